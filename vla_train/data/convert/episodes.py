"""What every converter shares: episodes in one in-memory layout -> an RLDS dataset written by our tfds
builder into DST/<name>/1.0.0/, plus the dataset's entry in DST/registry.yaml (standardize_fn identity),
so that a converted dataset trains through the same pipeline as any RLDS one.

An `Episode` holds arrays over its T steps under the keys

    image uint8 [T, H, W, 3] (required), wrist_image uint8 [T, H', W', 3], state float [T, S],
    action float [T, A] (required)

and one instruction (or one per step). A converter passes the per-step shapes, the episode keys of each
split and a function that loads an episode by its key: `write_rlds` asks for the episodes one at a time, in
split order, so a converter may decode each episode only when it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_train.data.errors import DatasetError
from vla_train.data.registry import DEFAULT_ACTION_DIM
from vla_train.data.rlds_steps import step_flag_features, step_flags

VERSION = "1.0.0"
IMAGE_KEYS = ("image", "wrist_image")
# the encoding an action width names by itself (the registry's default widths, inverted)
ENCODING_BY_DIM = {dim: encoding for encoding, dim in DEFAULT_ACTION_DIM.items()}


@dataclass
class Episode:
    path: Path  # where the episode came from (its file, or SRC/episode_<index> for a LeRobot episode)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    instruction: str | list[str] = ""  # one for the episode, or one per step
    control_frequency: float | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.path.name


def step_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The per-step shape of each array of an episode."""
    return {k: tuple(v.shape[1:]) for k, v in arrays.items()}


def action_encoding(choice: str, action_dim: int) -> str:
    """The registry's action_encoding: `choice`, or the one the action width names (choice 'auto')."""
    if choice != "auto":
        return choice
    if action_dim not in ENCODING_BY_DIM:
        raise DatasetError(
            f"actions have {action_dim} dimensions, which names no action encoding by itself; pass "
            f"--action_encoding (one of {sorted(set(ENCODING_BY_DIM.values()))}; the action_dim is written too)"
        )
    return ENCODING_BY_DIM[action_dim]


def val_keys(keys: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The episodes held out as the val split: a seeded `val_fraction` of them, at least one when there are
    two or more (and val_fraction > 0), never all."""
    num_val = int(round(len(keys) * val_fraction))
    if val_fraction > 0 and len(keys) > 1:
        num_val = max(1, min(num_val, len(keys) - 1))
    rng = np.random.default_rng(seed)
    return {keys[i] for i in rng.permutation(len(keys))[:num_val]}


def _builder_class(name: str, kind: str, shapes: dict, splits: dict, load: Callable, image_format: str):
    from vla_train.data.tf_setup import tfds

    def image(key: str):
        return tfds.features.Image(shape=shapes[key], dtype=np.uint8, encoding_format=image_format)

    observation = {k: image(k) for k in IMAGE_KEYS if k in shapes}
    if "state" in shapes:
        observation["state"] = tfds.features.Tensor(shape=shapes["state"], dtype=np.float32)

    class ConvertedEpisodes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Episodes converted by vla-convert (vla_train/data/convert/)."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): f"Converted by vla-convert {kind}."}

        def _info(self):
            steps = {
                "observation": tfds.features.FeaturesDict(observation),
                "action": tfds.features.Tensor(shape=shapes["action"], dtype=np.float32),
                "language_instruction": tfds.features.Text(),
                **step_flag_features(tfds),
            }
            metadata = {
                "file_path": tfds.features.Text(),
                "control_frequency": tfds.features.Scalar(dtype=np.float32),
            }
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"'{name}': episodes converted by vla-convert {kind}.",
                features=tfds.features.FeaturesDict(
                    {
                        "steps": tfds.features.Dataset(steps),
                        "episode_metadata": tfds.features.FeaturesDict(metadata),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            # tfds cannot write an empty split (val_fraction 0): such a split is left out
            return {split: self._generate_examples(keys) for split, keys in splits.items() if keys}

        def _generate_examples(self, keys):
            for key in keys:
                yield key, _example(load(key))

    ConvertedEpisodes.name = name
    return ConvertedEpisodes


def _example(ep: Episode) -> dict:
    a = ep.arrays
    T = len(a["action"])
    steps = []
    for t in range(T):
        obs = {k: a[k][t] for k in IMAGE_KEYS if k in a}
        if "state" in a:
            obs["state"] = a["state"][t].astype(np.float32)
        steps.append(
            {
                "observation": obs,
                "action": a["action"][t].astype(np.float32),
                "language_instruction": ep.instruction
                if isinstance(ep.instruction, str)
                else ep.instruction[t],
                **step_flags(t, T),
            }
        )
    freq = -1.0 if ep.control_frequency is None else ep.control_frequency
    return {"steps": steps, "episode_metadata": {"file_path": str(ep.path), "control_frequency": freq}}


def registry_entry(
    shapes: dict, encoding: str, state_encoding: str, control_frequency: float | None, notes: str
) -> dict:
    """The dataset's registry entry: our stored keys, identity standardization."""
    entry = {
        "image_obs_keys": {
            "primary": "image",
            "secondary": None,
            "wrist": "wrist_image" if "wrist_image" in shapes else None,
        },
        "state_obs_keys": ["state"] if "state" in shapes else [None],
        "state_encoding": state_encoding if "state" in shapes else "NONE",
        "action_encoding": encoding,
        "standardize_fn": "identity",
        "version": VERSION,
        "notes": notes,
    }
    if shapes["action"][0] != DEFAULT_ACTION_DIM[encoding]:
        entry["action_dim"] = int(shapes["action"][0])
    if control_frequency is not None:
        entry["control_frequency"] = control_frequency
    return entry


def write_rlds(
    dst: Path,
    name: str,
    kind: str,
    shapes: dict,
    splits: dict[str, list[str]],
    load: Callable[[str], Episode],
    image_format: str,
    entry: dict,
) -> dict:
    """Write the tfds dataset DST/<name>/1.0.0/ (splits: {split: episode keys}, each episode loaded by
    `load(key)` when it is written) and add `entry` to DST/registry.yaml. Returns where it went, its size
    on disk and the seconds it took."""
    import yaml

    out = dst / name / VERSION
    if out.exists():
        raise DatasetError(f"{out} exists already; remove it or choose another --dst or --name")
    from vla_train.data.tf_setup import tfds

    start = time.monotonic()
    builder = _builder_class(name, kind, shapes, splits, load, image_format)(data_dir=str(dst))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    registry = dst / "registry.yaml"
    entries = yaml.safe_load(registry.read_text()) if registry.is_file() else {}
    entries = entries or {}
    entries.setdefault("datasets", {})[name] = entry
    registry.write_text(yaml.safe_dump(entries, sort_keys=False))
    return {
        "dataset": name,
        "path": str(out),
        "registry_file": str(registry),
        "disk_mb": round(folder_bytes(out) / 2**20, 3),
        "seconds": round(time.monotonic() - start, 2),
        "train_with": (
            f"--data.data_root_dir {dst} --data.dataset_name {name} --data.registry_files [{registry}]"
        ),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

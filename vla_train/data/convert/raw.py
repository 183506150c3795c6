"""vla-convert raw SRC DST: a folder of per-episode `.npz` or `.hdf5` files -> an RLDS dataset written by
our tfds builder, plus the registry entry that makes it trainable.

One file per episode; arrays over its T steps (npz keys, or datasets at the root of an hdf5 file):

    image              uint8 [T, H, W, 3]   the primary camera (required)
    wrist_image        uint8 [T, H, W, 3]   a wrist camera (optional)
    state              float [T, S]         proprio (optional)
    action             float [T, A]         required; A = 7 is OpenVLA's layout: xyz and roll-pitch-yaw
                                            deltas, then the gripper (1 = open, 0 = closed)
    instruction        string               one per episode (required; npz: a 0-d string array, hdf5: a
                                            root attribute or a string dataset)
    control_frequency  number (Hz)          optional metadata

Other keys are ignored (and named once). Every file is checked before anything is written, and every
problem of every file (missing key, wrong shape or dtype, ragged lengths, NaN/inf, a shape that differs
from the other episodes) is reported at once, with the file and the key.

Output: `DST/<name>/1.0.0/` (tfds; frames as JPEG, or PNG with `--image_format png`, episodes split
into train and val) and `DST/registry.yaml` with the dataset's entry (standardize_fn `identity`). Train
with `--data.data_root_dir DST --data.dataset_name <name> --data.registry_files [DST/registry.yaml]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_train.config import ConvertRawConfig
from vla_train.data.errors import DatasetError
from vla_train.data.registry import DEFAULT_ACTION_DIM
from vla_train.data.rlds_steps import step_flag_features, step_flags

VERSION = "1.0.0"
SUFFIXES = (".npz", ".hdf5", ".h5")
ARRAY_KEYS = ("image", "wrist_image", "state", "action")
KNOWN_KEYS = (*ARRAY_KEYS, "instruction", "control_frequency")
# the encoding an action width names by itself (the registry's default widths, inverted)
ENCODING_BY_DIM = {dim: encoding for encoding, dim in DEFAULT_ACTION_DIM.items()}


@dataclass
class Episode:
    path: Path
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    instruction: str = ""
    control_frequency: float | None = None
    ignored: list[str] = field(default_factory=list)


def _text(value) -> str | None:
    value = np.asarray(value)
    if value.size != 1:
        return None
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        return item.decode("utf-8", "replace")
    return item if isinstance(item, str) else None


def read_episode(path: Path) -> tuple[Episode, list[str]]:
    """One episode file -> (episode, problems). Only reads; checks that need other episodes come later."""
    ep, problems = Episode(path), []
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
            attrs = {}
        else:
            import h5py

            with h5py.File(path, "r") as f:
                raw = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
                attrs = dict(f.attrs)
    except Exception as e:  # a file that cannot be read is one problem among the others
        return ep, [f"{path}: cannot be read ({type(e).__name__}: {e})"]
    for key in ARRAY_KEYS:
        if key in raw:
            ep.arrays[key] = np.asarray(raw[key])
    instruction = raw.get("instruction", attrs.get("instruction"))
    if instruction is None:
        problems.append(f"{path}: key 'instruction' is missing (one string per episode)")
    else:
        text = _text(instruction)
        if text is None or not text.strip():
            problems.append(
                f"{path}: key 'instruction' must be one non-empty string, got {instruction!r:.80}"
            )
        else:
            ep.instruction = text.strip()
    freq = raw.get("control_frequency", attrs.get("control_frequency"))
    if freq is not None:
        try:
            ep.control_frequency = float(np.asarray(freq).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            problems.append(f"{path}: key 'control_frequency' must be a number (Hz), got {freq!r:.40}")
    ep.ignored = sorted((set(raw) | set(attrs)) - set(KNOWN_KEYS))
    return ep, problems + _array_problems(ep)


def _array_problems(ep: Episode) -> list[str]:
    problems = []
    a = ep.arrays
    for key in ("image", "action"):
        if key not in a:
            problems.append(f"{ep.path}: key '{key}' is missing")
    for key in ("image", "wrist_image"):
        if key in a and (a[key].dtype != np.uint8 or a[key].ndim != 4 or a[key].shape[-1] != 3):
            problems.append(
                f"{ep.path}: key '{key}' must be uint8 [T, H, W, 3] (RGB), got {a[key].dtype} {list(a[key].shape)}"
            )
    for key in ("action", "state"):
        if key not in a:
            continue
        if a[key].dtype.kind not in "fiu" or a[key].ndim != 2:
            problems.append(
                f"{ep.path}: key '{key}' must be numbers [T, dim], got {a[key].dtype} {list(a[key].shape)}"
            )
            continue
        bad = ~np.isfinite(a[key].astype(np.float64))
        if bad.any():
            step = int(np.argwhere(bad)[0][0])
            problems.append(
                f"{ep.path}: key '{key}' has {int(bad.sum())} NaN/inf values (first at step {step})"
            )
    lengths = {k: len(v) for k, v in a.items() if v.ndim >= 1}
    if len(set(lengths.values())) > 1:
        problems.append(f"{ep.path}: ragged lengths, the keys must have one length T: {lengths}")
    elif lengths and not next(iter(lengths.values())):
        problems.append(f"{ep.path}: the episode has no steps (T = 0)")
    return problems


def _shape_of(ep: Episode) -> dict[str, tuple]:
    return {k: tuple(v.shape[1:]) for k, v in ep.arrays.items()}


def check_episodes(src: Path) -> tuple[list[Episode], list[str]]:
    files = sorted(p for p in src.iterdir() if p.suffix in SUFFIXES) if src.is_dir() else []
    if not files:
        raise DatasetError(f"{src}: no episode files ({', '.join(SUFFIXES)}); see `vla-convert raw --help`")
    episodes, problems, good = [], [], []
    for path in files:
        ep, found = read_episode(path)
        episodes.append(ep)
        problems += found
        if not found:
            good.append(ep)
    if good:  # every episode without problems of its own must look like the first of them
        first = good[0]
        reference = _shape_of(first)
        for ep in good[1:]:
            shapes = _shape_of(ep)
            for key in sorted(set(reference) | set(shapes)):
                if reference.get(key) != shapes.get(key):
                    have = "absent" if key not in shapes else f"per-step shape {list(shapes[key])}"
                    want = "absent" if key not in reference else f"{list(reference[key])}"
                    problems.append(f"{ep.path}: key '{key}' is {have}, but {first.path.name} has {want}")
    return episodes, problems


def _action_encoding(cfg: ConvertRawConfig, action_dim: int) -> str:
    if cfg.action_encoding != "auto":
        return cfg.action_encoding
    if action_dim not in ENCODING_BY_DIM:
        raise DatasetError(
            f"actions have {action_dim} dimensions, which names no action encoding by itself; pass "
            f"--action_encoding (one of {sorted(set(ENCODING_BY_DIM.values()))}; the action_dim is written too)"
        )
    return ENCODING_BY_DIM[action_dim]


def _builder_class(name: str, episodes: list[Episode], image_format: str, val_names: set[str]):
    from vla_train.data.tf_setup import tfds

    first = episodes[0].arrays

    def image(key: str):
        return tfds.features.Image(shape=first[key].shape[1:], dtype=np.uint8, encoding_format=image_format)

    observation = {k: image(k) for k in ("image", "wrist_image") if k in first}
    if "state" in first:
        observation["state"] = tfds.features.Tensor(shape=first["state"].shape[1:], dtype=np.float32)

    class RawEpisodes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Episodes converted by vla-convert raw (vla_train/data/convert/raw.py)."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Converted from per-episode files by vla-convert raw."}

        def _info(self):
            steps = {
                "observation": tfds.features.FeaturesDict(observation),
                "action": tfds.features.Tensor(shape=first["action"].shape[1:], dtype=np.float32),
                "language_instruction": tfds.features.Text(),
                **step_flag_features(tfds),
            }
            metadata = {
                "file_path": tfds.features.Text(),
                "control_frequency": tfds.features.Scalar(dtype=np.float32),
            }
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"'{name}': per-episode files converted by vla-convert raw.",
                features=tfds.features.FeaturesDict(
                    {
                        "steps": tfds.features.Dataset(steps),
                        "episode_metadata": tfds.features.FeaturesDict(metadata),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            val = [ep for ep in episodes if ep.path.name in val_names]
            train = [ep for ep in episodes if ep.path.name not in val_names]
            return {"train": self._generate_examples(train), "val": self._generate_examples(val)}

        def _generate_examples(self, split_episodes):
            for ep in split_episodes:
                yield ep.path.name, _example(ep)

    RawEpisodes.name = name
    return RawEpisodes


def _example(ep: Episode) -> dict:
    a = ep.arrays
    T = len(a["action"])
    steps = []
    for t in range(T):
        obs = {k: a[k][t] for k in ("image", "wrist_image") if k in a}
        if "state" in a:
            obs["state"] = a["state"][t].astype(np.float32)
        steps.append(
            {
                "observation": obs,
                "action": a["action"][t].astype(np.float32),
                "language_instruction": ep.instruction,
                **step_flags(t, T),
            }
        )
    freq = -1.0 if ep.control_frequency is None else ep.control_frequency
    return {"steps": steps, "episode_metadata": {"file_path": str(ep.path), "control_frequency": freq}}


def registry_entry(name: str, episodes: list[Episode], encoding: str, state_encoding: str) -> dict:
    first = episodes[0].arrays
    entry = {
        "image_obs_keys": {
            "primary": "image",
            "secondary": None,
            "wrist": "wrist_image" if "wrist_image" in first else None,
        },
        "state_obs_keys": ["state"] if "state" in first else [None],
        "state_encoding": state_encoding if "state" in first else "NONE",
        "action_encoding": encoding,
        "standardize_fn": "identity",
        "version": VERSION,
        "notes": f"Converted by vla-convert raw from {len(episodes)} episode files.",
    }
    if first["action"].shape[1] != DEFAULT_ACTION_DIM[encoding]:
        entry["action_dim"] = int(first["action"].shape[1])
    freqs = {ep.control_frequency for ep in episodes if ep.control_frequency is not None}
    if len(freqs) == 1:
        entry["control_frequency"] = freqs.pop()
    return entry


def convert_raw(cfg: ConvertRawConfig) -> dict:
    """Check every episode file of cfg.src, then write the tfds dataset and its registry entry to cfg.dst.
    Raises DatasetError listing every problem when any file is bad (nothing is written then)."""
    import yaml

    src, dst = Path(cfg.src), Path(cfg.dst)
    name = cfg.name or dst.name
    episodes, problems = check_episodes(src)
    if problems:
        shown = "\n  ".join(problems[:200]) + (
            f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        )
        raise DatasetError(
            f"{src}: {len(problems)} problem(s) in the episode files, nothing written:\n  {shown}"
        )
    encoding = _action_encoding(cfg, episodes[0].arrays["action"].shape[1])
    num_val = int(round(len(episodes) * cfg.val_fraction))
    if cfg.val_fraction > 0 and len(episodes) > 1:
        num_val = max(1, min(num_val, len(episodes) - 1))
    rng = np.random.default_rng(cfg.seed)
    val_names = {episodes[i].path.name for i in rng.permutation(len(episodes))[:num_val]}
    out = dst / name / VERSION
    if out.exists():
        raise DatasetError(f"{out} exists already; remove it or choose another --dst or --name")
    from vla_train.data.tf_setup import tfds

    builder = _builder_class(name, episodes, cfg.image_format, val_names)(data_dir=str(dst))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    registry = dst / "registry.yaml"
    entries = yaml.safe_load(registry.read_text()) if registry.is_file() else {}
    entries = entries or {}
    entries.setdefault("datasets", {})[name] = registry_entry(name, episodes, encoding, cfg.state_encoding)
    registry.write_text(yaml.safe_dump(entries, sort_keys=False))
    ignored = sorted({k for ep in episodes for k in ep.ignored})
    return {
        "dataset": name,
        "path": str(out),
        "registry_file": str(registry),
        "episodes": {"train": len(episodes) - len(val_names), "val": len(val_names)},
        "frames": int(sum(len(ep.arrays["action"]) for ep in episodes)),
        "ignored_keys": ignored,
        "train_with": (
            f"--data.data_root_dir {dst} --data.dataset_name {name} --data.registry_files [{registry}]"
        ),
    }

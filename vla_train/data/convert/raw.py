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

from pathlib import Path

import numpy as np

from vla_train.config import ConvertRawConfig
from vla_train.data.convert.episodes import (
    Episode,
    action_encoding,
    registry_entry,
    step_shapes,
    val_keys,
    write_rlds,
)
from vla_train.data.errors import DatasetError

SUFFIXES = (".npz", ".hdf5", ".h5")
ARRAY_KEYS = ("image", "wrist_image", "state", "action")
KNOWN_KEYS = (*ARRAY_KEYS, "instruction", "control_frequency")


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
        reference = step_shapes(first.arrays)
        for ep in good[1:]:
            shapes = step_shapes(ep.arrays)
            for key in sorted(set(reference) | set(shapes)):
                if reference.get(key) != shapes.get(key):
                    have = "absent" if key not in shapes else f"per-step shape {list(shapes[key])}"
                    want = "absent" if key not in reference else f"{list(reference[key])}"
                    problems.append(f"{ep.path}: key '{key}' is {have}, but {first.path.name} has {want}")
    return episodes, problems


def convert_raw(cfg: ConvertRawConfig) -> dict:
    """Check every episode file of cfg.src, then write the tfds dataset and its registry entry to cfg.dst.
    Raises DatasetError listing every problem when any file is bad (nothing is written then)."""
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
    shapes = step_shapes(episodes[0].arrays)
    encoding = action_encoding(cfg.action_encoding, shapes["action"][0])
    by_key = {ep.key: ep for ep in episodes}
    val = val_keys(list(by_key), cfg.val_fraction, cfg.seed)
    splits = {"train": [k for k in by_key if k not in val], "val": [k for k in by_key if k in val]}
    freqs = {ep.control_frequency for ep in episodes if ep.control_frequency is not None}
    notes = f"Converted by vla-convert raw from {len(episodes)} episode files."
    entry = registry_entry(
        shapes, encoding, cfg.state_encoding, freqs.pop() if len(freqs) == 1 else None, notes
    )
    written = write_rlds(dst, name, "raw", shapes, splits, by_key.__getitem__, cfg.image_format, entry)
    return {
        **written,
        "episodes": {"train": len(splits["train"]), "val": len(splits["val"])},
        "frames": int(sum(len(ep.arrays["action"]) for ep in episodes)),
        "ignored_keys": sorted({k for ep in episodes for k in ep.ignored}),
    }

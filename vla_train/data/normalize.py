"""Action/proprio normalization (OpenVLA semantics) and dataset statistics, computed once and cached.

Statistics: one streaming pass over the numeric fields only (images are never decoded), giving
`mean, std, min, max, q01, q99` for action and proprio plus `num_transitions`, `num_trajectories`.
They are cached as JSON under a key that changes when the data or the standardization changes.

This module imports no TensorFlow at import time: exported models use `unnormalize` without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

NORMALIZATIONS = ("bounds_q99", "bounds", "normal")


def default_action_mask(action_dim: int) -> list[bool]:
    """7-DoF EEF deltas + gripper: normalize the first action_dim - 1 dims, pass the gripper raw."""
    return [True] * (action_dim - 1) + [False]


def _bounds(stats: dict, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "bounds_q99":
        return np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    if mode == "bounds":
        return np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
    raise ValueError(f"unknown normalization '{mode}'; use one of {NORMALIZATIONS}")


def normalize(x: np.ndarray, stats: dict, mode: str, mask: list[bool] | None = None) -> np.ndarray:
    """Physical -> normalized. Dimensions with mask False pass through; min == max dims become 0.

    Computed as OpenVLA's tf.data graph computes `clip(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1)`:
    its statistics are float64 numpy arrays (read from JSON) and the frames float32 tensors, so the
    denominator is formed in float64 and cast, and every op with the frame runs in float32. The normalized
    values, and so the action tokens, are then OpenVLA's bit for bit (one float64 pass differs by up to
    2.4e-7, enough to move a value across a bin edge)."""
    f32 = np.float32
    x = np.asarray(x, f32)
    m = np.ones(x.shape[-1], bool) if mask is None else np.asarray(mask, bool)
    if mode == "normal":
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        out = (x - mean.astype(f32)) / (std + 1e-8).astype(f32)
    else:
        low, high = _bounds(stats, mode)
        scale = (high - low + 1e-8).astype(f32)
        out = np.clip(f32(2) * (x - low.astype(f32)) / scale - f32(1), f32(-1), f32(1))
    out = np.where(m, out, x)
    if mode != "normal":
        out = np.where(np.asarray(stats["min"]) == np.asarray(stats["max"]), f32(0), out)
    return out.astype(f32)


def normalize_proprio_batch(
    proprio: np.ndarray, dataset_names: list[str], statistics: dict[str, Any], mode: str
) -> np.ndarray:
    """Normalize each frame's proprio ([B, P] or a window [B, W, P]) with its dataset's proprio
    statistics, as actions are (every dimension; a mixture's zero padding beyond a dataset's own width
    stays 0). A dataset without proprio gives zeros."""
    x = np.asarray(proprio, np.float32)
    out = np.zeros_like(x)
    per_dataset = "action" not in statistics  # {dataset: stats} (mixture.is_per_dataset)
    for name in sorted(set(dataset_names)):
        stats = (statistics[name] if per_dataset else statistics).get("proprio") or {}
        width = len(stats.get("q01", []))
        if not width:
            continue
        rows = np.asarray([n == name for n in dataset_names])
        out[rows, ..., :width] = normalize(x[rows, ..., :width], stats, mode)
    return out


def unnormalize(
    a: np.ndarray, stats: dict, mode: str = "bounds_q99", mask: list[bool] | None = None
) -> np.ndarray:
    """Normalized -> physical (the inverse of `normalize` on the masked dims)."""
    a = np.asarray(a, np.float64)
    m = np.asarray(stats.get("mask", [True] * a.shape[-1]) if mask is None else mask, bool)
    if mode == "normal":
        out = a * (np.asarray(stats["std"]) + 1e-8) + np.asarray(stats["mean"])
    else:
        low, high = _bounds(stats, mode)
        out = 0.5 * (a + 1) * (high - low) + low
    return np.where(m, out, a).astype(np.float32)


def summarize(values: np.ndarray) -> dict[str, list[float]]:
    v = np.asarray(values, np.float64)
    return {
        "mean": v.mean(0).tolist(),
        "std": v.std(0).tolist(),
        "max": v.max(0).tolist(),
        "min": v.min(0).tolist(),
        "q01": np.quantile(v, 0.01, axis=0).tolist(),
        "q99": np.quantile(v, 0.99, axis=0).tolist(),
    }


def statistics_from_trajectories(trajectories, action_mask: list[bool]) -> dict[str, Any]:
    """trajectories: iterable of dicts with numpy `action` [T, A] and `proprio` [T, P] (numeric only)."""
    actions, proprios, num_traj = [], [], 0
    for traj in trajectories:
        actions.append(np.asarray(traj["action"]))
        proprios.append(np.asarray(traj["proprio"]))
        num_traj += 1
    if num_traj == 0:
        raise ValueError("the dataset has no episodes: cannot compute statistics")
    action = np.concatenate(actions)
    proprio = np.concatenate(proprios)
    if not np.isfinite(action).all():
        raise ValueError("the dataset's actions contain NaN or inf values: fix or filter those episodes")
    return {
        "action": {**summarize(action), "mask": list(action_mask)},
        "proprio": summarize(proprio) if proprio.shape[-1] else {},
        "num_transitions": int(action.shape[0]),
        "num_trajectories": num_traj,
    }


def cache_key(
    dataset_info: dict[str, Any], state_keys: list[str], standardize_fn: str, action_mask: list[bool]
) -> str:
    """Changes with the data, the state keys, the standardization (name and code) and the action mask."""
    blob = json.dumps(
        {
            "info": dataset_info,
            "state": state_keys,
            "fn": standardize_fn,
            "mask": list(map(bool, action_mask)),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stats_cache_path(cache_dir: str | Path, dataset_name: str, key: str) -> Path:
    return Path(cache_dir) / f"{dataset_name}_{key}.json"


def load_cached(path: Path) -> dict[str, Any] | None:
    if path.is_file():
        return json.loads(path.read_text())
    return None


def save_cached(path: Path, stats: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=2))
    tmp.replace(path)  # atomic: a reader never sees a half-written file

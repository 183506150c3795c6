"""Dataset mixtures: weights (optionally balanced by dataset size), per-dataset statistics and the split of a
thread budget across datasets. No TensorFlow at import time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vla_train.config import DataConfig


def run_datasets(data: DataConfig) -> tuple[tuple[str, float], ...]:
    """The (dataset, raw weight) pairs a run reads: data.mixture's, or (data.dataset_name, 1.0) alone.

    The one answer to "which datasets": the trainer, export and vla-stats ask it once, where they start
    (after config validation), and pass the result on. It registers data.registry_files process-wide (read
    once; registering again is a no-op), so that the pipeline finds the run's own datasets.
    """
    from vla_train.data.registry import add_registry_files

    registry = add_registry_files(data.registry_files)
    if not data.mixture:
        return ((data.dataset_name, 1.0),)
    return tuple((name, float(weight)) for name, weight in registry.mixture(data.mixture))


def normalized_weights(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
    return (w / w.sum()).tolist()


def balance_weights(weights: Sequence[float], num_transitions: Sequence[int]) -> list[float]:
    """OpenVLA's `balance_weights`: weight x num_transitions of each dataset, renormalized to sum 1."""
    if len(weights) != len(num_transitions):
        raise ValueError("one num_transitions per mixture weight")
    return normalized_weights(np.asarray(weights, np.float64) * np.asarray(num_transitions, np.float64))


def allocate_threads(budget: int, weights: Sequence[float]) -> list[int]:
    """Split `budget` threads across datasets proportionally to their weights, each getting >= 1; the
    counts sum to `budget` (OpenVLA's `allocate_threads`). Needs budget >= number of datasets."""
    w = np.asarray(normalized_weights(weights))
    n = len(w)
    if budget < n:
        raise ValueError(f"a thread budget of {budget} cannot give each of {n} datasets one thread")
    allocation = np.zeros(n, dtype=int)
    left = budget
    # datasets that would get less than one thread get exactly one; re-split the rest among the others
    while True:
        small = (w * left < 1) & (w >= 0) & (allocation == 0)
        if not small.any():
            break
        allocation[small] = 1
        left -= int(small.sum())
        w = np.where(small, 0.0, w)
        if w.sum() == 0:
            break
        w = w / w.sum()
    if left > 0 and w.sum() > 0:
        fractional, integral = np.modf(w * left)
        allocation += integral.astype(int)
        left -= int(integral.sum())
        for i in np.argsort(-fractional, kind="stable")[:left]:
            allocation[i] += 1
    return allocation.tolist()


def is_per_dataset(statistics: Mapping[str, Any]) -> bool:
    """True for {dataset_name: stats}, False for one dataset's stats (which has an 'action' entry)."""
    return "action" not in statistics


def mixture_statistics(
    data_root_dir: str, datasets: Sequence[str], cache_dir: str = "", on_bad_data: str = "raise"
) -> dict[str, Any]:
    """{dataset_name: statistics} of every dataset of a mixture (each from its own cache entry)."""
    from vla_train.data.rlds import get_statistics

    return {name: get_statistics(data_root_dir, name, cache_dir, on_bad_data) for name in datasets}


def resolve_mixture(
    datasets: Sequence[tuple[str, float]],
    balance: bool = False,
    num_transitions: Mapping[str, int] | None = None,
) -> list[tuple[str, float]]:
    """(dataset, normalized weight) pairs; with `balance`, weights are multiplied by num_transitions."""
    names = [d for d, _ in datasets]
    weights = [float(w) for _, w in datasets]
    if balance:
        if num_transitions is None or any(n not in num_transitions for n in names):
            raise ValueError("balance_weights needs num_transitions of every dataset of the mixture")
        weights = balance_weights(weights, [num_transitions[n] for n in names])
    else:
        weights = normalized_weights(weights)
    return list(zip(names, weights, strict=True))


__all__ = [
    "run_datasets",
    "allocate_threads",
    "balance_weights",
    "is_per_dataset",
    "mixture_statistics",
    "normalized_weights",
    "resolve_mixture",
]

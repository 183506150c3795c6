"""Normalization and statistics against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_train.data.normalize import normalize, statistics_from_trajectories, unnormalize


def stats_of(values):
    v = np.asarray(values, np.float64)
    return {
        "mean": v.mean(0),
        "std": v.std(0),
        "min": v.min(0),
        "max": v.max(0),
        "q01": np.quantile(v, 0.01, axis=0),
        "q99": np.quantile(v, 0.99, axis=0),
        "mask": [True, True, False],
    }


def test_bounds_q99_hand_computed():
    stats = {
        "q01": [0.0, -2.0, 0.0],
        "q99": [10.0, 2.0, 1.0],
        "min": [0.0, -3.0, 0.0],
        "max": [10.0, 3.0, 1.0],
    }
    x = np.array([[5.0, 1.0, 0.0], [12.0, -4.0, 1.0]])
    out = normalize(x, stats, "bounds_q99", mask=[True, True, False])
    # 2 * (5 - 0) / 10 - 1 = 0; 2 * (1 + 2) / 4 - 1 = 0.5; gripper raw; 12 and -4 clip to 1 and -1
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.0], [1.0, -1.0, 1.0]], atol=1e-6)


def test_bounds_and_normal_and_constant_dims():
    stats = {
        "min": [1.0, 2.0],
        "max": [3.0, 2.0],
        "q01": [0, 0],
        "q99": [1, 1],
        "mean": [1.0, 4.0],
        "std": [2.0, 0.5],
    }
    np.testing.assert_allclose(
        normalize([[2.0, 2.0]], stats, "bounds"), [[0.0, 0.0]], atol=1e-6
    )  # min==max -> 0
    np.testing.assert_allclose(normalize([[5.0, 5.0]], stats, "normal"), [[2.0, 2.0]], atol=1e-6)


def test_unnormalize_inverts_masked_dims():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1000, 3)) * [1, 5, 0.1]
    values[:, 2] = rng.integers(0, 2, 1000)
    s = stats_of(values)
    inside = values[(values[:, 0] > s["q01"][0]) & (values[:, 0] < s["q99"][0])][:10]
    inside = inside[(inside[:, 1] > s["q01"][1]) & (inside[:, 1] < s["q99"][1])]
    back = unnormalize(normalize(inside, s, "bounds_q99", s["mask"]), s, "bounds_q99")
    np.testing.assert_allclose(back, inside, atol=1e-5)
    # unnormalize: 0.5 * (a + 1) * (q99 - q01) + q01
    a = np.array([[0.0, 1.0, 0.7]])
    expect = [0.5 * (s["q99"][0] + s["q01"][0]), s["q99"][1], 0.7]
    np.testing.assert_allclose(unnormalize(a, s), [expect], atol=1e-5)


def test_statistics_hand_computed():
    trajs = [
        {"action": np.array([[0.0, 1.0], [2.0, 1.0]]), "proprio": np.array([[1.0], [3.0]])},
        {"action": np.array([[4.0, 0.0]]), "proprio": np.array([[5.0]])},
    ]
    st = statistics_from_trajectories(iter(trajs), [True, False])
    assert st["num_transitions"] == 3 and st["num_trajectories"] == 2
    assert st["action"]["mean"] == pytest.approx([2.0, 2 / 3])
    assert st["action"]["min"] == [0.0, 0.0] and st["action"]["max"] == [4.0, 1.0]
    assert st["action"]["q01"][0] == pytest.approx(0.04)  # index 0.01 * (3 - 1) = 0.02 between 0 and 2
    assert st["action"]["q99"][0] == pytest.approx(3.96)  # index 1.98 between 2 and 4
    assert st["proprio"]["std"] == pytest.approx([np.std([1.0, 3.0, 5.0])])
    assert st["action"]["mask"] == [True, False]
    json.dumps(st)  # serializable as is


def test_statistics_reject_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        statistics_from_trajectories([{"action": np.array([[np.nan]]), "proprio": np.zeros((1, 1))}], [True])
    with pytest.raises(ValueError, match="no episodes"):
        statistics_from_trajectories([], [True])

"""The bookkeeping every RLDS step carries (is_first, is_last, is_terminal, reward, discount): its tfds
features and its values, shared by our builders (the synthetic dataset, Meta-World demonstrations, the
converters). The reward is 1 on the last step of an episode (they are all successful demonstrations)."""

from __future__ import annotations

import numpy as np


def step_flag_features(tfds) -> dict:
    """tfds features of the bookkeeping fields, to merge into a builder's step features."""
    return {
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
        "reward": tfds.features.Scalar(dtype=np.float32),
        "discount": tfds.features.Scalar(dtype=np.float32),
    }


def step_flags(t: int, num_steps: int) -> dict:
    """The bookkeeping values of step t of an episode of num_steps steps."""
    last = t == num_steps - 1
    return {"is_first": t == 0, "is_last": last, "is_terminal": last, "reward": float(last), "discount": 1.0}

"""Shared fixtures: a small synthetic RLDS dataset written once per session by the real tfds builder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """(data_root_dir, SyntheticDataConfig) of a 24-episode, 4-step, 32 px synthetic dataset."""
    from vla_train.config import SyntheticDataConfig
    from vla_train.data.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    cfg = SyntheticDataConfig(
        num_train_episodes=24, num_val_episodes=6, steps_per_episode=4, image_size=32, seed=3
    )
    build_synthetic_dataset(root, cfg)
    return root, cfg

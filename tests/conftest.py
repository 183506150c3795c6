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


# The longest test files first (minutes each, measured serially: e2e ~6.5, distributed ~5.5, action_heads
# ~5, faults ~2.5, slurm ~1.7): `make test` hands whole files to two workers in this order (xdist's own
# reordering, by test count, is off), so the long ones do not start last and leave one worker idle at the end.
LONGEST_FIRST = (
    "test_e2e.py",
    "test_distributed.py",
    "test_action_heads.py",
    "test_faults.py",
    "test_slurm.py",
    "test_preflight.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept

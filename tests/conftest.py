"""Shared fixtures: a small synthetic RLDS dataset written once per session by the real tfds builder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """(data_root_dir, SyntheticDataConfig) of a 24-episode, 4-step, 32 px synthetic dataset."""
    from vla_train.config import SyntheticDataConfig
    from vla_train.data.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    cfg = SyntheticDataConfig(num_train_episodes=24, num_val_episodes=6, steps_per_episode=4, image_size=32, seed=3)
    build_synthetic_dataset(root, cfg)
    return root, cfg


def run_cli(entry: str, *args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console entry point (vla_train.cli:<entry>) in a fresh interpreter, as a user would."""
    code = f"import sys; from vla_train.cli import {entry}; {entry}(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

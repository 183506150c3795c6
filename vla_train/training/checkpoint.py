"""Checkpoints: trainable weights (adapters only for LoRA), optimizer, step, RNG state, data position and
config, written to a temporary directory and committed by an atomic rename, so that a kill during a write
leaves the previous checkpoint as the newest committed one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CKPT_DIR = "checkpoints"
STEP_PREFIX = "step_"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit: a checkpoint exists only once this rename happened
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    p = Path(path)
    return {
        "trainable": load_file(str(p / "trainable.safetensors")),
        "optimizer": torch.load(p / "optimizer.pt", weights_only=False),
        "rng": torch.load(p / "rng.pt", weights_only=False),
        "state": json.loads((p / "state.json").read_text()),
    }

"""Checkpoints that resume a run exactly and survive a kill at any moment.

Layout of `<run_dir>/checkpoints/step_NNNNNNNN/`:

    dcp/                  torch.distributed.checkpoint (DCP): trainable weights only (adapters and
                          modules_to_save for LoRA) under `model.*`, AdamW state under `optimizer.*`;
                          sharded under FSDP2, resharded on load to any world size or strategy
    scheduler.pt          learning-rate scheduler state
    rng_rank<R>.pt        rank R's RNG states (torch, CUDA, numpy, python)
    data_rank<R>.json     rank R's data-stream position (its read shards' positions, ShardedStream.state_dict)
                          and how the data was sharded
    config.yaml           the run config
    state.json            step, world size, strategy, ...; written last

Every file is written into `.tmp_step_NNNNNNNN/` and the directory is committed by one atomic rename:
a checkpoint exists only once that rename happened, so a kill during a write leaves the previous
checkpoint as the newest. Older checkpoints beyond `keep_last` are deleted after the commit.

Reading a checkpoint back needs no process group: `load_checkpoint` (used by export) reads the DCP
tensors in one process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_train.training.distributed import DistContext, barrier

CKPT_DIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
DCP_DIR = "dcp"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_uncommitted(run_dir: str | Path) -> list[Path]:
    """Delete temporary directories of writes that never committed (call on rank 0, before training)."""
    root = Path(run_dir) / CKPT_DIR
    stale = sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ---- state dicts ------------------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    """A parameter's name without wrapper prefixes (DDP's `module.`, activation checkpointing's)."""
    parts = [p for p in name.split(".") if p != "_checkpoint_wrapped_module"]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, keyed by clean names: DTensor shards under FSDP2, plain tensors
    otherwise. They share storage with the parameters, so DCP loads into the model in place.

    (torch's get_model_state_dict walks `model.state_dict()`, which fails on bitsandbytes' 8-bit layers:
    they add state-dict entries such as `weight.SCB` that are no module attributes.)
    """
    return {_clean_name(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, final: Path) -> None:
    """The commit of a checkpoint: its fully written temporary directory becomes `final` by one atomic
    rename (a step saved again, e.g. a finished run resumed, is replaced), made durable by fsyncs."""
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext,
    *,
    data_state: dict[str, Any],
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 2,
) -> Path:
    """Write and commit the checkpoint of `step`. Call on every rank (`data_state` is this rank's).

    Assumes `run_dir` is on a file system every rank sees (as multi-node training needs anyway).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root = Path(run_dir) / CKPT_DIR
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    dcp.save(
        {"model": _model_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=str(tmp / DCP_DIR),
        no_dist=not ctx.has_group,
    )
    torch.save(_rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    _write_text(tmp / f"data_rank{ctx.rank}.json", json.dumps(data_state, indent=2))
    barrier(ctx)
    if ctx.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_text(tmp / "config.yaml", config_yaml)
        meta = {
            "step": step,
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
            "time": round(time.time(), 3),
            **state,
        }
        _write_text(tmp / "state.json", json.dumps(meta, indent=2))
        commit(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Restored:
    step: int
    saved_world_size: int
    # every saving rank's data position, by rank (a rank reads the read shards it now owns from them)
    data_states: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what a resume on another world size did


def restore_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext,
) -> Restored:
    """Load trainable weights, optimizer, scheduler and this rank's RNG state. Call on every rank.

    Weights and optimizer state are resharded by DCP to the current world size and strategy. RNG states
    come from this rank's file; a rank without one (the world grew) is seeded from the step and rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    p = Path(path)
    state = json.loads((p / "state.json").read_text())
    saved_keys = {
        k[len("model.") :] for k in _dcp_metadata(p / DCP_DIR).state_dict_metadata if k.startswith("model.")
    }
    model_state = _model_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer)
    missing, unexpected = sorted(set(model_state) - saved_keys), sorted(saved_keys - set(model_state))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {p} does not hold this run's trainable weights (was the LoRA / finetune_mode setup "
            f"changed?): missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    to_load = {"model": model_state, "optimizer": optim_state}
    dcp.load(to_load, checkpoint_id=str(p / DCP_DIR), no_dist=not ctx.has_group)
    set_optimizer_state_dict(model, optimizer, to_load["optimizer"])
    scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=False))

    notes = []
    saved_world = int(state.get("world_size", 1))
    rng_file = p / f"rng_rank{ctx.rank}.pt"
    if saved_world == ctx.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        seed_everything(int(state["step"]) * 1000 + ctx.rank)
        notes.append(
            f"RNG states re-seeded per rank from the step since the world size changed {saved_world} -> "
            f"{ctx.world_size}"
        )
    data_files = [p / f"data_rank{r}.json" for r in range(saved_world)]
    data_states = [json.loads(f.read_text()) for f in data_files if f.is_file()]
    return Restored(int(state["step"]), saved_world, data_states, notes)


def _dcp_metadata(dcp_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    if not dcp_dir.is_dir():
        raise ValueError(
            f"checkpoint {dcp_dir.parent} has no {DCP_DIR}/ directory: it was written by an older vla_train "
            "(trainable.safetensors format); start a new logging.run_id or delete that run's checkpoints"
        )
    return FileSystemReader(str(dcp_dir)).read_metadata()


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable weights of a checkpoint, read in one process without a group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp_dir = Path(path) / DCP_DIR
    meta = _dcp_metadata(dcp_dir).state_dict_metadata
    model = {
        k[len("model.") :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load({"model": model}, checkpoint_id=str(dcp_dir), no_dist=True)
    return model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """What export and tools need, in one process: {"trainable": name -> full tensor, "state": state.json}.

    Names are the trained module's parameter names: the VLA's for full fine-tunes, the VLA-inside-peft's
    (`...lora_A.default.weight`) for LoRA runs (`models.peft.load_adapter_state_dict` takes them).
    """
    p = Path(path)
    return {
        "trainable": read_trainable(p),
        "state": json.loads((p / "state.json").read_text()),
    }

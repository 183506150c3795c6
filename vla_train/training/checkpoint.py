"""Checkpoints that resume a run exactly and survive a kill at any moment.

Layout of `<run_dir>/checkpoints/step_NNNNNNNN/`:

    dcp/                  torch.distributed.checkpoint (DCP): trainable weights only (adapters and
                          modules_to_save for LoRA) under `model.*`, AdamW state under `optimizer.*`;
                          sharded under FSDP2, resharded on load to any world size or strategy
    scheduler.json        learning-rate scheduler state (`scheduler.state_dict()`)
    rng_rank<R>.safetensors  rank R's RNG states: the torch CPU and CUDA generator states as uint8
                          tensors, numpy's and Python's states as JSON in the header's metadata
    data_rank<R>.json     rank R's data-stream position (its read shards' positions, ShardedStream.state_dict)
                          and how the data was sharded
    config.yaml           the run config
    state.json            step, world size, strategy, ...; written last

Every file is written into `.tmp_step_NNNNNNNN/` and the directory is committed by one atomic rename:
a checkpoint exists only once that rename happened, so a kill during a write leaves the previous
checkpoint as the newest. Older checkpoints beyond `keep_last` are deleted after the commit.

Reading a checkpoint back needs no process group: `load_checkpoint` (used by export) reads the DCP
tensors in one process.

No pickle runs on load, so a checkpoint from elsewhere cannot run code: vla_train's own files are JSON and
safetensors, and a file of them that holds a pickle is refused (`PickledCheckpointError`). DCP pickles
its `.metadata` and the non-tensor entries (optimizer hyperparameters, saved by `torch.save`) and
unpickles both on load; before DCP reads them, `_check_dcp` scans those pickles (`pickletools`) and
refuses any reference to a Python global outside what our checkpoints hold (`_DCP_METADATA_GLOBALS`;
none in the entries). Checkpoints of older vla_train versions (`scheduler.pt`, `rng_rank<R>.pt`:
unrestricted pickles) are refused for resuming; export, which reads only `dcp/` and state.json, still
reads them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import shutil
import time
import zipfile
from collections.abc import Callable
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
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng_rank{rank}.safetensors"
OLD_PICKLE_FILES = ("scheduler.pt", "rng_rank*.pt")  # written by vla_train before pickles were refused


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


def _rng_bytes() -> bytes:
    """This process's RNG states as a safetensors file: torch's generator states as tensors, numpy's and
    Python's (integers and floats; JSON keeps floats exactly) as JSON in the header's metadata."""
    from safetensors.torch import save

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    rest = {"numpy": [name, key.tolist(), pos, has_gauss, gauss], "python": [version, list(mt), gauss_next]}
    return save(tensors, metadata={"json": json.dumps(rest)})


def _read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What `_rng_bytes` wrote: (tensors, the JSON part)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["json"])
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise _unreadable(path, "a safetensors file of RNG states") from e


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, key, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = rest["python"]
    random.setstate((version, tuple(mt), gauss_next))


# ---- no pickles on load ------------------------------------------------------------------------------


class PickledCheckpointError(ValueError):
    """A checkpoint file holds pickled Python objects that loading would have to run."""


def _refused(path: Path | str, why: str) -> PickledCheckpointError:
    return PickledCheckpointError(
        f"{path}: checkpoint refused: it holds pickled Python objects ({why}), which could run arbitrary "
        "code when loaded, beyond what vla_train's own checkpoints hold. Do not use checkpoints from sources "
        "you do not trust; if this run is yours (written by another vla_train or torch version), start a "
        "new logging.run_id or delete that run's checkpoints"
    )


def _is_pickle(data: bytes) -> bool:
    """Whether `data` is a pickle or a torch.save archive (a zip holding one)."""
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            return any(n.endswith(".pkl") for n in zipfile.ZipFile(io.BytesIO(data)).namelist())
        for _ in pickletools.genops(data):
            pass
    except Exception:
        return False
    return True


def _unreadable(path: Path, kind: str) -> ValueError:
    """The error for a checkpoint file that is not the `kind` it should be: PickledCheckpointError when
    it holds a pickle instead."""
    if _is_pickle(path.read_bytes()):
        return _refused(path, f"instead of {kind}")
    return ValueError(f"{path}: checkpoint file is not {kind} (corrupt or not written by vla_train)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, "JSON") from e


# What the DCP `.metadata` pickles of our checkpoints reference, as (module, name): found in those of full
# fine-tunes, LoRA (+ modules_to_save), DDP and FSDP2 on 1 and 2 processes; torch dtypes besides.
# (`pathlib._local` is where Python 3.13+ pickles PosixPath from.)
_DCP_METADATA_CLASSES = ("Metadata", "StorageMeta", "MetadataIndex", "BytesStorageMetadata")
_DCP_METADATA_CLASSES += (
    "TensorStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_DCP_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in _DCP_METADATA_CLASSES]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size")]
    + [("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")]
)


def _metadata_global(module: str, name: str) -> bool:
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return (module, name) in _DCP_METADATA_GLOBALS


_NO_STACK_EFFECT = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def _check_pickle(where: str, data: bytes, allowed: Callable[[str, str], bool]) -> None:
    """Refuse the pickle `data` unless every global it references (GLOBAL, INST, STACK_GLOBAL) is
    `allowed`; it may not use persistent ids or the copyreg extension registry either.

    STACK_GLOBAL takes module and name from the stack: `pushed` holds, per opcode that changes the stack,
    the string it pushed or None, so the two strings under STACK_GLOBAL are known or it is refused.
    """
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            ref = None
            if op.name in ("GLOBAL", "INST"):
                ref = tuple(arg.split(" ", 1))
            elif op.name == "STACK_GLOBAL":
                ref = tuple(pushed[-2:])
                if len(ref) < 2 or None in ref:
                    raise _refused(where, "a global whose name is computed")
            elif op.name in ("PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"):
                raise _refused(where, f"opcode {op.name}")
            if ref is not None and not allowed(*ref):
                raise _refused(where, f"a reference to {'.'.join(ref)}")
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name.endswith("PUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name.endswith("GET"):
                pushed.append(memo.get(arg))
            elif op.name not in _NO_STACK_EFFECT:
                pushed.append(arg if op.name.endswith("UNICODE") else None)
    except PickledCheckpointError:
        raise
    except Exception as e:
        raise _refused(where, f"a malformed pickle: {e}") from e


def _check_dcp(dcp_dir: Path):
    """DCP's metadata of `dcp_dir`, read after `_check_pickle` passed on it and on every non-tensor entry
    (which DCP would `torch.load(weights_only=False)`; ours hold plain values, no globals)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    raw = (dcp_dir / ".metadata").read_bytes()
    _check_pickle(str(dcp_dir / ".metadata"), raw, _metadata_global)
    meta = pickle.loads(raw)  # only allowlisted classes and functions: safe
    if not isinstance(meta, Metadata):
        raise ValueError(f"{dcp_dir / '.metadata'} is no DCP metadata (corrupt or not written by vla_train)")
    entries = {k for k, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    for index, info in meta.storage_data.items():
        if index.fqn not in entries:
            continue
        where = f"{dcp_dir / info.relative_path} (entry {index.fqn})"
        with open(dcp_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        if info.transform_descriptors or not zipfile.is_zipfile(blob):
            raise _refused(where, "an entry not in torch.save's zip format, which cannot be checked")
        with zipfile.ZipFile(blob) as z:
            for name in (n for n in z.namelist() if n.endswith(".pkl")):
                _check_pickle(where, z.read(name), lambda *ref: False)
    return meta


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


def _write_file(path: Path, data: str | bytes) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
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
    _write_file(tmp / RNG_FILE.format(rank=ctx.rank), _rng_bytes())
    _write_file(tmp / f"data_rank{ctx.rank}.json", json.dumps(data_state, indent=2))
    barrier(ctx)
    if ctx.is_main:
        _write_file(tmp / SCHEDULER_FILE, json.dumps(scheduler.state_dict(), indent=2))
        _write_file(tmp / "config.yaml", config_yaml)
        meta = {
            "step": step,
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
            "time": round(time.time(), 3),
            **state,
        }
        _write_file(tmp / "state.json", json.dumps(meta, indent=2))
        commit(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


BEST_DIR = "best"  # <run_dir>/best: a copy of the checkpoint with the best validation metric so far
BEST_FILE = "best.json"


def best_record(run_dir: str | Path) -> dict[str, Any] | None:
    """{metric, mode, value, step} of the run's best checkpoint, or None."""
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def keep_best(run_dir: str | Path, checkpoint: Path, record: dict[str, Any]) -> Path:
    """Copy the committed `checkpoint` to <run_dir>/best with `record` (its metric and value), replacing
    the previous best in one rename; it is kept whatever keep_last_checkpoints deletes. Rank 0 only."""
    final = Path(run_dir) / BEST_DIR
    tmp = Path(run_dir) / f"{TMP_PREFIX}{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    _write_file(tmp / BEST_FILE, json.dumps({**record, "checkpoint": checkpoint.name}, indent=2))
    commit(tmp, final)
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
    old = sorted(f.name for pattern in OLD_PICKLE_FILES for f in p.glob(pattern))
    if old:
        raise PickledCheckpointError(
            f"checkpoint {p} was written by an older vla_train: its {', '.join(old)} are pickles, which cannot "
            "be loaded safely (unpickling can run arbitrary code); start a new logging.run_id or delete that "
            "run's checkpoints (vla-export still reads them)"
        )
    # every file is read and checked before anything is loaded into the model
    state = _read_json(p / "state.json")
    saved_keys = {
        k[len("model.") :] for k in _dcp_metadata(p / DCP_DIR).state_dict_metadata if k.startswith("model.")
    }
    scheduler_state = _read_json(p / SCHEDULER_FILE)
    saved_world = int(state.get("world_size", 1))
    rng_file = p / RNG_FILE.format(rank=ctx.rank)
    rng = _read_rng(rng_file) if saved_world == ctx.world_size and rng_file.is_file() else None
    data_files = [p / f"data_rank{r}.json" for r in range(saved_world)]
    data_states = [_read_json(f) for f in data_files if f.is_file()]

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
    scheduler.load_state_dict(scheduler_state)

    notes = []
    if rng is not None:
        _set_rng_state(*rng)
    else:
        seed_everything(int(state["step"]) * 1000 + ctx.rank)
        notes.append(
            f"RNG states re-seeded per rank from the step since the world size changed {saved_world} -> "
            f"{ctx.world_size}"
        )
    return Restored(int(state["step"]), saved_world, data_states, notes)


def _dcp_metadata(dcp_dir: Path):
    """DCP's metadata of a checkpoint, once `_check_dcp` found no pickled object outside the allowlist."""
    if not dcp_dir.is_dir():
        raise ValueError(
            f"checkpoint {dcp_dir.parent} has no {DCP_DIR}/ directory: it was written by an older vla_train "
            "(trainable.safetensors format); start a new logging.run_id or delete that run's checkpoints"
        )
    return _check_dcp(dcp_dir)


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
        "state": _read_json(p / "state.json"),
    }

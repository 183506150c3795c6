"""Every torch.distributed call of the trainer: the process group (from torchrun's environment, or a
one-process group when FSDP/DDP is asked for without torchrun), DDP and FSDP2 wrapping (full or hybrid
shard, mixed precision, activation checkpointing), FSDP2 sharding of a meta-device model with each rank
reading only its shard of the weights file, the global gradient norm, and the few collectives the
trainer needs (sums over ranks, barrier, broadcast).

Functions whose docstring says "call on every rank" are collectives: every rank must call them, in the
same order, or the job hangs until the watchdog (`distributed.timeout_s`) fails it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from vla_train.config import DistributedConfig, launch_world_size

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from vla_train.models.load import SafetensorsRows


@dataclass
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str  # resolved: single | ddp | fsdp
    precision: str  # resolved: bf16 | fp32
    backend: str | None  # None when no process group exists (strategy single)
    started_group: bool  # this process created the group (and destroys it at shutdown)
    mesh: Any = None  # the FSDP DeviceMesh (1-D "shard", or 2-D "replicate" x "shard")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        return self.backend is not None


def resolve_strategy(strategy: str, world_size: int) -> str:
    """auto: one process trains without wrappers, several with DDP (choose fsdp explicitly)."""
    if strategy == "auto":
        return "single" if world_size == 1 else "ddp"
    return strategy


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    if mixed_precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return mixed_precision


def collective_timeout_s(cfg: DistributedConfig, step_timeout_s: int = 0) -> int:
    """The process group's timeout: distributed.timeout_s, or (0) a minute above the step watchdog's
    bound, so that the watchdog, which names the stalled step, fires first (1800 s without one)."""
    if cfg.timeout_s:
        return cfg.timeout_s
    return step_timeout_s + 60 if step_timeout_s else 1800


def init_distributed(cfg: DistributedConfig, step_timeout_s: int = 0) -> DistContext:
    """Start (or join) the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK, with the
    collective timeout of `collective_timeout_s` (and NCCL's asynchronous error handling on GPU, so a
    timed-out collective ends the process instead of hanging it).

    Without torchrun, `single` runs without any group and `ddp`/`fsdp` get a one-process group (an
    in-memory store), so the same code path and checkpoint format serve one process and many.
    """
    world_size = launch_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    strategy = resolve_strategy(cfg.strategy, world_size)
    precision = resolve_precision(cfg.mixed_precision, device)
    if strategy == "single":
        assert world_size == 1, "config validation rejects strategy single on several processes"
        return DistContext(0, 1, 0, device, strategy, precision, None, False)

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=collective_timeout_s(cfg, step_timeout_s))
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    started = False
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # torchrun (or srun exporting the same variables)
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        started = True
    ctx = DistContext(
        dist.get_rank(), dist.get_world_size(), local_rank, device, strategy, precision, backend, started
    )
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        replicas = cfg.fsdp_hybrid_replicas
        if replicas > 1:
            ctx.mesh = init_device_mesh(
                device.type, (replicas, ctx.world_size // replicas), mesh_dim_names=("replicate", "shard")
            )
        else:
            ctx.mesh = init_device_mesh(device.type, (ctx.world_size,), mesh_dim_names=("shard",))
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.started_group and dist.is_initialized():
        dist.destroy_process_group()


# ---- model wrapping -------------------------------------------------------------------------------


def apply_activation_checkpointing(vla: nn.Module) -> None:
    """Wrap every decoder layer and vision block so its activations are recomputed in backward.

    The wrapper adds `_checkpoint_wrapped_module` to parameter names; the checkpoint code reads state
    through torch.distributed.checkpoint's state-dict API, which strips it, so checkpoints do not depend
    on this setting.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    vla.disable_kv_cache()
    for blocks in vla.repeated_blocks():
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def wrap_model(vla: nn.Module, ctx: DistContext, cfg: DistributedConfig) -> nn.Module:
    """Parallelize `vla` (already on ctx.device, trainable parameters chosen; for fsdp its parameters may
    be on the meta device, see shard_from_file) for ctx.strategy.

    Returns the module to call for training. For fsdp that is `vla` itself (sharded in place); for ddp a
    DistributedDataParallel wrapper around it; for single `vla`. Evaluation calls `vla` directly in all
    cases (`predict_action_tokens` is registered as an FSDP forward method). Call on every rank.
    """
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(vla)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        # The projector's output (fc3 on [B, P, D]) is a view; the VLA only reads it out of place (cast,
        # concat), which is what the warning asks for.
        warnings.filterwarnings(
            "ignore",
            message=r"FSDP2-wrapped module \((FSDPFusedMLPProjector|FSDPModulesToSaveWrapper)\) returned a view",
        )
        if ctx.precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for blocks in vla.repeated_blocks():
            for block in blocks:
                fully_shard(block, mesh=ctx.mesh, mp_policy=mp)
        fully_shard(vla.projector, mesh=ctx.mesh, mp_policy=mp)
        fully_shard(vla, mesh=ctx.mesh, mp_policy=mp)
        register_fsdp_forward_method(vla, "predict_action_tokens")
        return vla
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(vla, device_ids=device_ids)
    return vla


def shard_from_file(
    vla: nn.Module, ctx: DistContext, cfg: DistributedConfig, weights_file: str | Path
) -> nn.Module:
    """FSDP2 without a whole copy of the model anywhere: shard `vla`, built on the meta device with its
    trainable weights chosen (LoRA adapters, if any, already real), with wrap_model's plan, then give each
    meta parameter this rank's shard only, read from the safetensors file `weights_file` (its rows of
    dim 0, the rows FSDP2 assigns this rank) in the dtype the meta parameter has: fp32 master weights for
    full fine-tuning, the stored dtype for LoRA's frozen base. Tied weights stay tied (one tensor, read
    once). Returns what wrap_model returns. Call on every rank.
    """
    from torch.distributed.tensor import DTensor

    from vla_train.models.load import SafetensorsRows, file_key

    assert ctx.strategy == "fsdp", "shard_from_file serves the fsdp strategy only"
    model = wrap_model(vla, ctx, cfg)
    with SafetensorsRows(weights_file) as weights:
        for name, param in vla.named_parameters():  # a tied weight once
            if not param.is_meta:
                continue
            assert isinstance(param, DTensor), f"{name} was not sharded by fully_shard"
            shard = _local_rows(weights, file_key(name), param, ctx.device)
            # swap_tensors keeps the parameter object, which FSDP2 (and every tied alias) refers to.
            torch.utils.swap_tensors(param, nn.Parameter(shard, requires_grad=param.requires_grad))
        for name, buf in vla.named_buffers():
            if buf.is_meta:  # persistent buffers are not sharded: every rank reads them whole
                full = weights.read_rows(file_key(name), 0, buf.shape[0] if buf.dim() else 1, buf.dtype)
                torch.utils.swap_tensors(buf, full.to(ctx.device))
    left = [n for n, t in [*vla.named_parameters(), *vla.named_buffers()] if t.is_meta]
    assert not left, f"still on the meta device after loading: {left[:8]}"
    return model


def _local_rows(weights: SafetensorsRows, key: str, param: DTensor, device: torch.device) -> DTensor:
    """This rank's shard of the DTensor `param`, read from `weights` into a DTensor on `device`. FSDP2
    splits dim 0 as torch.chunk does (the last ranks' chunks may be smaller, or empty) and pads
    internally; hybrid sharding replicates that over the other mesh dimension."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if param.dim() == 0:
        rows = weights.read_rows(key, 0, 1, param.dtype)
    else:
        # FSDP2 shards dim 0 only (tensor parallelism would shard others; this trainer has none).
        assert tuple(shape[1:]) == tuple(param.shape[1:]) and not any(offset[1:]), (key, shape, offset)
        assert tuple(shape) == tuple(param.to_local().shape), (key, shape, param.to_local().shape)
        rows = weights.read_rows(key, offset[0], offset[0] + shape[0], param.dtype)
    return DTensor.from_local(
        rows.to(device),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def reshard(vla: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward without backward (evaluation).

    The root module does not reshard after forward, expecting the backward; after evaluation its
    parameters would stay unsharded, and the optimizer (which holds the sharded ones) and checkpoints
    would see other tensors. Local (no collective); a no-op without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in vla.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def autocast(ctx: DistContext):
    """bf16 autocast for single/DDP runs in bf16; FSDP casts through its MixedPrecisionPolicy instead."""
    if ctx.precision == "bf16" and ctx.strategy != "fsdp":
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step.

    FSDP2 keeps reduce-scattering every micro-batch (as torchtitan does): skipping it would hold unsharded
    gradients, the memory FSDP exists to save.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to the global gradient norm over all ranks and return it (max_norm 0: measure only).

    Under FSDP2 the gradients are sharded DTensors and torch's clip computes the norm of the whole
    (unsharded) gradient; under DDP every rank already holds the all-reduced gradient. Call on every rank.
    """
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ---- collectives ----------------------------------------------------------------------------------


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of a list of numbers over ranks (float64). Call on every rank."""
    if not ctx.has_group or ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_over_ranks(sums: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum metric dictionaries over ranks; ranks may hold different keys (e.g. per-dataset sums).

    Call on every rank.
    """
    if not ctx.has_group or ctx.world_size == 1:
        return dict(sums)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, sums)
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def barrier(ctx: DistContext) -> None:
    """Call on every rank."""
    if ctx.has_group and ctx.world_size > 1:
        dist.barrier()


def long_barrier(ctx: DistContext, timeout_s: float) -> None:
    """A barrier with its own timeout instead of the collective watchdog's (a gloo group made for it),
    for phases that may take hours on some rank, such as the first statistics pass over a large mixture.
    Call on every rank."""
    if not ctx.has_group or ctx.world_size == 1:
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def local_world_size() -> int:
    """The processes torchrun started on this node (LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cores_per_rank() -> int:
    """The CPU cores this process may use. A process bound to some cores (its affinity mask narrower than
    the machine: numactl, SLURM's --cpu-bind) uses its mask; otherwise the node's cores are split among
    the processes torchrun started on it (LOCAL_WORLD_SIZE)."""
    machine = os.cpu_count() or 1
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    if mask < machine:
        return max(1, mask)
    return max(1, machine // local_world_size())


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, by rank. Call on every rank."""
    if not ctx.has_group or ctx.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank. Call on every rank."""
    if not ctx.has_group or ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

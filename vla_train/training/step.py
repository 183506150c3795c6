"""One optimizer step on model inputs: forward/backward of each micro-batch (gradients synced on the
last), the global gradient norm and clipping, the optimizer and schedule step.

It imports neither the data pipeline nor TensorFlow, so the trainer (`trainer.train_step`, which turns
stream batches into model inputs first) and the GPU benchmark (`scripts/bench_gpu.py`, which feeds
pre-made inputs) run the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vla_train.models.vla import VLA
from vla_train.training.distributed import (
    DistContext,
    all_reduce_sum,
    autocast,
    clip_grad_norm,
    gradient_sync,
)
from vla_train.training.metrics import accumulate, action_metrics


@dataclass
class StepParts:
    """What an optimizer step works with (a trainer Run has these and more)."""

    ctx: DistContext
    vla: VLA  # the model itself (sharded in place under FSDP)
    model: torch.nn.Module  # what the training forward calls (the DDP wrapper, or `vla`)
    processor: Any
    params: list[torch.Tensor]  # the trainable parameters (clipped together)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_grad_norm: float  # training.max_grad_norm (0: measured, not clipped)


@dataclass
class StepResult:
    sums: dict[str, Any]  # metric sums of the step's micro-batches on this rank (metrics.action_metrics)
    loss: float  # the last micro-batch's loss on this rank (for the progress bar)
    lr: float  # the learning rate of this step
    grad_norm: float  # before clipping, over all ranks (non-finite: the step was not applied)
    stop: bool = False  # some rank was asked to stop: this is the run's last step
    losses: list[float] = field(default_factory=list)  # this rank's micro-batch losses (non-finite steps)
    datasets: list[str] = field(default_factory=list)  # the datasets of each micro-batch (idem)

    @property
    def nonfinite(self) -> bool:
        return not math.isfinite(self.grad_norm)


def optimizer_step(
    parts: StepParts,
    inputs: list[dict[str, torch.Tensor]],
    dataset_names: list[list[str] | None] | None = None,
    stop_requested: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches of model inputs (the processor's collate output);
    dataset_names[i]: micro-batch i's dataset per row, for per-dataset sums (None: not split). Call on
    every rank.

    One collective comes first: the step's supervised-token count over all ranks and micro-batches (the
    loss is the sum of token losses over it), and whether any rank was asked to stop (the step still
    runs: `stop` says it is the last). A non-finite global gradient norm (any rank's loss or gradient
    non-finite; every rank sees the same norm) leaves the weights, optimizer and schedule untouched
    (`losses` then holds this rank's micro-batch losses).
    """
    ctx, c = parts.ctx, parts.vla.config
    n_tok = [parts.processor.supervised_count(x) for x in inputs]
    n_tok_global, stop = all_reduce_sum([sum(n_tok), float(stop_requested)], ctx)
    lr = parts.optimizer.param_groups[0]["lr"]
    sums: dict[str, Any] = {}
    losses = []
    for i, x in enumerate(inputs):
        with gradient_sync(parts.model, enabled=i == len(inputs) - 1):
            with autocast(ctx):
                out = parts.model(**{k: v.to(ctx.device) for k, v in x.items()})
            # DDP and FSDP average gradients over ranks, hence the world size factor.
            (out.loss * (n_tok[i] * ctx.world_size / n_tok_global)).backward()
        losses.append(out.loss.detach())
        names = dataset_names[i] if dataset_names else None
        accumulate(sums, action_metrics(out, parts.processor.action_tokenizer, names))
        frames = x["input_ids_BL"].shape[0]
        tokens = int(x["attention_mask_BL"].sum()) + frames * c.num_prefix_tokens
        if "actions_BKA" in x:  # the l1_parallel head's slots
            tokens += frames * c.num_action_slots
        accumulate(sums, {"frames": frames, "tokens": tokens})
    grad_norm = clip_grad_norm(parts.params, parts.max_grad_norm)
    result = StepResult(sums, out.loss.item(), lr, grad_norm, stop=bool(stop))
    if result.nonfinite:
        result.losses = [float(x) for x in losses]
    else:
        parts.optimizer.step()
        parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return result

"""The optimizer (AdamW, weight decay on matrices only) and the learning-rate schedule (constant or
linear warmup + cosine) of a run."""

from __future__ import annotations

import math
from functools import partial

import torch

from vla_train.config import TrainingConfig


def lr_factor(step: int, t: TrainingConfig) -> float:
    """Learning-rate multiplier for the optimizer step that follows `step` completed steps."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_for(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norms (1-D) get no weight decay. Fused (one kernel
    per group of tensors, no temporaries the size of the states) when every trainable parameter is a
    floating-point CUDA tensor; torch's default (single-tensor on CPU) otherwise."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = uses_fused_adamw([*decay, *no_decay])
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True if fused else None
    )


def pin_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Choose fused or torch's default AdamW for the parameters as they are now. A restored optimizer state
    brings its param_groups' `fused`/`foreach` from where it was saved (a GPU checkpoint resumed on a
    CPU, or one saved before AdamW was fused on CUDA): call after loading one."""
    fused = uses_fused_adamw([p for g in optimizer.param_groups for p in g["params"]])
    for g in optimizer.param_groups:
        g["fused"], g["foreach"] = (True if fused else None), None
        for p in g["params"] if fused else []:  # the fused kernel takes its step counts on the device
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def uses_fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether optimizer_for makes a fused AdamW for these parameters: all on CUDA, all floating point."""
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def schedule_for(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t=t))

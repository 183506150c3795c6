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
    """AdamW over the trainable parameters; biases and norms (1-D) get no weight decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def schedule_for(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t=t))

"""The training loop, top to bottom: process group -> data -> model (+LoRA or a freeze mode) ->
parallelize (single / DDP / FSDP2) -> optimizer and schedule -> resume -> steps (micro-batches, clipping,
metrics summed over ranks, validation, checkpoints, preemption) -> final validation and checkpoint.

Every run writes to <output_dir>/<run_id>/; only rank 0 writes logs and prints. Every torch.distributed
call lives in training/distributed.py, and the checkpoint format in training/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import draccus
import numpy as np
import torch

from vla_train.config import TrainConfig, TrainingConfig, to_yaml
from vla_train.data.loader import FrameStream, StreamSpec
from vla_train.data.mixture import mixture_statistics, resolve_mixture
from vla_train.data.rlds import collect_instructions, open_builder, split_for
from vla_train.data.synthetic import build_synthetic_dataset
from vla_train.models.load import build_from_config, load_model_dir, save_model_dir
from vla_train.models.peft import apply_lora, set_finetune_mode
from vla_train.models.prompting import IGNORE_INDEX
from vla_train.training.checkpoint import (
    Restored,
    latest_checkpoint,
    remove_uncommitted,
    restore_checkpoint,
    save_checkpoint,
    seed_everything,
)
from vla_train.training.distributed import (
    DistContext,
    all_reduce_sum,
    autocast,
    barrier,
    broadcast_object,
    clip_grad_norm,
    gradient_sync,
    init_distributed,
    reshard,
    shutdown,
    sum_over_ranks,
    wrap_model,
)
from vla_train.training.logging import MetricsLogger, NullLogger
from vla_train.training.metrics import accumulate, action_metrics, finalize, generated_metrics
from vla_train.training.preemption import PreemptionWatcher

BASE_MODEL_DIR = "base_model"


def run_dir_of(cfg: TrainConfig) -> Path:
    run_id = cfg.logging.run_id or time.strftime("run_%Y%m%d_%H%M%S")
    return Path(cfg.logging.output_dir) / run_id


def stream_spec(
    cfg: TrainConfig,
    image_size: int,
    train: bool,
    batch_size: int | None = None,
    seed: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> StreamSpec:
    """The frame stream of a run's training (train=True) or validation (train=False) data: every dataset
    of `data.mixture` (or `data.dataset_name` alone) with the config's trajectory transforms."""
    d = cfg.data
    return StreamSpec(
        data_root_dir=d.data_root_dir,
        dataset_name=d.dataset_name,
        image_size=image_size,
        batch_size=batch_size or cfg.training.batch_size,
        seed=cfg.training.seed if seed is None else seed,
        train=train,
        normalization=d.normalization,
        shuffle_buffer_size=d.shuffle_buffer_size,
        image_augmentation=d.image_augmentation and train,
        ablation=d.ablation,
        num_parallel_calls=d.num_parallel_calls,
        num_shards=num_shards,
        shard_index=shard_index,
        datasets=d.datasets() if d.mixture else [],
        balance_weights=d.balance_weights,
        future_action_window_size=d.future_action_window_size,
        window_size=d.window_size,
        max_action=d.max_action,
        max_proprio=d.max_proprio,
        subsample_length=d.subsample_length if train else 0,
        goal_relabeling=d.goal_relabeling,
        cameras=list(d.cameras),
        ram_budget_gb=d.ram_budget_gb,
        on_bad_data=d.on_bad_data,
    )


def dataset_names(cfg: TrainConfig) -> list[str]:
    """The datasets a run reads: those of data.mixture, or data.dataset_name alone."""
    return [name for name, _ in cfg.data.datasets()]


def run_statistics(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """{dataset_name: statistics} of every dataset of the run (each computed once and cached under
    data.stats_cache_dir), plus the normalization mode: OpenVLA's `norm_stats` layout, which FrameStream
    also accepts as per-dataset statistics."""
    stats = mixture_statistics(
        cfg.data.data_root_dir, dataset_names(cfg), cfg.data.stats_cache_dir, cfg.data.on_bad_data
    )
    return {name: {**s, "normalization": cfg.data.normalization} for name, s in stats.items()}


def run_instructions(cfg: TrainConfig) -> list[str]:
    """The distinct instructions of the training splits of every dataset of the run (for the tokenizer)."""
    instructions: set[str] = set()
    for name in dataset_names(cfg):
        builder = open_builder(cfg.data.data_root_dir, name)
        instructions.update(collect_instructions(builder, split_for(builder, train=True)))
    out = sorted(instructions)
    if cfg.data.ablation == "fixed_instruction":
        from vla_train.data.loader import FIXED_INSTRUCTION

        out.append(FIXED_INSTRUCTION)
    return out


def mask_padded_chunk_labels(labels_BL: torch.Tensor, action_pad_mask: np.ndarray, action_dim: int) -> None:
    """Action chunking: set the labels of chunk steps past the episode end to IGNORE_INDEX (in place).

    Each row's supervised labels are its (F + 1) x action_dim action tokens, step by step, then EOS
    (processor.collate tokenizes the whole [F + 1, A] chunk); `action_pad_mask` [B, F + 1] is False for
    the steps past the end, whose tokens stay in the input but are not learned (EOS still is).
    """
    pad = np.asarray(action_pad_mask, bool)
    steps = pad.shape[1]
    for b in range(labels_BL.shape[0]):
        positions = (labels_BL[b] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        if len(positions) != steps * action_dim + 1:
            raise ValueError(
                f"row {b} has {len(positions)} supervised labels, expected {steps} x {action_dim} action "
                "tokens + EOS"
            )
        past_end = positions[:-1].view(steps, action_dim)[torch.as_tensor(~pad[b])]
        labels_BL[b, past_end.reshape(-1)] = IGNORE_INDEX


def model_inputs(processor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model inputs of a batch: its normalized actions ([B, A], or [B, F + 1, A] chunks) as action tokens;
    chunk steps past the episode end are excluded from the loss."""
    inputs = processor.collate(batch["image"], batch["instruction"], batch["action"])
    if "action_pad_mask" in batch:
        mask_padded_chunk_labels(inputs["labels_BL"], batch["action_pad_mask"], batch["action"].shape[-1])
    return inputs


def current_action(batch: dict[str, Any], key: str = "action") -> np.ndarray:
    """[B, A]: each frame's own action (the first step of a chunk), what predict_action outputs."""
    action = np.asarray(batch[key])
    return action[:, 0] if "action_pad_mask" in batch else action


@dataclass
class DataPlan:
    """How this rank reads its micro-batches (see training.data_sharding)."""

    micro_batch: int  # frames per rank per micro-batch
    stream_batch: int  # frames per batch of this rank's stream
    num_shards: int
    shard_index: int
    rows: slice  # the rows of each stream batch this rank keeps


def data_plan(t: TrainingConfig, ctx: DistContext) -> DataPlan:
    micro = t.batch_size // (ctx.world_size * t.grad_accum_steps)
    if t.data_sharding == "batch_slice":
        rows = slice(ctx.rank * micro, (ctx.rank + 1) * micro)
        return DataPlan(micro, micro * ctx.world_size, 1, 0, rows)
    return DataPlan(micro, micro, ctx.world_size, ctx.rank, slice(None))


def lr_factor(step: int, t: TrainingConfig) -> float:
    """Learning-rate multiplier for the optimizer step that follows `step` completed steps."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.training.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def _rows(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] for k, v in batch.items()}


def resume_data_position(
    restored: Restored, plan: DataPlan, t: TrainingConfig, ctx: DistContext
) -> tuple[int, int, str]:
    """(stream seed, batches to skip, what was done) for a resumed run."""
    saved = restored.data_state
    old_world = restored.saved_world_size
    if (
        saved is not None
        and old_world == ctx.world_size
        and saved.get("sharding") == t.data_sharding
        and saved.get("stream_batch") == plan.stream_batch
    ):
        pos = int(saved["stream"]["num_batches_yielded"])
        return int(saved["seed"]), pos, f"data position restored ({pos} batches of this rank's stream)"
    if saved is not None and saved.get("sharding") == t.data_sharding == "batch_slice":
        frames = restored.step * t.batch_size
        return (
            int(saved["seed"]),
            frames // plan.stream_batch,
            f"data position kept: batch_slice reads one global stream at any world size, continuing after "
            f"its first {frames} frames (world size {old_world} -> {ctx.world_size})",
        )
    seed = t.seed + restored.step
    why = (
        f"world size changed {old_world} -> {ctx.world_size}"
        if old_world != ctx.world_size
        else "the data layout changed (data_sharding, batch size or grad_accum_steps)"
    )
    return (
        seed,
        0,
        f"data position restarted from the beginning of a reshuffled stream (seed {seed}) since {why}",
    )


@torch.no_grad()
def validate(
    vla: torch.nn.Module,
    processor,
    cfg: TrainConfig,
    statistics: dict,
    image_size: int,
    ctx: DistContext,
    batch_size: int,
) -> dict:
    """One ordered pass over the first `num_val_frames` frames of the validation split (of every dataset
    of a mixture, interleaved at the mixture's weights). Call on every rank.

    statistics: {dataset_name: statistics} (run_statistics); physical errors use each frame's own.

    Every rank reads the same ordered frames and evaluates every world_size-th batch; ranks without a
    batch in the last round evaluate a discarded one, so that all ranks run the same number of forwards
    (FSDP gathers parameters collectively). The sums are added over ranks: the result does not depend on
    the world size.

    Besides the teacher-forced metrics (OpenVLA's: each action token predicted from the true previous
    ones), greedy decoding gives `val/generated_*`: what `predict_action` would output. Teacher forcing
    leaks information (once the true first tokens are given, later ones may follow from them), so only
    the generated metrics show what a policy knows on its own.
    """
    if cfg.training.num_val_frames == 0:
        return {}
    was_training = vla.training
    vla.eval()
    sums: dict[str, Any] = {}

    def evaluate(batch: dict[str, Any], keep: bool) -> None:
        inputs = model_inputs(processor, batch)
        pixels = processor.pixel_values(batch["image"], train=False).to(ctx.device)
        with autocast(ctx):
            out = vla(**{k: v.to(ctx.device) for k, v in inputs.items()})
            generated = vla.predict_action_tokens(processor.inference_prompts(batch["instruction"]), pixels)
        if keep:
            names = batch["dataset_name"]
            accumulate(sums, action_metrics(out, processor.action_tokenizer, names, statistics))
            # greedy decoding yields one action per frame: compared with the frame's own (a chunk's first)
            accumulate(
                sums,
                generated_metrics(generated.cpu().numpy(), current_action(batch), processor.action_tokenizer),
            )
            sums["frames"] = sums.get("frames", 0) + len(batch["instruction"])

    seen, count, mine, first = 0, 0, 0, None
    for batch in FrameStream(stream_spec(cfg, image_size, train=False, batch_size=batch_size), statistics):
        take = min(len(batch["instruction"]), cfg.training.num_val_frames - seen)
        batch = _rows(batch, slice(0, take))
        first = batch if first is None else first
        if count % ctx.world_size == ctx.rank:
            evaluate(batch, keep=True)
            mine += 1
        count += 1
        seen += take
        if seen >= cfg.training.num_val_frames:
            break
    for _ in range(math.ceil(count / ctx.world_size) - mine):
        evaluate(first, keep=False)
    reshard(vla)
    vla.train(was_training)
    total = sum_over_ranks(sums, ctx)
    return {**finalize(total, "val"), "val/num_frames": int(total.get("frames", 0))}


def train(cfg: TrainConfig, return_model: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run on this process's rank; returns the final metrics (on every rank).

    `return_model` adds the trained module (the VLA; sharded under FSDP) under "model", for tests.
    """
    ctx = init_distributed(cfg.distributed)
    try:
        return _train(cfg, ctx, return_model)
    finally:
        shutdown(ctx)


def _train(cfg: TrainConfig, ctx: DistContext, return_model: bool) -> dict[str, Any]:
    t = cfg.training

    def say(msg: str) -> None:
        if ctx.is_main:
            print(msg, flush=True)

    run_dir = Path(broadcast_object(str(run_dir_of(cfg)), ctx))
    config_yaml = to_yaml(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        for stale in remove_uncommitted(run_dir):
            say(f"removed the uncommitted checkpoint write {stale.name} (the run was stopped during it)")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    seed_everything(t.seed)

    # ---- data: rank 0 builds the synthetic set and the statistics cache, the others read them ---------
    # Statistics are per dataset ({dataset_name: stats + normalization}, OpenVLA's norm_stats), one entry
    # for each dataset of a mixture: every frame is normalized (and unnormalized) with its own dataset's.
    if ctx.is_main:
        if cfg.data.build_synthetic:
            build_synthetic_dataset(cfg.data.data_root_dir, cfg.data.synthetic)
        norm_stats = run_statistics(cfg)
    norm_stats = broadcast_object(norm_stats if ctx.is_main else None, ctx)  # computed once, on rank 0
    if ctx.is_main:
        (run_dir / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))

    # ---- model: pretrained directory, or built once from config and saved as the run's base model. Every
    # rank then loads the same directory, so all ranks (and a resumed run) start from identical weights.
    base_dir = Path(cfg.model.pretrained_dir) if cfg.model.pretrained_dir else run_dir / BASE_MODEL_DIR
    if ctx.is_main and not cfg.model.pretrained_dir and not (base_dir / "config.json").is_file():
        built, built_processor = build_from_config(cfg.model, run_instructions(cfg), seed=t.seed)
        save_model_dir(base_dir, built, built_processor, norm_stats)
        del built, built_processor
    barrier(ctx)
    model, processor = load_model_dir(base_dir)
    model.config.norm_stats = norm_stats
    image_size = model.config.image_size

    torch.manual_seed(t.seed)  # the same adapter init on every rank
    if cfg.lora.enabled:
        vla = apply_lora(model, cfg.lora, ctx.device).get_base_model()
        mode = f"LoRA r={cfg.lora.rank}" + (
            f" over {cfg.lora.quantization} base weights" if cfg.lora.quantization != "none" else ""
        )
    else:
        set_finetune_mode(model, t.finetune_mode)
        # fp32 master weights even from a bf16 checkpoint (openvla-7b); mixed precision casts for compute.
        vla = model.to(ctx.device, dtype=torch.float32)
        mode = f"{t.finetune_mode} fine-tune"
    vla.train()
    num_trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in vla.parameters())
    model_w = wrap_model(vla, ctx, cfg.distributed)
    params = [p for p in model_w.parameters() if p.requires_grad]
    optimizer = optimizer_for(model_w, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t=t))
    torch.manual_seed(t.seed + 1 + ctx.rank)  # per-rank randomness from here on (e.g. LoRA dropout)

    # ---- resume from the newest committed checkpoint -------------------------------------------------
    plan = data_plan(t, ctx)
    step, restored_step, data_seed, skip = 0, None, t.seed, 0
    ckpt = broadcast_object(latest_checkpoint(run_dir), ctx)
    if ckpt is not None:
        restored = restore_checkpoint(ckpt, model_w, optimizer, scheduler, ctx)
        step = restored_step = restored.step
        data_seed, skip, data_note = resume_data_position(restored, plan, t, ctx)
        say(
            f"resuming {run_dir} from {ckpt.name} (step {step}, saved by {restored.saved_world_size} rank(s))"
        )
        for note in [*restored.notes, data_note]:
            say(f"  {note}")
    stream = FrameStream(
        stream_spec(cfg, image_size, True, plan.stream_batch, data_seed, plan.num_shards, plan.shard_index),
        norm_stats,
    )
    if skip:
        stream.load_state_dict({"num_batches_yielded": skip, "seed": data_seed})

    def data_state() -> dict[str, Any]:
        return {
            "stream": stream.state_dict(),
            "seed": data_seed,
            "sharding": t.data_sharding,
            "stream_batch": plan.stream_batch,
            "rank": ctx.rank,
        }

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir,
            step,
            model_w,
            optimizer,
            scheduler,
            ctx,
            data_state=data_state(),
            state={"lora": cfg.lora.enabled, "data_sharding": t.data_sharding},
            config_yaml=config_yaml,
            keep_last=t.keep_last_checkpoints,
        )

    say(
        f"run {run_dir}: {num_trainable / 1e6:.3f}M trainable of {num_total / 1e6:.3f}M parameters, {mode}, "
        f"{ctx.strategy} on {ctx.world_size} process(es), {ctx.precision}, device {ctx.device}; global batch "
        f"{t.batch_size} = {ctx.world_size} x {t.grad_accum_steps} x {plan.micro_batch}"
    )
    if cfg.data.mixture:
        weights = resolve_mixture(
            cfg.data.datasets(),
            cfg.data.balance_weights,
            {name: s["num_transitions"] for name, s in norm_stats.items()},
        )
        say(
            f"data: mixture '{cfg.data.mixture}' of {len(weights)} datasets, sampling weights "
            + ", ".join(f"{name} {w:.3f}" for name, w in weights)
        )
    logger = (
        MetricsLogger(run_dir, cfg.logging, draccus.encode(cfg), t.max_steps, step)
        if ctx.is_main
        else NullLogger()
    )
    watcher = PreemptionWatcher()
    sums: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    last_saved = restored_step
    preempted = ""
    try:
        batches = iter(stream) if step < t.max_steps else iter(())
        while step < t.max_steps:
            micro = [_rows(next(batches), plan.rows) for _ in range(t.grad_accum_steps)]
            inputs = [model_inputs(processor, b) for b in micro]
            n_tok = [int((x["labels_BL"][:, 1:] != IGNORE_INDEX).sum()) for x in inputs]
            # One collective per step: the step's supervised tokens over all ranks, and whether any rank
            # was asked to stop.
            n_tok_global, stop = all_reduce_sum([sum(n_tok), float(watcher.requested)], ctx)
            if stop:
                preempted = watcher.signal_name or "a signal on another rank"
                break
            lr = optimizer.param_groups[0]["lr"]
            for i, (b, x) in enumerate(zip(micro, inputs)):
                with gradient_sync(model_w, enabled=i == len(micro) - 1):
                    with autocast(ctx):
                        out = model_w(**{k: v.to(ctx.device) for k, v in x.items()})
                    # Sum of token losses / the step's token count over ranks and micro-batches; DDP and
                    # FSDP average gradients over ranks, hence the world size factor.
                    (out.loss * (n_tok[i] * ctx.world_size / n_tok_global)).backward()
                # per-dataset sums (an extra cross-entropy) only when the run reads several datasets
                names = b["dataset_name"] if len(norm_stats) > 1 else None
                accumulate(sums, action_metrics(out, processor.action_tokenizer, names))
                sums["frames"] = sums.get("frames", 0) + len(b["instruction"])
                sums["tokens"] = (
                    sums.get("tokens", 0)
                    + int(x["attention_mask_BL"].sum())
                    + len(b["instruction"]) * vla.config.num_patches
                )
            grad_norm = clip_grad_norm(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            logger.progress(1, loss=out.loss.item())
            if step % cfg.logging.log_every == 0 or step == t.max_steps:
                total = sum_over_ranks(sums, ctx)
                # what the data pipeline dropped so far (all ranks), by reason: nothing is dropped silently
                drops = sum_over_ranks({k: float(v) for k, v in stream.drop_counts().items()}, ctx)
                elapsed = time.perf_counter() - window_start
                logger.log(
                    step,
                    {
                        **finalize(total, "train"),
                        "train/lr": lr,
                        "train/grad_norm": grad_norm,
                        "train/step_time_s": elapsed / window_steps,
                        "train/samples_per_s": total["frames"] / elapsed,
                        "train/tokens_per_s": total["tokens"] / elapsed,
                        **{f"data/dropped_{reason}": int(n) for reason, n in drops.items()},
                    },
                )
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            if t.val_every and step % t.val_every == 0 and step < t.max_steps:
                logger.log(step, validate(vla, processor, cfg, norm_stats, image_size, ctx, plan.micro_batch))
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                ckpt = checkpoint()
                last_saved = step
        if preempted:
            ckpt = checkpoint() if last_saved != step else ckpt
            say(f"stopped by {preempted} at step {step}; checkpoint {ckpt}; relaunch to resume")
            return {"step": step, "run_dir": str(run_dir), "checkpoint": str(ckpt), "preempted": preempted}
        val = validate(vla, processor, cfg, norm_stats, image_size, ctx, plan.micro_batch)
        if val:
            logger.log(step, val)
    finally:
        watcher.close()
        logger.close()
    if val and math.isnan(val["val/loss"]):
        raise RuntimeError("validation loss is NaN: the run diverged")
    if last_saved != step:
        ckpt = checkpoint()
    result = {"step": step, "run_dir": str(run_dir), "checkpoint": str(ckpt), **val}
    if val:
        say(
            f"done: step {step}, val/action_token_accuracy {val['val/action_token_accuracy']:.3f}, "
            f"val/action_l1 {val['val/action_l1']:.4f}, val/loss {val['val/loss']:.4f}; checkpoint {ckpt}"
        )
    else:
        say(f"done: step {step}; checkpoint {ckpt}")
    if return_model:
        result["model"] = vla
    return result

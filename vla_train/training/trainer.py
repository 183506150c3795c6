"""The training loop, top to bottom: data -> model (+LoRA) -> optimizer -> resume -> steps -> validation ->
checkpoint. Single process on CPU or one GPU in this version; every run writes to <output_dir>/<run_id>/.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import draccus
import torch

from vla_train.config import TrainConfig, to_yaml
from vla_train.data.loader import FrameStream, StreamSpec
from vla_train.data.rlds import collect_instructions, get_statistics, open_builder, split_for
from vla_train.data.synthetic import build_synthetic_dataset
from vla_train.models.load import build_from_config, load_model_dir, save_model_dir
from vla_train.models.peft import adapter_state_dict, apply_lora, load_adapter_state_dict
from vla_train.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vla_train.training.logging import MetricsLogger
from vla_train.training.metrics import accumulate, action_metrics, finalize, generated_metrics

BASE_MODEL_DIR = "base_model"


def run_dir_of(cfg: TrainConfig) -> Path:
    run_id = cfg.logging.run_id or time.strftime("run_%Y%m%d_%H%M%S")
    return Path(cfg.logging.output_dir) / run_id


def stream_spec(cfg: TrainConfig, image_size: int, train: bool) -> StreamSpec:
    return StreamSpec(
        data_root_dir=cfg.data.data_root_dir,
        dataset_name=cfg.data.dataset_name,
        image_size=image_size,
        batch_size=cfg.training.batch_size,
        seed=cfg.training.seed,
        train=train,
        normalization=cfg.data.normalization,
        shuffle_buffer_size=cfg.data.shuffle_buffer_size,
        image_augmentation=cfg.data.image_augmentation and train,
        ablation=cfg.data.ablation,
        num_parallel_calls=cfg.data.num_parallel_calls,
    )


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


def trainable_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        return adapter_state_dict(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def validate(
    model, processor, cfg: TrainConfig, statistics: dict, image_size: int, device: torch.device
) -> dict:
    """One ordered pass over the first `num_val_frames` frames of the validation split.

    Besides the teacher-forced metrics (OpenVLA's: each action token predicted from the true previous
    ones), greedy decoding gives `val/generated_*`: what `predict_action` would output. Teacher forcing
    leaks information (once the true first tokens are given, later ones may follow from them), so only
    the generated metrics show what a policy knows on its own.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}
    seen = 0
    for batch in FrameStream(stream_spec(cfg, image_size, train=False), statistics):
        take = min(len(batch["instruction"]), cfg.training.num_val_frames - seen)
        images, instructions, actions = (
            batch["image"][:take],
            batch["instruction"][:take],
            batch["action"][:take],
        )
        inputs = processor.collate(images, instructions, actions)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        accumulate(sums, action_metrics(out, processor.action_tokenizer, statistics["action"]))
        generated = model.predict_action_tokens(
            processor.inference_prompts(instructions), processor.pixel_values(images, train=False).to(device)
        )
        accumulate(sums, generated_metrics(generated.cpu().numpy(), actions, processor.action_tokenizer))
        seen += take
        if seen >= cfg.training.num_val_frames:
            break
    model.train(was_training)
    return {**finalize(sums, "val"), "val/num_frames": seen}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- data: build the synthetic set if asked, statistics (cached), instructions -----------------
    if cfg.data.build_synthetic:
        build_synthetic_dataset(cfg.data.data_root_dir, cfg.data.synthetic)
    statistics = get_statistics(cfg.data.data_root_dir, cfg.data.dataset_name, cfg.data.stats_cache_dir)
    norm_stats = {cfg.data.dataset_name: {**statistics, "normalization": cfg.data.normalization}}
    (run_dir / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))

    # ---- model: pretrained directory or built from config (then saved as the run's base model) ----
    if cfg.model.pretrained_dir:
        model, processor = load_model_dir(cfg.model.pretrained_dir)
    else:
        base_dir = run_dir / BASE_MODEL_DIR
        if (base_dir / "config.json").is_file():  # resuming: the same random base, not a new one
            model, processor = load_model_dir(base_dir)
        else:
            builder = open_builder(cfg.data.data_root_dir, cfg.data.dataset_name)
            instructions = collect_instructions(builder, split_for(builder, train=True))
            if cfg.data.ablation == "fixed_instruction":
                from vla_train.data.loader import FIXED_INSTRUCTION

                instructions = instructions + [FIXED_INSTRUCTION]
            model, processor = build_from_config(cfg.model, instructions, seed=cfg.training.seed)
            save_model_dir(base_dir, model, processor, norm_stats)
    model.config.norm_stats = norm_stats
    image_size = model.config.image_size
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.to(device).train()
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())

    optimizer = optimizer_for(model, cfg)
    warmup = cfg.training.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )

    # ---- resume from the newest committed checkpoint ---------------------------------------------
    stream = FrameStream(stream_spec(cfg, image_size, train=True), statistics)
    step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        saved = load_checkpoint(ckpt)
        if cfg.lora.enabled:
            load_adapter_state_dict(model, saved["trainable"])
        else:
            model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["state"]["step"]
        scheduler.last_epoch = step
        torch.set_rng_state(saved["rng"]["torch_rng"])
        stream.load_state_dict(saved["state"]["data"])
        print(f"resuming {run_dir} from {ckpt.name} (step {step})")

    print(
        f"run {run_dir}: {num_trainable / 1e6:.3f}M trainable of {num_total / 1e6:.3f}M parameters, "
        f"{'LoRA r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'full fine-tune'}, device {device}"
    )
    logger = MetricsLogger(run_dir, cfg.logging, draccus.encode(cfg), cfg.training.max_steps, step)
    sums: dict[str, Any] = {}
    window_start = time.perf_counter()
    window_frames = 0
    try:
        for batch in stream if step < cfg.training.max_steps else []:
            inputs = processor.collate(batch["image"], batch["instruction"], batch["action"])
            out = model(**{k: v.to(device) for k, v in inputs.items()})
            out.loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
                if cfg.training.max_grad_norm > 0
                else torch.tensor(float("nan"))
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_frames += len(batch["instruction"])
            accumulate(sums, action_metrics(out, processor.action_tokenizer))
            logger.progress(1, loss=out.loss.item())
            if step % cfg.logging.log_every == 0 or step == cfg.training.max_steps:
                elapsed = time.perf_counter() - window_start
                logger.log(
                    step,
                    {
                        **finalize(sums, "train"),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm),
                        "train/samples_per_s": window_frames / elapsed,
                        "train/step_time_s": elapsed / max(1, sums.get("batches", 1)),
                    },
                )
                sums, window_frames, window_start = {}, 0, time.perf_counter()
            if (
                cfg.training.val_every
                and step % cfg.training.val_every == 0
                and step < cfg.training.max_steps
            ):
                logger.log(step, validate(model, processor, cfg, statistics, image_size, device))
            if step >= cfg.training.max_steps:
                break
        val = validate(model, processor, cfg, statistics, image_size, device)
        logger.log(step, val)
    finally:
        logger.close()
    if math.isnan(val["val/loss"]):
        raise RuntimeError("validation loss is NaN: the run diverged")
    ckpt = save_checkpoint(
        run_dir,
        step,
        trainable_state(model, cfg.lora.enabled),
        optimizer.state_dict(),
        {"data": stream.state_dict(), "lora": cfg.lora.enabled},
    )
    result = {"step": step, "run_dir": str(run_dir), "checkpoint": str(ckpt), **val}
    print(
        f"done: step {step}, val/action_token_accuracy {val['val/action_token_accuracy']:.3f}, "
        f"val/action_l1 {val['val/action_l1']:.4f}, val/loss {val['val/loss']:.4f}; checkpoint {ckpt}"
    )
    return result

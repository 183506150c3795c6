"""vla-export: merge a run's LoRA adapters into its base model in one CPU process and write a
self-contained model directory (weights, config with the fine-tuning dataset's norm_stats, tokenizer,
processor settings, dataset_statistics.json).

Checks made on every export, on sample frames: the merged model predicts the same action tokens as the
unmerged (base + adapters) one, and the written directory, reloaded, predicts the same tokens again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vla_train.config import ExportConfig, TrainConfig, parse_config
from vla_train.models.load import load_model_dir, save_model_dir
from vla_train.models.peft import apply_lora, load_adapter_state_dict
from vla_train.models.policy import VLAPolicy
from vla_train.training.checkpoint import latest_checkpoint, load_checkpoint
from vla_train.training.trainer import BASE_MODEL_DIR


def load_run_config(run_dir: Path) -> TrainConfig:
    return parse_config(TrainConfig, ["--config_path", str(run_dir / "config.yaml")], validate=False)


def sample_frames(train_cfg: TrainConfig, norm_stats: dict, image_size: int, n: int) -> dict:
    """The first n frames of the held-out split (images at model size, instructions, physical actions)."""
    from vla_train.data.loader import FrameStream
    from vla_train.training.trainer import stream_spec

    stats = norm_stats[train_cfg.data.dataset_name]
    spec = stream_spec(train_cfg, image_size, train=False)
    spec.batch_size = n
    batch = next(iter(FrameStream(spec, stats)))
    return {"image": batch["image"], "instruction": batch["instruction"], "action": batch["action_raw"]}


def export_run(cfg: ExportConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    train_cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no committed checkpoint; train first (vla-train)")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "export"
    norm_stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    base_dir = Path(train_cfg.model.pretrained_dir or run_dir / BASE_MODEL_DIR)

    with torch.device("cpu"):
        model, processor = load_model_dir(base_dir, device="cpu")
        model.config.norm_stats = norm_stats
        if train_cfg.data.image_augmentation:
            processor.settings.center_crop_area = 0.9
        saved = load_checkpoint(ckpt)
        frames = sample_frames(train_cfg, norm_stats, model.config.image_size, max(cfg.predict_samples, 8))
        if train_cfg.lora.enabled:
            peft_model = apply_lora(model, train_cfg.lora)
            load_adapter_state_dict(peft_model, saved["trainable"])
            unmerged = VLAPolicy(peft_model.eval(), processor).predict_tokens(
                frames["image"], frames["instruction"]
            )
            model = peft_model.merge_and_unload()
        else:
            model.load_state_dict(saved["trainable"], strict=False)
            unmerged = None
        merged = VLAPolicy(model, processor).predict_tokens(frames["image"], frames["instruction"])
        if unmerged is not None and not torch.equal(unmerged, merged):
            raise RuntimeError(
                f"merged model predicts different action tokens than base + adapters on "
                f"{int((unmerged != merged).any(-1).sum())} of {len(merged)} sample frames; export aborted"
            )
        save_model_dir(out_dir, model, processor, norm_stats)
        policy = VLAPolicy.from_dir(out_dir)
        reloaded = policy.predict_tokens(frames["image"], frames["instruction"])
    if not torch.equal(reloaded, merged):
        raise RuntimeError(f"the exported directory {out_dir} does not reproduce the merged model's tokens")
    report = {
        "checkpoint": str(ckpt),
        "base_model": str(base_dir),
        "merged_equals_unmerged": unmerged is not None,
        "reloaded_equals_merged": True,
        "num_check_frames": len(merged),
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"exported {ckpt.name} of {run_dir} to {out_dir} (merged == unmerged == reloaded on {len(merged)} frames)"
    )

    if cfg.predict_samples:
        np.set_printoptions(precision=3, suppress=True, floatmode="fixed")
        preds = policy.predict_action_batch(frames["image"], frames["instruction"])
        for i in range(cfg.predict_samples):
            print(f"instruction: {frames['instruction'][i]}")
            print(f"  predicted action: {preds[i]}")
            print(f"  true action:      {np.asarray(frames['action'][i])}")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in metrics if "val/action_token_accuracy" in m]
        if val:
            print(
                f"final val/action_token_accuracy: {val[-1]['val/action_token_accuracy']:.3f} (step {val[-1]['step']})"
            )
    return out_dir

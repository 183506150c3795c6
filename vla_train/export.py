"""vla-export: merge a run's LoRA adapters into its base model in one CPU process and write a
self-contained model directory (weights in fp32 or bf16, config with the norm_stats of the fine-tuning
dataset, or of each dataset of a mixture, tokenizer, processor settings, dataset_statistics.json).

Checks made on every export, on sample frames: the merged model predicts the same action tokens as the
unmerged (base + adapters) one, and the written directory, reloaded, predicts the same tokens again.

The checkpoint is read with torch.distributed.checkpoint in this one process (no process group), whatever
the number of ranks and the strategy (single, DDP, FSDP2) that wrote it. Adapters trained over quantized
base weights (QLoRA) are merged into the unquantized base, as OpenVLA does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from vla_train.config import ExportConfig, TrainConfig
from vla_train.config_cli import parse_config
from vla_train.data.mixture import run_datasets
from vla_train.data.stream import FrameStream
from vla_train.models.load import cast_parameters, load_with_layout, run_layout, save_model_dir
from vla_train.models.peft import apply_lora, load_adapter_state_dict
from vla_train.models.policy import VLAPolicy
from vla_train.runs import (
    CONFIG_FILE,
    STATS_FILE,
    base_model_dir,
    current_action,
    policy_inputs,
    stream_spec,
    use_run_preprocessing,
)
from vla_train.training.checkpoint import BEST_DIR, latest_checkpoint, load_checkpoint
from vla_train.training.logging import read_metrics


def load_run_config(run_dir: Path) -> TrainConfig:
    """The run's config as trained (not re-validated)."""
    return parse_config(TrainConfig, ["--config_path", str(run_dir / CONFIG_FILE)], validate=False)


def sample_frames(train_cfg: TrainConfig, norm_stats: dict, image_size: int, n: int, stride: int = 7) -> dict:
    """n held-out frames, every `stride`-th of the validation split's first n * stride (so that they come
    from different episodes; for a mixture, the validation splits of its datasets interleaved at the
    mixture's weights): images at model size, instructions, physical actions (of the frame's own step when
    actions are chunked) and dataset_name, the frame's dataset (its unnorm_key).

    norm_stats: the run's {dataset_name: statistics} (dataset_statistics.json).
    """
    datasets = run_datasets(train_cfg.data)  # registers the run's own registry_files
    spec = stream_spec(train_cfg, datasets, image_size, train=False, batch_size=n * stride)
    batch = next(iter(FrameStream(spec, norm_stats)))
    pick = slice(0, None, stride) if len(batch["instruction"]) >= n * stride else slice(0, n)
    keys = ["image", "instruction", "dataset_name", "proprio"]
    keys += [k for k in batch if k.startswith("image_")]  # other cameras and their masks
    frames = {k: batch[k][pick][:n] for k in keys}
    frames["action"] = current_action(batch, "action_raw")[pick][:n]
    return frames


def load_trained(
    run_dir: Path, train_cfg: TrainConfig, ckpt: Path | None = None, norm_stats: dict | None = None
):
    """(model, processor) of a run's checkpoint (default: the newest) on CPU, in one process: for LoRA
    the unmerged peft model (base + adapters, unquantized base), otherwise the VLA with its trained
    weights; the model config carries the run's norm_stats (read from dataset_statistics.json when not
    given)."""
    ckpt = ckpt or latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no committed checkpoint; train first (vla-train)")
    if norm_stats is None:
        norm_stats = json.loads((run_dir / STATS_FILE).read_text())
    layout = run_layout(train_cfg.data, train_cfg.model, norm_stats)
    model, processor, _ = load_with_layout(
        base_model_dir(run_dir, train_cfg), layout, train_cfg.training.seed
    )
    model.config.norm_stats = norm_stats
    use_run_preprocessing(processor, train_cfg.data)
    saved = load_checkpoint(ckpt)
    if train_cfg.lora.enabled:
        lora_cfg = dataclasses.replace(train_cfg.lora, quantization="none")
        peft_model = apply_lora(model, lora_cfg, "cpu")
        load_adapter_state_dict(peft_model, saved["trainable"])
        return peft_model.eval(), processor
    result = model.load_state_dict(saved["trainable"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{ckpt} holds weights the base model does not: {result.unexpected_keys[:8]}")
    return model.eval(), processor


def _as_bins(prediction: torch.Tensor, processor) -> torch.Tensor:
    """Token ids as they are; the l1_parallel head's normalized actions as the ids of their bins."""
    if prediction.is_floating_point():
        return torch.from_numpy(processor.action_tokenizer.encode(prediction.cpu().numpy()))
    return prediction


def _frames_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """Frames whose prediction differs: any token, or a regressed value by more than 1e-4 (a merge
    reorders float sums)."""
    if a.is_floating_point():
        return int(((a - b).abs() > 1e-4).reshape(len(a), -1).any(-1).sum())
    return int((a != b).any(-1).sum())


def chosen_checkpoint(run_dir: Path, which: str = "") -> Path | None:
    """'' = the newest committed checkpoint, 'best' = <run_dir>/best, else the directory given."""
    if which == "best":
        return run_dir / BEST_DIR
    return Path(which) if which else latest_checkpoint(run_dir)


def export_run(cfg: ExportConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    train_cfg = load_run_config(run_dir)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "export"
    ckpt = chosen_checkpoint(run_dir, cfg.checkpoint)
    norm_stats = json.loads((run_dir / STATS_FILE).read_text())

    with torch.device("cpu"):
        trained, processor = load_trained(run_dir, train_cfg, ckpt, norm_stats)
        frames = sample_frames(
            train_cfg, norm_stats, processor.settings.image_size, max(cfg.predict_samples, 8)
        )
        if train_cfg.lora.enabled:
            unmerged = VLAPolicy(trained, processor).predict_tokens(**policy_inputs(processor, frames))
            model = trained.merge_and_unload()
        else:
            model, unmerged = trained, None
        merged = VLAPolicy(model, processor).predict_tokens(**policy_inputs(processor, frames))
        if unmerged is not None and _frames_changed(unmerged, merged):
            raise RuntimeError(
                f"merged model predicts different actions than base + adapters on "
                f"{_frames_changed(unmerged, merged)} of {len(merged)} sample frames; export aborted"
            )
        fp32_tokens, cast = merged, {}
        if cfg.dtype == "bf16":  # the written weights are bf16: from here on the cast model is checked
            cast_parameters(model, torch.bfloat16)
            merged = VLAPolicy(model, processor).predict_tokens(**policy_inputs(processor, frames))
            bins = [_as_bins(x, processor) for x in (merged, fp32_tokens)]
            cast = {
                "bf16_token_agreement": float((bins[0] == bins[1]).float().mean()),
                "bf16_frames_changed": int((bins[0] != bins[1]).reshape(len(merged), -1).any(-1).sum()),
            }
        save_model_dir(out_dir, model, processor, norm_stats)
        policy = VLAPolicy.from_dir(out_dir)
        reloaded = policy.predict_tokens(**policy_inputs(processor, frames))
    if not torch.equal(reloaded, merged):
        raise RuntimeError(f"the exported directory {out_dir} does not reproduce the merged model's tokens")
    report = {
        "checkpoint": str(ckpt),
        "base_model": str(base_model_dir(run_dir, train_cfg)),
        "merged_equals_unmerged": unmerged is not None,
        "reloaded_equals_merged": True,
        "num_check_frames": len(merged),
        "dtype": cfg.dtype,
        **cast,
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"exported {ckpt.name} of {run_dir} to {out_dir} (merged == unmerged == reloaded on {len(merged)} frames)"
    )
    if cast:
        print(
            f"bf16 weights: {cast['bf16_token_agreement']:.1%} of the fp32 model's action tokens on the check "
            f"frames ({cast['bf16_frames_changed']} of {len(merged)} frames differ somewhere)"
        )

    if cfg.predict_samples:
        np.set_printoptions(precision=3, suppress=True, floatmode="fixed")
        # each frame unnormalized with its own dataset's statistics (one unnorm_key per frame)
        inputs = policy_inputs(policy.processor, frames)
        preds = policy.predict_action_batch(
            inputs["images"],
            frames["instruction"],
            unnorm_key=frames["dataset_name"],
            proprio=inputs["proprio"],
            image_masks=inputs["image_masks"],
        )
        for i in range(cfg.predict_samples):
            dataset = f" [{frames['dataset_name'][i]}]" if len(norm_stats) > 1 else ""
            print(f"instruction: {frames['instruction'][i]}{dataset}")
            first = " (the first of its chunk)" if preds.ndim == 3 else ""
            print(f"  predicted action: {preds[i][0] if preds.ndim == 3 else preds[i]}{first}")
            print(f"  true action:      {np.asarray(frames['action'][i])}")
        val = [m for m in read_metrics(run_dir) if "val/action_token_accuracy" in m]
        if val:
            print(
                f"final val/action_token_accuracy: {val[-1]['val/action_token_accuracy']:.3f} (step {val[-1]['step']})"
            )
    return out_dir

"""What a training run is, for the trainer and for what reads a run afterwards (export, evaluation): the
layout of its directory, the frame streams it reads, the preprocessing its model uses, and how a stream
batch becomes model inputs.

    <output_dir>/<run_id>/
        config.yaml               the run's config, every field resolved
        dataset_statistics.json   {dataset: statistics + normalization} (OpenVLA's norm_stats)
        base_model/               the model a run built from config (absent with model.pretrained_dir)
        metrics.jsonl             training and validation metrics (training/logging.py)
        checkpoints/step_N/       committed checkpoints (training/checkpoint.py)
        export/                   the merged model directory (vla-export)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_train.config import DataConfig, TrainConfig
from vla_train.data.image_ops import CROP_AREA
from vla_train.data.stream import StreamSpec
from vla_train.models.processor import VLAProcessor

CONFIG_FILE = "config.yaml"
STATS_FILE = "dataset_statistics.json"
BASE_MODEL_DIR = "base_model"


def run_dir_of(cfg: TrainConfig) -> Path:
    run_id = cfg.logging.run_id or time.strftime("run_%Y%m%d_%H%M%S")
    return Path(cfg.logging.output_dir) / run_id


def base_model_dir(run_dir: Path, cfg: TrainConfig) -> Path:
    """The base model a run trains from: model.pretrained_dir, or the run's own base_model/."""
    return Path(cfg.model.pretrained_dir) if cfg.model.pretrained_dir else Path(run_dir) / BASE_MODEL_DIR


def stream_spec(
    cfg: TrainConfig,
    datasets: tuple[tuple[str, float], ...],
    image_size: int,
    train: bool,
    batch_size: int | None = None,
    seed: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    num_threads: int = 0,
) -> StreamSpec:
    """The frame stream of a run's training (train=True) or validation (train=False) data over `datasets`
    (mixture.run_datasets of cfg.data), with the config's trajectory transforms."""
    return StreamSpec(
        data=cfg.data,
        datasets=tuple(datasets),
        image_size=image_size,
        batch_size=batch_size or cfg.training.batch_size,
        seed=cfg.training.seed if seed is None else seed,
        train=train,
        num_shards=num_shards,
        shard_index=shard_index,
        num_threads=num_threads,
    )


def use_run_preprocessing(processor: VLAProcessor, data: DataConfig) -> VLAProcessor:
    """The inference preprocessing of a run's model, the same in validation, export and the exported
    directory: a model trained with random-resized-crop augmentation sees a centre crop of the same area
    at inference (OpenVLA's center_crop); otherwise the model directory's settings stay as they are."""
    if data.image_augmentation:
        processor.settings.center_crop_area = CROP_AREA
    return processor


def camera_frames(processor: VLAProcessor, batch: dict[str, Any]) -> tuple[Any, dict | None]:
    """The frames of a stream batch for the processor's cameras (one array for a one-camera model, else
    {role: frames}), and the masks of cameras a dataset lacks."""
    roles = processor.cameras
    if roles == ("primary",):
        return batch["image"], None
    images = {r: batch["image" if r == "primary" else f"image_{r}"] for r in roles}
    return images, {r: batch[f"image_{r}_mask"] for r in roles if f"image_{r}_mask" in batch}


def policy_inputs(processor: VLAProcessor, batch: dict[str, Any]) -> dict[str, Any]:
    """A stream batch as VLAPolicy.predict_tokens' keyword arguments (frames, cameras, raw proprio)."""
    images, masks = camera_frames(processor, batch)
    return {
        "images": images,
        "instructions": batch["instruction"],
        "image_masks": masks,
        "proprio": batch["proprio"] if processor.proprio_dim else None,
        "unnorm_key": batch["dataset_name"],
    }


def model_inputs(
    processor: VLAProcessor, batch: dict[str, Any], train: bool = True
) -> dict[str, torch.Tensor]:
    """Model inputs of a stream batch: its normalized actions ([B, A], or [B, F + 1, A] chunks) as action
    tokens (or regression targets), chunk steps past the episode end out of the loss; the model's
    cameras (a dataset without one: masked) and normalized proprio; train=False preprocesses the images
    as inference does."""
    images, masks = camera_frames(processor, batch)
    return processor.collate(
        images,
        batch["instruction"],
        batch["action"],
        batch.get("action_pad_mask"),
        train=train,
        proprio_BP=batch.get("proprio_norm") if processor.proprio_dim else None,
        image_masks=masks,
    )


def current_action(batch: dict[str, Any], key: str = "action") -> np.ndarray:
    """[B, A]: each frame's own action (the first step of a chunk), what predict_action outputs."""
    action = np.asarray(batch[key])
    return action[:, 0] if "action_pad_mask" in batch else action

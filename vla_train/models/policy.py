"""Inference: image(s) + instruction(s) -> greedy action tokens -> unnormalized 7-dim actions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vla_train.data.normalize import normalize_proprio_batch, unnormalize
from vla_train.models.processor import VLAProcessor
from vla_train.models.vla import VLA


class VLAPolicy:
    def __init__(self, model: VLA, processor: VLAProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_dir(cls, directory: str | Path, device: str = "cpu", quantization: str = "none") -> VLAPolicy:
        """quantization int8 | nf4: the linear layers (all but the LM head and the projector, as QLoRA
        trains them) become bitsandbytes layers, computing in bf16 on CUDA and fp32 on CPU."""
        from vla_train.models.load import load_model_dir

        model, processor = load_model_dir(directory, "cpu" if quantization != "none" else device)
        if quantization != "none":
            from vla_train.config import LoraConfig
            from vla_train.models.peft import quantize_linear_layers

            target = torch.device(device)
            quantize_linear_layers(model, LoraConfig(quantization=quantization), target)
            model.to(target)
        return cls(model, processor)

    def action_stats(self, unnorm_key: str | None = None) -> dict:
        """The action statistics (min, max, q01, q99, mask) that unnormalize actions for unnorm_key."""
        return self._stats_for(unnorm_key)["action"]

    def _stats_for(self, unnorm_key: str | None) -> dict:
        stats = self.model.config.norm_stats
        if unnorm_key is None:
            if len(stats) != 1:
                raise ValueError(
                    f"this model has statistics for {len(stats)} datasets; pass unnorm_key= one of {sorted(stats)}"
                )
            unnorm_key = next(iter(stats))
        if unnorm_key not in stats:
            raise ValueError(f"unknown unnorm_key '{unnorm_key}'; available: {sorted(stats)}")
        return stats[unnorm_key]

    def _keys(self, unnorm_key, n: int) -> tuple[list, dict]:
        """One statistics key per frame, and the statistics of each (fails before any forward)."""
        keys = [unnorm_key] * n if unnorm_key is None or isinstance(unnorm_key, str) else list(unnorm_key)
        if len(keys) != n:
            raise ValueError(f"{len(keys)} unnorm_keys for {n} instructions; pass one per frame")
        return keys, {key: self._stats_for(key) for key in dict.fromkeys(keys)}

    def _proprio_input(self, proprio, keys: list, stats: dict) -> dict:
        if not self.processor.proprio_dim:
            return {}
        if proprio is None:
            raise ValueError(
                f"this model reads proprio ({self.processor.proprio_dim} values per frame, in the units of "
                "the training data): pass proprio="
            )
        raw = np.asarray(proprio, np.float32)
        raw = raw[:, -1] if raw.ndim == 3 else raw  # a proprio window: the current step
        # zero-padded to the model's width, as a mixture pads a narrower dataset's proprio in training
        padded = np.zeros((len(keys), max(self.processor.proprio_dim, raw.shape[1])), np.float32)
        padded[:, : raw.shape[1]] = raw
        mode = next(iter(stats.values())).get("normalization", "bounds_q99")  # one per run
        return self.processor.proprio_input(normalize_proprio_batch(padded, keys, stats, mode))

    @torch.no_grad()
    def predict_tokens(
        self,
        images,
        instructions: list[str],
        preprocessed: bool = False,
        proprio=None,
        image_masks=None,
        unnorm_key=None,
    ) -> torch.Tensor:
        """What the model outputs before unnormalization. Token head: the greedy token ids
        [B, chunk_size * action_dim]; l1_parallel: the normalized actions [B, chunk_size, action_dim].
        preprocessed: the frames are already cropped and resized to the model size (as
        processor.resize_frames does), so the evaluation crop is not cut again. proprio (physical units)
        is normalized with unnorm_key's statistics."""
        device = next(self.model.parameters()).device
        # train=True only skips the evaluation crop: pixel_values has no other train-time step
        inputs = self.processor.camera_inputs(images, image_masks, train=preprocessed)
        if self.processor.proprio_dim:
            inputs.update(self._proprio_input(proprio, *self._keys(unnorm_key, len(instructions))))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        prompts = self.processor.inference_prompts(instructions)
        pixels = inputs.pop("pixel_values_BCHW")
        if self.model.config.action_head == "l1_parallel":
            return self.model.predict_actions(prompts, pixels, **inputs).float()
        return self.model.predict_action_tokens(prompts, pixels, **inputs)

    def predict_action_batch(
        self,
        images_BHWC,
        instructions: list[str],
        unnorm_key: str | Sequence[str] | None = None,
        preprocessed: bool = False,
        proprio=None,
        image_masks=None,
    ) -> np.ndarray:
        """[B, H, W, 3] uint8 images (or {camera role: frames} for a model of several cameras) + B
        instructions -> actions in physical units: [B, action_dim], or [B, chunk_size, action_dim] for a
        model that predicts chunks.

        unnorm_key: the dataset whose statistics unnormalize the actions (needed when the model has
        several, e.g. after training on a mixture), or one key per frame. preprocessed: see
        predict_tokens. proprio: [B, P] in physical units, for a model with a proprio token. image_masks:
        {role: [B] bool}, False for a camera the robot lacks (its frames are ignored).
        """
        keys, stats = self._keys(unnorm_key, len(instructions))
        out = self.predict_tokens(images_BHWC, instructions, preprocessed, proprio, image_masks, keys)
        c = self.model.config
        if c.action_head == "l1_parallel":
            normalized = out.cpu().numpy()
        else:
            normalized = self.processor.action_tokenizer.decode(out.cpu().numpy())
            normalized = normalized.reshape(len(instructions), c.chunk_size, c.action_dim)
        actions = np.empty(normalized.shape, np.float32)
        for key, s in stats.items():
            rows = np.asarray([k == key for k in keys])
            actions[rows] = unnormalize(normalized[rows], s["action"], s.get("normalization", "bounds_q99"))
        return actions[:, 0] if c.chunk_size == 1 else actions

    def predict_action(
        self, image_HWC, instruction: str, unnorm_key: str | None = None, proprio=None
    ) -> np.ndarray:
        """One frame (or {role: frame}) -> [action_dim], or [chunk_size, action_dim]."""
        if isinstance(image_HWC, dict):
            images = {role: np.asarray(frame)[None] for role, frame in image_HWC.items()}
        else:
            images = np.asarray(image_HWC)[None]
        batch_proprio = None if proprio is None else np.asarray(proprio)[None]
        return self.predict_action_batch(images, [instruction], unnorm_key, proprio=batch_proprio)[0]

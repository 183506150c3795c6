"""Inference: image(s) + instruction(s) -> greedy action tokens -> unnormalized 7-dim actions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vla_train.data.normalize import unnormalize
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

    @torch.no_grad()
    def predict_tokens(
        self, images_BHWC, instructions: list[str], preprocessed: bool = False
    ) -> torch.Tensor:
        """preprocessed: the frames are already cropped and resized to the model size (as
        processor.resize_frames does), so the evaluation crop is not cut again."""
        device = next(self.model.parameters()).device
        # train=True only skips the evaluation crop: pixel_values has no other train-time step
        pixels = self.processor.pixel_values(images_BHWC, train=preprocessed).to(device)
        prompts = self.processor.inference_prompts(instructions)
        return self.model.predict_action_tokens(prompts, pixels)

    def predict_action_batch(
        self,
        images_BHWC,
        instructions: list[str],
        unnorm_key: str | Sequence[str] | None = None,
        preprocessed: bool = False,
    ) -> np.ndarray:
        """[B, H, W, 3] uint8 images + B instructions -> [B, action_dim] actions in physical units.

        unnorm_key: the dataset whose statistics unnormalize the actions (needed when the model has
        several, e.g. after training on a mixture), or one key per frame. preprocessed: see predict_tokens.
        """
        if unnorm_key is None or isinstance(unnorm_key, str):
            keys = [unnorm_key] * len(instructions)
        else:
            keys = list(unnorm_key)
        if len(keys) != len(instructions):
            raise ValueError(
                f"{len(keys)} unnorm_keys for {len(instructions)} instructions; pass one per frame"
            )
        stats = {key: self._stats_for(key) for key in dict.fromkeys(keys)}  # fails before any forward
        tokens = self.predict_tokens(images_BHWC, instructions, preprocessed).cpu().numpy()
        normalized = self.processor.action_tokenizer.decode(tokens)
        out = np.empty(normalized.shape, np.float32)
        for key, s in stats.items():
            rows = np.asarray([k == key for k in keys])
            out[rows] = unnormalize(normalized[rows], s["action"], s.get("normalization", "bounds_q99"))
        return out

    def predict_action(self, image_HWC, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        return self.predict_action_batch(np.asarray(image_HWC)[None], [instruction], unnorm_key)[0]

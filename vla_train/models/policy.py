"""Inference: image(s) + instruction(s) -> greedy action tokens -> unnormalized 7-dim actions."""

from __future__ import annotations

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
    def from_dir(cls, directory: str | Path, device: str = "cpu") -> VLAPolicy:
        from vla_train.models.load import load_model_dir

        return cls(*load_model_dir(directory, device))

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
    def predict_tokens(self, images_BHWC, instructions: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.processor.pixel_values(images_BHWC, train=False).to(device)
        prompts = self.processor.inference_prompts(instructions)
        return self.model.predict_action_tokens(prompts, pixels)

    def predict_action_batch(
        self, images_BHWC, instructions: list[str], unnorm_key: str | None = None
    ) -> np.ndarray:
        """[B, H, W, 3] uint8 images + B instructions -> [B, action_dim] actions in physical units."""
        stats = self._stats_for(unnorm_key)
        tokens = self.predict_tokens(images_BHWC, instructions).cpu().numpy()
        normalized = self.processor.action_tokenizer.decode(tokens)
        return unnormalize(normalized, stats["action"], stats.get("normalization", "bounds_q99"))

    def predict_action(self, image_HWC, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        return self.predict_action_batch(np.asarray(image_HWC)[None], [instruction], unnorm_key)[0]

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
        self, images_BHWC, instructions: list[str], unnorm_key: str | Sequence[str] | None = None
    ) -> np.ndarray:
        """[B, H, W, 3] uint8 images + B instructions -> [B, action_dim] actions in physical units.

        unnorm_key: the dataset whose statistics unnormalize the actions (needed when the model has
        several, e.g. after training on a mixture), or one key per frame.
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
        tokens = self.predict_tokens(images_BHWC, instructions).cpu().numpy()
        normalized = self.processor.action_tokenizer.decode(tokens)
        out = np.empty(normalized.shape, np.float32)
        for key, s in stats.items():
            rows = np.asarray([k == key for k in keys])
            out[rows] = unnormalize(normalized[rows], s["action"], s.get("normalization", "bounds_q99"))
        return out

    def predict_action(self, image_HWC, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        return self.predict_action_batch(np.asarray(image_HWC)[None], [instruction], unnorm_key)[0]

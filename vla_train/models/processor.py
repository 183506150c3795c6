"""Turns frames into model inputs: images -> 6-channel pixel values (DINOv2 + SigLIP normalization),
instructions + action tokens -> padded input ids, attention mask and labels (OpenVLA's masking).

Saved with the model (`processor_config.json`), so an exported directory needs nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.prompting import IGNORE_INDEX, PromptBuilder
from vla_train.models.vision import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD

PROCESSOR_FILE = "processor_config.json"


@dataclass
class ProcessorSettings:
    image_size: int
    # Evaluation-time centre crop of this area fraction, resized back (1.0 = none). OpenVLA uses 0.9 for
    # models trained with random-resized-crop augmentation.
    center_crop_area: float = 1.0
    max_length: int = 2048

    def save(self, directory: Path) -> None:
        (Path(directory) / PROCESSOR_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ProcessorSettings:
        return cls(**json.loads((Path(directory) / PROCESSOR_FILE).read_text()))


def resize_frames(frames_BHWC: np.ndarray, size: int, crop_area: float = 1.0) -> np.ndarray:
    """uint8 [B, H, W, 3] -> uint8 [B, size, size, 3] exactly as OpenVLA's processor resizes a camera frame
    (`Image.fromarray(frame).resize((size, size), Image.BICUBIC)`: the aspect ratio is not kept). With
    crop_area < 1 the centred box of that area fraction is cut first (rounded to whole pixels)."""
    from PIL import Image

    frames = np.asarray(frames_BHWC)
    if frames.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB, got dtype {frames.dtype}")
    h, w = frames.shape[1:3]
    side = math.sqrt(crop_area)
    ch, cw = round(h * side), round(w * side)
    top, left = (h - ch) // 2, (w - cw) // 2
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(np.ascontiguousarray(frame[top : top + ch, left : left + cw]))
        out[i] = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
    return out


class VLAProcessor:
    def __init__(
        self, tokenizer, settings: ProcessorSettings, empty_piece_id: int | None, n_action_bins: int
    ):
        self.tokenizer = tokenizer
        self.settings = settings
        self.action_tokenizer = ActionTokenizer(
            len(tokenizer) - 1, n_action_bins
        )  # base vocab = all but <pad>
        self.prompt_builder = PromptBuilder(tokenizer, empty_piece_id)
        mean = torch.tensor(DINO_MEAN + SIGLIP_MEAN).view(1, 6, 1, 1)
        std = torch.tensor(DINO_STD + SIGLIP_STD).view(1, 6, 1, 1)
        self._mean, self._std = mean, std

    # ---- images ---------------------------------------------------------------------------------
    def pixel_values(self, images_BHWC, train: bool = True) -> torch.Tensor:
        """uint8 images [B, H, W, 3] (numpy or torch) -> float32 [B, 6, S, S].

        Frames from the data pipeline are already at the model size and pass straight through. Frames of
        any other size are resized as OpenVLA's processor does: a PIL image resized to S x S with PIL's
        bicubic filter, rounded to uint8 (resize_frames). At inference (train=False) the optional centre
        crop is cut from the uint8 frame first and resized back the same way.
        """
        x = images_BHWC if torch.is_tensor(images_BHWC) else torch.tensor(np.asarray(images_BHWC))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [batch, height, width, 3] (RGB), got shape {tuple(x.shape)}"
            )
        crop = 1.0 if train else self.settings.center_crop_area
        s = self.settings.image_size
        if crop < 1.0 or tuple(x.shape[1:3]) != (s, s):
            x = torch.from_numpy(resize_frames(x.cpu().numpy(), s, crop))
        x = x.permute(0, 3, 1, 2).float() / 255.0
        x = torch.cat([x, x], dim=1)
        return (x - self._mean) / self._std

    # ---- text -----------------------------------------------------------------------------------
    def collate(
        self,
        images_BHWC,
        instructions: list[str],
        actions_BA: np.ndarray,
        action_pad_mask_BT: np.ndarray | None = None,
        train: bool = True,
    ) -> dict[str, torch.Tensor]:
        """A batch for the model's forward: normalized actions ([B, A], or chunks [B, F + 1, A]) become
        action tokens, with labels only on them and EOS; chunk steps where action_pad_mask_BT is False
        (past the episode end) get no labels. train=False preprocesses the images as inference does
        (pixel_values)."""
        action_ids = self.action_tokenizer.encode(actions_BA)
        masks = [None] * len(instructions) if action_pad_mask_BT is None else list(action_pad_mask_BT)
        pairs = [
            self.prompt_builder.training_example(i, a, m)
            for i, a, m in zip(instructions, action_ids, masks, strict=True)
        ]
        L = max(len(ids) for ids, _ in pairs)
        if L > self.settings.max_length:
            raise ValueError(
                f"a prompt has {L} tokens, more than the model's max_length {self.settings.max_length}; "
                "shorten the instruction or raise model.max_length"
            )
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(pairs), L), pad, dtype=torch.long)
        labels = torch.full((len(pairs), L), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(pairs):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
        return {
            "input_ids_BL": input_ids,
            "attention_mask_BL": (input_ids != pad).long(),
            "labels_BL": labels,
            "pixel_values_BCHW": self.pixel_values(images_BHWC, train=train),
        }

    def inference_prompts(self, instructions: list[str]) -> list[list[int]]:
        return [self.prompt_builder.prompt_ids(i) for i in instructions]

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
from vla_train.models.prompting import IGNORE_INDEX, PromptBuilder, pad_prompts
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
        self,
        tokenizer,
        settings: ProcessorSettings,
        empty_piece_id: int | None,
        n_action_bins: int,
        action_head: str = "tokens",
        cameras: tuple[str, ...] = ("primary",),
        proprio_dim: int = 0,
    ):
        """action_head, cameras, proprio_dim: the model's (VLAConfig): what collate builds."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.action_head = action_head
        self.cameras = tuple(cameras)
        self.proprio_dim = proprio_dim
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

    def camera_inputs(self, images, image_masks=None, train: bool = True) -> dict[str, torch.Tensor]:
        """The model's image inputs: `images` is one camera's uint8 frames [B, H, W, 3] (a one-camera
        model) or {role: frames} for every camera of the model, in any order; image_masks {role: [B]
        bool} marks frames a dataset does not have (their patches are masked out). Returns
        pixel_values_BCHW [B, 6 x cameras, S, S] (the model's camera order) and image_mask_BN when some
        frame is missing."""
        if not isinstance(images, dict):
            if len(self.cameras) != 1:
                raise ValueError(f"this model reads cameras {list(self.cameras)}: pass {{role: frames}}")
            images = {self.cameras[0]: images}
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(
                f"this model reads cameras {list(self.cameras)}; no frames for {missing} (a camera a robot "
                "lacks: pass black frames and image_masks {role: False})"
            )
        pixels = [self.pixel_values(images[c], train=train) for c in self.cameras]
        out = {"pixel_values_BCHW": pixels[0] if len(pixels) == 1 else torch.cat(pixels, dim=1)}
        if image_masks:
            B = pixels[0].shape[0]
            cols = [
                torch.as_tensor(np.asarray(image_masks.get(c, np.ones(B, bool)), bool)) for c in self.cameras
            ]
            mask = torch.stack(cols, dim=1)
            if not bool(mask.all()):
                out["image_mask_BN"] = mask
        return out

    def proprio_input(self, proprio_BP) -> dict[str, torch.Tensor]:
        """{proprio_BP: float32 [B, proprio_dim]} for a model with a proprio token (normalized proprio,
        wider input cut to the model's width: a mixture pads proprio with zeros), else {}."""
        if not self.proprio_dim:
            return {}
        if proprio_BP is None:
            raise ValueError(
                f"this model reads proprio ({self.proprio_dim} values, normalized): pass proprio"
            )
        x = np.asarray(proprio_BP, np.float32)
        if x.ndim == 3:  # a proprio window [B, W, P]: the current step
            x = x[:, -1]
        if x.ndim != 2 or x.shape[1] < self.proprio_dim:
            raise ValueError(f"proprio must be [batch, {self.proprio_dim}], got {x.shape}")
        return {"proprio_BP": torch.from_numpy(np.ascontiguousarray(x[:, : self.proprio_dim]))}

    # ---- text -----------------------------------------------------------------------------------
    def collate(
        self,
        images_BHWC,
        instructions: list[str],
        actions_BA: np.ndarray,
        action_pad_mask_BT: np.ndarray | None = None,
        train: bool = True,
        proprio_BP: np.ndarray | None = None,
        image_masks: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch for the model's forward. Token head: normalized actions ([B, A], or chunks
        [B, F + 1, A]) become action tokens, with labels only on them and EOS; chunk steps where
        action_pad_mask_BT is False (past the episode end) get no labels. l1_parallel: the prompts alone,
        and the normalized actions as regression targets (actions_BKA, action_mask_BK). train=False
        preprocesses the images as inference does (pixel_values). Images, image_masks: camera_inputs."""
        extra = {**self.camera_inputs(images_BHWC, image_masks, train), **self.proprio_input(proprio_BP)}
        if self.action_head == "l1_parallel":
            return {
                **self._prompt_batch(instructions),
                **extra,
                **self._action_targets(actions_BA, action_pad_mask_BT),
            }
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
            **extra,
        }

    def _prompt_batch(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """The inference prompts (BOS + prompt + empty piece), right-padded."""
        prompts = self.inference_prompts(instructions)
        L = max(len(p) for p in prompts)
        if L > self.settings.max_length:
            raise ValueError(
                f"a prompt has {L} tokens, more than the model's max_length {self.settings.max_length}; "
                "shorten the instruction or raise model.max_length"
            )
        ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id)
        return {"input_ids_BL": ids, "attention_mask_BL": mask}

    @staticmethod
    def _action_targets(actions, action_pad_mask_BT=None) -> dict[str, torch.Tensor]:
        a = np.asarray(actions, np.float32)
        a = a[:, None] if a.ndim == 2 else a  # [B, A] -> one-step chunks
        if action_pad_mask_BT is None:
            mask = np.ones(a.shape[:2], bool)
        else:
            mask = np.array(action_pad_mask_BT, bool)  # a copy: tf.data's arrays are read-only
        return {
            "actions_BKA": torch.from_numpy(np.array(a)),
            "action_mask_BK": torch.from_numpy(mask),
        }

    def supervised_count(self, inputs: dict[str, torch.Tensor]) -> int:
        """What the loss averages over: supervised tokens (token head), or supervised action values."""
        if "labels_BL" in inputs:
            return int((inputs["labels_BL"][:, 1:] != IGNORE_INDEX).sum())
        return int(inputs["action_mask_BK"].sum()) * inputs["actions_BKA"].shape[-1]

    def inference_prompts(self, instructions: list[str]) -> list[list[int]]:
        return [self.prompt_builder.prompt_ids(i) for i in instructions]

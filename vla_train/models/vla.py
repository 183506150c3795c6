"""The OpenVLA-architecture VLA: fused vision towers -> projector -> causal LM, with patch embeddings
inserted right after BOS. Training forward computes LM-head logits only at the supervised positions;
`predict_action_tokens` decodes greedily with a KV cache, batched with left padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_train.models.prompting import IGNORE_INDEX
from vla_train.models.vision import DinoSigLIPBackbone, FusedMLPProjector, dino_config, siglip_config


@dataclass
class VLAConfig:
    """Everything needed to rebuild the model; saved as config.json in a model directory."""

    image_size: int
    patch_size: int
    dino: dict[str, int]  # hidden, layers, heads, registers[, intermediate]
    siglip: dict[str, int]  # hidden, layers, heads[, intermediate]
    llm: dict[str, Any]  # model_type ("llama", "qwen2") + that transformers config's size kwargs
    base_vocab_size: int  # text vocabulary incl. action tokens (Llama-2: 32000)
    pad_token_id: int  # = base_vocab_size (OpenVLA: 32000)
    empty_piece_id: int | None  # sentencepiece "▁" appended to prompts (Llama-2: 29871)
    action_dim: int = 7
    n_action_bins: int = 256
    llm_max_length: int = 2048
    pad_to_multiple_of: int = 64
    attn_implementation: str = "sdpa"
    norm_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def image_sizes(self) -> list[int]:
        return [self.image_size, self.image_size]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "vla_train"
        d["image_sizes"] = self.image_sizes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VLAOutput:
    loss: torch.Tensor
    logits_NV: torch.Tensor  # LM-head logits at the N supervised positions
    labels_N: torch.Tensor  # their target ids
    sample_index_N: torch.Tensor  # which batch row each supervised position belongs to


def padded_vocab(base_vocab_size: int, multiple: int) -> int:
    n = base_vocab_size + 1  # + pad
    return (n + multiple - 1) // multiple * multiple


def openvla_unused_parameters(config: VLAConfig) -> int:
    """Parameters an OpenVLA checkpoint stores but that never feed the features, so this model does not
    build them: the last block of each tower, both towers' final norms, and SigLIP's attention-pool head
    (timm's AttentionPoolLatent). Added to the built count this gives the checkpoint's size (7.54 B)."""

    def block(d: int, i: int, layerscale: bool) -> int:
        return (
            2 * 2 * d
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + (d * i + i)
            + (i * d + d)
            + (2 * d if layerscale else 0)
        )

    dd, di = config.dino["hidden"], config.dino.get("intermediate", 4 * config.dino["hidden"])
    sd, si = config.siglip["hidden"], config.siglip.get("intermediate", 4 * config.siglip["hidden"])
    attn_pool = (
        sd
        + (sd * sd + sd)
        + (2 * sd * sd + 2 * sd)
        + (sd * sd + sd)
        + 2 * sd
        + (sd * si + si)
        + (si * sd + sd)
    )
    return block(dd, di, True) + block(sd, si, False) + 2 * dd + 2 * sd + attn_pool


class VLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = config
        c = config
        self.vision_backbone = DinoSigLIPBackbone(
            dino_config(c.dino, c.image_size, c.patch_size, c.attn_implementation),
            siglip_config(c.siglip, c.image_size, c.patch_size, c.attn_implementation),
        )
        llm_kwargs = {"tie_word_embeddings": False, **c.llm}  # OpenVLA keeps a separate LM head
        llm_cfg = AutoConfig.for_model(
            llm_kwargs.pop("model_type", "llama"),
            vocab_size=padded_vocab(c.base_vocab_size, c.pad_to_multiple_of),
            pad_token_id=c.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=c.llm_max_length,
            attn_implementation=c.attn_implementation,
            **llm_kwargs,
        )
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, llm_cfg.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(llm_cfg)

    # ---- structure, for parallelism -------------------------------------------------------------
    def repeated_blocks(self) -> list[nn.ModuleList]:
        """The repeated blocks: the LLM decoder layers and each vision tower's blocks. They are the units
        FSDP shards and activation checkpointing recomputes (training/distributed.py), which may replace
        entries of these lists with wrappers."""
        return [self.language_model.model.layers, *self.vision_backbone.repeated_blocks()]

    def disable_kv_cache(self) -> None:
        """No KV cache in the forward unless asked for: under activation checkpointing each recomputation
        would append to it again (transformers' own gradient checkpointing turns it off too). Generation
        (predict_action_tokens) asks for it explicitly."""
        self.language_model.config.use_cache = False

    # ---- shared by training and inference -------------------------------------------------------
    def check_pixel_values(self, pixel_values_BCHW: torch.Tensor) -> None:
        s = self.config.image_size
        if pixel_values_BCHW.ndim != 4 or tuple(pixel_values_BCHW.shape[1:]) != (6, s, s):
            raise ValueError(
                f"pixel_values must be [batch, 6, {s}, {s}] (the image at the model's {s} px, normalized for "
                f"DINOv2 and SigLIP: use the model's processor), got {tuple(pixel_values_BCHW.shape)}"
            )

    def _multimodal_embeddings(self, input_ids_BL, attention_mask_BL, pixel_values_BCHW):
        self.check_pixel_values(pixel_values_BCHW)
        patches_BPD = self.projector(self.vision_backbone(pixel_values_BCHW))
        text_BLD = self.language_model.get_input_embeddings()(input_ids_BL)
        patches_BPD = patches_BPD.to(text_BLD.dtype)
        emb = torch.cat([text_BLD[:, :1], patches_BPD, text_BLD[:, 1:]], dim=1)
        ones = attention_mask_BL.new_ones(patches_BPD.shape[:2])
        mask = torch.cat([attention_mask_BL[:, :1], ones, attention_mask_BL[:, 1:]], dim=1)
        return emb, mask, patches_BPD.shape[1]

    def forward(self, input_ids_BL, attention_mask_BL, pixel_values_BCHW, labels_BL) -> VLAOutput:
        """Training/eval forward. labels_BL holds IGNORE_INDEX except on the supervised positions."""
        emb, mask, num_patches = self._multimodal_embeddings(
            input_ids_BL, attention_mask_BL, pixel_values_BCHW
        )
        hidden = self.language_model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        # Text token i (i >= 1) is predicted from the hidden state at sequence position num_patches + i - 1.
        supervised = labels_BL[:, 1:] != IGNORE_INDEX
        rows, cols = supervised.nonzero(as_tuple=True)
        hidden_ND = hidden[rows, cols + num_patches]
        logits_NV = self.language_model.lm_head(hidden_ND).float()
        labels_N = labels_BL[:, 1:][rows, cols]
        loss = F.cross_entropy(logits_NV, labels_N)
        return VLAOutput(loss=loss, logits_NV=logits_NV, labels_N=labels_N, sample_index_N=rows)

    @torch.no_grad()
    def predict_action_tokens(
        self, prompt_ids: list[list[int]], pixel_values_BCHW: torch.Tensor
    ) -> torch.Tensor:
        """Greedy decoding of action_dim tokens for a batch of prompts (each BOS + prompt + empty piece).

        Prompts of different lengths are left-padded so that every row's next token is at the end.
        Returns [B, action_dim] token ids.
        """
        self.check_pixel_values(pixel_values_BCHW)
        device = pixel_values_BCHW.device
        B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
        if L + self.config.num_patches + self.config.action_dim > self.config.llm_max_length:
            raise ValueError(
                f"a prompt of {L} tokens + {self.config.num_patches} image patches + {self.config.action_dim} "
                f"action tokens exceeds the model's context of {self.config.llm_max_length}; shorten the instruction"
            )
        pad = self.config.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long, device=device)
        mask = torch.zeros((B, L), dtype=torch.long, device=device)
        for b, p in enumerate(prompt_ids):
            ids[b, L - len(p) :] = torch.tensor(p, device=device)
            mask[b, L - len(p) :] = 1
        # Left padding puts BOS at a different column per row; build the sequence row-wise instead.
        patches_BPD = self.projector(self.vision_backbone(pixel_values_BCHW))
        text_BLD = self.language_model.get_input_embeddings()(ids)
        patches_BPD = patches_BPD.to(text_BLD.dtype)
        P = patches_BPD.shape[1]
        emb = text_BLD.new_zeros((B, L + P, text_BLD.shape[-1]))
        full_mask = mask.new_zeros((B, L + P))
        for b, p in enumerate(prompt_ids):
            start = L - len(p)
            row = torch.cat([text_BLD[b, start : start + 1], patches_BPD[b], text_BLD[b, start + 1 :]])
            emb[b, L + P - row.shape[0] :] = row
            full_mask[b, L + P - row.shape[0] :] = 1
        emb[full_mask == 0] = self.language_model.get_input_embeddings()(ids.new_tensor([pad]))[0].to(
            emb.dtype
        )
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=emb, attention_mask=full_mask, position_ids=position_ids, use_cache=True
        )
        tokens = []
        next_tok = out.logits[:, -1].argmax(-1)
        for step in range(self.config.action_dim):
            tokens.append(next_tok)
            if step == self.config.action_dim - 1:
                break
            full_mask = torch.cat([full_mask, full_mask.new_ones((B, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.language_model(
                input_ids=next_tok[:, None],
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_tok = out.logits[:, -1].argmax(-1)
        return torch.stack(tokens, dim=1)

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
    dino: dict[str, int]  # hidden, layers, heads, registers
    siglip: dict[str, int]  # hidden, layers, heads
    llm: dict[str, Any]  # transformers LlamaConfig kwargs (sizes)
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


class VLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = config
        c = config
        self.vision_backbone = DinoSigLIPBackbone(
            dino_config(
                c.dino["hidden"], c.dino["layers"], c.dino["heads"], c.dino["registers"], c.image_size,
                c.patch_size, c.attn_implementation,
            ),
            siglip_config(
                c.siglip["hidden"], c.siglip["layers"], c.siglip["heads"], c.image_size, c.patch_size,
                c.attn_implementation,
            ),
        )
        llm_cfg = LlamaConfig(
            vocab_size=padded_vocab(c.base_vocab_size, c.pad_to_multiple_of),
            pad_token_id=c.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=c.llm_max_length,
            tie_word_embeddings=False,
            attn_implementation=c.attn_implementation,
            **c.llm,
        )
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, llm_cfg.hidden_size)
        self.language_model = LlamaForCausalLM(llm_cfg)

    # ---- shared by training and inference -------------------------------------------------------
    def _multimodal_embeddings(self, input_ids_BL, attention_mask_BL, pixel_values_BCHW):
        patches_BPD = self.projector(self.vision_backbone(pixel_values_BCHW))
        text_BLD = self.language_model.get_input_embeddings()(input_ids_BL)
        patches_BPD = patches_BPD.to(text_BLD.dtype)
        emb = torch.cat([text_BLD[:, :1], patches_BPD, text_BLD[:, 1:]], dim=1)
        ones = attention_mask_BL.new_ones(patches_BPD.shape[:2])
        mask = torch.cat([attention_mask_BL[:, :1], ones, attention_mask_BL[:, 1:]], dim=1)
        return emb, mask, patches_BPD.shape[1]

    def forward(self, input_ids_BL, attention_mask_BL, pixel_values_BCHW, labels_BL) -> VLAOutput:
        """Training/eval forward. labels_BL holds IGNORE_INDEX except on the supervised positions."""
        emb, mask, num_patches = self._multimodal_embeddings(input_ids_BL, attention_mask_BL, pixel_values_BCHW)
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
    def predict_action_tokens(self, prompt_ids: list[list[int]], pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of action_dim tokens for a batch of prompts (each BOS + prompt + empty piece).

        Prompts of different lengths are left-padded so that every row's next token is at the end.
        Returns [B, action_dim] token ids.
        """
        device = pixel_values_BCHW.device
        B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
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
        emb[full_mask == 0] = self.language_model.get_input_embeddings()(ids.new_tensor([pad]))[0].to(emb.dtype)
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

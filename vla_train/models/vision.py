"""Fused vision backbone (DINOv2 with registers + SigLIP, from `transformers`) and the fused GELU MLP
projector, with OpenVLA's feature semantics: patch features of the second-to-last block, no final norm,
no class/register tokens, the two towers concatenated on the feature axis.

Only the blocks that contribute are kept: the last block of each tower (whose output OpenVLA discards)
is not built, and neither are the final norms or SigLIP's pooling head.
"""

from __future__ import annotations

import torch
from torch import nn

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def dino_config(spec: dict, image_size: int, patch: int, attn: str):
    """spec: hidden, layers, heads, registers, optional intermediate (default 4 x hidden)."""
    from transformers import Dinov2WithRegistersConfig

    intermediate = spec.get("intermediate", 4 * spec["hidden"])
    if intermediate % spec["hidden"]:
        raise ValueError(f"DINOv2 MLP width {intermediate} must be a multiple of its width {spec['hidden']}")
    return Dinov2WithRegistersConfig(
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        mlp_ratio=intermediate // spec["hidden"],
        image_size=image_size,
        patch_size=patch,
        num_register_tokens=spec["registers"],
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        hidden_act="gelu",
        attn_implementation=attn,
    )


def siglip_config(spec: dict, image_size: int, patch: int, attn: str):
    """spec: hidden, layers, heads, optional intermediate (default 4 x hidden; so400m: 4304)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=spec.get("intermediate", 4 * spec["hidden"]),
        image_size=image_size,
        patch_size=patch,
        layer_norm_eps=1e-6,
        # timm's so400m tower (what openvla-7b was built from) uses exact GELU, not the tanh approximation.
        hidden_act="gelu",
        vision_use_head=False,
        attn_implementation=attn,
    )


def _drop_last_block(layers: nn.ModuleList) -> nn.ModuleList:
    return nn.ModuleList(list(layers)[:-1])


class DinoSigLIPBackbone(nn.Module):
    """pixel_values_BCHW with 6 channels (DINOv2-normalized RGB, then SigLIP-normalized RGB) ->
    patch features [B, num_patches, dino_dim + siglip_dim]."""

    def __init__(self, dino_cfg, siglip_cfg):
        super().__init__()
        from transformers import Dinov2WithRegistersModel, SiglipVisionModel

        dino = Dinov2WithRegistersModel(dino_cfg)
        siglip = SiglipVisionModel(siglip_cfg)
        dino.encoder.layer = _drop_last_block(dino.encoder.layer)
        siglip.encoder.layers = _drop_last_block(siglip.encoder.layers)
        del dino.layernorm, siglip.post_layernorm
        self.featurizer = dino
        self.fused_featurizer = siglip
        self.num_prefix_tokens = 1 + dino_cfg.num_register_tokens
        self.embed_dim = dino_cfg.hidden_size + siglip_cfg.hidden_size
        self.num_patches = (dino_cfg.image_size // dino_cfg.patch_size) ** 2

    def repeated_blocks(self) -> list[nn.ModuleList]:
        """Each tower's transformer blocks."""
        return [self.featurizer.encoder.layer, self.fused_featurizer.encoder.layers]

    def forward(self, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
        dino_px, siglip_px = torch.split(pixel_values_BCHW, [3, 3], dim=1)
        d = self.featurizer.embeddings(dino_px)
        d = self.featurizer.encoder(d).last_hidden_state[:, self.num_prefix_tokens :]
        s = self.fused_featurizer.embeddings(siglip_px)
        s = self.fused_featurizer.encoder(s).last_hidden_state
        return torch.cat([d, s], dim=-1)


class FusedMLPProjector(nn.Module):
    """fc1 (vision -> 4 x vision), GELU, fc2 (-> llm), GELU, fc3 (llm -> llm): OpenVLA's fused projector."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, bias=True)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim, bias=True)
        self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, features_BPD: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features_BPD)))))

"""Build a VLA from config (random weights, local tokenizer) and save/load vla_train model directories:

config.json                 VLAConfig (sizes, vocab, norm_stats, OpenVLA fields)
model.safetensors           weights
tokenizer.json, tokenizer_config.json, special_tokens_map.json
processor_config.json       image size, eval centre crop, max length
dataset_statistics.json     the same statistics as config.json's norm_stats
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vla_train.config import ModelConfig
from vla_train.models.processor import ProcessorSettings, VLAProcessor
from vla_train.models.tokenizer import build_local_tokenizer, empty_piece_id
from vla_train.models.vla import VLA, VLAConfig

WEIGHTS_FILE = "model.safetensors"


def resolve_attn_implementation(name: str) -> str:
    """`auto`: flash-attn when it is installed and CUDA is up, else PyTorch SDPA."""
    if name != "auto":
        return name
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def vla_config_from(model_cfg: ModelConfig, tokenizer) -> VLAConfig:
    m = model_cfg
    llm: dict = {
        "model_type": m.llm_type,
        "hidden_size": m.llm_hidden_size,
        "intermediate_size": m.llm_intermediate_size,
        "num_hidden_layers": m.llm_num_layers,
        "num_attention_heads": m.llm_num_heads,
        "num_key_value_heads": m.llm_num_kv_heads or m.llm_num_heads,
        "tie_word_embeddings": m.llm_tie_word_embeddings,
    }
    if m.llm_rope_theta:
        llm["rope_theta"] = m.llm_rope_theta
    if m.llm_rms_norm_eps:
        llm["rms_norm_eps"] = m.llm_rms_norm_eps
    return VLAConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        dino={
            "hidden": m.dino_hidden_size,
            "layers": m.dino_num_layers,
            "heads": m.dino_num_heads,
            "registers": m.dino_num_registers,
            "intermediate": m.dino_intermediate_size or 4 * m.dino_hidden_size,
        },
        siglip={
            "hidden": m.siglip_hidden_size,
            "layers": m.siglip_num_layers,
            "heads": m.siglip_num_heads,
            "intermediate": m.siglip_intermediate_size or 4 * m.siglip_hidden_size,
        },
        llm=llm,
        base_vocab_size=len(tokenizer) - 1,
        pad_token_id=tokenizer.pad_token_id,
        empty_piece_id=empty_piece_id(tokenizer),
        action_dim=m.action_dim,
        n_action_bins=m.n_action_bins,
        llm_max_length=m.max_length,
        attn_implementation=resolve_attn_implementation(m.attn_implementation),
    )


def make_processor(config: VLAConfig, tokenizer, center_crop_area: float = 1.0) -> VLAProcessor:
    settings = ProcessorSettings(
        config.image_size, center_crop_area, config.llm_max_length - config.num_patches
    )
    return VLAProcessor(tokenizer, settings, config.empty_piece_id, config.n_action_bins)


def build_from_config(model_cfg: ModelConfig, instructions: list[str], seed: int) -> tuple[VLA, VLAProcessor]:
    """A randomly initialized model (seeded) and its processor with a tokenizer trained on `instructions`."""
    tokenizer = build_local_tokenizer(instructions, model_cfg.text_vocab_size, model_cfg.n_action_bins)
    config = vla_config_from(model_cfg, tokenizer)
    torch.manual_seed(seed)
    model = VLA(config)
    return model, make_processor(config, tokenizer)


def save_model_dir(
    directory: str | Path,
    model: VLA,
    processor: VLAProcessor,
    norm_stats: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained model directory (weights, config with norm_stats, tokenizer, processor)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if norm_stats is not None:
        model.config.norm_stats = norm_stats
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    (out / "dataset_statistics.json").write_text(json.dumps(model.config.norm_stats, indent=2))
    processor.tokenizer.save_pretrained(str(out))
    processor.settings.save(out)
    return out


def _rebuild_non_persistent_buffers(model: VLA, device: torch.device) -> None:
    """Buffers that are not saved (rotary frequencies, position ids) were created on meta: rebuild each
    owning module from its config on the real device and take its buffers."""
    for name, module in model.named_modules():
        meta = [b for b, buf in module.named_buffers(recurse=False) if buf.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"cannot rebuild buffers {meta} of {name}: the module has no config")
        with torch.device(device):
            fresh = type(module)(module.config)
        for b in meta:
            module.register_buffer(b, getattr(fresh, b), persistent=False)
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling


def load_model_dir(directory: str | Path, device: str = "cpu") -> tuple[VLA, VLAProcessor]:
    """Load a vla_train model directory, or an OpenVLA-format one (e.g. openvla-7b) converted on the fly."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory: no config.json")
    from vla_train.models.openvla_format import is_openvla_dir, load_openvla_dir

    if is_openvla_dir(d):  # a released OpenVLA checkpoint (timm key layout): converted on load
        return load_openvla_dir(d, device)
    config = VLAConfig.from_dict(json.loads((d / "config.json").read_text()))
    with torch.device("meta"):
        model = VLA(config)
    state = load_file(str(d / WEIGHTS_FILE), device=device)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{d / WEIGHTS_FILE} does not match config.json: missing {missing}, unexpected {unexpected}"
        )
    expected_shapes = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)}, config {tuple(expected_shapes[k].shape)}"
        for k, v in sorted(state.items())
        if tuple(v.shape) != tuple(expected_shapes[k].shape)
    ]
    if wrong:
        raise ValueError(f"{d / WEIGHTS_FILE} does not match config.json in shape: " + "; ".join(wrong))
    model.load_state_dict(state, assign=True)
    _rebuild_non_persistent_buffers(model, torch.device(device))
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(d))
    processor = VLAProcessor(
        tokenizer, ProcessorSettings.load(d), config.empty_piece_id, config.n_action_bins
    )
    return model, processor

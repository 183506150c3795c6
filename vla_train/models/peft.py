"""Which weights of the VLA train: LoRA adapters (peft) on every nn.Linear except the LM head by default
(OpenVLA's "all-linear", gaussian init, alpha = min(rank, 16)), optionally over bitsandbytes 4-bit NF4 or
8-bit base weights (QLoRA), or the freeze modes of full fine-tuning (full, frozen_vision, sandwich,
last_layer).
"""

from __future__ import annotations

import torch
from torch import nn

from vla_train.config import LoraConfig
from vla_train.models.vla import NEW_MODULES

# The DINOv2 mask token only serves masked-image pretraining; the VLA forward never reads it, and a
# trainable parameter without a gradient breaks DDP.
UNUSED_PARAMETERS = ("mask_token",)


def freeze_unused(model: nn.Module) -> None:
    """Freeze the parameters the forward never reads (UNUSED_PARAMETERS; the LM head, and any adapter on
    it, of an l1_parallel model, which regresses actions instead of predicting tokens)."""
    heads = {getattr(getattr(m, "config", None), "action_head", None) for m in model.modules()}
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] in UNUSED_PARAMETERS:
            p.requires_grad_(False)
        elif "l1_parallel" in heads and ("lm_head." in name or name.endswith("lm_head")):
            p.requires_grad_(False)


def _is_new_module(name: str) -> bool:
    return any(_is_under(name, m) for m in NEW_MODULES)


def linear_module_names(model: nn.Module) -> list[str]:
    """LoRA's candidate layers: every nn.Linear but the LM head and the NEW_MODULES (the proprio
    projector and the l1_parallel head train whole, as OpenVLA-OFT trains them)."""
    return sorted(
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head") and not _is_new_module(name)
    )


def train_new_modules(model: nn.Module) -> None:
    """The NEW_MODULES (VLA.add_missing_modules) always train, whole, in every mode, with fp32 master
    weights (even in a bf16 checkpoint)."""
    for name, p in model.named_parameters():
        if _is_new_module(name.removeprefix("base_model.model.")):
            p.data = p.data.float()
            p.requires_grad_(True)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".")


def _is_under(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The linear layers that get adapters: every nn.Linear but the LM head for "all-linear", plus the
    named ones; layers inside a module of cfg.modules_to_save get none (the whole module trains). A
    name that matches nothing raises a ValueError naming it."""
    every = sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    targets = set(linear_module_names(model)) if "all-linear" in cfg.target_modules else set()
    for t in cfg.target_modules:
        if t != "all-linear":
            matched = [n for n in every if n == t or n.endswith("." + t)]
            if not matched:
                raise ValueError(
                    f"lora.target_modules entry '{t}' matches no linear layer; examples: {every[:6]}"
                )
            targets.update(matched)
    modules = dict(model.named_modules())
    for m in cfg.modules_to_save:
        if m not in modules:
            top = sorted(n for n in modules if n and "." not in n)
            raise ValueError(f"lora.modules_to_save entry '{m}' is no module of the model; top level: {top}")
        if _is_new_module(m):
            raise ValueError(
                f"lora.modules_to_save entry '{m}': the new modules ({', '.join(NEW_MODULES)}) already "
                "train whole under LoRA; remove it"
            )
        targets = {t for t in targets if not _is_under(t, m)}
    return sorted(t for t in targets if not _is_new_module(t))  # the new modules train whole


def quantized_layers(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The nn.Linear layers QLoRA quantizes: all but the LM head and cfg.quant_skip_modules."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not name.endswith("lm_head")
        and not _is_new_module(name)
        and not any(_matches(name, skip) or _is_under(name, skip) for skip in cfg.quant_skip_modules)
    ]


def quantize_linear_layers(model: nn.Module, cfg: LoraConfig, device: torch.device) -> list[str]:
    """Replace nn.Linear layers by bitsandbytes 4-bit NF4 / 8-bit layers holding the same weights.

    The LM head and `cfg.quant_skip_modules` stay unquantized (as transformers and OpenVLA do). The
    weights are quantized when the layer moves to `device` (bitsandbytes' CPU kernels serve CPU runs).
    Returns the names of the quantized layers.
    """
    import bitsandbytes as bnb

    compute = cfg.quant_compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.type == "cuda" else "float32"
    compute_dtype = getattr(torch, compute)
    quantized = quantized_layers(model, cfg)
    for name in quantized:
        module = model.get_submodule(name)
        has_bias = module.bias is not None
        if cfg.quantization == "nf4":
            new = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                quant_storage=torch.uint8,
            )
            new.weight = bnb.nn.Params4bit(
                module.weight.data.detach().clone(), requires_grad=False, quant_type="nf4"
            )
        else:
            new = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(
                module.weight.data.detach().clone(), requires_grad=False, has_fp16_weights=False
            )
        if has_bias:
            new.bias = nn.Parameter(module.bias.data.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new.to(device))
    return quantized


def apply_lora(model: nn.Module, cfg: LoraConfig, device: torch.device | str | None = None):
    """Wrap `model` with LoRA adapters (over quantized base weights when cfg.quantization is set).

    Afterwards only the adapters and `cfg.modules_to_save` are trainable. Linear layers inside a module
    of modules_to_save get no adapter (the whole module trains). Returns the peft model; its
    `get_base_model()` is the VLA (adapters injected in place), which the trainer calls and shards.
    """
    import peft

    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = lora_targets(model, cfg)
    if cfg.quantization != "none":
        model.requires_grad_(False)
        quantize_linear_layers(model, cfg, device)
        # Non-quantized weights stay float32 (peft's prepare_model_for_kbit_training does the same).
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    model.to(device)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        modules_to_save=list(cfg.modules_to_save) or None,
    )
    peft_model = peft.get_peft_model(model, peft_cfg)
    train_new_modules(peft_model)
    freeze_unused(peft_model)
    return peft_model


def last_layer_modules(vla: nn.Module) -> list[nn.Module]:
    """Prismatic's "last LLM layer" for fine-tuning: the last decoder block, the token embedding and the
    LM head (the action tokens live in the embedding and the head)."""
    lm = vla.language_model
    return [lm.model.layers[-1], lm.get_input_embeddings(), lm.lm_head]


def set_finetune_mode(vla: nn.Module, mode: str) -> None:
    """Choose the trainable base weights of a full fine-tune (no LoRA); see training.finetune_mode."""
    if mode == "full":
        vla.requires_grad_(True)
    elif mode == "frozen_vision":
        vla.requires_grad_(True)
        vla.vision_backbone.requires_grad_(False)
    elif mode == "sandwich":
        vla.requires_grad_(False)
        vla.vision_backbone.requires_grad_(True)
        vla.projector.requires_grad_(True)
        for m in last_layer_modules(vla):
            m.requires_grad_(True)
    elif mode == "last_layer":
        vla.requires_grad_(False)
        for m in last_layer_modules(vla):
            m.requires_grad_(True)
    else:
        raise ValueError(f"unknown finetune mode '{mode}'")
    train_new_modules(vla)
    freeze_unused(vla)


def load_adapter_state_dict(peft_model, state: dict) -> None:
    """Load adapters (and modules_to_save) into a peft model from the trainer's checkpoint format:
    parameter names of the VLA inside the peft model (`<name>.lora_A.default.weight`), as
    torch.distributed.checkpoint stores them."""
    inner = peft_model.get_base_model()
    result = inner.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter checkpoint has keys the model does not: {result.unexpected_keys[:8]}")
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise ValueError(f"adapter checkpoint lacks trainable weights of the model: {missing[:8]}")

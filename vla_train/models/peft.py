"""LoRA adapters (peft) on the VLA: every nn.Linear except the LM head by default (OpenVLA's
"all-linear"), gaussian init, alpha = min(rank, 16) unless set."""

from __future__ import annotations

from torch import nn

from vla_train.config import LoraConfig


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    )


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap `model` with LoRA adapters; only adapter weights are trainable afterwards."""
    import peft

    every = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    targets = set(linear_module_names(model)) if "all-linear" in cfg.target_modules else set()
    for t in cfg.target_modules:
        if t != "all-linear":
            matched = [n for n in every if n == t or n.endswith("." + t)]
            if not matched:
                raise ValueError(
                    f"lora.target_modules entry '{t}' matches no linear layer; examples: {every[:6]}"
                )
            targets.update(matched)
    targets = sorted(targets)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
    )
    return peft.get_peft_model(model, peft_cfg)


def adapter_state_dict(peft_model) -> dict:
    import peft

    return peft.get_peft_model_state_dict(peft_model)


def load_adapter_state_dict(peft_model, state: dict) -> None:
    import peft

    result = peft.set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter checkpoint has keys the model does not: {unexpected[:8]}")

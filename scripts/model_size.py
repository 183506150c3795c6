"""Build a model preset on the meta device (no memory, no weights) and report its parameter counts.

.venv/bin/python scripts/model_size.py configs/model_openvla_7b.yaml configs/model_minivla.yaml
"""

from __future__ import annotations

import sys

import torch

from vla_train.config import TrainConfig
from vla_train.config_cli import parse_config
from vla_train.models.load import vla_config_from
from vla_train.models.tokenizer import build_local_tokenizer
from vla_train.models.vla import VLA, openvla_unused_parameters


def main(paths: list[str]) -> None:
    for path in paths:
        cfg = parse_config(TrainConfig, ["--config_path", path], validate=False)
        tok = build_local_tokenizer(["pick up the block"], cfg.model.text_vocab_size, cfg.model.n_action_bins)
        config = vla_config_from(cfg.model, tok)
        with torch.device("meta"):
            model = VLA(config)
        parts = {
            "vision": model.vision_backbone,
            "projector": model.projector,
            "language_model": model.language_model,
        }
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        built = sum(counts.values())
        unused = openvla_unused_parameters(config)
        print(
            f"{path}: {built / 1e9:.4f} B built "
            + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items())
            + f"; {(built + unused) / 1e9:.4f} B as an OpenVLA checkpoint stores it "
            f"(+{unused / 1e6:.1f} M in the towers' last blocks, final norms and attention pool, never used)"
        )


if __name__ == "__main__":
    main(
        sys.argv[1:]
        or ["configs/model_openvla_7b.yaml", "configs/model_minivla.yaml", "configs/model_tiny.yaml"]
    )

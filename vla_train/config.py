"""Typed run configuration: one draccus dataclass per component, parsed from YAML presets plus dotted
CLI overrides, and validated before anything heavy (torch, TensorFlow, a process group) is imported.

Every `validate()` collects all problems with their field path (`training.max_steps`) and a fix, so a
user sees every mistake of a config at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import draccus


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the field path and the fix."""


def _problem(path: str, msg: str) -> str:
    return f"{path}: {msg}"


def writable_dir_problem(directory: str) -> str | None:
    """None if `directory` exists or can be created and a file can be written in it, else why not.

    Creating the directory is the only reliable test (permissions, read-only mounts, root's rights).
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"'{directory}' is not a writable directory ({e.strerror or e}); choose a directory you can write to"
    return None


@dataclass
class SyntheticDataConfig:
    # Episodes written to the `train` split when the synthetic dataset is built.
    num_train_episodes: int = 400
    # Episodes written to the `val` split.
    num_val_episodes: int = 40
    # Steps (frames) per episode.
    steps_per_episode: int = 10
    # Side of the stored square JPEG frames, in pixels.
    image_size: int = 64
    # Seed of the episode generator: the same seed writes the same dataset.
    seed: int = 0

    def validate(self, prefix: str) -> list[str]:
        errs = []
        for name in ("num_train_episodes", "num_val_episodes", "steps_per_episode"):
            if getattr(self, name) < 1:
                errs.append(_problem(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}"))
        if self.image_size < 16:
            errs.append(_problem(f"{prefix}.image_size", f"must be >= 16 pixels, got {self.image_size}"))
        return errs


@dataclass
class DataConfig:
    # Directory that holds tfds builder directories (<data_root_dir>/<dataset_name>/<version>/).
    data_root_dir: str = "data_cache"
    # Name of the RLDS dataset under data_root_dir.
    dataset_name: str = "vla_synthetic"
    # Build the synthetic dataset into data_root_dir when it is missing (only for dataset_name vla_synthetic).
    build_synthetic: bool = False
    # Parameters of the synthetic dataset, used when build_synthetic builds it.
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # Action/proprio normalization: bounds_q99 (OpenVLA default), bounds or normal.
    normalization: str = "bounds_q99"
    # Shuffle buffer, in frames (shuffling happens on still-encoded JPEG frames).
    shuffle_buffer_size: int = 20000
    # Directory for cached dataset statistics; empty means <data_root_dir>/vla_train_stats.
    stats_cache_dir: str = ""
    # OpenVLA's train-time image augmentation (random resized crop + color jitter).
    image_augmentation: bool = False
    # Diagnostic modality ablation: none, blank_image (all frames black) or fixed_instruction (one
    # instruction for every frame). A policy that truly uses an input scores far lower without it.
    ablation: str = "none"
    # Threads tf.data may use for parallel map/interleave (0 = tf.data.AUTOTUNE).
    num_parallel_calls: int = 0

    def validate(self, prefix: str = "data") -> list[str]:
        errs = []
        if self.normalization not in ("bounds_q99", "bounds", "normal"):
            errs.append(
                _problem(
                    f"{prefix}.normalization",
                    f"unknown '{self.normalization}'; use one of bounds_q99, bounds, normal",
                )
            )
        if self.ablation not in ("none", "blank_image", "fixed_instruction"):
            errs.append(
                _problem(
                    f"{prefix}.ablation",
                    f"unknown '{self.ablation}'; use none, blank_image or fixed_instruction",
                )
            )
        if self.shuffle_buffer_size < 1:
            errs.append(_problem(f"{prefix}.shuffle_buffer_size", "must be >= 1"))
        if self.num_parallel_calls < 0:
            errs.append(_problem(f"{prefix}.num_parallel_calls", "must be >= 0 (0 = autotune)"))
        dataset_dir = Path(self.data_root_dir) / self.dataset_name
        if self.build_synthetic:
            if self.dataset_name != "vla_synthetic":
                errs.append(
                    _problem(
                        f"{prefix}.build_synthetic",
                        f"only the synthetic dataset 'vla_synthetic' can be built, not '{self.dataset_name}'; "
                        "set data.build_synthetic false and point data.data_root_dir at your RLDS data",
                    )
                )
            errs += self.synthetic.validate(f"{prefix}.synthetic")
            problem = writable_dir_problem(self.data_root_dir)
            if problem:
                errs.append(
                    _problem(f"{prefix}.data_root_dir", f"{problem} (the synthetic dataset is built there)")
                )
        elif not Path(self.data_root_dir).is_dir():
            errs.append(
                _problem(
                    f"{prefix}.data_root_dir",
                    f"directory '{self.data_root_dir}' does not exist; point it at the directory that "
                    "holds your tfds datasets (or set data.build_synthetic true for the synthetic demo data)",
                )
            )
        elif not dataset_dir.is_dir():
            found = sorted(p.name for p in Path(self.data_root_dir).iterdir() if p.is_dir())
            errs.append(
                _problem(
                    f"{prefix}.dataset_name",
                    f"no dataset '{self.dataset_name}' under '{self.data_root_dir}' (expected "
                    f"{dataset_dir}/<version>/dataset_info.json); found: {found or 'nothing'}",
                )
            )
        return errs


@dataclass
class ModelConfig:
    # Load the base model from this vla_train/OpenVLA model directory; empty = build from the sizes below
    # with random weights.
    pretrained_dir: str = ""
    # Square input image side in pixels (OpenVLA: 224).
    image_size: int = 64
    # Vision patch size in pixels (OpenVLA: 14).
    patch_size: int = 8
    # DINOv2-with-registers tower: width, depth, heads, register tokens.
    dino_hidden_size: int = 64
    dino_num_layers: int = 3
    dino_num_heads: int = 4
    dino_num_registers: int = 4
    # DINOv2 MLP width (0 = 4 x width).
    dino_intermediate_size: int = 0
    # SigLIP tower: width, depth, heads, MLP width (0 = 4 x width; so400m: 4304).
    siglip_hidden_size: int = 64
    siglip_num_layers: int = 3
    siglip_num_heads: int = 4
    siglip_intermediate_size: int = 0
    # Causal LM family from transformers: llama (OpenVLA) or qwen2 (MiniVLA-style).
    llm_type: str = "llama"
    # Language model: width, depth, heads, MLP width.
    llm_hidden_size: int = 128
    llm_num_layers: int = 4
    llm_num_heads: int = 4
    llm_intermediate_size: int = 344
    # Key/value heads for grouped-query attention (0 = llm_num_heads).
    llm_num_kv_heads: int = 0
    # Rotary base and RMSNorm epsilon (0 = the transformers default of llm_type).
    llm_rope_theta: float = 0.0
    llm_rms_norm_eps: float = 0.0
    # Share the input embedding with the LM head (Qwen2.5-0.5B does; Llama-2/OpenVLA does not).
    llm_tie_word_embeddings: bool = False
    # Text vocabulary of a model built from config: a BPE trained locally on the instructions, filled up
    # to this size; the n_action_bins action tokens follow, then <pad> (Llama-2: 31744 + 256 = 32000).
    text_vocab_size: int = 512
    # Maximum sequence length of the language model (text tokens + image patches).
    max_length: int = 512
    # Action dimensionality (7 = 6-DoF end-effector delta + gripper).
    action_dim: int = 7
    # Number of action bins (OpenVLA: 256).
    n_action_bins: int = 256
    # Attention kernel: auto (flash_attention_2 when flash-attn is installed and CUDA is up, else sdpa),
    # sdpa, eager, or flash_attention_2 (needs the `gpu` extra).
    attn_implementation: str = "auto"

    def validate(self, prefix: str = "model") -> list[str]:
        errs = []
        if self.pretrained_dir and not (Path(self.pretrained_dir) / "config.json").is_file():
            errs.append(
                _problem(
                    f"{prefix}.pretrained_dir",
                    f"'{self.pretrained_dir}' has no config.json; point it at a model directory written by "
                    "vla-export (or leave it empty to build a model from the sizes in this config)",
                )
            )
        positive = (
            "image_size patch_size dino_hidden_size dino_num_layers dino_num_heads siglip_hidden_size "
            "siglip_num_layers siglip_num_heads llm_hidden_size llm_num_layers llm_num_heads "
            "llm_intermediate_size text_vocab_size max_length action_dim n_action_bins"
        ).split()
        for name in positive:
            if getattr(self, name) < 1:
                errs.append(_problem(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}"))
        if self.dino_num_registers < 0:
            errs.append(_problem(f"{prefix}.dino_num_registers", "must be >= 0"))
        if errs:
            return errs
        if self.image_size % self.patch_size:
            errs.append(
                _problem(
                    f"{prefix}.image_size",
                    f"{self.image_size} is not a multiple of model.patch_size {self.patch_size}",
                )
            )
        for tower in ("dino", "siglip", "llm"):
            width, heads = getattr(self, f"{tower}_hidden_size"), getattr(self, f"{tower}_num_heads")
            if width % heads:
                errs.append(
                    _problem(
                        f"{prefix}.{tower}_hidden_size",
                        f"{width} is not divisible by {tower}_num_heads {heads}",
                    )
                )
        for tower in ("dino", "siglip"):
            if getattr(self, f"{tower}_num_layers") < 2:
                errs.append(
                    _problem(
                        f"{prefix}.{tower}_num_layers",
                        "must be >= 2: features come from the second-to-last block",
                    )
                )
        if self.text_vocab_size < 64:
            errs.append(_problem(f"{prefix}.text_vocab_size", "must be >= 64 to hold the prompt vocabulary"))
        if self.llm_type not in ("llama", "qwen2"):
            errs.append(_problem(f"{prefix}.llm_type", f"unknown '{self.llm_type}'; use llama or qwen2"))
        if self.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2"):
            errs.append(
                _problem(
                    f"{prefix}.attn_implementation",
                    f"unknown '{self.attn_implementation}'; use auto, sdpa, eager or flash_attention_2",
                )
            )
        if self.llm_num_kv_heads and self.llm_num_heads % self.llm_num_kv_heads:
            errs.append(
                _problem(
                    f"{prefix}.llm_num_kv_heads",
                    f"{self.llm_num_kv_heads} does not divide llm_num_heads {self.llm_num_heads}",
                )
            )
        dino_mlp = self.dino_intermediate_size or 4 * self.dino_hidden_size
        if dino_mlp % self.dino_hidden_size:
            errs.append(
                _problem(
                    f"{prefix}.dino_intermediate_size",
                    f"{dino_mlp} must be a multiple of dino_hidden_size {self.dino_hidden_size}",
                )
            )
        num_patches = (self.image_size // self.patch_size) ** 2
        if num_patches + 32 > self.max_length:
            errs.append(
                _problem(
                    f"{prefix}.max_length",
                    f"{self.max_length} leaves no room for text after {num_patches} image patches; raise it",
                )
            )
        return errs


@dataclass
class LoraConfig:
    # Train LoRA adapters (peft) instead of the full model.
    enabled: bool = True
    # Adapter rank.
    rank: int = 32
    # Scaling alpha; 0 means OpenVLA's choice min(rank, 16).
    alpha: int = 0
    # Dropout on the adapter input.
    dropout: float = 0.0
    # Which layers get adapters: "all-linear" (every nn.Linear except the LM head) or a list of names.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Adapter weight init: gaussian (OpenVLA) or default (kaiming, as peft).
    init: str = "gaussian"

    def validate(self, prefix: str = "lora") -> list[str]:
        errs = []
        if self.enabled:
            if self.rank < 1:
                errs.append(_problem(f"{prefix}.rank", f"must be >= 1, got {self.rank}"))
            if self.alpha < 0:
                errs.append(_problem(f"{prefix}.alpha", "must be >= 0 (0 = min(rank, 16))"))
            if not 0.0 <= self.dropout < 1.0:
                errs.append(_problem(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}"))
            if self.init not in ("gaussian", "default"):
                errs.append(_problem(f"{prefix}.init", f"unknown '{self.init}'; use gaussian or default"))
            if not self.target_modules:
                errs.append(_problem(f"{prefix}.target_modules", "is empty; use [all-linear] or layer names"))
        return errs

    @property
    def effective_alpha(self) -> int:
        return self.alpha or min(self.rank, 16)


@dataclass
class TrainingConfig:
    # Optimizer steps to run.
    max_steps: int = 200
    # Frames per optimizer step.
    batch_size: int = 16
    # Peak learning rate of AdamW.
    learning_rate: float = 5e-4
    # AdamW weight decay (applied to matrices, not to biases and norms).
    weight_decay: float = 0.0
    # Linear warmup steps before the constant learning rate.
    warmup_steps: int = 0
    # Gradient-norm clipping threshold (0 disables).
    max_grad_norm: float = 1.0
    # Seed of the model init, data order and augmentation: the same seed reproduces the run.
    seed: int = 7
    # Frames evaluated on the validation split at the end of training (and every val_every steps).
    num_val_frames: int = 256
    # Run validation every this many steps (0 = only at the end).
    val_every: int = 0
    # Torch threads for the CPU path (0 = torch default).
    num_threads: int = 0

    def validate(self, prefix: str = "training") -> list[str]:
        errs = []
        if self.max_steps < 1:
            errs.append(
                _problem(f"{prefix}.max_steps", f"must be a positive step count, got {self.max_steps}")
            )
        if self.batch_size < 1:
            errs.append(_problem(f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}"))
        if not self.learning_rate > 0:
            errs.append(_problem(f"{prefix}.learning_rate", f"must be > 0, got {self.learning_rate}"))
        if self.weight_decay < 0:
            errs.append(_problem(f"{prefix}.weight_decay", "must be >= 0"))
        if self.warmup_steps < 0:
            errs.append(_problem(f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}"))
        if self.max_grad_norm < 0:
            errs.append(_problem(f"{prefix}.max_grad_norm", "must be >= 0 (0 disables clipping)"))
        if self.num_val_frames < 0:
            errs.append(_problem(f"{prefix}.num_val_frames", "must be >= 0"))
        if self.val_every < 0:
            errs.append(_problem(f"{prefix}.val_every", "must be >= 0 (0 = only at the end)"))
        if self.num_threads < 0:
            errs.append(_problem(f"{prefix}.num_threads", "must be >= 0"))
        return errs


@dataclass
class LoggingConfig:
    # Runs are written to <output_dir>/<run_id>/ (metrics.jsonl, checkpoints, base model, wandb files).
    output_dir: str = "runs"
    # Name of this run; empty = a timestamp.
    run_id: str = ""
    # Weights & Biases: disabled, offline (files only) or online.
    wandb_mode: str = "disabled"
    # Weights & Biases project name.
    wandb_project: str = "vla_train"
    # Append a metrics line every this many steps.
    log_every: int = 10
    # Show a progress bar.
    progress_bar: bool = True

    def validate(self, prefix: str = "logging") -> list[str]:
        errs = []
        if self.wandb_mode not in ("disabled", "offline", "online"):
            errs.append(
                _problem(
                    f"{prefix}.wandb_mode", f"unknown '{self.wandb_mode}'; use disabled, offline or online"
                )
            )
        if self.log_every < 1:
            errs.append(_problem(f"{prefix}.log_every", "must be >= 1"))
        if self.run_id and (os.sep in self.run_id or self.run_id in (".", "..")):
            errs.append(_problem(f"{prefix}.run_id", f"'{self.run_id}' must be a plain name, not a path"))
        problem = writable_dir_problem(self.output_dir)
        if problem:
            errs.append(_problem(f"{prefix}.output_dir", problem))
        return errs


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Raise ConfigError listing every problem (call before any heavy import)."""
        errs = (
            self.data.validate("data")
            + self.model.validate("model")
            + self.lora.validate("lora")
            + self.training.validate("training")
            + self.logging.validate("logging")
        )
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


@dataclass
class ExportConfig:
    # Training run directory (<output_dir>/<run_id>) whose newest checkpoint is exported.
    run_dir: str = ""
    # Where the merged model directory is written; empty = <run_dir>/export.
    output_dir: str = ""
    # After exporting, reload the directory and predict this many held-out validation frames.
    predict_samples: int = 0

    def validate(self) -> None:
        errs = []
        if not self.run_dir:
            errs.append(_problem("run_dir", "is required: the run directory of a vla-train run"))
        elif not (Path(self.run_dir) / "config.yaml").is_file():
            errs.append(
                _problem("run_dir", f"'{self.run_dir}' is not a vla-train run directory (no config.yaml)")
            )
        if self.predict_samples < 0:
            errs.append(_problem("predict_samples", "must be >= 0"))
        if errs:
            raise ConfigError("invalid export config:\n  " + "\n  ".join(errs))


@dataclass
class StatsConfig:
    # Data section as in the training config (data_root_dir, dataset_name, normalization...).
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        errs = self.data.validate("data")
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def _field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every dotted field path of a dataclass tree to its field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out[path] = f
        ftype = f.type if isinstance(f.type, type) else _resolve(cls, f.name)
        if dataclasses.is_dataclass(ftype):
            out.update(_field_paths(ftype, path + "."))
    return out


def _resolve(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls)[name]


def _check_cli_keys(cls: type, args: list[str]) -> None:
    known = _field_paths(cls)
    for arg in args:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0]
        if key in ("config_path", "help", "h"):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '--{key}'{hint}")


def parse_config(cls: type, args: list[str] | None = None, validate: bool = True):
    """Parse `--config_path FILE` plus dotted overrides into `cls` and validate it.

    Every problem becomes a ConfigError naming the field (draccus' own errors are translated).
    """
    args = list(sys.argv[1:] if args is None else args)
    _check_cli_keys(cls, args)
    for i, arg in enumerate(args):
        if arg.split("=", 1)[0] == "--config_path":
            path = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if not Path(path).is_file():
                raise ConfigError(f"config_path: file '{path}' does not exist")
    try:
        cfg = draccus.parse(cls, args=args)
    except draccus.utils.DecodingError as e:
        path = ".".join(str(p) for p in e.key_path) or "<root>"
        msg = str(e.message) if hasattr(e, "message") else str(e)
        if "are not valid for" in msg:
            stem = "" if path == "<root>" else path + "."
            options = [k[len(stem) :] for k in _field_paths(cls) if k.startswith(stem)]
            options = sorted(k for k in options if "." not in k)
            raise ConfigError(f"{path}: {msg}; valid keys here: {', '.join(options)}") from None
        raise ConfigError(f"{path}: {msg}") from None
    if validate:
        cfg.validate()
    return cfg


def to_yaml(cfg: Any) -> str:
    return draccus.dump(cfg)

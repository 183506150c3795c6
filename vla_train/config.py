"""Typed run configuration: one draccus dataclass per component (the schema), and its validation, made
before anything heavy (torch, TensorFlow, a process group) is imported. Parsing YAML presets and CLI
overrides lives beside it, in config_cli.py.

Every `validate()` collects all problems with their field path (`training.max_steps`) and a fix, so a
user sees every mistake of a config at once. Validation only looks: it creates no directory and leaves
the process-wide dataset registry as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the field path and the fix."""


def _problem(path: str, msg: str) -> str:
    return f"{path}: {msg}"


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _at_least(obj, prefix: str, low: int, *names: str, note: str = "") -> list[str]:
    """A problem for each of obj's fields `names` below `low` (note: what the bound means)."""
    hint = f" ({note})" if note else ""
    return [
        _problem(_field(prefix, name), f"must be >= {low}{hint}, got {getattr(obj, name)}")
        for name in names
        if getattr(obj, name) < low
    ]


def _one_of(obj, prefix: str, name: str, options, note: str = "") -> list[str]:
    """A problem if obj's field `name` is not one of `options` (note: where the alternatives are)."""
    value = getattr(obj, name)
    if value in options:
        return []
    hint = f" ({note})" if note else ""
    return [_problem(_field(prefix, name), f"unknown '{value}'; use one of {', '.join(options)}{hint}")]


def writable_dir_problem(directory: str) -> str | None:
    """None if `directory` is, or can be created as, a directory this process can write files in; else
    why not. It only looks (nothing is created): the path must not run through a file, and its nearest
    existing ancestor must be a writable directory on a file system that stores files (not mounted
    read-only, not a pseudo file system such as /proc, where even root cannot create files)."""
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    why = ""
    if not existing.is_dir():
        why = f"'{existing}' is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no write permission in '{existing}'"
    else:
        fs = os.statvfs(existing)
        if fs.f_flag & os.ST_RDONLY:
            why = f"'{existing}' is on a read-only file system"
        elif fs.f_blocks == 0:
            why = f"'{existing}' is on a pseudo file system that holds no files"
    if why:
        return f"'{directory}' is not a writable directory ({why}); choose a directory you can write to"
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
    # TFRecord files per split (read shards split a dataset by files); 0 = as tfds sizes them.
    num_files: int = 0

    def validate(self, prefix: str) -> list[str]:
        errs = _at_least(self, prefix, 1, "num_train_episodes", "num_val_episodes", "steps_per_episode")
        errs += _at_least(self, prefix, 0, "num_files", note="0 = as tfds sizes them")
        return errs + _at_least(self, prefix, 16, "image_size", note="pixels")


@dataclass
class DataConfig:
    # Directory that holds tfds builder directories (<data_root_dir>/<dataset_name>/<version>/).
    data_root_dir: str = "data_cache"
    # Name of the RLDS dataset under data_root_dir; it must be registered (datasets_registry/ or
    # registry_files).
    dataset_name: str = "vla_synthetic"
    # Extra registry YAML files (same format as datasets_registry/*.yaml) that add your own datasets and
    # mixtures without code edits.
    registry_files: list[str] = field(default_factory=list)
    # Build the synthetic dataset into data_root_dir when it is missing (only for dataset_name vla_synthetic).
    build_synthetic: bool = False
    # Parameters of the synthetic dataset, used when build_synthetic builds it.
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # Action/proprio normalization: bounds_q99 (OpenVLA default), bounds or normal (statistics only: a
    # training run with the token head refuses normal, whose values leave the bins' [-1, 1]).
    normalization: str = "bounds_q99"
    # Shuffle buffer, in frames (shuffling happens on still-encoded JPEG frames).
    shuffle_buffer_size: int = 20000
    # Directory for cached dataset statistics; empty means <data_root_dir>/vla_train_stats.
    stats_cache_dir: str = ""
    # How long ranks wait for each other while the statistics are computed (the first pass over a large
    # mixture takes hours; the collective watchdog, distributed.timeout_s, does not apply to it), seconds.
    stats_timeout_s: int = 21600
    # OpenVLA's train-time image augmentation (random resized crop + color jitter).
    image_augmentation: bool = False
    # Diagnostic modality ablation: none, blank_image (all frames black) or fixed_instruction (one
    # instruction for every frame). A policy that truly uses an input scores far lower without it.
    ablation: str = "none"
    # Threads tf.data may use for parallel map/interleave (0 = tf.data.AUTOTUNE), and the threads that
    # resize/augment each batch (0 = one per core); a mixture splits the tf.data threads across its
    # datasets in proportion to the weights.
    num_parallel_calls: int = 0
    # A registry mixture name (datasets_registry/mixtures.yaml or registry_files) to read instead of
    # dataset_name alone; empty = dataset_name. Each dataset keeps its own standardization and statistics.
    mixture: str = ""
    # Multiply each mixture weight by the dataset's number of transitions (then renormalize).
    balance_weights: bool = False
    # Action chunking: each frame's action becomes [F + 1, A] (this step and the next F); 0 = OpenVLA.
    future_action_window_size: int = 0
    # Proprio history length (images stay a single frame); 1 = OpenVLA.
    window_size: int = 1
    # Drop episodes with any |action| (|proprio|) above this bound; 0 = off.
    max_action: float = 0.0
    max_proprio: float = 0.0
    # Keep at most this many steps per training episode (uniform random subset); 0 = off.
    subsample_length: int = 0
    # Add a goal image drawn uniformly from the same episode's future (batch key goal_image).
    goal_relabeling: bool = False
    # Cameras to read, by registry role: primary (batch key image), secondary, wrist (image_<role>).
    # A dataset without a listed camera gets black frames and image_<role>_mask False.
    cameras: list[str] = field(default_factory=lambda: ["primary"])
    # Disjoint read shards of the training data (training.data_sharding episodes): each rank reads the
    # files of its shards only. 0 = one per rank. A fixed number (a multiple of the world size) gives the
    # same global batches, and an exact resume, at any world size that divides it.
    read_shards: int = 0
    # Host RAM this process's data pipeline may use, in GiB: it caps the shuffle buffer (encoded frames,
    # sized from the datasets' average frame size) and the prefetch depth. 0 = no cap.
    ram_budget_gb: float = 8.0
    # Bad input (NaN actions or proprio, a corrupt JPEG): raise (an error naming the dataset, episode and
    # key) or skip (drop the episode/frame and count it in the logs). Structural problems (missing
    # directory or key, wrong action dimension, empty dataset) always raise.
    on_bad_data: str = "raise"

    def validate(self, prefix: str = "data") -> list[str]:
        errs = _at_least(
            self, prefix, 0, "future_action_window_size", "max_action", "max_proprio", "subsample_length",
            note="0 = off",
        )  # fmt: skip
        errs += _at_least(self, prefix, 1, "window_size", "shuffle_buffer_size")
        errs += _at_least(self, prefix, 0, "ram_budget_gb", note="0 = no cap")
        errs += _at_least(self, prefix, 0, "num_parallel_calls", note="0 = autotune")
        errs += _at_least(self, prefix, 0, "read_shards", note="0 = one per rank")
        errs += _at_least(self, prefix, 1, "stats_timeout_s", note="seconds")
        errs += _one_of(self, prefix, "normalization", ("bounds_q99", "bounds", "normal"))
        errs += _one_of(self, prefix, "ablation", ("none", "blank_image", "fixed_instruction"))
        errs += _one_of(self, prefix, "on_bad_data", ("raise", "skip"))
        bad_cameras = [c for c in self.cameras if c not in ("primary", "secondary", "wrist")]
        if bad_cameras or "primary" not in self.cameras or len(set(self.cameras)) != len(self.cameras):
            errs.append(
                _problem(
                    f"{prefix}.cameras",
                    f"{self.cameras} is not a list of distinct roles from primary, secondary, wrist that "
                    "includes primary (the policy's image)",
                )
            )
        registry_errs, names = self._registry_problems(prefix)
        errs += registry_errs
        if self.build_synthetic:
            if self.dataset_name != "vla_synthetic" or self.mixture:
                errs.append(
                    _problem(
                        f"{prefix}.build_synthetic",
                        f"only the synthetic dataset 'vla_synthetic' can be built, not "
                        f"'{self.mixture or self.dataset_name}'; set data.build_synthetic false and point "
                        "data.data_root_dir at your RLDS data",
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
        else:
            errs += self._missing_datasets(prefix, names)
        return errs

    def _missing_datasets(self, prefix: str, names: list[str]) -> list[str]:
        """A problem for each dataset the run reads that is not under data_root_dir."""
        root = Path(self.data_root_dir)
        missing = [name for name in names if not (root / name).is_dir()]
        if not missing:
            return []
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) or "nothing"
        where = f"{prefix}.mixture" if self.mixture else f"{prefix}.dataset_name"
        read_by = f" (read by mixture '{self.mixture}')" if self.mixture else ""
        return [
            _problem(
                where,
                f"no dataset '{name}'{read_by} under '{root}' (expected {root / name}/<version>/"
                f"dataset_info.json); found: {found}",
            )
            for name in missing
        ]

    def _registry_problems(self, prefix: str) -> tuple[list[str], list[str]]:
        """(problems, the dataset names the run reads): the registry (YAML only, no TensorFlow) with
        registry_files must name data.mixture or data.dataset_name. Reading it changes nothing: the run
        registers registry_files process-wide where it starts (mixture.run_datasets)."""
        from vla_train.data.registry import (
            RegistryError,
            UnknownNameError,
            load_registry,
            unknown_standardize_problem,
        )

        for f in self.registry_files:
            if not Path(f).is_file():
                return [_problem(f"{prefix}.registry_files", f"file '{f}' does not exist")], []
        try:
            registry = load_registry(self.registry_files)
            names = [n for n, _ in registry.mixture(self.mixture)] if self.mixture else [self.dataset_name]
            field_name = f"{prefix}.mixture" if self.mixture else f"{prefix}.dataset_name"
            unknown = [unknown_standardize_problem(registry.dataset(n)) for n in names]
            return [_problem(field_name, u) for u in unknown if u], names
        except RegistryError as e:
            return [_problem(f"{prefix}.registry_files", str(e))], []
        except UnknownNameError as e:
            field_name, kind = ("mixture", "mixtures") if self.mixture else ("dataset_name", "datasets")
            return [
                _problem(
                    f"{prefix}.{field_name}",
                    f"{e}; define it under '{kind}:' in a YAML file in data.registry_files",
                )
            ], []


@dataclass
class ModelConfig:
    # Model preset this section starts from: a name (tiny, minivla, openvla_7b: configs/model_<name>.yaml)
    # or the path of a YAML file with a `model:` block. Keys set in the config file or on the command line
    # override the preset's; empty = the defaults below.
    preset: str = ""
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
    # sdpa, eager, or flash_attention_2 (needs the `gpu` extra). l1_parallel takes sdpa or eager.
    attn_implementation: str = "auto"
    # How actions come out: tokens (OpenVLA: 256-bin action tokens decoded one by one) or l1_parallel
    # (OpenVLA-OFT-style parallel decoding: chunk x action_dim placeholder slots after the prompt, one
    # forward pass, an MLP head on their hidden states regressing normalized actions with L1 loss). The
    # chunk is data.future_action_window_size + 1 actions; the cameras are data.cameras.
    action_head: str = "tokens"
    # Width of the l1_parallel head's MLP (0 = llm_hidden_size, as OpenVLA-OFT).
    head_hidden_size: int = 0
    # Feed the current proprio (normalized with each dataset's proprio statistics) as one token through
    # a small projector after the image patches (OpenVLA-OFT's ProprioProjector).
    use_proprio: bool = False

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
        errs += _at_least(self, prefix, 1, *positive) + _at_least(self, prefix, 0, "dino_num_registers")
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
        errs += _at_least(
            self, prefix, 2, "dino_num_layers", "siglip_num_layers",
            note="features come from the second-to-last block",
        )  # fmt: skip
        errs += _at_least(self, prefix, 64, "text_vocab_size", note="to hold the prompt vocabulary")
        errs += _one_of(self, prefix, "llm_type", ("llama", "qwen2"))
        errs += _one_of(self, prefix, "attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
        errs += _one_of(self, prefix, "action_head", ("tokens", "l1_parallel"))
        errs += _at_least(self, prefix, 0, "head_hidden_size", note="0 = llm_hidden_size")
        if self.action_head == "l1_parallel" and self.attn_implementation == "flash_attention_2":
            errs.append(
                _problem(
                    f"{prefix}.attn_implementation",
                    "flash_attention_2 cannot take the l1_parallel head's attention mask (slots attend to "
                    "each other both ways); use sdpa, eager or auto (which picks sdpa for this head)",
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
    # Base weights under the adapters (QLoRA): none (as loaded), nf4 (bitsandbytes 4-bit NormalFloat) or
    # int8 (bitsandbytes 8-bit). Quantized layers stay frozen; only adapters (and modules_to_save) train.
    quantization: str = "none"
    # Compute dtype of quantized layers: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32.
    quant_compute_dtype: str = "auto"
    # Linear layers kept unquantized (OpenVLA keeps the projector; the LM head is never quantized).
    quant_skip_modules: list[str] = field(default_factory=lambda: ["projector"])
    # Modules trained in full next to the adapters (peft modules_to_save), e.g. [projector].
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "lora") -> list[str]:
        errs = []
        if self.enabled:
            errs += _at_least(self, prefix, 1, "rank")
            errs += _at_least(self, prefix, 0, "alpha", note="0 = min(rank, 16)")
            if not 0.0 <= self.dropout < 1.0:
                errs.append(_problem(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}"))
            errs += _one_of(self, prefix, "init", ("gaussian", "default"))
            if not self.target_modules:
                errs.append(_problem(f"{prefix}.target_modules", "is empty; use [all-linear] or layer names"))
        bad_quantization = _one_of(self, prefix, "quantization", ("none", "nf4", "int8"))
        errs += bad_quantization
        if not bad_quantization and self.quantization != "none" and not self.enabled:
            errs.append(
                _problem(
                    f"{prefix}.quantization",
                    f"{self.quantization} base weights cannot be trained, only adapters on top of them; "
                    "set lora.enabled true (QLoRA) or lora.quantization none",
                )
            )
        errs += _one_of(self, prefix, "quant_compute_dtype", ("auto", "bfloat16", "float32"))
        if self.modules_to_save and not self.enabled:
            errs.append(
                _problem(
                    f"{prefix}.modules_to_save",
                    "only applies to LoRA runs; without LoRA choose trainable parts with training.finetune_mode",
                )
            )
        return errs

    @property
    def effective_alpha(self) -> int:
        return self.alpha or min(self.rank, 16)


LR_SCHEDULES = ("constant", "linear-warmup+cosine")
FINETUNE_MODES = ("full", "frozen_vision", "sandwich", "last_layer")


@dataclass
class TrainingConfig:
    # Optimizer steps to run.
    max_steps: int = 200
    # Frames per optimizer step over all ranks and micro-batches (the global batch); each rank's
    # micro-batch is batch_size / (world_size * grad_accum_steps).
    batch_size: int = 16
    # Micro-batches accumulated per optimizer step; the loss is normalized by the supervised-token count
    # of the whole step, so 4 x 2 frames give the same update as 1 x 8.
    grad_accum_steps: int = 1
    # Peak learning rate of AdamW.
    learning_rate: float = 5e-4
    # AdamW weight decay (applied to matrices, not to biases and norms).
    weight_decay: float = 0.0
    # Learning-rate schedule: constant (after the warmup) or linear-warmup+cosine (cosine decay from the
    # peak at warmup_steps to min_lr_ratio x peak at max_steps).
    lr_schedule: str = "constant"
    # Linear warmup steps from ~0 to the peak learning rate (both schedules).
    warmup_steps: int = 0
    # Final learning rate of the cosine schedule, as a fraction of the peak.
    min_lr_ratio: float = 0.0
    # Gradient-norm clipping threshold (0 disables); the norm is the global one over all ranks.
    max_grad_norm: float = 1.0
    # Which base weights train when lora.enabled is false: full, frozen_vision (projector + LLM),
    # sandwich (vision + projector + last LLM layer) or last_layer (last LLM layer). As in
    # prismatic, "last LLM layer" = the last decoder block plus the token embedding and the LM head.
    finetune_mode: str = "full"
    # Seed of the model init, data order and augmentation: the same seed reproduces the run.
    seed: int = 7
    # Frames evaluated on the validation split at the end of training (and every val_every steps);
    # -1 = the whole split (of every dataset of a mixture), 0 = no validation.
    num_val_frames: int = 256
    # Run validation every this many steps (0 = only at the end).
    val_every: int = 0
    # Write a checkpoint every this many steps (0 = only at the end); the run resumes from the newest.
    checkpoint_every: int = 0
    # Keep the checkpoint with the best value of this validation metric (e.g.
    # val/generated_action_token_accuracy_varying_dims) in <run_dir>/best, checked at every validation;
    # empty = off. `vla-export --checkpoint best` exports it.
    best_metric: str = ""
    # Whether a larger (max) or smaller (min) best_metric is better.
    best_mode: str = "max"
    # Committed checkpoints kept on disk (older ones are deleted after each commit).
    keep_last_checkpoints: int = 2
    # How ranks split the data: episodes (each rank reads a disjoint 1/world share of the episodes) or
    # batch_slice (every rank reads the one global stream and keeps its rows: the same frames at any
    # world size, so a resume on another world size continues exactly; costs world x the decoding).
    data_sharding: str = "episodes"
    # CPU threads of this rank for torch, tf.data and the image kernels (0 = the cores available to the
    # rank: its affinity mask, or the node's cores over the processes on the node).
    num_threads: int = 0
    # Memory preflight before any weight loads: strict (refuse a config estimated not to fit), warn, or off.
    preflight: str = "strict"
    # Device memory per rank the preflight plans for, in GiB; 0 = detect it (set it to plan for another).
    preflight_device_memory_gb: float = 0.0
    # A step whose loss or gradient is non-finite (NaN/inf) on any rank is never applied. halt: stop with
    # exit code 3 naming the step, rank and dataset (the newest checkpoint holds the last good step);
    # skip: drop the step on every rank, count it (train/nonfinite_skipped), and halt after
    # max_consecutive_skips such steps in a row.
    on_nonfinite: str = "halt"
    max_consecutive_skips: int = 10
    # Watchdog per rank: a step (or checkpoint write, or validation pass) not finished within this many
    # seconds ends every rank with exit code 4, naming the stalled step and rank (0 = off). The first step
    # includes filling the first shuffle block. The process group's timeout follows it
    # (distributed.timeout_s 0).
    step_timeout_s: int = 1800

    def validate(self, prefix: str = "training") -> list[str]:
        errs = []
        if self.max_steps < 1:
            errs.append(
                _problem(f"{prefix}.max_steps", f"must be a positive step count, got {self.max_steps}")
            )
        errs += _at_least(self, prefix, 1, "batch_size", "grad_accum_steps", "keep_last_checkpoints")
        errs += _at_least(self, prefix, 0, "weight_decay", "num_threads")
        errs += _at_least(self, prefix, -1, "num_val_frames", note="-1 = the whole split, 0 = none")
        errs += _at_least(self, prefix, 0, "val_every", "checkpoint_every", note="0 = only at the end")
        errs += _at_least(self, prefix, 0, "max_grad_norm", note="0 disables clipping")
        errs += _one_of(self, prefix, "lr_schedule", LR_SCHEDULES)
        errs += _one_of(self, prefix, "data_sharding", ("episodes", "batch_slice"))
        errs += _one_of(self, prefix, "best_mode", ("max", "min"))
        if self.best_metric and not self.best_metric.startswith("val/"):
            errs.append(
                _problem(
                    f"{prefix}.best_metric", f"'{self.best_metric}' is not a validation metric (val/...)"
                )
            )
        if self.best_metric and self.num_val_frames == 0:
            errs.append(_problem(f"{prefix}.best_metric", "needs validation: set num_val_frames (-1 or > 0)"))
        if self.preflight != "False":  # YAML reads a bare `off` as false, which draccus hands over as "False"
            errs += _one_of(self, prefix, "preflight", ("strict", "warn", "off"))
        errs += _at_least(self, prefix, 0, "preflight_device_memory_gb", note="0 = detect")
        errs += _one_of(self, prefix, "on_nonfinite", ("halt", "skip"))
        errs += _at_least(self, prefix, 1, "max_consecutive_skips")
        errs += _at_least(self, prefix, 0, "step_timeout_s", note="seconds, 0 = no watchdog")
        errs += _one_of(
            self, prefix, "finetune_mode", FINETUNE_MODES, note="LoRA/QLoRA: lora.enabled / lora.quantization"
        )
        # batch_size must split into ranks x grad_accum_steps: launch_problems checks it, with the world size
        if not self.learning_rate > 0:
            errs.append(_problem(f"{prefix}.learning_rate", f"must be > 0, got {self.learning_rate}"))
        errs += _at_least(self, prefix, 0, "warmup_steps")
        if self.lr_schedule == "linear-warmup+cosine" and self.warmup_steps >= self.max_steps >= 1:
            errs.append(
                _problem(
                    f"{prefix}.warmup_steps",
                    f"{self.warmup_steps} leaves no cosine decay before max_steps {self.max_steps}",
                )
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errs.append(_problem(f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"))
        return errs


@dataclass
class DistributedConfig:
    # auto (single for one process, ddp under torchrun with several), single, ddp or fsdp (FSDP2).
    strategy: str = "auto"
    # FSDP only: 1 = full shard over all ranks; R > 1 = hybrid shard over a 2-D mesh (R replicas x
    # world/R shards, e.g. R = number of nodes). Must divide the world size.
    fsdp_hybrid_replicas: int = 1
    # Recompute each LLM decoder layer and vision block in the backward pass (saves activation memory).
    activation_checkpointing: bool = False
    # auto (bf16 params with fp32 gradient reduce on GPU, fp32 on CPU), bf16 or fp32.
    mixed_precision: str = "auto"
    # Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo.
    backend: str = "auto"
    # Collective watchdog: a rank waiting longer than this on the others fails instead of hanging, in
    # seconds. 0 = training.step_timeout_s + 60 (1800 with the step watchdog off).
    timeout_s: int = 0

    def validate(self, prefix: str = "distributed") -> list[str]:
        errs = _one_of(self, prefix, "strategy", ("auto", "single", "ddp", "fsdp"))
        errs += _one_of(self, prefix, "mixed_precision", ("auto", "bf16", "fp32"))
        errs += _one_of(self, prefix, "backend", ("auto", "nccl", "gloo"))
        errs += _at_least(self, prefix, 0, "timeout_s", note="seconds, 0 = from training.step_timeout_s")
        errs += _at_least(self, prefix, 1, "fsdp_hybrid_replicas", note="1 = full shard")
        if self.fsdp_hybrid_replicas > 1 and self.strategy != "fsdp":
            errs.append(
                _problem(
                    f"{prefix}.fsdp_hybrid_replicas",
                    f"hybrid sharding is an FSDP mode; set distributed.strategy fsdp (got '{self.strategy}')",
                )
            )
        return errs


def launch_world_size() -> int:
    """The number of processes of this launch, from torchrun's environment (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launch_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """Combinations that cannot run, found before any process group starts."""
    errs = []
    d, t, lora = cfg.distributed, cfg.training, cfg.lora
    if d.strategy == "single" and world_size > 1:
        errs.append(
            _problem(
                "distributed.strategy",
                f"single cannot run on {world_size} processes; use ddp or fsdp (or launch one process)",
            )
        )
    if cfg.eval.rollouts_every and d.strategy == "fsdp":
        errs.append(
            _problem(
                "eval.rollouts_every",
                "rollouts during training run the model on rank 0 alone, which a sharded (fsdp) model "
                "cannot; use ddp or single, or evaluate the checkpoints with vla-eval",
            )
        )
    if d.strategy == "fsdp" and lora.quantization != "none":
        errs.append(
            _problem(
                "distributed.strategy",
                f"fsdp cannot shard bitsandbytes-quantized ({lora.quantization}) base weights; use ddp or "
                "single for QLoRA, or lora.quantization none",
            )
        )
    if d.strategy == "fsdp" and d.fsdp_hybrid_replicas > 1 and world_size % d.fsdp_hybrid_replicas:
        errs.append(
            _problem(
                "distributed.fsdp_hybrid_replicas",
                f"{d.fsdp_hybrid_replicas} replicas do not divide the world size {world_size}",
            )
        )
    if lora.enabled and t.finetune_mode != "full":
        errs.append(
            _problem(
                "training.finetune_mode",
                f"'{t.finetune_mode}' chooses base weights to train without LoRA; set lora.enabled false, "
                "or keep finetune_mode full and list extra trained modules in lora.modules_to_save",
            )
        )
    per_step = world_size * t.grad_accum_steps
    shards = cfg.data.read_shards if t.data_sharding == "episodes" else 0
    if shards and shards % world_size:
        errs.append(
            _problem(
                "data.read_shards",
                f"{shards} read shards do not divide among {world_size} ranks; use a multiple of {world_size} "
                "(or 0: one per rank)",
            )
        )
    elif t.batch_size >= 1 and t.grad_accum_steps >= 1 and t.batch_size % per_step:
        errs.append(
            _problem(
                "training.batch_size",
                f"the global batch {t.batch_size} does not split into {world_size} ranks x "
                f"{t.grad_accum_steps} micro-batches; use a multiple of {per_step}",
            )
        )
    elif shards and t.batch_size % (shards * t.grad_accum_steps):
        errs.append(
            _problem(
                "training.batch_size",
                f"the global batch {t.batch_size} does not split into {shards} read shards x "
                f"{t.grad_accum_steps} micro-batches; use a multiple of {shards * t.grad_accum_steps}",
            )
        )
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
        errs = _one_of(self, prefix, "wandb_mode", ("disabled", "offline", "online"))
        errs += _at_least(self, prefix, 1, "log_every")
        if self.run_id and (os.sep in self.run_id or self.run_id in (".", "..")):
            errs.append(_problem(f"{prefix}.run_id", f"'{self.run_id}' must be a plain name, not a path"))
        problem = writable_dir_problem(self.output_dir)
        if problem:
            errs.append(_problem(f"{prefix}.output_dir", problem))
        return errs


SEEDS_PER_SPLIT = 1000  # Meta-World reset seeds per task in each of train / val / eval (sim/metaworld_env.py)


def _tasks_problem(tasks: str, path: str) -> list[str]:
    from vla_train.sim.metaworld_env import resolve_tasks  # numpy only: no simulator import

    try:
        resolve_tasks(tasks)
    except ValueError as e:
        return [_problem(path, str(e))]
    return []


@dataclass
class RolloutConfig:
    # Meta-World tasks: 'mt10' or comma-separated names (reach-v3,push-v3).
    tasks: str = "mt10"
    # Trials per task (evaluation seeds k = 0..trials-1 of each task's range).
    trials: int = 20
    # Steps before a trial counts as failed (the experts need 48-117, peg-insert-side up to ~200).
    max_steps: int = 200
    # Rendered frame side, pixels; 0 = what the training data was rendered at (its generation.json),
    # else 224. The policy should see frames rendered as in training.
    image_size: int = 0
    # Anti-aliasing samples; -1 = as the training data (else 4).
    msaa_samples: int = -1
    # Simulator worker processes; 0 = one per core.
    num_workers: int = 0
    # Trials per task saved as a video (the first ones).
    video_trials: int = 2
    # A policy that predicts chunks of K actions: steps executed open loop from each chunk before the
    # next query (0 = all K, as OpenVLA-OFT; at most K).
    execute_steps: int = 0

    def validate(self, prefix: str = "") -> list[str]:
        errs = _at_least(self, prefix, 1, "trials", "max_steps")
        errs += _at_least(self, prefix, 0, "execute_steps", note="0 = the whole chunk")
        if self.trials > SEEDS_PER_SPLIT:
            errs.append(
                _problem(_field(prefix, "trials"), f"must be <= {SEEDS_PER_SPLIT} (seeds per task and split)")
            )
        errs += _at_least(self, prefix, 0, "image_size", "num_workers", "video_trials")
        errs += _at_least(self, prefix, -1, "msaa_samples", note="-1 = as the training data")
        if 0 < self.image_size < 16:
            errs.append(
                _problem(_field(prefix, "image_size"), f"must be 0 or >= 16 pixels, got {self.image_size}")
            )
        return errs + _tasks_problem(self.tasks, _field(prefix, "tasks"))


@dataclass
class TrainRolloutConfig(RolloutConfig):
    # Closed-loop rollouts in Meta-World every this many steps (and at the end) on the val seed range,
    # logged as rollout/... like validation (0 = off). Single process or DDP (rank 0 runs them).
    rollouts_every: int = 0
    # Tasks, trials per task and videos per task of each round (small: a round costs minutes on a CPU).
    tasks: str = "mt10"
    trials: int = 2
    video_trials: int = 1
    max_steps: int = 150

    def validate(self, prefix: str = "eval") -> list[str]:
        errs = super().validate(prefix) + _at_least(self, prefix, 0, "rollouts_every", note="0 = off")
        return errs + _simulator_problems(_field(prefix, "rollouts_every"))


def _simulator_problems(path: str) -> list[str]:
    """What is missing for rendering Meta-World here (looked up, not imported)."""
    import ctypes.util
    import importlib.util

    errs = []
    if importlib.util.find_spec("metaworld") is None:
        errs.append(_problem(path, "needs the simulator: pip install -e '.[sim]' (make install-sim)"))
    gl = os.environ.get("MUJOCO_GL", "osmesa")
    if gl == "osmesa" and ctypes.util.find_library("OSMesa") is None:
        errs.append(_problem(path, "needs OSMesa for headless rendering: apt-get install libosmesa6"))
    return errs


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: TrainRolloutConfig = field(default_factory=TrainRolloutConfig)

    def validate(self) -> None:
        """Raise ConfigError listing every problem (call before any heavy import)."""
        errs = (
            self.data.validate("data")
            + self.model.validate("model")
            + self.lora.validate("lora")
            + self.training.validate("training")
            + self.distributed.validate("distributed")
            + self.logging.validate("logging")
            + (self.eval.validate("eval") if self.eval.rollouts_every else [])
            + launch_problems(self, launch_world_size())
        )
        if self.data.normalization == "normal" and self.model.action_head == "tokens":
            errs.append(
                _problem(
                    "data.normalization",
                    "'normal' (mean/std) does not fit the action tokens: their 256 bins cover [-1, 1], so "
                    "every value beyond one standard deviation would be clipped; use bounds_q99 (OpenVLA's "
                    "default) or bounds, or the regression head model.action_head l1_parallel",
                )
            )
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


@dataclass
class ExportConfig:
    # Training run directory (<output_dir>/<run_id>) whose newest checkpoint is exported.
    run_dir: str = ""
    # Where the merged model directory is written; empty = <run_dir>/export.
    output_dir: str = ""
    # Which checkpoint: empty = the newest, best = the one kept by training.best_metric, or a directory.
    checkpoint: str = ""
    # After exporting, reload the directory and predict this many held-out validation frames.
    predict_samples: int = 0
    # Weights dtype of the written directory: fp32, or bf16 (half the size; the tokens are checked again
    # after the cast and any frame whose tokens change is reported).
    dtype: str = "fp32"

    def validate(self) -> None:
        errs = []
        if not self.run_dir:
            errs.append(_problem("run_dir", "is required: the run directory of a vla-train run"))
        elif not (Path(self.run_dir) / "config.yaml").is_file():
            errs.append(
                _problem("run_dir", f"'{self.run_dir}' is not a vla-train run directory (no config.yaml)")
            )
        errs += _at_least(self, "", 0, "predict_samples")
        errs += _one_of(self, "", "dtype", ("fp32", "bf16"))
        if (
            self.checkpoint == "best"
            and self.run_dir
            and not (Path(self.run_dir) / "best" / "state.json").is_file()
        ):
            errs.append(
                _problem(
                    "checkpoint", f"'{self.run_dir}' has no best checkpoint (train with training.best_metric)"
                )
            )
        elif self.checkpoint not in ("", "best") and not (Path(self.checkpoint) / "state.json").is_file():
            errs.append(
                _problem("checkpoint", f"'{self.checkpoint}' is not a committed checkpoint directory")
            )
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


@dataclass
class MetaWorldDataConfig:
    # Tasks to record: 'mt10' or comma-separated names (reach-v3,push-v3; '-v3' may be left off).
    tasks: str = "mt10"
    # Successful expert episodes per task in the train split.
    episodes_per_task: int = 20
    # Successful expert episodes per task in the val split (its own seed range).
    val_episodes_per_task: int = 2
    # Data root directory: the dataset goes to <out>/metaworld_mt10/1.0.0, episode files to
    # <out>/_metaworld_episodes (kept: a re-run resumes and rebuilds from them).
    out: str = "data_cache"
    # Side of the rendered square frames, pixels.
    image_size: int = 224
    # Multisample anti-aliasing samples (0 = off: about half the render time, jagged edges).
    msaa_samples: int = 4
    # Also render the gripper camera, stored as observation/wrist_image.
    wrist: bool = False
    # JPEG quality of the stored frames (95: ~17.5 KiB per 224 px frame; 75: ~7 KiB).
    jpeg_quality: int = 95
    # Longest expert attempt, steps; an attempt without success by then is dropped.
    max_episode_steps: int = 300
    # Steps recorded after the first success (the episode still succeeds at its last step).
    steps_after_success: int = 10
    # Seeds tried per task and split before giving up; 0 = 3 x the episodes asked for + 5.
    max_seeds_per_task: int = 0
    # Worker processes (each renders with one thread); 0 = one per core.
    num_workers: int = 0
    # TFRecord files per split; 0 = as tfds sizes them.
    num_files: int = 0
    # Show a progress bar.
    progress_bar: bool = True

    def validate(self) -> None:
        errs = _at_least(self, "", 1, "episodes_per_task", "val_episodes_per_task", "max_episode_steps")
        errs += _at_least(self, "", 0, "msaa_samples", "steps_after_success", "max_seeds_per_task")
        errs += _at_least(self, "", 0, "num_workers", "num_files")
        errs += _at_least(self, "", 16, "image_size", note="pixels")
        if not 1 <= self.jpeg_quality <= 100:
            errs.append(_problem("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}"))
        if self.max_seeds_per_task and self.max_seeds_per_task < max(
            self.episodes_per_task, self.val_episodes_per_task
        ):
            errs.append(_problem("max_seeds_per_task", "must be at least the episodes asked for per task"))
        for name in ("episodes_per_task", "val_episodes_per_task", "max_seeds_per_task"):
            if getattr(self, name) > SEEDS_PER_SPLIT:
                errs.append(_problem(name, f"must be <= {SEEDS_PER_SPLIT} (seeds per task and split)"))
        errs += _tasks_problem(self.tasks, "tasks") + _simulator_problems("tasks")
        why = writable_dir_problem(self.out)
        if why:
            errs.append(_problem("out", why))
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


@dataclass
class EvalConfig(RolloutConfig):
    # What to evaluate: an exported model directory, a vla-train run directory (its newest checkpoint),
    # 'expert' (Meta-World's scripted experts) or 'replay:<data_root_dir>' (a dataset's recorded actions).
    policy: str = ""
    # Seed range: eval (held out), val, train, or dataset (the seeds a replay policy's episodes came from).
    seed_split: str = "eval"
    # First seed index within the range (trials use first_seed .. first_seed + trials - 1).
    first_seed: int = 0
    # Output folder; empty = <policy dir>/eval (runs/eval_<policy> for expert and replay).
    out: str = ""
    # Dataset whose statistics unnormalize the actions; empty = metaworld_mt10 when the model has it.
    unnorm_key: str = ""
    # Where the policy runs: cpu or cuda.
    device: str = "cpu"
    # Data root of the training data, to render as it was rendered (found from a run's config if empty).
    data_root_dir: str = ""
    # Show a progress bar.
    progress_bar: bool = True

    def validate(self) -> None:
        errs = super().validate()
        if not self.policy:
            errs.append(
                _problem(
                    "policy", "is required: a model directory, a run directory, 'expert' or 'replay:DIR'"
                )
            )
        elif self.policy != "expert" and not self.policy.startswith("replay:"):
            p = Path(self.policy)
            if not ((p / "config.json").is_file() or (p / "config.yaml").is_file()):
                errs.append(
                    _problem(
                        "policy",
                        f"'{self.policy}' is neither a model directory (config.json) nor a run directory (config.yaml)",
                    )
                )
        errs += _one_of(self, "", "seed_split", ("eval", "val", "train", "dataset"))
        if self.seed_split == "dataset" and not self.policy.startswith("replay:"):
            errs.append(_problem("seed_split", "'dataset' needs a replay:<data_root_dir> policy"))
        if self.policy.startswith("replay:") and self.seed_split != "dataset":
            errs.append(
                _problem("seed_split", "a replay policy plays recorded episodes: use --seed_split dataset")
            )
        errs += _at_least(self, "", 0, "first_seed") + _simulator_problems("policy")
        if self.first_seed + self.trials > SEEDS_PER_SPLIT:
            errs.append(
                _problem(
                    "trials", f"first_seed + trials must be <= {SEEDS_PER_SPLIT} (seeds per task and split)"
                )
            )
        errs += _one_of(self, "", "device", ("cpu", "cuda"))
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


@dataclass
class SafetyConfig:
    # Apply the bounds, translation/rotation and workspace rules (vla-serve --safety off sets False; the
    # e-stop and the reported gripper command work either way).
    enabled: bool = True
    # Which dataset bounds clamp each normalized action dimension: min_max or q01_q99.
    bounds: str = "min_max"
    # Widen the bounds by this fraction of their range on each side.
    margin: float = 0.05
    # Largest L2 norm of the xyz translation of one action (7-D layout); 0 = from the dataset's bounds.
    max_translation: float = 0.0
    # Largest L2 norm of the rotation of one action (7-D layout); 0 = from the dataset's bounds.
    max_rotation: float = 0.0
    # Workspace box [x, y, z] for requests that carry eef_position; empty = no box.
    workspace_min: list[float] = field(default_factory=list)
    workspace_max: list[float] = field(default_factory=list)
    # Position change per unit of translation action (1.0 when actions are position deltas in the same
    # unit as eef_position).
    workspace_action_scale: float = 1.0
    # Gripper hysteresis on the decoded value: open above, closed below, unchanged in between.
    gripper_open_above: float = 0.6
    gripper_close_below: float = 0.4

    def validate(self, prefix: str = "safety") -> list[str]:
        errs = _one_of(self, prefix, "bounds", ("min_max", "q01_q99"))
        for name in ("margin", "max_translation", "max_rotation"):
            if not getattr(self, name) >= 0:
                errs.append(_problem(_field(prefix, name), f"must be >= 0, got {getattr(self, name)}"))
        if not self.workspace_action_scale > 0:
            errs.append(_problem(_field(prefix, "workspace_action_scale"), "must be > 0"))
        box = (self.workspace_min, self.workspace_max)
        if any(box) and not (len(box[0]) == len(box[1]) == 3 and all(a < b for a, b in zip(*box))):
            errs.append(
                _problem(
                    _field(prefix, "workspace_min"),
                    f"workspace_min and workspace_max must be 3 values each with min < max, got {box[0]} and {box[1]}",
                )
            )
        if not self.gripper_close_below <= self.gripper_open_above:
            errs.append(
                _problem(
                    _field(prefix, "gripper_close_below"),
                    f"must be <= gripper_open_above ({self.gripper_open_above}), got {self.gripper_close_below}",
                )
            )
        return errs


@dataclass
class ServeConfig:
    # Exported model directory to serve (vla-export output, or an OpenVLA-format checkpoint).
    policy: str = ""
    # Interface to bind; 127.0.0.1 keeps the server local. 0.0.0.0 exposes it to the network.
    host: str = "127.0.0.1"
    port: int = 8000
    # Where the model runs: cpu or cuda.
    device: str = "cpu"
    # Load the weights quantized with bitsandbytes: none, int8 or nf4 (bf16 compute on GPU, fp32 on CPU).
    quantization: str = "none"
    # Dynamic batching: at most this many requests per forward pass ...
    max_batch: int = 8
    # ... waiting at most this long for more after the first.
    max_wait_ms: float = 5.0
    # Requests waiting beyond this many are refused with 503 and Retry-After.
    queue_size: int = 64
    # A request not answered within this many seconds gets 504.
    request_timeout_s: float = 30.0
    # Largest request body accepted (MiB); larger ones get 413.
    max_body_mb: float = 16.0
    # File holding the bearer token clients must send (Authorization: Bearer ...); empty = no token.
    token_file: str = ""
    # Dataset whose statistics unnormalize actions when a request names none (empty: the model's only one).
    unnorm_key: str = ""
    # The safety layer (vla_train/serving/safety.py).
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def validate(self) -> None:
        errs = []
        if not self.policy:
            errs.append(_problem("policy", "is required: an exported model directory (vla-export)"))
        elif not (Path(self.policy) / "config.json").is_file():
            errs.append(_problem("policy", f"'{self.policy}' is not a model directory (no config.json)"))
        errs += _one_of(self, "", "device", ("cpu", "cuda"))
        errs += _one_of(self, "", "quantization", ("none", "int8", "nf4"))
        errs += _at_least(self, "", 1, "max_batch", "queue_size")
        if not 0 < self.port < 65536:
            errs.append(_problem("port", f"must be in 1..65535, got {self.port}"))
        if not self.max_wait_ms >= 0:
            errs.append(_problem("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}"))
        for name in ("request_timeout_s", "max_body_mb"):
            if not getattr(self, name) > 0:
                errs.append(_problem(name, f"must be > 0, got {getattr(self, name)}"))
        if self.token_file and not Path(self.token_file).is_file():
            errs.append(_problem("token_file", f"'{self.token_file}' does not exist"))
        elif self.token_file and not Path(self.token_file).read_text().strip():
            errs.append(_problem("token_file", f"'{self.token_file}' is empty; put the token in it"))
        errs += self.safety.validate()
        if errs:
            raise ConfigError("invalid serve config:\n  " + "\n  ".join(errs))


@dataclass
class ConvertRawConfig:
    # Folder of per-episode .npz / .hdf5 files (layout: vla_train/data/convert/raw.py).
    src: str = ""
    # Data root to write the dataset into (<dst>/<name>/1.0.0/) and its registry entry (<dst>/registry.yaml).
    dst: str = ""
    # Dataset name; empty = the dst folder's name.
    name: str = ""
    # Fraction of the episodes held out as the val split (at least one when there are two or more).
    val_fraction: float = 0.1
    # Seed of the train/val split.
    seed: int = 0
    # How frames are stored: jpeg (small) or png (lossless).
    image_format: str = "jpeg"
    # The actions' encoding; auto = by their width (7 EEF_POS, 8 JOINT_POS, 10 EEF_R6, 14 JOINT_POS_BIMANUAL).
    action_encoding: str = "auto"
    # What the state vector holds (written to the registry entry): NONE, POS_EULER, POS_QUAT, JOINT.
    state_encoding: str = "NONE"

    def validate(self) -> None:
        errs = self.problems()
        if errs:
            raise ConfigError("invalid convert config:\n  " + "\n  ".join(errs))

    def problems(self) -> list[str]:
        from vla_train.data.registry import ACTION_ENCODINGS, STATE_ENCODINGS

        errs = []
        if not self.src:
            errs.append(_problem("src", "is required: the folder to convert"))
        elif not Path(self.src).is_dir():
            errs.append(_problem("src", f"'{self.src}' is not a folder"))
        if not self.dst:
            errs.append(_problem("dst", "is required: the data root to write the dataset into"))
        elif problem := writable_dir_problem(self.dst):
            errs.append(_problem("dst", problem))
        name = self.name or Path(self.dst).name
        if self.dst and not name.replace("_", "a").isalnum():
            errs.append(_problem("name", f"'{name}' must be letters, digits and underscores (a tfds name)"))
        if not 0 <= self.val_fraction < 1:
            errs.append(_problem("val_fraction", f"must be in [0, 1), got {self.val_fraction}"))
        errs += _one_of(self, "", "image_format", ("jpeg", "png"))
        errs += _one_of(self, "", "action_encoding", ("auto", *ACTION_ENCODINGS))
        errs += _one_of(self, "", "state_encoding", STATE_ENCODINGS)
        return errs


@dataclass
class ConvertLerobotConfig(ConvertRawConfig):
    # A local LeRobot v3.0 dataset folder (meta/info.json, data/, videos/; vla_train/data/convert/lerobot.py).
    src: str = ""
    # The primary camera: an observation.images.* feature (or the part after that prefix); auto = the first
    # camera whose key does not contain 'wrist'.
    primary_camera: str = "auto"
    # The wrist camera: auto = a camera whose key contains 'wrist' (none if there is none); none = no wrist.
    wrist_camera: str = "auto"
    # The proprio vector: auto = observation.state when present; none = no state.
    state_key: str = "auto"
    # The action vector feature.
    action_key: str = "action"
    # How far (s) the nearest decoded frame may be from a row's timestamp (LeRobot's tolerance_s).
    tolerance_s: float = 1e-4

    def validate(self) -> None:
        errs = self.problems()
        for name in ("primary_camera", "action_key"):
            if not getattr(self, name) or getattr(self, name) == "none":
                errs.append(_problem(name, "is required (auto or a feature key)"))
        if not 0 < self.tolerance_s < 1:
            errs.append(_problem("tolerance_s", f"must be in (0, 1) seconds, got {self.tolerance_s}"))
        if errs:
            raise ConfigError("invalid convert config:\n  " + "\n  ".join(errs))


@dataclass
class RldsToLerobotConfig(StatsConfig):
    # Folder to write the LeRobot v3.0 dataset into (meta/, data/, videos/); must not hold one already.
    dst: str = ""
    # Frames per second; 0 = the registry's control_frequency of the dataset.
    fps: int = 0
    # Video encoder: auto = libx264 (h264) if the PyAV build has it, else mpeg4; or libx264, mpeg4, libsvtav1.
    codec: str = "auto"
    # Constant rate factor of libx264 / libsvtav1 (lower = closer to the frames; 18 is near-transparent).
    crf: int = 18
    # Keyframe interval, frames (LeRobot's default 2 keeps random access cheap).
    gop: int = 2

    def validate(self) -> None:
        errs = self.data.validate("data")
        if not self.dst:
            errs.append(_problem("dst", "is required: the folder to write the LeRobot dataset into"))
        elif problem := writable_dir_problem(self.dst):
            errs.append(_problem("dst", problem))
        elif (Path(self.dst) / "meta" / "info.json").exists():
            errs.append(_problem("dst", f"'{self.dst}' holds a LeRobot dataset already; choose another"))
        errs += _at_least(self, "", 0, "fps", note="0 = the registry's control_frequency")
        errs += _at_least(self, "", 1, "gop")
        errs += _one_of(self, "", "codec", ("auto", "libx264", "mpeg4", "libsvtav1"))
        if not 0 <= self.crf <= 51:
            errs.append(_problem("crf", f"must be in 0..51, got {self.crf}"))
        if errs:
            raise ConfigError("invalid rlds-to-lerobot config:\n  " + "\n  ".join(errs))


@dataclass
class InspectConfig(StatsConfig):
    # Folder for summary.json/.md, contact_sheet.png and actions.png; empty = runs/inspect_<dataset>.
    out: str = ""
    # Episodes shown on the contact sheet (rows) ...
    episodes: int = 4
    # ... and frames per episode, evenly spaced over it.
    frames: int = 6

    def validate(self) -> None:
        errs = self.data.validate("data") + _at_least(self, "", 1, "episodes", "frames")
        if self.out and (problem := writable_dir_problem(self.out)):
            errs.append(_problem("out", problem))
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))

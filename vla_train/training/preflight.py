"""Memory preflight: before any weight is read, estimate the peak memory per rank of a training step of a
config and refuse (training.preflight strict), or warn about, a config that cannot fit the device.

The estimate builds the model on the meta device (no memory, no weights) for its parameter inventory and
applies the run's choices to it the way the trainer does: the LoRA targets of `models/peft.py`, the
quantized layers of QLoRA, the freeze modes, the strategy's sharding, the precision. Every number is a
stated physical quantity (bytes of tensors that exist at the peak), not a fitted factor:

- base weights: frozen parameters in their stored dtype: fp32 for a full fine-tune (the trainer keeps fp32
  master weights), the checkpoint's dtype under LoRA (a bf16 openvla-7b stays bf16; a base the trainer
  built from config is saved, and loaded, in fp32), and under QLoRA nf4 = 0.5 byte/param + its
  quantization state (bitsandbytes' blocksize 64 with nested statistics, as `Params4bit` defaults to: one
  uint8 absmax per 64 values plus one fp32 absmax per 256 of those) or int8 = 1 byte/param + one fp32
  scale per row, with the layers left unquantized (LM head, lora.quant_skip_modules) in fp32;
- trainable weights: LoRA adapters, r * (in + out) fp32 params per targeted nn.Linear (all but the LM head
  for "all-linear", plus listed modules), and modules_to_save trained in full (a trainable copy next to
  the frozen original, as peft keeps it); for a full fine-tune the weights training.finetune_mode trains;
- gradients: one per trainable parameter, in its dtype; optimizer: AdamW's two states per trainable
  parameter, in its dtype. FSDP (full shard) divides weights, gradients and states by the world size;
  DDP keeps one more copy of the gradients in its all-reduce buckets;
- activations: the tensors autograd saves in the forward of one micro-batch
  (training.batch_size / (world * grad_accum)), block by block, from the sequence lengths (DINOv2:
  patches + CLS + registers; SigLIP: patches; LLM: patches + text, text = prompt + action tokens + EOS),
  the widths of the LLM and both towers and the precision. Per token of a Llama decoder layer, with h the
  width, kv the key/value width and i the MLP width: the RMSNorm inputs (2 h, in fp32: the norm upcasts),
  the normalized inputs when the norm weights train (2 h), the inputs of the projections (2 h: one tensor
  shared by q/k/v and one by gate/up), the attention's q, k, v and output (2 h + 2 kv) and its
  log-sum-exp (heads), the MLP's gate, SiLU, up and product (4 i), and r per LoRA adapter; a vision
  block saves its LayerNorm inputs (2 h), their outputs (2 h), the attention's q, k, v, output (4 h), the
  GELU input and output (2 i), and DINOv2's LayerScale inputs when they train (2 h). A tensor is only
  saved where a gradient needs it (a frozen projection without an adapter does not keep its input). fp32
  precision: 4 bytes each; bf16 (autocast, or FSDP's bf16 parameters): 2 bytes, with norms keeping fp32
  copies of their inputs and, under autocast over fp32 weights, each projection keeping its own bf16 copy
  of its input and of its weight. The logits exist only at the labelled positions (VLA.forward projects
  those only): the output's fp32 logits and their log-softmax, (action tokens + 1) x vocabulary per frame.
  Activation checkpointing keeps each block's input only, and recomputes one block at a time in backward;
- the peak: backward releases each block's saved tensors after writing its gradients, so the peak is the
  largest of (saved activations of the blocks not yet visited + gradients written so far + the working
  set of the block being visited: the gradients flowing in and out, 2 h, and its widest intermediate
  gradients, 3 i for a decoder layer and 2 i for a vision block, in the activation dtype; the logits'
  gradients for the head; one dequantized weight under QLoRA; FSDP's gathered parameters) over the
  backward, and of (all gradients + the optimizer step's temporaries: two of the largest tensor for
  the single-tensor AdamW on CPU, none for the fused AdamW the trainer uses on GPU). With
  gradient accumulation the gradients of earlier micro-batches are all held already.

Host memory per rank: the model load (the weights file, or the rank's shard of it under FSDP) plus the
data pipeline's budget (data.ram_budget_gb).

The estimate counts tensors: what an allocator keeps cached or fragmented comes on top (the CUDA caching
allocator's reserved memory above its allocated peak; the CUDA context is outside the free memory the
check compares with). tests/test_preflight.py measures it against real steps on CPU
(training/preflight_measure.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_train.config import ConfigError, TrainConfig

GIB = 2**30
# BOS + OpenVLA's prompt around a typical instruction + the empty piece, with Llama-2's tokenizer.
PROMPT_TOKENS = 32
# bitsandbytes' 4-bit quantization: values per absmax block, absmax values per nested (second-level) block.
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 64, 256
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


@dataclass
class MemoryRow:
    name: str
    num_bytes: float
    detail: str = ""


@dataclass
class MemoryEstimate:
    """The peak memory of a training step per rank, as the rows held at that moment (they sum to the
    peak), the host memory per rank, and the device capacity once known (check_before_loading)."""

    rows: list[MemoryRow]
    host_rows: list[MemoryRow]
    summary: list[str]  # what was estimated: model, mode, strategy, precision, batch, sequence
    peak_at: str  # the moment of the peak
    device: str  # cuda | cpu
    world_size: int
    num_params: int = 0
    num_trainable: int = 0
    capacity_bytes: float | None = None
    capacity_source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(r.num_bytes for r in self.rows)

    @property
    def host_bytes(self) -> float:
        return sum(r.num_bytes for r in self.host_rows)

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.fits_in(self.capacity_bytes)

    def fits_in(self, capacity_bytes: float | None) -> bool:
        return capacity_bytes is None or self.peak_bytes <= capacity_bytes


# ---- the model: sizes and the stored weights ------------------------------------------------------


@dataclass
class _ModelSource:
    config: Any  # VLAConfig
    checkpoint_dtype_bytes: int  # bytes per element of the stored floating-point weights
    weights_file_bytes: float  # what one full load reads into host memory
    note: str


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> dtype, shape), read from its header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _weights_dtype_bytes(files: list[Path]) -> int | None:
    """Bytes per element of the floating-point tensors holding most bytes in these files (headers only)."""
    by_dtype: dict[str, int] = {}
    for f in files:
        for entry in _safetensors_header(f).values():
            dtype = entry["dtype"]
            if dtype in ("F64", "F32", "BF16", "F16"):
                by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(entry["shape"]) * _DTYPE_BYTES[dtype]
    return _DTYPE_BYTES[max(by_dtype, key=by_dtype.get)] if by_dtype else None


def _config_from_sizes(cfg: TrainConfig):
    from vla_train.models.load import vla_config_from
    from vla_train.models.tokenizer import build_local_tokenizer

    m = cfg.model
    # Only the vocabulary's size matters here; the run's tokenizer is trained on its instructions later.
    tokenizer = build_local_tokenizer(["pick up the block"], m.text_vocab_size, m.n_action_bins)
    return vla_config_from(m, tokenizer)


def _openvla_config(d: Path, files: list[Path]):
    from transformers import AutoTokenizer, PretrainedConfig

    from vla_train.models.openvla_format import openvla_vla_config

    shapes = {}
    for f in files:
        shapes.update({k: tuple(v["shape"]) for k, v in _safetensors_header(f).items()})
    # A blank config keeps AutoTokenizer away from config.json's remote-code auto_map (as load_openvla_dir).
    tokenizer = AutoTokenizer.from_pretrained(str(d), config=PretrainedConfig())
    return openvla_vla_config(json.loads((d / "config.json").read_text()), shapes, tokenizer)


def _model_source(cfg: TrainConfig) -> _ModelSource:
    """The model's VLAConfig and what its weights weigh, without reading a weight."""
    from vla_train.models.vla import VLAConfig

    if not cfg.model.pretrained_dir:
        config = _config_from_sizes(cfg)
        # The trainer builds this base once and saves it in fp32 (training/trainer.py, _load_model).
        return _ModelSource(config, 4, math.nan, "built from the model section's sizes (saved in fp32)")
    from vla_train.models.openvla_format import is_openvla_dir, weight_files

    d = Path(cfg.model.pretrained_dir)
    try:
        files = weight_files(d)
    except (FileNotFoundError, ValueError, KeyError):
        files = []
    file_bytes = float(sum(f.stat().st_size for f in files)) if files else math.nan
    dtype_bytes = _weights_dtype_bytes(files) if files else None
    if is_openvla_dir(d):
        try:
            config = _openvla_config(d, files)
            note = f"OpenVLA-format {d}"
        except Exception as e:  # noqa: BLE001 (any unreadable part: estimate from the config's sizes)
            config = _config_from_sizes(cfg)
            note = f"OpenVLA-format {d}, sizes from the model section ({type(e).__name__}: {e})"
    else:
        config = VLAConfig.from_dict(json.loads((d / "config.json").read_text()))
        note = f"{d}"
    if dtype_bytes is None:
        note += "; no weights file to read the dtype from: fp32 assumed"
    return _ModelSource(config, dtype_bytes or 4, file_bytes, note)


_META_MODELS: dict[str, Any] = {}


def _meta_model(config):
    """The VLA on the meta device (shapes only), cached per config: suggestions re-estimate the same model."""
    import torch

    from vla_train.models.vla import VLA

    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _META_MODELS:
        _META_MODELS.clear()  # one at a time (a 7B one is a few MB of module objects)
        with torch.device("meta"):
            _META_MODELS[key] = VLA(config)
    return _META_MODELS[key]


# ---- which weights train, and what they weigh -----------------------------------------------------


@dataclass
class _Plan:
    """The run's fine-tuning choices applied to the meta model."""

    precision: str  # bf16 | fp32
    strategy: str  # single | ddp | fsdp
    autocast: bool  # bf16 through torch.autocast over stored weights (single/DDP)
    act_bytes: int  # bytes of an activation in the compute dtype
    res_bytes: int  # bytes of the residual stream (the stored dtype of the embeddings under autocast)
    frozen_bytes: dict[str, float]  # per segment
    trainable: dict[str, list[tuple[int, int]]]  # per segment: (numel, bytes per element) of each tensor
    trains_param: set[str]  # names of trainable parameters of the base model (full FT, modules_to_save)
    adapters: dict[str, int]  # targeted module -> LoRA rank
    quantized: dict[str, int]  # quantized linear -> its weight's numel
    linear_weights: dict[str, int]  # module -> numel of its (unquantized) weight, for autocast copies
    mode: str  # what trains, in words
    quantization: str  # none | nf4 | int8
    base_bytes: int  # bytes per element of the stored unquantized weights
    shard: int  # the world size under FSDP (full shard), else 1
    attn: str  # the attention kernel: sdpa | eager | flash_attention_2
    training_modules: set[str] = field(default_factory=set)  # every module with a trainable part inside

    def __post_init__(self) -> None:
        for name in [*self.trains_param, *self.adapters]:
            parts = name.split(".")
            self.training_modules.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))


def _segment(name: str) -> str:
    """The forward-order piece a parameter or module belongs to (a repeated block, or the parts between)."""
    for pattern, label in (
        (r"vision_backbone\.featurizer\.encoder\.layer\.(\d+)\.", "dino.{}"),
        (r"vision_backbone\.fused_featurizer\.encoder\.layers\.(\d+)\.", "siglip.{}"),
        (r"language_model\.model\.layers\.(\d+)\.", "llm.{}"),
    ):
        m = re.match(pattern, name)
        if m:
            return label.format(m.group(1))
    for prefix, label in (
        ("vision_backbone.featurizer.", "dino_embed"),
        ("vision_backbone.fused_featurizer.", "siglip_embed"),
        ("projector.", "projector"),
        ("language_model.model.embed_tokens.", "text_embed"),
    ):
        if name.startswith(prefix):
            return label
    return "head"


def _quantized_numel_bytes(numel: int, rows: int, kind: str) -> float:
    if kind == "nf4":
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        # packed 4-bit values, a uint8 absmax per block, an fp32 absmax per 256 blocks + the 256-entry code
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + 4 * 256 + 4
    return numel + 4 * rows  # int8: one byte per weight, one fp32 scale per output row


def _plan(cfg: TrainConfig, source: _ModelSource, model, world_size: int, device: str) -> _Plan:
    import torch
    from torch import nn

    # The same selection rules as the trainer's LoRA/QLoRA (models/peft.py).
    from vla_train.models.peft import lora_targets, quantized_layers, set_finetune_mode
    from vla_train.training.distributed import resolve_precision, resolve_strategy

    lora, t = cfg.lora, cfg.training
    precision = resolve_precision(cfg.distributed.mixed_precision, torch.device(device))
    strategy = resolve_strategy(cfg.distributed.strategy, world_size)
    modules = dict(model.named_modules())
    adapters: dict[str, int] = {}
    quantized: dict[str, int] = {}
    trains_param: set[str] = set()
    if lora.enabled:
        try:
            targets = lora_targets(model, lora)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for m in lora.modules_to_save:
            trains_param.update(f"{m}.{p}" for p, _ in modules[m].named_parameters())
        adapters = {n: lora.rank for n in targets}
        if lora.quantization != "none":
            quantized = {name: modules[name].weight.numel() for name in quantized_layers(model, lora)}
        base_bytes = 4 if quantized else source.checkpoint_dtype_bytes  # QLoRA casts the rest to fp32
        mode = f"LoRA r={lora.rank}" + (f" over {lora.quantization} base weights" if quantized else "")
    else:
        set_finetune_mode(model, t.finetune_mode)
        trains_param = {n for n, p in model.named_parameters() if p.requires_grad}
        base_bytes = 4  # the trainer casts to fp32 master weights
        mode = f"{t.finetune_mode} fine-tune"

    frozen: dict[str, float] = {}
    trainable: dict[str, list[tuple[int, int]]] = {}
    linear_weights: dict[str, int] = {}
    for name, p in model.named_parameters():
        seg = _segment(name)
        module_name = name.rpartition(".")[0]
        if module_name in quantized and name.endswith(".weight"):
            rows = modules[module_name].out_features
            frozen[seg] = frozen.get(seg, 0.0) + _quantized_numel_bytes(p.numel(), rows, lora.quantization)
            continue
        if isinstance(modules.get(module_name), nn.Linear) and name.endswith(".weight"):
            linear_weights[module_name] = p.numel()
        if name in trains_param and lora.enabled:
            # modules_to_save: peft trains a copy and keeps the original frozen next to it
            trainable.setdefault(seg, []).append((p.numel(), base_bytes))
            frozen[seg] = frozen.get(seg, 0.0) + p.numel() * base_bytes
        elif name in trains_param:
            trainable.setdefault(seg, []).append((p.numel(), 4))
        else:
            frozen[seg] = frozen.get(seg, 0.0) + p.numel() * base_bytes
    for name, rank in adapters.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            numels = [rank * m.in_channels * math.prod(m.kernel_size), m.out_channels * rank]
        else:
            numels = [rank * m.in_features, m.out_features * rank]
        # peft keeps adapters in fp32 (autocast_adapter_dtype) whatever the base dtype
        trainable.setdefault(_segment(name + "."), []).extend((n, 4) for n in numels)

    autocast = precision == "bf16" and strategy != "fsdp"
    act_bytes = 2 if precision == "bf16" else 4
    if precision == "fp32":
        res_bytes = 4
    elif strategy == "fsdp":
        res_bytes = 2  # FSDP's bf16 parameters: the whole forward runs in bf16
    else:
        res_bytes = base_bytes  # autocast leaves the embeddings' (and residual adds') dtype as stored
    return _Plan(
        precision, strategy, autocast, act_bytes, res_bytes, frozen, trainable, trains_param, adapters,
        quantized, linear_weights, mode, lora.quantization if lora.enabled else "none", base_bytes,
        world_size if strategy == "fsdp" else 1, source.config.attn_implementation,
    )  # fmt: skip


# ---- activations ----------------------------------------------------------------------------------


class _Saved:
    """Bytes autograd saves in one block's forward, from the block's trainable parts: per frame (`bytes`)
    and per micro-batch (`batch_bytes`: autocast's weight copies)."""

    def __init__(self, plan: _Plan, prefix: str, lora_dropout: float):
        self.plan, self.prefix, self.dropout = plan, prefix, lora_dropout
        self.bytes = 0.0
        self.batch_bytes = 0.0

    def _name(self, local: str) -> str:
        return f"{self.prefix}.{local}"

    def trains(self, local: str) -> bool:
        """Whether a module has trainable parameters or an adapter (its backward computes gradients)."""
        return self._name(local) in self.plan.training_modules

    def keeps_input(self, local: str) -> bool:
        """A projection keeps its input when its weight trains, when its adapter reads it (without LoRA
        dropout), or under bitsandbytes int8 (whose matmul keeps it)."""
        name = self._name(local)
        if f"{name}.weight" in self.plan.trains_param:
            return True
        if name in self.plan.quantized and self.plan.quantization == "int8":
            return True
        return name in self.plan.adapters and not self.dropout

    def add(self, elements: float, nbytes: float) -> None:
        self.bytes += elements * nbytes

    def adapters(self, locals_: list[str], widths: list[int], tokens: int) -> None:
        """LoRA intermediates (rank values, lora_B's input), plus, with dropout, each adapter's own dropped
        copy of its input and the dropout mask."""
        for local, width in zip(locals_, widths, strict=True):
            rank = self.plan.adapters.get(self._name(local))
            if rank:
                self.add(tokens * rank, self.plan.act_bytes)
                if self.dropout:
                    self.add(tokens * width, self.plan.act_bytes + 1)

    def norm_output(self, width: int, tokens: int, consumers: list[str], fp32_output: bool) -> None:
        """A norm's output read by `consumers`: one shared tensor, or, under autocast over an fp32 output,
        one bf16 copy per consumer that keeps its input (autocast casts activations per call)."""
        keepers = sum(self.keeps_input(c) for c in consumers)
        if keepers and self.plan.autocast and fp32_output:
            self.add(tokens * width * keepers, self.plan.act_bytes)
        elif keepers:
            self.add(tokens * width, self.plan.res_bytes)

    def weight_copies(self, locals_: list[str]) -> None:
        """Autocast's bf16 copy of each fp32 projection weight, kept by its matmul for the input gradient."""
        p = self.plan
        if p.autocast and p.base_bytes == 4:
            self.batch_bytes += sum(2 * p.linear_weights.get(self._name(x), 0) for x in locals_)


def _llm_block(s: _Saved, c, L: int, flows: bool, attn: str) -> bool:
    """One Llama/Qwen2 decoder layer; returns whether a gradient flows out of it."""
    p = s.plan
    h, i = c.llm["hidden_size"], c.llm["intermediate_size"]
    heads = c.llm["num_attention_heads"]
    kv_width = (c.llm.get("num_key_value_heads") or heads) * h // heads
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    projections = [*qkv, "self_attn.o_proj", *gate_up, "mlp.down_proj"]
    fp32_res = p.res_bytes == 4
    if flows:
        s.add(L * h, 4)  # RMSNorm keeps an fp32 copy of its input
    if s.trains("input_layernorm"):
        s.add(L * h, p.res_bytes)  # the normalized input, for the norm weight's gradient
    s.norm_output(h, L, qkv, fp32_res)
    s.adapters(qkv, [h, h, h], L)
    flows = flows or s.trains("input_layernorm") or any(s.trains(x) for x in qkv)
    if flows:
        s.add(L * (2 * h + 2 * kv_width), p.act_bytes)  # q (rotated), k (rotated), v, the attention output
        s.add(L * heads, 4)  # log-sum-exp
        if p.attn == "eager":
            s.add(heads * L * L, 4 + (p.act_bytes if p.act_bytes != 4 else 0))  # fp32 softmax + its cast
        elif p.attn == "sdpa":
            s.add(L * L, p.act_bytes)  # the padding + causal mask SDPA keeps
    elif s.keeps_input("self_attn.o_proj"):
        s.add(L * h, p.act_bytes)
    s.adapters(["self_attn.o_proj"], [h], L)
    flows = flows or s.trains("self_attn.o_proj")
    if flows:
        s.add(L * h, 4)  # the second RMSNorm's fp32 input
    if s.trains("post_attention_layernorm"):
        s.add(L * h, p.res_bytes)
    s.norm_output(h, L, gate_up, fp32_res)
    s.adapters(gate_up, [h, h], L)
    flows = flows or s.trains("post_attention_layernorm") or any(s.trains(x) for x in gate_up)
    if flows:
        s.add(L * 3 * i, p.act_bytes)  # gate (SiLU input), SiLU output, up
    if s.keeps_input("mlp.down_proj"):
        s.add(L * i, p.act_bytes)
    s.adapters(["mlp.down_proj"], [i], L)
    flows = flows or s.trains("mlp.down_proj")
    if flows:
        s.weight_copies(projections)
    return flows


def _vision_block(s: _Saved, spec: dict, T: int, flows: bool, dino: bool) -> bool:
    """One DINOv2 (LayerScale) or SigLIP block; returns whether a gradient flows out of it."""
    p = s.plan
    h, i, heads = spec["hidden"], spec.get("intermediate", 4 * spec["hidden"]), spec["heads"]
    n1, attn, out, n2 = ("norm1", "attention", "o_proj", "norm2") if dino else (
        "layer_norm1", "self_attn", "out_proj", "layer_norm2"
    )  # fmt: skip
    qkv = [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    ln_input = 4 if p.autocast else p.act_bytes  # autocast runs LayerNorm in fp32
    if flows or s.trains(n1):
        s.add(T * h, ln_input)
        s.add(T * 2, 4)  # mean, rstd
    s.norm_output(h, T, qkv, fp32_output=True)
    s.adapters(qkv, [h, h, h], T)
    flows = flows or s.trains(n1) or any(s.trains(x) for x in qkv)
    if flows:
        s.add(T * 4 * h, p.act_bytes)  # q, k, v, the attention output
        s.add(T * heads, 4)  # log-sum-exp
    elif s.keeps_input(f"{attn}.{out}"):
        s.add(T * h, p.act_bytes)
    s.adapters([f"{attn}.{out}"], [h], T)
    if dino and s.trains("layer_scale1"):
        s.add(T * h, p.act_bytes)
    flows = flows or s.trains(f"{attn}.{out}") or (dino and s.trains("layer_scale1"))
    if flows or s.trains(n2):
        s.add(T * h, ln_input)
        s.add(T * 2, 4)
    s.norm_output(h, T, ["mlp.fc1"], fp32_output=True)
    s.adapters(["mlp.fc1"], [h], T)
    flows = flows or s.trains(n2) or s.trains("mlp.fc1")
    if flows:
        s.add(T * i, p.act_bytes)  # the GELU's input
    if s.keeps_input("mlp.fc2"):
        s.add(T * i, p.act_bytes)
    s.adapters(["mlp.fc2"], [i], T)
    if dino and s.trains("layer_scale2"):
        s.add(T * h, p.act_bytes)
    flows = flows or s.trains("mlp.fc2") or (dino and s.trains("layer_scale2"))
    if flows:
        s.weight_copies([*qkv, f"{attn}.{out}", "mlp.fc1", "mlp.fc2"])
    return flows


def _projector(s: _Saved, c, P: int, flows: bool) -> bool:
    """fc1 -> GELU -> fc2 -> GELU -> fc3 over the patch features."""
    d_vision, h = c.dino["hidden"] + c.siglip["hidden"], c.llm["hidden_size"]
    for fc, width, gelu_width in (("fc1", d_vision, 4 * d_vision), ("fc2", 4 * d_vision, h), ("fc3", h, 0)):
        if s.keeps_input(fc):
            s.add(P * width, s.plan.act_bytes)
        s.adapters([fc], [width], P)
        flows = flows or s.trains(fc)
        if flows and gelu_width:
            s.add(P * gelu_width, s.plan.act_bytes)  # the GELU's input
    if flows:
        s.weight_copies(["fc1", "fc2", "fc3"])
    return flows


def _head(s: _Saved, c, L: int, N: int, vocab: int, flows: bool) -> None:
    """The final norm, the LM head at the N labelled positions of a frame, and the loss."""
    h = c.llm["hidden_size"]
    if flows:
        s.add(L * h, 4)
    if s.trains("model.norm"):
        s.add(L * h, s.plan.res_bytes)
    if s.keeps_input("lm_head"):
        s.add(N * h, s.plan.act_bytes)
    s.adapters(["lm_head"], [h], N)
    s.add(N * vocab, 4 + 4)  # fp32 logits (held by the output) and their log-softmax (kept by the loss)
    s.weight_copies(["lm_head"])


@dataclass
class _Segment:
    name: str
    saved: float  # bytes autograd saves for it in the micro-batch's forward
    kept: float  # what activation checkpointing keeps of it instead (its input; = saved when not a block)
    working: float  # its backward's transient tensors (gradients in flight)
    grads: float  # its gradients' bytes on this rank
    visited: bool  # whether backward runs through it


def _segments_of(plan: _Plan, c, cfg: TrainConfig, micro: int, L: int, N: int, vocab: int) -> list[_Segment]:
    """Activations, working sets and gradients of each segment, in forward order."""
    dropout = cfg.lora.dropout if cfg.lora.enabled else 0.0
    P = c.num_patches
    a = plan.act_bytes
    out: list[_Segment] = []

    def grads_of(seg: str) -> float:
        return sum(n * b for n, b in plan.trainable.get(seg, [])) / plan.shard

    def add(seg: str, s: _Saved, kept: float | None, working: float, visited: bool) -> None:
        saved = s.bytes * micro + s.batch_bytes
        out.append(_Segment(seg, saved, saved if kept is None else kept, working, grads_of(seg), visited))

    for tower, spec, T, prefix, dino in (
        ("dino", c.dino, P + 1 + c.dino["registers"], "vision_backbone.featurizer.encoder.layer", True),
        ("siglip", c.siglip, P, "vision_backbone.fused_featurizer.encoder.layers", False),
    ):
        flows = bool(plan.trainable.get(f"{tower}_embed"))
        out.append(_Segment(f"{tower}_embed", 0.0, 0.0, 0.0, grads_of(f"{tower}_embed"), flows))
        h, i = spec["hidden"], spec.get("intermediate", 4 * spec["hidden"])
        for k in range(spec["layers"] - 1):  # the last block is not built
            s = _Saved(plan, f"{prefix}.{k}", dropout)
            flows = _vision_block(s, spec, T, flows, dino)
            # backward working set: the gradient into and out of the block, its two widest gradients
            add(f"{tower}.{k}", s, micro * T * h * plan.res_bytes, micro * T * (2 * h + 2 * i) * a, flows)
        if tower == "dino":
            flows_dino = flows
    s = _Saved(plan, "projector", dropout)
    flows = _projector(s, c, P, flows_dino or flows)
    add("projector", s, None, 0.0, flows)
    flows = flows or bool(plan.trainable.get("text_embed"))
    out.append(_Segment("text_embed", 0.0, 0.0, 0.0, grads_of("text_embed"), flows))
    h, i = c.llm["hidden_size"], c.llm["intermediate_size"]
    for k in range(c.llm["num_hidden_layers"]):
        s = _Saved(plan, f"language_model.model.layers.{k}", dropout)
        flows = _llm_block(s, c, L, flows, plan.attn)
        add(f"llm.{k}", s, micro * L * h * plan.res_bytes, micro * L * (2 * h + 3 * i) * a, flows)
    s = _Saved(plan, "language_model", dropout)
    _head(s, c, L, N, vocab, flows)
    add("head", s, None, 2 * micro * N * vocab * 4, True)  # gradients of the log-softmax and the logits
    return out


# ---- the estimate ---------------------------------------------------------------------------------


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}"


def _fsdp_working_set(plan: _Plan, model, world_size: int) -> float:
    """FSDP2 gathers each block's parameters (in the parameter dtype) for its forward and backward and
    prefetches the next block's; a block's gradient exists unsharded (fp32) until reduce-scattered; the
    root's parameters (embeddings, LM head, norms) stay gathered from the forward to the backward."""
    if plan.strategy != "fsdp" or world_size == 1:
        return 0.0
    numel: dict[str, int] = {}
    for name, prm in model.named_parameters():
        seg = _segment(name)
        numel[seg] = numel.get(seg, 0) + prm.numel()
    blocks = [seg for seg in numel if "." in seg or seg == "projector"]
    root = sum(n for seg, n in numel.items() if seg not in blocks)
    param_bytes = 2 if plan.precision == "bf16" else 4
    biggest = max(numel[seg] for seg in blocks)
    biggest_grad = max(sum(n for n, _ in plan.trainable.get(seg, [])) for seg in blocks) * 4
    return (2 * biggest + root) * param_bytes * (1 - 1 / world_size) + biggest_grad


def _peak(plan: _Plan, segments: list[_Segment], cfg: TrainConfig, model, world_size: int, device: str):
    """(when, activations held, gradients held, working set, what the working set is) at the peak.

    The backward visits the segments from the last: the saved tensors of the segments not yet visited
    (checkpointed blocks: their inputs; the visited one: all, recomputed), the gradients written so far
    (all of them with accumulation: earlier micro-batches wrote them) and the visited one's working set.
    Then the optimizer step: all gradients and its temporaries."""
    grad_total = sum(s.grads for s in segments)
    fsdp_ws = _fsdp_working_set(plan, model, world_size)
    dequantized = 0.0
    if plan.quantized:
        # bitsandbytes dequantizes a layer's weight to the compute dtype for its matmul (forward and backward)
        qc = cfg.lora.quant_compute_dtype
        compute = 2 if qc == "bfloat16" or (qc == "auto" and device == "cuda") else 4
        dequantized = max(plan.quantized.values()) * compute
    ckpt = cfg.distributed.activation_checkpointing
    peak = (-1.0, "", 0.0, 0.0, 0.0)
    for j, seg in enumerate(segments):
        if not seg.visited:
            continue
        held_acts = sum(s.kept if ckpt else s.saved for s in segments[:j]) + seg.saved
        held_grads = grad_total if cfg.training.grad_accum_steps > 1 else sum(s.grads for s in segments[j:])
        ws = seg.working + fsdp_ws + dequantized
        if held_acts + held_grads + ws > peak[0]:
            peak = (held_acts + held_grads + ws, f"the backward of {seg.name}", held_acts, held_grads, ws)
    parts = ["the visited block's gradients in flight"]
    parts += ["a dequantized weight"] if dequantized else []
    parts += ["FSDP's gathered parameters and unsharded gradient"] if fsdp_ws else []
    if device == "cpu":  # single-tensor AdamW: two temporaries (sqrt, division) of one tensor at a time
        step_ws = 2 * max((n * b for seg in plan.trainable.values() for n, b in seg), default=0) / plan.shard
        step_how = "AdamW's temporaries for the largest trainable tensor"
    else:  # fused AdamW (training/optim.py on CUDA): updated in place, no temporaries of the states' size
        step_ws = 0.0
        step_how = "fused AdamW (in place)"
    if grad_total + step_ws > peak[0]:
        return "the optimizer step", 0.0, grad_total, step_ws, step_how
    return peak[1], peak[2], peak[3], peak[4], ", ".join(parts)


def _host_rows(cfg: TrainConfig, load_bytes: float, sharded: bool) -> list[MemoryRow]:
    return [
        MemoryRow("model load", load_bytes, ("a shard of " if sharded else "") + "the weights file"),
        MemoryRow(
            "data pipeline",
            cfg.data.ram_budget_gb * GIB,
            "data.ram_budget_gb" if cfg.data.ram_budget_gb else "uncapped (data.ram_budget_gb 0)",
        ),
    ]


def estimate(
    cfg: TrainConfig,
    world_size: int,
    device: str | None = None,
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    checkpoint_dtype_bytes: int | None = None,
    logits_at: str = "labelled",
) -> MemoryEstimate:
    """The peak memory per rank of a training step of `cfg` on `world_size` ranks, without loading a weight
    (the formulas are in the module docstring).

    device: "cuda" or "cpu" semantics (precision auto = bf16 on cuda, fp32 on cpu); None = this machine's.
    prompt_tokens: BOS + prompt + empty piece of the longest instruction (the default: a typical OpenVLA
    prompt under Llama-2's tokenizer). checkpoint_dtype_bytes: bytes per element of the stored base
    weights instead of what the weights file says (e.g. 2 to plan a LoRA run over a bf16 checkpoint that
    is not on this machine). logits_at: "labelled" (what VLA.forward does: the LM head projects the
    labelled positions only) or "all" (the counterfactual of a causal LM's usual forward, logits at
    every position of the sequence, for stating what the first saves).
    """
    import torch

    from vla_train.models.vla import padded_vocab

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = _model_source(cfg)
    if checkpoint_dtype_bytes:
        note = f"{source.note}; stored weights planned at {checkpoint_dtype_bytes} bytes per value"
        source = dataclasses.replace(source, checkpoint_dtype_bytes=checkpoint_dtype_bytes, note=note)
    c = source.config
    model = _meta_model(c)
    plan = _plan(cfg, source, model, world_size, device)
    t = cfg.training
    micro = max(1, t.batch_size // (world_size * t.grad_accum_steps))
    action_tokens = c.action_dim * (cfg.data.future_action_window_size + 1)
    text = prompt_tokens + action_tokens + 1  # + EOS
    L = c.num_patches + text
    if logits_at not in ("labelled", "all"):
        raise ValueError(f"logits_at is 'labelled' or 'all', not {logits_at!r}")
    N = action_tokens + 1 if logits_at == "labelled" else L  # positions the LM head projects, per frame
    segments = _segments_of(plan, c, cfg, micro, L, N, padded_vocab(c.base_vocab_size, c.pad_to_multiple_of))

    grad_total = sum(s.grads for s in segments)
    trainable_bytes = grad_total  # the trainable weights: the same dtype and sharding as their gradients
    peak_at, held_acts, held_grads, ws, ws_how = _peak(plan, segments, cfg, model, world_size, device)

    sharded = f", / {world_size} ranks (FSDP)" if plan.shard > 1 else ""
    if plan.quantized:
        base_how = f"frozen: {cfg.lora.quantization} layers + the rest in fp32"
    else:
        base_how = "frozen, " + {4: "fp32", 2: "bf16"}.get(plan.base_bytes, f"{plan.base_bytes} bytes")
    rows = [
        MemoryRow("base weights", sum(plan.frozen_bytes.values()) / plan.shard, base_how + sharded),
        MemoryRow(
            "trainable weights",
            trainable_bytes,
            ("LoRA adapters, " if cfg.lora.enabled else "") + "fp32" + sharded,
        ),
        MemoryRow("optimizer states", 2 * trainable_bytes, "AdamW, 2 per trainable parameter" + sharded),
        MemoryRow("gradients", held_grads, f"held at the peak, of {_gb(grad_total)}{sharded}"),
        MemoryRow(
            "activations",
            held_acts,
            f"held at the peak; micro-batch {micro}, {plan.precision}"
            + (", blocks checkpointed" if cfg.distributed.activation_checkpointing else ""),
        ),
        MemoryRow("workspace", ws, ws_how),
    ]
    if plan.strategy == "ddp":
        rows.append(MemoryRow("DDP gradient buckets", grad_total, "a second copy of the gradients"))

    num_params = sum(prm.numel() for prm in model.parameters())
    num_trainable = sum(n for seg in plan.trainable.values() for n, _ in seg)
    # no weights file yet (a base built from config, or a planned checkpoint): its parameters as stored
    load = source.weights_file_bytes
    if math.isnan(load) or checkpoint_dtype_bytes:
        load = num_params * source.checkpoint_dtype_bytes
    host_rows = _host_rows(cfg, load / plan.shard, plan.shard > 1)
    summary = [
        f"{num_params / 1e9:.3f} B parameters, {num_trainable / 1e6:.1f} M trainable ({plan.mode}); "
        f"model {source.note}",
        f"{plan.strategy} on {world_size} rank(s), {plan.precision} on {device}; global batch "
        f"{t.batch_size} = {world_size} rank(s) x {t.grad_accum_steps} micro-batch(es) x {micro} frames; "
        f"sequence {c.num_patches} patches + {text} text tokens",
    ]
    return MemoryEstimate(rows, host_rows, summary, peak_at, device, world_size, num_params, num_trainable)


def format_table(est: MemoryEstimate) -> str:
    """The estimate as a table: component, GiB per rank and what it holds; the total, the device capacity
    and the headroom once known; the host memory per rank."""
    names = [r.name for r in est.rows] + ["device capacity"]
    width = max(len(n) for n in names) + 2
    lines = [f"memory preflight: {est.summary[0]}", *[f"  {line}" for line in est.summary[1:]]]
    lines.append(f"  {'component':<{width}}{'GiB/rank':>9}")
    lines += [f"  {r.name:<{width}}{_gb(r.num_bytes):>9}  {r.detail}" for r in est.rows]
    lines.append(
        f"  {'total':<{width}}{_gb(est.peak_bytes):>9}  the peak of a training step, at {est.peak_at}"
    )
    if est.capacity_bytes is not None:
        headroom = est.capacity_bytes - est.peak_bytes
        lines.append(f"  {'device capacity':<{width}}{_gb(est.capacity_bytes):>9}  {est.capacity_source}")
        lines.append(
            f"  {'headroom':<{width}}{_gb(headroom):>9}  {'fits' if headroom >= 0 else 'DOES NOT FIT'}"
        )
    host = " + ".join(f"{r.name} {_gb(r.num_bytes)} ({r.detail})" for r in est.host_rows)
    lines.append(f"  host memory per rank: {_gb(est.host_bytes)} GiB = {host}")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


# ---- the check before loading ---------------------------------------------------------------------


def _mem_available_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def device_capacity(cfg: TrainConfig, local_world_size: int) -> tuple[str, float | None, str]:
    """(device type, bytes one rank may use, where that number comes from): the free memory of this
    rank's GPU when CUDA is up, else the machine's available RAM shared by the node's ranks;
    training.preflight_device_memory_gb overrides the number."""
    import torch

    override = cfg.training.preflight_device_memory_gb
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if override:
        return device, override * GIB, f"training.preflight_device_memory_gb {override:g}"
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(index)
        return device, float(free), f"free on cuda:{index} (of {total / GIB:.1f} GiB)"
    available = _mem_available_bytes()
    if available is None:
        return device, None, "unknown (no /proc/meminfo)"
    ranks = max(1, local_world_size)
    return (
        device,
        available / ranks,
        f"MemAvailable {available / GIB:.1f} GiB / {ranks} rank(s) on this machine",
    )


def _with(cfg: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """A copy of cfg with fields of some sections replaced: _with(cfg, lora={"enabled": True})."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    )


def _suggestions(
    cfg: TrainConfig, world_size: int, device: str, capacity: float, prompt_tokens: int
) -> list[str]:
    """What to change, each with its estimated peak per rank, in the order that changes the run least:
    more accumulation (the same global batch), activation checkpointing, LoRA, QLoRA, more ranks with
    FSDP; then, when nothing fits on the ranks there are, all of the others together."""
    t, lora, d = cfg.training, cfg.lora, cfg.distributed

    def peak(candidate: TrainConfig, ranks: int) -> MemoryEstimate:
        return estimate(candidate, ranks, device, prompt_tokens=prompt_tokens)

    def first_fitting(candidates: list[tuple[TrainConfig, int]]) -> tuple[TrainConfig, int] | None:
        """The first candidate that fits, else the last (the furthest one goes)."""
        for candidate, ranks in candidates:
            if peak(candidate, ranks).fits_in(capacity):
                return candidate, ranks
        return candidates[-1] if candidates else None

    options: list[tuple[str, TrainConfig, int]] = []
    per_rank = t.batch_size // world_size
    accums = [a for a in range(t.grad_accum_steps + 1, per_rank + 1) if per_rank % a == 0]
    found = first_fitting([(_with(cfg, training={"grad_accum_steps": a}), world_size) for a in accums])
    if found:
        a = found[0].training.grad_accum_steps
        text = f"training.batch_size {t.batch_size} -> use training.grad_accum_steps {a} (micro-batch "
        options.append((text + f"{per_rank // a}, the same global batch)", *found))
    if not d.activation_checkpointing:
        ckpt = _with(cfg, distributed={"activation_checkpointing": True})
        options.append(("distributed.activation_checkpointing true", ckpt, world_size))
    if not lora.enabled:
        text = f"lora.enabled true (LoRA r={lora.rank} adapters instead of a full fine-tune)"
        options.append(
            (text, _with(cfg, lora={"enabled": True}, training={"finetune_mode": "full"}), world_size)
        )
    one_device = "single" if world_size == 1 else "ddp"
    if lora.quantization == "none":
        text = (
            "lora.quantization nf4" if lora.enabled else "lora.enabled true + lora.quantization nf4 (QLoRA)"
        )
        strategy = d.strategy
        if d.strategy == "fsdp":
            text += f" + distributed.strategy {one_device} (FSDP cannot shard 4-bit weights)"
            strategy = one_device
        qlora = _with(
            cfg,
            lora={"enabled": True, "quantization": "nf4"},
            training={"finetune_mode": "full"},
            distributed={"strategy": strategy},
        )
        options.append((text, qlora, world_size))
        fsdp = _with(cfg, distributed={"strategy": "fsdp"})
        sizes = [
            n
            for n in (2, 4, 8, 16, 32, 64, 128, 256)
            if n > world_size and not t.batch_size % (n * t.grad_accum_steps)
        ]
        found = first_fitting([(fsdp, n) for n in sizes])
        if found:
            text = f"distributed.strategy fsdp on {found[1]} ranks (each holds 1/{found[1]} of the weights)"
            options.append((text, *found))
    lines, fits_here = [], False
    for text, candidate, ranks in options:
        est = peak(candidate, ranks)
        fits_here = fits_here or (ranks == world_size and est.fits_in(capacity))
        lines.append(
            f"{text}: {_gb(est.peak_bytes)} GiB, {'fits' if est.fits_in(capacity) else 'still too much'}"
        )
    if lines and not fits_here:  # on these ranks, only all of it together may do
        accums = [a for a in range(t.grad_accum_steps, per_rank + 1) if per_rank % a == 0]
        together, _ = first_fitting(
            [
                (
                    _with(
                        cfg,
                        lora={"enabled": True, "quantization": "nf4"},
                        training={"finetune_mode": "full", "grad_accum_steps": a},
                        distributed={"activation_checkpointing": True, "strategy": one_device},
                    ),
                    world_size,
                )
                for a in accums
            ]
        )
        est = peak(together, world_size)
        a = together.training.grad_accum_steps
        verdict = "fits" if est.fits_in(capacity) else "still too much: this needs a device with more memory"
        lines.append(
            f"all together: QLoRA nf4, activation checkpointing, training.grad_accum_steps {a} (micro-batch "
            f"{per_rank // a}): {_gb(est.peak_bytes)} GiB, {verdict}"
        )
    return lines


def check_before_loading(
    cfg: TrainConfig,
    world_size: int,
    local_world_size: int,
    is_main: bool = True,
    *,
    mode: str | None = None,
    device: str | None = None,
) -> MemoryEstimate | None:
    """The memory preflight of a run, before any weight is read: estimate the peak per rank, print the
    table (on the main rank), and when it exceeds the device's capacity raise a ConfigError that names the
    changes that would fit (mode strict), or print that warning and go on (warn). Returns the estimate
    (None with training.preflight off, or when the estimate itself failed, which is reported and does not
    stop the run). Local, no collective: every rank estimates the same peak against its own device's
    capacity; a rank that refuses fails the job as any failing rank does (torchrun stops the others).

    mode: strict | warn | off instead of training.preflight. device: "cuda" or "cpu" semantics instead of
    this machine's (the capacity is still this machine's, or training.preflight_device_memory_gb).
    """
    mode = mode or cfg.training.preflight
    if mode in ("off", "False"):  # YAML reads a bare `off` as false
        return None

    def say(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    detected, capacity, source = device_capacity(cfg, local_world_size)
    device = device or detected
    try:
        est = estimate(cfg, world_size, device)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (a failed estimate must not stop a run that may well fit)
        say(f"memory preflight skipped: the estimate failed ({type(e).__name__}: {e})")
        return None
    est.capacity_bytes, est.capacity_source = capacity, source
    host_node = est.host_bytes * max(1, local_world_size)
    available = _mem_available_bytes()
    # on a CPU device the host memory is the device memory the estimate was checked against already
    if device == "cuda" and available is not None and host_node > available:
        est.notes.append(
            f"host memory: {local_world_size} rank(s) x {_gb(est.host_bytes)} GiB = {_gb(host_node)} GiB "
            f"exceeds this machine's {_gb(available)} GiB available; lower data.ram_budget_gb, or shard the "
            "load with distributed.strategy fsdp"
        )
    say(format_table(est))
    if est.fits:
        return est
    try:
        fixes = _suggestions(cfg, world_size, device, capacity, PROMPT_TOKENS)
    except Exception as e:  # noqa: BLE001 (the refusal stands without them)
        fixes = [f"(no suggestions: estimating them failed with {type(e).__name__}: {e})"]
    message = (
        f"training.preflight: a training step needs an estimated {_gb(est.peak_bytes)} GiB per rank, more "
        f"than the {_gb(capacity)} GiB of the device ({source}). Change one of (estimated peak per rank):"
        "\n    - "
        + "\n    - ".join(fixes)
        + "\n  or set training.preflight warn to try anyway (training.preflight_device_memory_gb plans for "
        "another device)"
    )
    if mode == "strict":
        raise ConfigError(message)
    say("warning: " + message.replace("training.preflight: ", "", 1))
    return est

"""Build a VLA from config (random weights, local tokenizer) and save/load vla_train model directories:

config.json                 VLAConfig (sizes, vocab, norm_stats, OpenVLA fields)
model.safetensors           weights
tokenizer.json, tokenizer_config.json, special_tokens_map.json
processor_config.json       image size, eval centre crop, max length
dataset_statistics.json     the same statistics as config.json's norm_stats

A tied weight (llm_tie_word_embeddings) is stored once, under its first name. For sharded (FSDP) loads
the model is also built on the meta device (`build_on_meta`), and `SafetensorsRows` reads row ranges of
the weights file with positional reads, so a process holds only the rows it asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_train.config import DataConfig, ModelConfig
from vla_train.models.processor import ProcessorSettings, VLAProcessor
from vla_train.models.tokenizer import build_local_tokenizer, empty_piece_id
from vla_train.models.vla import VLA, VLAConfig

WEIGHTS_FILE = "model.safetensors"


def flash_attention_available() -> bool:
    """flash-attn can run here: the package is installed and a CUDA device is up."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(name: str, action_head: str = "tokens") -> str:
    """`auto`: flash-attn when it is installed and CUDA is up, else PyTorch SDPA (always SDPA for the
    l1_parallel head, whose attention mask flash-attn cannot take)."""
    if name != "auto":
        return name
    if action_head == "l1_parallel":
        return "sdpa"
    return "flash_attention_2" if flash_attention_available() else "sdpa"


def attn_for_loading(stored: str, requested: str | None, action_head: str = "tokens") -> str:
    """The attention a loaded model directory is built with. `requested` (a run's model.attn_implementation,
    `auto` resolved as for a new model) wins over what its config.json stored (an OpenVLA checkpoint
    stores none: SDPA). Without a request, a stored flash_attention_2 where flash-attn cannot run (not
    installed, or no CUDA: an export or evaluation on a CPU-only machine) becomes sdpa, the same attention
    in exact arithmetic over the same weights. Requesting flash_attention_2 where it cannot run is an
    error."""
    if requested is None:
        return "sdpa" if stored == "flash_attention_2" and not flash_attention_available() else stored
    chosen = resolve_attn_implementation(requested, action_head)
    if chosen == "flash_attention_2" and not flash_attention_available():
        raise ValueError(
            "model.attn_implementation flash_attention_2 needs the flash-attn package and a CUDA device, "
            "which this machine lacks: install the [flash] extra on a GPU machine, or use auto or sdpa"
        )
    return chosen


def vla_config_from(model_cfg: ModelConfig, tokenizer, layout: dict | None = None) -> VLAConfig:
    """layout: the run's run_layout or head_layout (chunk, cameras, proprio width); None = OpenVLA's one
    image, one action, no proprio, and model_cfg's head."""
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
        attn_implementation=resolve_attn_implementation(m.attn_implementation, m.action_head),
        **{"action_head": m.action_head, "head_hidden_size": m.head_hidden_size, **(layout or {})},
    )


def make_processor(config: VLAConfig, tokenizer, center_crop_area: float = 1.0) -> VLAProcessor:
    settings = ProcessorSettings(config.image_size, center_crop_area, prompt_max_length(config))
    return processor_for(config, tokenizer, settings)


def prompt_max_length(config: VLAConfig) -> int:
    """The longest prompt (with its action tokens) the model's context leaves room for: its length minus
    the image/proprio tokens (and the l1_parallel head's placeholders)."""
    slots = config.num_action_slots if config.action_head == "l1_parallel" else 0
    return config.llm_max_length - config.num_prefix_tokens - slots


def processor_for(config: VLAConfig, tokenizer, settings: ProcessorSettings) -> VLAProcessor:
    """The processor that builds `config`'s model inputs (its action head, cameras, proprio)."""
    return VLAProcessor(
        tokenizer,
        settings,
        config.empty_piece_id,
        config.n_action_bins,
        action_head=config.action_head,
        cameras=tuple(config.cameras),
        proprio_dim=config.proprio_dim,
    )


def head_layout(data: DataConfig, model_cfg: ModelConfig, norm_stats: dict[str, Any]) -> dict[str, Any]:
    """What a run's data puts into and asks out of the model: the chunk (future_action_window_size + 1),
    the cameras, and the proprio width (the widest dataset's, when model.use_proprio)."""
    proprio_dim = 0
    if model_cfg.use_proprio:
        widths = {name: len(s.get("proprio", {}).get("q01", [])) for name, s in norm_stats.items()}
        proprio_dim = max(widths.values(), default=0)
        if not proprio_dim:
            raise ValueError(
                f"model.use_proprio is set but the run's datasets have no proprio ({widths}); register their "
                "state_obs_keys or set model.use_proprio false"
            )
    return {
        "chunk_size": data.future_action_window_size + 1,
        "cameras": list(data.cameras),
        "proprio_dim": proprio_dim,
    }


def run_layout(data: DataConfig, model_cfg: ModelConfig, norm_stats: dict[str, Any]) -> dict[str, Any]:
    """The model layout (VLAConfig.layout) a run trains: its action head and head_layout."""
    return {
        "action_head": model_cfg.action_head,
        "head_hidden_size": model_cfg.head_hidden_size,
        **head_layout(data, model_cfg, norm_stats),
    }


def stored_layout(directory: str | Path) -> dict[str, Any] | None:
    """The layout of a vla_train model directory, from its config.json (None for another format)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    if config.get("model_type") != "vla_train":
        return None
    return VLAConfig.from_dict(config).layout()


def load_with_layout(
    directory: str | Path,
    layout: dict[str, Any],
    seed: int,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[VLA, VLAProcessor, list[str]]:
    """load_model_dir, then the model turned into `layout` (VLA.set_layout; created modules seeded):
    (model, its processor, the names of the modules created)."""
    model, processor = load_model_dir(directory, device, attn_implementation)
    torch.manual_seed(seed)
    added = model.set_layout(layout)
    if added:
        model.to(device)
    c = model.config
    inputs = (c.action_head, tuple(c.cameras), c.proprio_dim)
    if (processor.action_head, processor.cameras, processor.proprio_dim) != inputs:
        settings = dataclasses.replace(processor.settings, max_length=prompt_max_length(c))
        processor = processor_for(c, processor.tokenizer, settings)
    return model, processor, added


def build_from_config(
    model_cfg: ModelConfig, instructions: list[str], seed: int, layout: dict | None = None
) -> tuple[VLA, VLAProcessor]:
    """A randomly initialized model (seeded) and its processor with a tokenizer trained on `instructions`;
    layout: head_layout."""
    tokenizer = build_local_tokenizer(instructions, model_cfg.text_vocab_size, model_cfg.n_action_bins)
    config = vla_config_from(model_cfg, tokenizer, layout)
    torch.manual_seed(seed)
    model = VLA(config)
    return model, make_processor(config, tokenizer)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters (what model.safetensors stores) to dtype in place. Unlike model.to(dtype) the
    non-persistent buffers (rotary frequencies) stay fp32, as load_model_dir rebuilds them, so the cast
    model predicts what its saved and reloaded directory predicts."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


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
    aliases = tied_aliases(model)  # safetensors refuses shared tensors: a tied weight is stored once
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}
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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: first name} of every parameter that is the same tensor as an earlier one (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point every alias at its first name's parameter again (load_state_dict(assign=True) replaces each
    name's parameter by its own tensor)."""
    for name, target in aliases.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(target))


def _check_weights(weights_file: Path, model: VLA, shapes: dict[str, tuple[int, ...]]) -> None:
    """The file holds exactly the model's weights (a tied alias may be absent), in the config's shapes."""
    aliases = tied_aliases(model)
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(expected_shapes) - set(aliases)
    missing, unexpected = sorted(expected - set(shapes)), sorted(set(shapes) - expected - set(aliases))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not match config.json: missing {missing}, unexpected {unexpected}"
        )
    wrong = [
        f"{k}: file {shape}, config {expected_shapes[k]}"
        for k, shape in sorted(shapes.items())
        if shape != expected_shapes[k]
    ]
    if wrong:
        raise ValueError(f"{weights_file} does not match config.json in shape: " + "; ".join(wrong))


def _model_dir(directory: str | Path) -> Path:
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory: no config.json")
    return d


def _load_processor(d: Path, config: VLAConfig) -> VLAProcessor:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(d))
    return processor_for(config, tokenizer, ProcessorSettings.load(d))


def load_model_dir(
    directory: str | Path, device: str = "cpu", attn_implementation: str | None = None
) -> tuple[VLA, VLAProcessor]:
    """Load a vla_train model directory, or an OpenVLA-format one (e.g. openvla-7b) converted on the fly;
    attn_implementation: see attn_for_loading (None: the stored one)."""
    from safetensors.torch import load_file

    d = _model_dir(directory)
    from vla_train.models.openvla_format import is_openvla_dir, load_openvla_dir

    if is_openvla_dir(d):  # a released OpenVLA checkpoint (timm key layout): converted on load
        return load_openvla_dir(d, device, attn_implementation=attn_implementation)
    config = _stored_config(d, attn_implementation)
    with torch.device("meta"):
        model = VLA(config)
    state = load_file(str(d / WEIGHTS_FILE), device=device)
    _check_weights(d / WEIGHTS_FILE, model, {k: tuple(v.shape) for k, v in state.items()})
    aliases = tied_aliases(model)
    model.load_state_dict({k: v for k, v in state.items() if k not in aliases}, assign=True, strict=False)
    _retie(model, aliases)
    _rebuild_non_persistent_buffers(model, torch.device(device))
    model.eval()
    return model, _load_processor(d, config)


def _stored_config(d: Path, attn_implementation: str | None) -> VLAConfig:
    config = VLAConfig.from_dict(json.loads((d / "config.json").read_text()))
    config.attn_implementation = attn_for_loading(
        config.attn_implementation, attn_implementation, config.action_head
    )
    return config


def build_on_meta(directory: str | Path, attn_implementation: str | None = None) -> tuple[VLA, VLAProcessor]:
    """The model of a vla_train model directory with its parameters on the meta device, each in the dtype
    its weights file stores (what load_model_dir would load), checked against the file's header; the
    non-persistent buffers (rotary frequencies, position ids) are real, on the CPU. Nothing of the weights
    is read: distributed.shard_from_file reads each rank's shard. OpenVLA-format directories (converted on
    load) are refused: load them with load_model_dir."""
    from vla_train.models.openvla_format import is_openvla_dir

    d = _model_dir(directory)
    if is_openvla_dir(d):
        raise ValueError(f"{d} is an OpenVLA-format checkpoint, converted on load: use load_model_dir")
    config = _stored_config(d, attn_implementation)
    with torch.device("meta"):
        model = VLA(config)
    with SafetensorsRows(d / WEIGHTS_FILE) as weights:
        stored = weights.tensors
    _check_weights(d / WEIGHTS_FILE, model, {k: t.shape for k, t in stored.items()})
    for name, p in model.named_parameters():  # each tied weight once, by its stored (first) name
        if p.dtype != stored[name].dtype:
            torch.utils.swap_tensors(p, nn.Parameter(p.to(stored[name].dtype), requires_grad=p.requires_grad))
    _rebuild_non_persistent_buffers(model, torch.device("cpu"))
    model.eval()
    return model, _load_processor(d, config)


# ---- sharded loading: meta models and row ranges of the weights file ------------------------------

# Module names wrappers insert between a model's modules: activation checkpointing, peft's LoRA layers
# (`base_layer`) and modules_to_save copies (`original_module`, `modules_to_save.<adapter>`).
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "base_layer", "original_module")


def file_key(name: str) -> str:
    """The weights-file key of the parameter or buffer `name` of a wrapped model."""
    parts = name.split(".")
    kept: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "modules_to_save" and i + 2 < len(parts):
            i += 2  # "modules_to_save.<adapter name>"
        elif parts[i] in _WRAPPER_NAMES:
            i += 1
        else:
            kept.append(parts[i])
            i += 1
    return ".".join(kept)


@contextlib.contextmanager
def placeholder_weights(model: nn.Module) -> Iterator[None]:
    """While the body runs, every meta parameter of `model` is an empty CPU tensor of its dtype, so code
    that must see a real device works on a meta model: peft places LoRA adapters on their base weight's
    device and dtype (on meta it would create them and lose their initial values), and `.to(device)`
    moves a model. Afterwards each placeholder becomes a meta tensor of its shape again, copies made in
    the body too (peft's modules_to_save), matched by their weights-file key. Nothing of the weights'
    size is allocated."""
    shapes: dict[str, torch.Size] = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            shapes[file_key(name)] = p.shape
            torch.utils.swap_tensors(
                p, nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad)
            )
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            shape = shapes.get(file_key(name))
            if shape is not None and p.numel() == 0 and math.prod(shape) != 0 and not p.is_meta:
                meta = torch.empty(shape, dtype=p.dtype, device="meta")
                torch.utils.swap_tensors(p, nn.Parameter(meta, requires_grad=p.requires_grad))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, as its header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte, from the start of the file


class SafetensorsRows:
    """Reads row ranges (dim 0) of the tensors of a .safetensors file with positional reads (os.preadv).

    The file is not memory-mapped, unlike safetensors' own readers: pages of a mapped file count in the
    process's resident memory once touched, while a read grows it only by the buffer it fills. Layout: an
    8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}, offsets
    relative to the end of the header), then the tensors' bytes, row-major.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.tensors: dict[str, StoredTensor] = self._read_header()
        except Exception:
            self.close()
            raise

    def _read_header(self) -> dict[str, StoredTensor]:
        (header_len,) = struct.unpack("<Q", self._read_bytes(8, 0))
        header = json.loads(self._read_bytes(header_len, 8))
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name} has dtype {entry['dtype']}, which is not supported"
                )
            begin, end = entry["data_offsets"]
            t = StoredTensor(
                _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + header_len + begin
            )
            if end - begin != math.prod(t.shape) * t.dtype.itemsize:
                raise ValueError(
                    f"{self.path}: tensor {name} holds {end - begin} bytes, not those of {t.shape}"
                )
            tensors[name] = t
        return tensors

    def __enter__(self) -> SafetensorsRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (a 0-d tensor: all of it, with start 0, stop 1), as a new CPU
        tensor of `dtype` (default: the stored one)."""
        t = self.tensors[name]
        num_rows = t.shape[0] if t.shape else 1
        if not 0 <= start <= stop <= num_rows:
            raise ValueError(f"rows [{start}, {stop}) are outside {name} of shape {t.shape}")
        out = torch.empty((stop - start, *t.shape[1:]) if t.shape else (), dtype=t.dtype)
        row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
        if out.numel():
            self._read_into(out, t.offset + start * row_bytes)
        return out if dtype is None or dtype == t.dtype else out.to(dtype)

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):  # a positional read may return fewer bytes than asked
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{self.path} ends inside a tensor (truncated file?)")
            done += n

    def _read_bytes(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.path} is not a safetensors file: its header is cut short")
        return data

"""Load an OpenVLA-format model directory (the layout of the released `openvla/openvla-7b`: an HF
`OpenVLAConfig` config.json, safetensors shards with timm-named vision towers, a Llama tokenizer) into our
`VLA`, without `trust_remote_code` and without timm.

The job splits in three:
- `openvla_vla_config`: OpenVLA's config.json (+ weight shapes, + tokenizer) -> our `VLAConfig`.
- `convert_openvla_state_dict`: timm/prismatic key names -> our module names (fused qkv split into q, k, v;
  LayerScale renamed; DINOv2's patch-only position embedding given a zero class slot). Weights our model
  deliberately does not build (the last block of each tower, the final norms, SigLIP's attention-pool
  head) are dropped by name; any other unknown, missing or wrongly shaped weight is a `ValueError` that
  lists every offender.
- `load_openvla_dir`: the two above plus reading (sharded) safetensors and the tokenizer.

config.json fields read (those of prismatic's `OpenVLAConfig`): `vision_backbone_id`,
`use_fused_vision_backbone`, `image_sizes`, `text_config`, `pad_token_id`, `pad_to_multiple_of`,
`llm_max_length`, `n_action_bins`, `norm_stats`. `llm_backbone_id`, `timm_model_ids`, `arch_specifier`,
`hf_llm_id` are informational only. One field is ours:

- `vision_num_heads`: [DINOv2 heads, SigLIP heads]. Attention head counts cannot be read from weight
  shapes, so a `vision_backbone_id` outside `KNOWN_VISION_BACKBONES` needs it (every other tower size is
  inferred from the weights). For a known id it may be given but must agree with the table.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vla_train.models.processor import VLAProcessor
from vla_train.models.vla import VLA, VLAConfig, padded_vocab

logger = logging.getLogger(__name__)

DINO = "vision_backbone.featurizer."
SIGLIP = "vision_backbone.fused_featurizer."
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class FusedVisionSpec:
    """Sizes of a DINOv2-with-registers + SigLIP tower pair, in `VLAConfig.dino` / `.siglip` terms."""

    image_size: int
    patch_size: int
    dino: dict[str, int]
    siglip: dict[str, int]


# timm's vit_large_patch14_reg4_dinov2.lvd142m and vit_so400m_patch14_siglip_{224,384}: the towers
# prismatic's fused `dinosiglip-*` backbones are built from.
_DINOV2_L14_REG4 = {"hidden": 1024, "layers": 24, "heads": 16, "registers": 4, "intermediate": 4096}
_SIGLIP_SO400M14 = {"hidden": 1152, "layers": 27, "heads": 16, "intermediate": 4304}
KNOWN_VISION_BACKBONES: dict[str, FusedVisionSpec] = {
    "dinosiglip-vit-so-224px": FusedVisionSpec(224, 14, _DINOV2_L14_REG4, _SIGLIP_SO400M14),
    "dinosiglip-vit-so-384px": FusedVisionSpec(384, 14, _DINOV2_L14_REG4, _SIGLIP_SO400M14),
}

# openvla-7b's text_config stores only the fields that differ from transformers' LlamaConfig defaults
# ({"model_type", "pad_token_id", "torch_dtype", "vocab_size"}); the rest were filled by the defaults of
# the transformers it was saved with (4.40.1). Pin those here rather than trusting whatever defaults the
# installed transformers has. Note rms_norm_eps 1e-6: the released model runs with it, although
# Llama-2-7b's own config says 1e-5.
LLAMA_TEXT_CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
}
# text_config fields that shape the computation and are passed on to our `VLAConfig.llm`. Vocabulary,
# special ids, max positions and tying are set by `VLA` itself (and checked below), the rest is metadata.
_LLM_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
)


# ---- key mapping ---------------------------------------------------------------------------------
# Each rule maps one of OUR parameter names (regex, relative to the tower prefix) to the checkpoint key it
# comes from, how to turn the checkpoint tensor into ours, and which checkpoint shape our shape implies
# (so that a mismatch is reported in the checkpoint's own terms, before any reshaping).
Transform = Callable[[torch.Tensor, re.Match], torch.Tensor]
SourceShape = Callable[[tuple[int, ...]], tuple[int, ...]]


@dataclass(frozen=True)
class _Rule:
    ours: re.Pattern
    source: str | None  # re.Match.expand template (\g<n> groups); None = not stored, zero-filled
    transform: Transform | None = None
    source_shape: SourceShape | None = None


def _same(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape


def _qkv_part(t: torch.Tensor, m: re.Match) -> torch.Tensor:
    # timm's fused qkv is laid out [q; k; v] on the output axis (reshape(B, N, 3, heads, head_dim)).
    # Clone: views of one storage would later fail safetensors' shared-memory check on save.
    return t.chunk(3, dim=0)["qkv".index(m.group("part"))].clone()


def _qkv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (3 * shape[0], *shape[1:])


def _dino_pos(t: torch.Tensor, m: re.Match) -> torch.Tensor:
    # timm DINOv2-reg uses no_embed_class: pos_embed (1, P, D) covers the patches only. transformers adds
    # (1, 1 + P, D) to [class, patches] before inserting the registers; a zero class slot makes the two
    # identical (class + 0 is exact).
    return torch.cat([t.new_zeros((1, 1, t.shape[-1])), t], dim=1)


def _dino_pos_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, shape[1] - 1, shape[2])


def _siglip_pos(t: torch.Tensor, m: re.Match) -> torch.Tensor:
    return t[0].clone()  # (1, P, D) parameter -> (P, D) nn.Embedding table


def _siglip_pos_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *shape)


def _rules(pairs: list[tuple[str, str | None, Transform | None, SourceShape | None]]) -> list[_Rule]:
    return [_Rule(re.compile(o), s, t, sh) for o, s, t, sh in pairs]


_WB = r"(?P<wb>weight|bias)"
_DINO_RULES = _rules(
    [
        (r"embeddings\.cls_token", "cls_token", None, None),
        (r"embeddings\.register_tokens", "reg_token", None, None),
        (r"embeddings\.position_embeddings", "pos_embed", _dino_pos, _dino_pos_shape),
        # transformers' masked-image-modeling token: unused at inference (no bool_masked_pos), absent
        # from timm; filled with zeros.
        (r"embeddings\.mask_token", None, None, None),
        (rf"embeddings\.patch_embeddings\.projection\.{_WB}", r"patch_embed.proj.\g<wb>", None, None),
        (
            rf"encoder\.layer\.(?P<n>\d+)\.norm(?P<i>[12])\.{_WB}",
            r"blocks.\g<n>.norm\g<i>.\g<wb>",
            None,
            None,
        ),
        (
            rf"encoder\.layer\.(?P<n>\d+)\.attention\.(?P<part>[qkv])_proj\.{_WB}",
            r"blocks.\g<n>.attn.qkv.\g<wb>",
            _qkv_part,
            _qkv_shape,
        ),
        (
            rf"encoder\.layer\.(?P<n>\d+)\.attention\.o_proj\.{_WB}",
            r"blocks.\g<n>.attn.proj.\g<wb>",
            None,
            None,
        ),
        (
            r"encoder\.layer\.(?P<n>\d+)\.layer_scale(?P<i>[12])\.lambda1",
            r"blocks.\g<n>.ls\g<i>.scale_factor",
            None,
            None,
        ),
        (
            rf"encoder\.layer\.(?P<n>\d+)\.mlp\.fc(?P<i>[12])\.{_WB}",
            r"blocks.\g<n>.mlp.fc\g<i>.\g<wb>",
            None,
            None,
        ),
    ]
)
_SIGLIP_RULES = _rules(
    [
        (rf"embeddings\.patch_embedding\.{_WB}", r"patch_embed.proj.\g<wb>", None, None),
        (r"embeddings\.position_embedding\.weight", "pos_embed", _siglip_pos, _siglip_pos_shape),
        (
            rf"encoder\.layers\.(?P<n>\d+)\.layer_norm(?P<i>[12])\.{_WB}",
            r"blocks.\g<n>.norm\g<i>.\g<wb>",
            None,
            None,
        ),
        (
            rf"encoder\.layers\.(?P<n>\d+)\.self_attn\.(?P<part>[qkv])_proj\.{_WB}",
            r"blocks.\g<n>.attn.qkv.\g<wb>",
            _qkv_part,
            _qkv_shape,
        ),
        (
            rf"encoder\.layers\.(?P<n>\d+)\.self_attn\.out_proj\.{_WB}",
            r"blocks.\g<n>.attn.proj.\g<wb>",
            None,
            None,
        ),
        (
            rf"encoder\.layers\.(?P<n>\d+)\.mlp\.fc(?P<i>[12])\.{_WB}",
            r"blocks.\g<n>.mlp.fc\g<i>.\g<wb>",
            None,
            None,
        ),
    ]
)


@dataclass(frozen=True)
class _Source:
    key: str | None  # checkpoint key; None = filled with zeros
    transform: Transform | None
    source_shape: SourceShape
    match: re.Match | None


def _source_of(our_key: str) -> _Source | None:
    """Where one of our parameters comes from in an OpenVLA checkpoint (None: no rule knows it)."""
    for prefix, rules in ((DINO, _DINO_RULES), (SIGLIP, _SIGLIP_RULES)):
        if our_key.startswith(prefix):
            rest = our_key[len(prefix) :]
            for rule in rules:
                m = rule.ours.fullmatch(rest)
                if m:
                    key = None if rule.source is None else prefix + m.expand(rule.source)
                    return _Source(key, rule.transform, rule.source_shape or _same, m)
            return None
    if our_key.startswith(("projector.", "language_model.")):
        return _Source(our_key, None, _same, None)
    return None


def known_unused_keys(keys: list[str] | set[str], config: VLAConfig) -> list[str]:
    """Checkpoint keys our model deliberately does not build: each tower's last block (OpenVLA takes the
    second-to-last block's output), both final norms, SigLIP's attention-pool head, and rotary
    frequencies that old transformers versions saved (we recompute them)."""
    patterns = [
        re.compile(rf"{re.escape(DINO)}blocks\.{config.dino['layers'] - 1}\..+"),
        re.compile(rf"{re.escape(SIGLIP)}blocks\.{config.siglip['layers'] - 1}\..+"),
        re.compile(rf"({re.escape(DINO)}|{re.escape(SIGLIP)})norm\.(weight|bias)"),
        re.compile(rf"{re.escape(SIGLIP)}attn_pool\..+"),
        re.compile(r"language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    ]
    return sorted(k for k in keys if any(p.fullmatch(k) for p in patterns))


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return str(tuple(int(s) for s in shape))


def convert_openvla_state_dict(
    state: dict[str, torch.Tensor],
    config: VLAConfig,
    model: VLA | None = None,
) -> dict[str, torch.Tensor]:
    """OpenVLA-checkpoint (timm-named) tensors -> a state dict for `VLA(config)`.

    `model` (any device, meta is enough) supplies the expected names and shapes; when omitted, one is
    built on the meta device. Raises ValueError listing every unknown checkpoint key, every parameter of
    ours that the checkpoint lacks, and every shape mismatch (checkpoint shape vs the shape our config
    implies). Known-unused keys are dropped and logged.
    """
    if model is None:
        with torch.device("meta"):
            model = VLA(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # Zero-filled parameters take the checkpoint's floating dtype and device, like their neighbours.
    like = next((v for v in state.values() if v.is_floating_point()), None)
    fill_dtype = like.dtype if like is not None else torch.float32
    fill_device = like.device if like is not None else torch.device("cpu")

    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    filled: list[str] = []
    missing: list[str] = []
    mismatched: dict[str, str] = {}
    no_rule: list[str] = []
    for our_key, shape in expected.items():
        src = _source_of(our_key)
        if src is None:
            no_rule.append(our_key)
            continue
        if src.key is None or (src.key not in state and 0 in shape):
            # Not stored by timm (DINOv2's mask token) or empty (no register tokens): zeros are exact.
            out[our_key] = torch.zeros(shape, dtype=fill_dtype, device=fill_device)
            filled.append(our_key)
            continue
        if src.key not in state:
            missing.append(our_key if src.key == our_key else f"{our_key} (checkpoint key {src.key})")
            continue
        consumed.add(src.key)
        tensor = state[src.key]
        want = src.source_shape(shape)
        if tuple(tensor.shape) != want:
            mismatched[src.key] = (
                f"{src.key}: checkpoint {_fmt(tensor.shape)}, model expects {_fmt(want)}"
                + ("" if src.key == our_key else f" (for {our_key} {_fmt(shape)})")
            )
            continue
        out[our_key] = src.transform(tensor, src.match) if src.transform else tensor

    dropped = known_unused_keys(set(state) - consumed, config)
    unknown = sorted(set(state) - consumed - set(dropped))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown checkpoint key(s): {unknown}")
    if missing:
        problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {sorted(missing)}")
    if no_rule:
        # Our model grew a parameter this converter does not know (e.g. transformers renamed a module).
        problems.append(f"{len(no_rule)} model key(s) with no OpenVLA mapping: {sorted(no_rule)}")
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es) between the checkpoint and a model built from its "
            f"config (sizes in config.json do not match the weights): {[mismatched[k] for k in sorted(mismatched)]}"
        )
    if problems:
        raise ValueError("OpenVLA checkpoint does not match the model: " + "; ".join(problems))
    if dropped:
        logger.info(
            "OpenVLA checkpoint: dropped %d weights our model does not use: %s", len(dropped), dropped
        )
    if filled:
        logger.info("OpenVLA checkpoint: zero-filled %s (not stored in timm checkpoints)", filled)
    return out


# ---- config ----------------------------------------------------------------------------------------
def _tower_layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"the checkpoint has no {prefix}blocks.N.* weights")
    return max(blocks) + 1


def _infer_vision_spec(shapes: dict[str, tuple[int, ...]], heads: list[int]) -> FusedVisionSpec:
    """Tower sizes read off the timm-named weight shapes (all but the head counts)."""
    try:
        patch = shapes[f"{DINO}patch_embed.proj.weight"][-1]
        dino_hidden = shapes[f"{DINO}patch_embed.proj.weight"][0]
        dino_patches = shapes[f"{DINO}pos_embed"][1]
        siglip_hidden = shapes[f"{SIGLIP}patch_embed.proj.weight"][0]
        siglip_patch = shapes[f"{SIGLIP}patch_embed.proj.weight"][-1]
        siglip_patches = shapes[f"{SIGLIP}pos_embed"][1]
        dino_mlp = shapes[f"{DINO}blocks.0.mlp.fc1.weight"][0]
        siglip_mlp = shapes[f"{SIGLIP}blocks.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ValueError(f"cannot infer the vision tower sizes: the checkpoint has no {e.args[0]}") from None
    grid = round(dino_patches**0.5)
    if (patch, dino_patches) != (siglip_patch, siglip_patches) or grid * grid != dino_patches:
        raise ValueError(
            f"the two vision towers disagree: DINOv2 patch {patch} with {dino_patches} patches, SigLIP "
            f"patch {siglip_patch} with {siglip_patches} patches (both must be equal and a square grid)"
        )
    reg = shapes.get(f"{DINO}reg_token")
    return FusedVisionSpec(
        image_size=grid * patch,
        patch_size=patch,
        dino={
            "hidden": dino_hidden,
            "layers": _tower_layers(shapes, DINO),
            "heads": heads[0],
            "registers": reg[1] if reg else 0,
            "intermediate": dino_mlp,
        },
        siglip={
            "hidden": siglip_hidden,
            "layers": _tower_layers(shapes, SIGLIP),
            "heads": heads[1],
            "intermediate": siglip_mlp,
        },
    )


def _vision_spec(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> FusedVisionSpec:
    backbone = cfg.get("vision_backbone_id", "")
    fused = cfg.get("use_fused_vision_backbone", backbone.startswith("dinosiglip"))
    if not fused:
        raise ValueError(
            f"vision_backbone_id '{backbone}' is a single vision tower; only fused DINOv2 + SigLIP backbones "
            f"(use_fused_vision_backbone: true, e.g. {sorted(KNOWN_VISION_BACKBONES)}) can be loaded"
        )
    heads = cfg.get("vision_num_heads")
    if heads is not None and (
        not isinstance(heads, list) or len(heads) != 2 or not all(isinstance(h, int) and h > 0 for h in heads)
    ):
        raise ValueError(f"config.json vision_num_heads must be [DINOv2 heads, SigLIP heads], got {heads!r}")
    if backbone in KNOWN_VISION_BACKBONES:
        spec = KNOWN_VISION_BACKBONES[backbone]
        table_heads = [spec.dino["heads"], spec.siglip["heads"]]
        if heads is not None and heads != table_heads:
            raise ValueError(
                f"config.json vision_num_heads {heads} disagrees with {backbone}'s {table_heads}; "
                "remove the field or use an id of your own for a different backbone"
            )
    else:
        if heads is None:
            raise ValueError(
                f"unknown vision_backbone_id '{backbone}' (known: {sorted(KNOWN_VISION_BACKBONES)}): tower "
                'sizes are read from the weights, but add "vision_num_heads": [DINOv2 heads, SigLIP heads] '
                "to config.json since head counts are not visible in weight shapes"
            )
        spec = _infer_vision_spec(shapes, heads)
    image_sizes = cfg.get("image_sizes")
    if image_sizes is not None and any(s != spec.image_size for s in image_sizes):
        raise ValueError(
            f"config.json image_sizes {image_sizes} disagree with the {spec.image_size} px of "
            f"vision_backbone_id '{backbone}'"
        )
    return spec


def _llm_spec(text_config: dict[str, Any]) -> dict[str, Any]:
    model_type = text_config.get("model_type", "llama")
    llm: dict[str, Any] = {"model_type": model_type}
    if model_type == "llama":
        llm.update(LLAMA_TEXT_CONFIG_DEFAULTS)
    llm.update({k: text_config[k] for k in _LLM_ARCH_FIELDS if text_config.get(k) is not None})
    if text_config.get("tie_word_embeddings"):
        raise ValueError("text_config.tie_word_embeddings is true; OpenVLA's LM has a separate lm_head")
    return llm


def _action_dim(norm_stats: dict[str, Any]) -> int:
    dims = {len(s["action"]["q01"]) for s in norm_stats.values() if "q01" in s.get("action", {})}
    if len(dims) > 1:
        raise ValueError(f"norm_stats hold actions of different sizes {sorted(dims)}; expected one")
    return dims.pop() if dims else 7


def openvla_vla_config(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], tokenizer) -> VLAConfig:
    """Our VLAConfig for an OpenVLA config.json, its checkpoint's weight shapes and its tokenizer."""
    from vla_train.models.tokenizer import empty_piece_id

    spec = _vision_spec(cfg, shapes)
    text_config = cfg.get("text_config") or {}
    pad_to_multiple_of = cfg.get("pad_to_multiple_of", 64)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; OpenVLA adds <PAD> right after the base vocabulary")
    base_vocab_size = len(tokenizer) - 1  # all but <pad> (Llama-2: 32000)
    pad_token_id = cfg.get("pad_token_id", tokenizer.pad_token_id)
    if pad_token_id != tokenizer.pad_token_id or pad_token_id != base_vocab_size:
        raise ValueError(
            f"config.json pad_token_id {pad_token_id}, the tokenizer's pad id {tokenizer.pad_token_id} and "
            f"its base vocabulary size {base_vocab_size} must all be equal (OpenVLA: 32000)"
        )
    vocab = padded_vocab(base_vocab_size, pad_to_multiple_of)
    if text_config.get("vocab_size", vocab) != vocab:
        raise ValueError(
            f"text_config.vocab_size {text_config['vocab_size']} != the tokenizer's {base_vocab_size} + pad "
            f"rounded up to pad_to_multiple_of {pad_to_multiple_of} = {vocab}"
        )
    norm_stats = cfg.get("norm_stats") or {}
    return VLAConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        dino=dict(spec.dino),
        siglip=dict(spec.siglip),
        llm=_llm_spec(text_config),
        base_vocab_size=base_vocab_size,
        pad_token_id=pad_token_id,
        empty_piece_id=empty_piece_id(tokenizer),
        action_dim=_action_dim(norm_stats),
        n_action_bins=cfg.get("n_action_bins", 256),
        llm_max_length=cfg.get("llm_max_length", 2048),
        pad_to_multiple_of=pad_to_multiple_of,
        norm_stats=norm_stats,
    )


# ---- directory -------------------------------------------------------------------------------------
def is_openvla_dir(path: str | Path) -> bool:
    """True when `path` holds an OpenVLA-format config.json (model_type "openvla" or a vision_backbone_id)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and (cfg.get("model_type") == "openvla" or "vision_backbone_id" in cfg)


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors file(s) of a directory: the shards named by model.safetensors.index.json, else
    model.safetensors."""
    d = Path(directory)
    if (d / SHARD_INDEX_FILE).is_file():
        weight_map = json.loads((d / SHARD_INDEX_FILE).read_text())["weight_map"]
        files = [d / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{d / SHARD_INDEX_FILE} names shard(s) that do not exist: {absent}")
        return files
    if (d / SINGLE_WEIGHTS_FILE).is_file():
        return [d / SINGLE_WEIGHTS_FILE]
    raise FileNotFoundError(
        f"{d} has no {SHARD_INDEX_FILE} or {SINGLE_WEIGHTS_FILE} (only safetensors checkpoints are supported)"
    )


def read_safetensors(files: list[Path], device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, on `device`; a key in two shards is an error."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=device) as handle:
            for key in handle.keys():
                if key in state:
                    raise ValueError(f"weight {key} appears in more than one shard (again in {f})")
                state[key] = handle.get_tensor(key)
    return state


def load_openvla_dir(
    directory: str | Path,
    device: str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    center_crop_area: float = 1.0,
    attn_implementation: str | None = None,
) -> tuple[VLA, VLAProcessor]:
    """Load an OpenVLA-format directory (config.json, safetensors shards, tokenizer) as our VLA + processor.

    dtype: cast floating-point weights to it (None keeps the checkpoint's; openvla-7b is bfloat16).
    center_crop_area: evaluation centre crop of the processor (OpenVLA uses 0.9 for models fine-tuned with
    random-crop augmentation, e.g. its LIBERO models; 1.0 = none, right for openvla-7b itself).
    attn_implementation: the attention to build it with (load.attn_for_loading; None: SDPA).
    """
    from transformers import AutoTokenizer, PretrainedConfig

    from vla_train.models.load import _rebuild_non_persistent_buffers, attn_for_loading, make_processor

    d = Path(directory)
    if not is_openvla_dir(d):
        raise ValueError(f"{d} is not an OpenVLA-format directory: config.json has no vision_backbone_id")
    cfg = json.loads((d / "config.json").read_text())
    # A blank config stops AutoTokenizer from reading config.json: its model_type "openvla" and auto_map
    # would send it down the remote-code path (a warning, or an interactive prompt in a terminal).
    tokenizer = AutoTokenizer.from_pretrained(str(d), config=PretrainedConfig())
    state = read_safetensors(weight_files(d), device)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = openvla_vla_config(cfg, {k: tuple(v.shape) for k, v in state.items()}, tokenizer)
    config.attn_implementation = attn_for_loading(config.attn_implementation, attn_implementation)
    with torch.device("meta"):
        model = VLA(config)
    converted = convert_openvla_state_dict(state, config, model)
    del state
    model.load_state_dict(converted, assign=True, strict=True)
    _rebuild_non_persistent_buffers(model, torch.device(device))
    model.eval()
    return model, make_processor(config, tokenizer, center_crop_area)

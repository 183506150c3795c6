"""Training-step benchmark of a model preset with random weights: step time, samples/s, tokens/s, model
FLOPs per step, MFU and peak memory for each fine-tuning mode, next to the memory preflight's estimate.
No checkpoint and no TensorFlow: the model is built on the meta device and its weights are created at
random on the device; the batches are pre-made model inputs (the processor's collate of random images,
one instruction and random actions), fed to the trainer's own optimizer step
(vla_train/training/step.py: autocast, backward, clipping, AdamW, schedule, metrics).

    python scripts/bench_gpu.py --preset openvla_7b --modes lora,qlora --json gpu.json --markdown BENCHMARKS.md
    python scripts/bench_gpu.py --preset minivla --modes full,frozen_vision
    torchrun --nproc_per_node 8 scripts/bench_gpu.py --preset openvla_7b --modes full   # FSDP2
    python scripts/bench_gpu.py --device cpu --preset tiny --json -                      # CI's check
    python scripts/bench_gpu.py --preset openvla_7b --modes lora,qlora --preflight-only  # estimates only

Modes (each a fresh model): lora (LoRA r32 all-linear over a bf16 base on CUDA, as openvla-7b's
checkpoint stores it; fp32 on CPU, as a base the trainer builds), qlora (the same over nf4 base
weights), full (every weight, fp32 master weights; FSDP2 on several GPUs), frozen_vision (the towers
frozen). Default batch sizes: lora 16, qlora 8, full and frozen_vision 16 (--batch-size sets all).

Model FLOPs per step (what MFU divides by the step time; recomputation under activation checkpointing
is not counted). Per frame, every matrix product of a layer with `in` x `out` weights (nn.Linear, the
patch embeddings as their unfolded matmul) over the T tokens it sees: forward 2 * in * out * T;
backward 2 * in * out * T for the gradient of its input when any weight before it (in the forward
order: each tower, then the projector, the LLM, the LM head) trains, plus 2 * in * out * T for the
gradient of its weight when it trains. A LoRA adapter of rank r on that layer: 2 r (in + out) T
forward and 4 r (in + out) T backward. Attention: 4 * T^2 * width per layer forward (scores and the
weighted sum, all T^2 pairs, also for the causal LLM), twice that backward when anything at or before
the layer trains. "Before" follows the modules' registration order: q/k/v (and gate/up) are parallel
in the graph, which over-counts a few input gradients of a tower's first block under LoRA (about 1e-5 of
the total). T: DINOv2 patches + CLS + registers, SigLIP and the projector the patches, the LLM
patches + text, the LM head the labelled positions only (VLA.forward projects those; action tokens +
EOS). For a full fine-tune this is 6 N per token of each part plus attention; frozen towers cost their
forward only. MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s (--peak-tflops, or
known for H100/H200 SXM 989.4 and A100 312).

Peak memory: torch.cuda.max_memory_allocated and max_memory_reserved over the timed steps (after the
warm-up, so the optimizer states exist), per rank, with what was allocated before the mode's model was
built (the previous mode's leftovers; ~0 when freed). On CPU the process's peak RSS so far is reported
instead (not per mode).
The preflight (vla_train/training/preflight.py) estimates the same step from the same config, with the
labelled-positions-only LM head and, beside it, for logits at every position (what that saves).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("lora", "qlora", "full", "frozen_vision")
DEFAULT_BATCH = {"lora": 16, "qlora": 8, "full": 16, "frozen_vision": 16}
# Peak dense bf16 tensor FLOP/s (no sparsity) by device name, the first match in this order (the PCIe and
# NVL boards run lower clocks than the SXM ones).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0,
    "H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
}  # fmt: skip
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"
HEAVY = ("tensorflow", "tensorflow_datasets", "draccus")
GIB = 2**30


def preset_model(preset: str, attn: str):
    """ModelConfig of configs/model_<preset>.yaml (read with PyYAML: no draccus on this path)."""
    import yaml

    from vla_train.config import ModelConfig

    path = REPO / "configs" / f"model_{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem[len("model_") :] for p in (REPO / "configs").glob("model_*.yaml"))
        raise SystemExit(f"--preset {preset}: no {path}; use one of {', '.join(names)}")
    block = yaml.safe_load(path.read_text())["model"]
    block.pop("preset", None)
    return ModelConfig(**block, attn_implementation=attn)


def train_config(model_cfg, mode: str, batch: int, strategy: str, activation_checkpointing: bool):
    from vla_train.config import DistributedConfig, LoraConfig, TrainConfig, TrainingConfig

    lora = LoraConfig(
        enabled=mode in ("lora", "qlora"), rank=32, quantization="nf4" if mode == "qlora" else "none"
    )
    finetune_mode = mode if mode in ("full", "frozen_vision") else "full"
    return TrainConfig(
        model=model_cfg,
        lora=lora,
        training=TrainingConfig(batch_size=batch, finetune_mode=finetune_mode, max_grad_norm=1.0),
        distributed=DistributedConfig(strategy=strategy, activation_checkpointing=activation_checkpointing),
    )


# ---- model FLOPs ----------------------------------------------------------------------------------

# The projection after each attention (Llama/Qwen2 and DINOv2 o_proj, SigLIP out_proj, older DINOv2s'
# attention.output.dense).
_ATTN_OUT = ("o_proj", "out_proj", "attention.output.dense")


def step_flops(meta_vla, cfg, frames: int, text_tokens: int, labelled: int) -> dict:
    """Model FLOPs of one training step of `frames` frames (the module docstring's formula), from the
    meta model with the mode's trainable weights chosen (requires_grad) and cfg.lora's adapters."""
    from torch import nn

    from vla_train.models.peft import lora_targets

    c = meta_vla.config
    P = c.num_patches
    tokens = {
        "vision_backbone.featurizer": P + 1 + c.dino["registers"],
        "vision_backbone.fused_featurizer": P,
        "projector": P,
        "language_model.lm_head": labelled,
        "language_model": P + text_tokens,
    }
    adapters = set(lora_targets(meta_vla, cfg.lora)) if cfg.lora.enabled else set()
    rank = cfg.lora.rank
    paths = {"vision_backbone.featurizer": False, "vision_backbone.fused_featurizer": False}
    upstream = False  # a trainable weight before the current layer, after the towers
    fwd = bwd = 0.0
    attn_flows: dict[str, bool] = {}
    for name, m in meta_vla.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        part = next((p for p in tokens if name.startswith(p)), None)
        if part is None:  # the l1_parallel head's or proprio modules (not in a token model's step)
            continue
        T = tokens[part]
        if isinstance(m, nn.Conv2d):
            n_in, n_out = m.in_channels * math.prod(m.kernel_size), m.out_channels
            T = P
        else:
            n_in, n_out = m.in_features, m.out_features
        trains = any(p.requires_grad for p in m.parameters(recurse=False))
        adapted = name in adapters
        if part in paths:
            flows = paths[part]
        else:
            if part == "projector" and not upstream:
                upstream = any(paths.values())
            flows = upstream
        mm = 2.0 * n_in * n_out * T
        fwd += mm
        bwd += mm * (flows + trains)
        if adapted:
            lora = 2.0 * rank * (n_in + n_out) * T
            fwd += lora
            bwd += 2 * lora
        if name.endswith(_ATTN_OUT):  # a weight at or before the layer's q/k/v trains: attention backward
            attn_flows[name] = flows
        if trains or adapted:
            if part in paths:
                paths[part] = True
            else:
                upstream = True
    attn = 0.0
    widths = {
        "vision_backbone.featurizer": c.dino["hidden"],
        "vision_backbone.fused_featurizer": c.siglip["hidden"],
        "language_model": c.llm["hidden_size"],
    }
    for name, flows in attn_flows.items():
        part = next(p for p in widths if name.startswith(p))
        a = 4.0 * tokens[part] ** 2 * widths[part]
        attn += a * (1 + 2 * flows)
        fwd += a
        bwd += 2 * a * flows
    return {"forward": fwd * frames, "backward": bwd * frames, "attention": attn * frames,
            "total": (fwd + bwd) * frames}  # fmt: skip


# ---- building a mode's model ----------------------------------------------------------------------


def materialize_random(model, device, seed: int) -> None:
    """Give every meta parameter random values on `device` in its dtype (matrices ~ N(0, 0.02), 1-D weights
    1, biases 0); a DTensor (FSDP2 shard) gets only its local shard. Then the non-persistent buffers
    (rotary frequencies, position ids) are rebuilt from the modules' configs."""
    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor

    from vla_train.models.load import _rebuild_non_persistent_buffers

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        t = torch.empty(local.shape, dtype=local.dtype, device=device)
        if t.dim() >= 2:
            t.normal_(0.0, 0.02, generator=gen)
        else:
            t.fill_(0.0 if name.endswith("bias") else 1.0)
        if isinstance(p, DTensor):
            t = DTensor.from_local(
                t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))
    _rebuild_non_persistent_buffers(model, device)


def build_mode(cfg, mode: str, config, ctx, seed: int):
    """(vla, the module the step calls) of a mode: LoRA over a random base in its dtype, or a full /
    frozen-vision fine-tune in fp32 master weights (sharded by FSDP2 before its weights exist)."""
    import torch

    from vla_train.models.peft import apply_lora, set_finetune_mode
    from vla_train.models.vla import VLA
    from vla_train.training.distributed import wrap_model

    with torch.device("meta"):
        model = VLA(config)
    if cfg.lora.enabled:
        # a bf16 base on CUDA (openvla-7b's checkpoint dtype, kept under LoRA), fp32 on CPU (a built base)
        base = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        model.to(dtype=base)
        materialize_random(model, ctx.device, seed)
        vla = apply_lora(model, cfg.lora, ctx.device).get_base_model()
        vla.train()
        return vla, wrap_model(vla, ctx, cfg.distributed)
    set_finetune_mode(model, cfg.training.finetune_mode)
    model.to(dtype=torch.float32)
    if ctx.strategy == "fsdp":
        wrapped = wrap_model(model, ctx, cfg.distributed)
        materialize_random(model, ctx.device, seed + ctx.rank)
    else:
        materialize_random(model, ctx.device, seed)
        wrapped = wrap_model(model, ctx, cfg.distributed)
    model.train()
    return model, wrapped


def premade_batches(processor, frames: int, action_dim: int, image_size: int, count: int, device, seed: int):
    """`count` model-input batches of `frames` frames (random images and actions), on the device."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        images = rng.integers(0, 256, (frames, image_size, image_size, 3), dtype=np.uint8)
        actions = rng.uniform(-1, 1, (frames, action_dim)).astype(np.float32)
        x = processor.collate(images, [INSTRUCTION] * frames, actions, train=True)
        out.append({k: v.to(device) for k, v in x.items()})
    return out


# ---- one mode -------------------------------------------------------------------------------------


def preflight(cfg, world: int, device: str, prompt_tokens: int) -> dict:
    from vla_train.training.preflight import estimate

    ckpt = 2 if cfg.lora.enabled and device == "cuda" else None  # the bf16 base the benchmark builds
    out = {}
    for at in ("labelled", "all"):
        est = estimate(
            cfg, world, device, prompt_tokens=prompt_tokens, checkpoint_dtype_bytes=ckpt, logits_at=at
        )
        out[at] = {"peak_gib": round(est.peak_bytes / GIB, 3), "at": est.peak_at,
                   "rows": {r.name: round(r.num_bytes / GIB, 3) for r in est.rows}}  # fmt: skip
    out["labelled_saves_gib"] = round(out["all"]["peak_gib"] - out["labelled"]["peak_gib"], 3)
    return out


def run_mode(args, mode: str, ctx, tokenizer, model_cfg) -> dict:
    import torch

    from vla_train.models.load import make_processor, vla_config_from
    from vla_train.models.peft import set_finetune_mode
    from vla_train.models.vla import VLA
    from vla_train.training.optim import optimizer_for, schedule_for, uses_fused_adamw
    from vla_train.training.step import StepParts, optimizer_step

    batch = args.batch_size or DEFAULT_BATCH[mode]
    if batch % ctx.world_size:
        raise SystemExit(f"--batch-size {batch} ({mode}) is not a multiple of the {ctx.world_size} ranks")
    strategy = ctx.strategy if mode in ("full", "frozen_vision") or ctx.strategy != "fsdp" else "ddp"
    mode_ctx = replace(ctx, strategy=strategy)
    cfg = train_config(model_cfg, mode, batch, strategy, args.activation_checkpointing)
    micro = batch // ctx.world_size
    config = vla_config_from(cfg.model, tokenizer)
    processor = make_processor(config, tokenizer)
    batches = premade_batches(
        processor, micro, config.action_dim, config.image_size, 2, ctx.device, args.seed
    )
    x = batches[0]
    text = int(x["attention_mask_BL"].sum(1).max())
    labelled = processor.supervised_count(x) // micro
    action_tokens = config.action_dim
    result: dict = {
        "mode": mode, "strategy": strategy, "precision": ctx.precision, "global_batch": batch,
        "micro_batch": micro, "attn_implementation": config.attn_implementation,
        "activation_checkpointing": args.activation_checkpointing,
        "sequence": {"patches": config.num_patches, "text": text, "labelled": labelled},
    }  # fmt: skip
    dev_kind = ctx.device.type
    plan = args.plan_device or dev_kind
    result["preflight"] = preflight(cfg, ctx.world_size, plan, text - action_tokens - 1)
    result["preflight"]["device"] = plan
    with torch.device("meta"):
        meta = VLA(config)
    if cfg.lora.enabled:
        meta.requires_grad_(False)
    else:
        set_finetune_mode(meta, cfg.training.finetune_mode)
    flops = step_flops(meta, cfg, batch, text, labelled)
    result["model_flops_per_step"] = flops
    if args.preflight_only:
        return result

    gc.collect()  # the previous mode's model and optimizer
    if dev_kind == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    vla, module = build_mode(cfg, mode, config, mode_ctx, args.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = optimizer_for(module, cfg.training)
    parts = StepParts(
        mode_ctx, vla, module, processor, params, optimizer, schedule_for(optimizer, cfg.training), 1.0
    )
    result["parameters"] = {  # the total as built (a 4-bit layer packs two weights per stored element)
        "total": sum(p.numel() for p in meta.parameters()),
        "trainable": sum(p.numel() for p in params),
    }
    result["fused_adamw"] = uses_fused_adamw(params)
    losses = []
    for i in range(args.warmup):
        losses.append(optimizer_step(parts, [batches[i % 2]]).loss)
    if dev_kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        losses.append(optimizer_step(parts, [batches[i % 2]]).loss)
    if dev_kind == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    tokens = batch * (config.num_patches + text)
    result.update({
        "step_time_s": round(step_s, 4),
        "samples_per_s": round(batch / step_s, 2),
        "tokens_per_s": round(tokens / step_s, 1),
        "losses": [round(v, 4) for v in losses],
        "achieved_tflops": round(flops["total"] / step_s / ctx.world_size / 1e12, 3),
    })  # fmt: skip
    peak = args.peak_tflops or peak_tflops(ctx.device)
    result["peak_tflops"] = peak
    result["mfu"] = round(flops["total"] / step_s / ctx.world_size / (peak * 1e12), 4) if peak else None
    if dev_kind == "cuda":
        result["memory_gib"] = {
            "max_allocated": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "max_reserved": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "allocated_before_build": round(before / GIB, 3),
        }
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        result["memory_gib"] = {"process_peak_rss": round(rss, 3)}
    del parts, optimizer, params, module, vla, batches
    return result


def peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="openvla_7b", help="configs/model_<preset>.yaml")
    ap.add_argument("--modes", default="lora,qlora", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch-size", type=int, default=0, help="global batch of every mode (0: per mode)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", default="auto", help="model.attn_implementation")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak dense bf16 TFLOP/s")
    ap.add_argument("--preflight-only", action="store_true", help="estimates and FLOPs only, no steps")
    ap.add_argument(
        "--plan-device",
        choices=("cuda", "cpu"),
        help="the preflight's device (default: the one the steps run on)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here ('-': stdout only)")
    ap.add_argument("--markdown", help="add a row per mode to this file's GPU table")
    args = ap.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; use {', '.join(MODES)}")
    model_cfg = preset_model(args.preset, args.attn)
    errs = model_cfg.validate()
    if errs:
        raise SystemExit("--preset: " + "; ".join(errs))
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer's device choice follows CUDA's availability

    import torch

    from vla_train.config import DistributedConfig
    from vla_train.models.tokenizer import build_local_tokenizer
    from vla_train.training.distributed import init_distributed, shutdown

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed(DistributedConfig(strategy="fsdp" if world > 1 else "single"))
    tokenizer = build_local_tokenizer([INSTRUCTION], model_cfg.text_vocab_size, model_cfg.n_action_bins)
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "world_size": ctx.world_size, "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps,
        "modes": {},
    }  # fmt: skip
    result["heavy_imports"] = []
    for mode in modes:  # each mode's JSON and row written as it finishes: a later mode's failure keeps them
        result["modes"][mode] = r = run_mode(args, mode, ctx, tokenizer, model_cfg)
        result["heavy_imports"] = sorted(m for m in HEAVY if m in sys.modules)
        if not ctx.is_main:
            continue
        print(json.dumps({mode: r}), file=sys.stderr, flush=True)
        if args.json and args.json != "-":
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.markdown:
            write_rows(Path(args.markdown), {**result, "modes": {mode: r}}, " ".join(sys.argv[1:]))
    shutdown(ctx)
    if ctx.is_main:
        print(json.dumps(result, indent=2))


def write_rows(path: Path, result: dict, argv: str) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from markdown_table import add_table_row

    date = time.strftime("%Y-%m-%d")
    for mode, r in result["modes"].items():
        pre = r["preflight"]
        mem = r.get("memory_gib", {})
        measured = (
            f"{mem['max_allocated']} / {mem['max_reserved']}"
            if "max_allocated" in mem
            else mem.get("process_peak_rss", "-")
        )
        speed = (
            f"{r['step_time_s']} s, {r['samples_per_s']} samples/s, {r['tokens_per_s']:.0f} tokens/s"
            if "step_time_s" in r
            else "not run (--preflight-only)"
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        add_table_row(
            path,
            "| date | device | preset, mode",
            f"| {date} | {result['device']} x {result['world_size']} | {result['preset']}, {mode} "
            f"({r['strategy']}, {r['precision']}, batch {r['global_batch']}"
            f"{', act. ckpt' if r['activation_checkpointing'] else ''}) | {speed} | "
            f"{r['model_flops_per_step']['total'] / 1e12:.1f} | {mfu} | {measured} | "
            f"{pre['labelled']['peak_gib']} (all-position logits: {pre['all']['peak_gib']}) | `python scripts/bench_gpu.py {argv}` |",
        )


if __name__ == "__main__":
    main()

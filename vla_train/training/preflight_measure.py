"""Measures what the memory preflight (training/preflight.py) estimates: the peak memory of training steps
of a config on CPU, in a fresh process, for the preflight's test and for benchmarks.

The child process imports everything and runs one step of a tiny model of the same kind (mapping the
kernels' code and starting the thread pools: fixed costs of a process, not memory of a config), builds a
synthetic batch with the processor and reads its RSS; then it builds the model from `cfg.model`, applies
the fine-tuning mode as the trainer does (LoRA / QLoRA through `apply_lora(...).get_base_model()`, a freeze
mode + fp32 otherwise), wraps it for a single process (activation checkpointing when asked), builds the
optimizer, resets the kernel's peak-RSS mark and runs the steps. The answer is the peak RSS (VmHWM) minus
the RSS before the model existed: resident weights, gradients, optimizer states and the steps'
activations. The transient of building the model in fp32 before it is quantized (QLoRA) is left out by
the reset: a training step never holds it. glibc's mmap threshold is pinned (MALLOC_ENV) so that RSS
follows the live tensors rather than glibc's free lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vla_train.config import TrainConfig

# The instructions of the synthetic batch (and of the tokenizer the child trains on them).
MEASURE_INSTRUCTIONS = (
    "pick up the red block and put it in the bowl",
    "open the top drawer of the cabinet",
    "push the blue cup to the left of the plate",
    "close the microwave door",
)


# glibc raises its mmap threshold each time a large block is freed, after which freed tensors stay in
# its heap (RSS) instead of going back to the system; pinned, every block above 128 KiB is its own mapping
# and RSS follows the live tensors (the allocated memory an estimate describes).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _warm_model(m):
    """A tiny model of the same family: one step of it, before the baseline, maps the kernels' code and
    starts the thread pools, fixed costs of the process rather than memory of the config."""
    import dataclasses

    return dataclasses.replace(
        m, dino_hidden_size=32, dino_num_layers=2, dino_num_heads=2, dino_intermediate_size=0,
        siglip_hidden_size=32, siglip_num_layers=2, siglip_num_heads=2, siglip_intermediate_size=0,
        llm_hidden_size=64, llm_num_layers=1, llm_num_heads=2, llm_num_kv_heads=0, llm_intermediate_size=128,
        text_vocab_size=512,
    )  # fmt: skip


def _steps(cfg: TrainConfig, steps: int) -> dict[str, int]:
    """Build the model of cfg, prepare it as the trainer does, and run `steps` training steps."""
    import gc

    import numpy as np
    import torch

    from vla_train.models.load import make_processor, vla_config_from
    from vla_train.models.peft import apply_lora, set_finetune_mode
    from vla_train.models.tokenizer import build_local_tokenizer
    from vla_train.models.vla import VLA
    from vla_train.training.distributed import DistContext, clip_grad_norm, wrap_model
    from vla_train.training.optim import optimizer_for

    m, t = cfg.model, cfg.training
    tokenizer = build_local_tokenizer(list(MEASURE_INSTRUCTIONS), m.text_vocab_size, m.n_action_bins)
    config = vla_config_from(m, tokenizer)
    processor = make_processor(config, tokenizer)
    micro = t.batch_size // t.grad_accum_steps  # one process
    rng = np.random.default_rng(0)
    window = cfg.data.future_action_window_size
    action_shape = (micro, m.action_dim) if window == 0 else (micro, window + 1, m.action_dim)
    batch = processor.collate(
        rng.integers(0, 256, (micro, m.image_size, m.image_size, 3), dtype=np.uint8),
        [MEASURE_INSTRUCTIONS[i % len(MEASURE_INSTRUCTIONS)] for i in range(micro)],
        rng.uniform(-1, 1, action_shape).astype(np.float32),
    )
    with torch.device("meta"):
        VLA(config)  # imports the model classes transformers loads lazily
    gc.collect()
    rss_before = _status_kib("VmRSS")

    torch.manual_seed(t.seed)
    model = VLA(config)
    device = torch.device("cpu")
    if cfg.lora.enabled:
        vla = apply_lora(model, cfg.lora, device).get_base_model()
    else:
        set_finetune_mode(model, t.finetune_mode)
        vla = model.to(device, dtype=torch.float32)
    vla.train()
    ctx = DistContext(0, 1, 0, device, "single", "fp32", None, False)
    trained = wrap_model(vla, ctx, cfg.distributed)
    optimizer = optimizer_for(trained, t)
    params = [p for p in trained.parameters() if p.requires_grad]
    gc.collect()
    rss_ready = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: building the model is not a training step
    for _ in range(steps):
        for _ in range(t.grad_accum_steps):
            out = trained(**batch)
            (out.loss / t.grad_accum_steps).backward()  # `out` (its logits) stays alive, as in train_step
            del out
        clip_grad_norm(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status_kib("VmHWM")
    return {
        "peak_bytes": (peak - rss_before) * 1024,
        "ready_bytes": (rss_ready - rss_before) * 1024,
        "text_tokens": int(batch["input_ids_BL"].shape[1]),
    }


def _child(cfg_json: str, steps: int) -> dict[str, int]:
    """Runs in the measuring process: a warm-up step of a tiny model of the same kind, then the config."""
    import dataclasses
    import gc

    import draccus
    import peft  # noqa: F401  (imported before the baseline: imports are no training memory)

    cfg = draccus.decode(TrainConfig, json.loads(cfg_json))
    if cfg.lora.quantization != "none":
        import bitsandbytes  # noqa: F401
    warm = dataclasses.replace(
        cfg,
        model=_warm_model(cfg.model),
        training=dataclasses.replace(cfg.training, batch_size=2, grad_accum_steps=1),
    )
    _steps(warm, 1)
    gc.collect()
    return _steps(cfg, steps)


def measure(cfg: TrainConfig, steps: int = 2, timeout_s: int = 900) -> dict[str, int]:
    """{peak_bytes, ready_bytes (model + optimizer before the first step), text_tokens (the padded text
    length of the batch)} of `steps` training steps of `cfg` on one CPU process, measured in a fresh
    interpreter (its RSS holds nothing else of this process)."""
    import draccus

    code = "import sys; from vla_train.training.preflight_measure import _main; _main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(steps)],
        input=json.dumps(draccus.encode(cfg)),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **MALLOC_ENV},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured_peak_bytes(cfg: TrainConfig) -> int:
    """The peak RSS growth, in bytes, of two training steps of `cfg` on one CPU process (the module
    docstring says what it counts). Its estimate: `estimate(cfg, 1, "cpu",
    prompt_tokens=measurement_prompt_tokens(cfg))`."""
    return measure(cfg)["peak_bytes"]


def measurement_prompt_tokens(cfg: TrainConfig) -> int:
    """BOS + prompt + empty piece of the longest measured instruction under the tokenizer the measuring
    process trains: what estimate(..., prompt_tokens=...) needs to describe the measured batch."""
    from vla_train.models.load import make_processor, vla_config_from
    from vla_train.models.tokenizer import build_local_tokenizer

    m = cfg.model
    tokenizer = build_local_tokenizer(list(MEASURE_INSTRUCTIONS), m.text_vocab_size, m.n_action_bins)
    processor = make_processor(vla_config_from(m, tokenizer), tokenizer)
    return max(len(processor.prompt_builder.prompt_ids(i)) for i in MEASURE_INSTRUCTIONS)


def _main() -> None:
    print(json.dumps(_child(sys.stdin.read(), int(sys.argv[1]))), flush=True)

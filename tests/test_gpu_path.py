"""The GPU path's CPU-checkable parts (issue 17): scripts/bench_gpu.py's fields and FLOP accounting, the
attention a loaded model is built with (the run's model.attn_implementation for a pretrained directory;
a flash-attn model loads and exports on a CPU-only machine), the fused-AdamW choice."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_model import INSTRUCTIONS, TINY
from test_trainer import run_in_process, tiny_args

from vla_test_utils import REPO, run_cli, torchrun
from vla_train.models.load import build_from_config, build_on_meta, load_model_dir, save_model_dir
from vla_train.training.optim import pin_implementation, uses_fused_adamw


def attn_of(model) -> set[str]:
    """The attention implementation of each transformers model inside the VLA (towers and LLM)."""
    vb = model.vision_backbone
    return {m.config._attn_implementation for m in (vb.featurizer, vb.fused_featurizer, model.language_model)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, proc = build_from_config(TINY, INSTRUCTIONS, seed=0)
    return save_model_dir(tmp_path_factory.mktemp("attn") / "model", model.eval(), proc)


def as_flash(src: Path, dst: Path) -> Path:
    """A copy of a model directory whose config.json says flash_attention_2 (as a model trained with
    flash-attn on a GPU stores it)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["attn_implementation"] = "flash_attention_2"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_loaded_directory_is_built_with_the_requested_attention(saved):
    """The request wins over config.json (None keeps the stored one); eager and sdpa predict the same."""
    stored, proc = load_model_dir(saved)
    eager, _ = load_model_dir(saved, attn_implementation="eager")
    assert attn_of(stored) == {"sdpa"} and attn_of(eager) == {"eager"}
    meta, _ = build_on_meta(saved, "eager")
    assert attn_of(meta) == {"eager"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = proc.collate(images, INSTRUCTIONS[:2], rng.uniform(-1, 1, (2, 7)))
    with torch.no_grad():
        torch.testing.assert_close(eager(**x).logits_NV, stored(**x).logits_NV, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_a_flash_attention_model_loads_on_a_cpu_machine_and_asking_for_flash_is_refused(saved, tmp_path):
    flash = as_flash(saved, tmp_path / "flash")
    model, _ = load_model_dir(flash)  # stored flash_attention_2, no flash-attn here: sdpa
    assert attn_of(model) == {"sdpa"}
    reference, _ = load_model_dir(saved)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package and a CUDA device"):
        load_model_dir(flash, attn_implementation="flash_attention_2")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_a_run_from_a_flash_pretrained_dir_honours_model_attn_implementation_and_exports(
    small_synthetic, saved, tmp_path
):
    """model.pretrained_dir whose config.json says flash_attention_2 (trained on a GPU), fine-tuned here
    with model.attn_implementation eager: the run's model is eager; vla-export of the run, on this
    CPU-only machine, loads the base as sdpa and writes a model directory that predicts."""
    from vla_train.models.policy import VLAPolicy

    root, _ = small_synthetic
    flash = as_flash(saved, tmp_path / "flash")
    args = tiny_args(root, tmp_path, "run", "--model.pretrained_dir", str(flash))
    args += ["--model.attn_implementation", "eager", "--training.max_steps", "2", "--lora.enabled", "false"]
    result = run_in_process(args, return_model=True)
    assert attn_of(result["model"]) == {"eager"}
    proc = run_cli(
        "export_main",
        "--run_dir",
        str(tmp_path / "run"),
        "--output_dir",
        str(tmp_path / "export"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = VLAPolicy.from_dir(tmp_path / "export")
    assert attn_of(policy.model) == {"sdpa"}
    actions = policy.predict_action_batch(
        np.zeros((2, 32, 32, 3), np.uint8), INSTRUCTIONS[:2], unnorm_key=None
    )
    assert actions.shape == (2, 7) and np.isfinite(actions).all()


def test_adamw_is_fused_only_when_every_trainable_tensor_is_floating_point_on_cuda():
    def fake(kind: str, floating: bool = True):
        return SimpleNamespace(device=SimpleNamespace(type=kind), is_floating_point=lambda: floating)

    assert uses_fused_adamw([fake("cuda"), fake("cuda")])
    assert not uses_fused_adamw([fake("cuda"), fake("cpu")])
    assert not uses_fused_adamw([fake("cuda", floating=False)])
    assert not uses_fused_adamw([torch.zeros(2, requires_grad=True)]) and not uses_fused_adamw([])
    # a state restored from a GPU checkpoint says fused: on CPU parameters it steps with torch's default
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["fused"] = True
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["fused"] is True
    pin_implementation(opt)
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None
    opt.step()
    assert torch.isfinite(p).all()


# ---- scripts/bench_gpu.py ---------------------------------------------------------------------------


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_runs_every_mode_on_cpu_without_tensorflow(tmp_path):
    """The CI run of the GPU benchmark: `--device cpu --preset tiny --json`, every mode, its fields."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--device", "cpu", "--preset", "tiny"]
    cmd += ["--modes", "lora,qlora,full,frozen_vision", "--batch-size", "2", "--warmup", "1", "--steps", "1"]
    cmd += ["--peak-tflops", "1.0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["heavy_imports"] == []  # neither TensorFlow nor draccus on the benchmark's path
    assert (
        r["preset"] == "tiny"
        and r["world_size"] == 1
        and set(r["modes"]) == {"lora", "qlora", "full", "frozen_vision"}
    )
    for mode, m in r["modes"].items():
        assert m["strategy"] == "single" and m["precision"] == "fp32" and m["global_batch"] == 2, mode
        assert m["step_time_s"] > 0 and m["samples_per_s"] > 0 and m["tokens_per_s"] > 0, mode
        assert len(m["losses"]) == 2 and all(math.isfinite(v) for v in m["losses"]), mode
        f = m["model_flops_per_step"]
        assert f["total"] == f["forward"] + f["backward"] > 0, mode
        mfu = f["total"] / m["step_time_s"] / 1e12
        assert m["mfu"] == pytest.approx(mfu, rel=0.02, abs=1e-4), mode  # --peak-tflops 1.0
        assert m["memory_gib"]["process_peak_rss"] > 0 and not m["fused_adamw"], mode
        pre = m["preflight"]
        assert 0 < pre["labelled"]["peak_gib"] < pre["all"]["peak_gib"], mode
        assert m["sequence"]["labelled"] == 8, mode  # 7 action tokens + EOS
        assert m["parameters"]["trainable"] < m["parameters"]["total"] or mode == "full", mode
    modes = r["modes"]
    full, frozen, lora = (modes[k]["model_flops_per_step"] for k in ("full", "frozen_vision", "lora"))
    assert frozen["forward"] == full["forward"] and frozen["backward"] < full["backward"]
    assert lora["forward"] > full["forward"]  # the adapters' products
    assert modes["qlora"]["model_flops_per_step"] == lora


def test_bench_gpu_shards_before_the_weights_exist_on_two_ranks(tmp_path):
    """Under torchrun (2 gloo ranks here, NCCL on GPUs): full fine-tune is FSDP2, each rank's shard created
    after sharding the meta model; LoRA is DDP. Each rank takes half the global batch."""
    out = tmp_path / "gpu.json"
    script = str(REPO / "scripts" / "bench_gpu.py")
    args = ["--device", "cpu", "--preset", "tiny", "--modes", "full,lora", "--batch-size", "4"]
    proc = torchrun(script, *args, "--warmup", "1", "--steps", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["heavy_imports"] == []
    full, lora = r["modes"]["full"], r["modes"]["lora"]
    assert (full["strategy"], lora["strategy"]) == ("fsdp", "ddp")
    assert full["micro_batch"] == lora["micro_batch"] == 2
    assert full["parameters"]["total"] == tiny_parameter_count()  # global sizes of the sharded parameters
    assert all(math.isfinite(v) for m in (full, lora) for v in m["losses"])


def tiny_parameter_count() -> int:
    """The tiny preset's parameter count, as one process builds it."""
    from vla_train.models.load import vla_config_from
    from vla_train.models.tokenizer import build_local_tokenizer
    from vla_train.models.vla import VLA

    b = bench_gpu()
    cfg = b.preset_model("tiny", "sdpa")
    with torch.device("meta"):
        vla = VLA(
            vla_config_from(
                cfg, build_local_tokenizer([b.INSTRUCTION], cfg.text_vocab_size, cfg.n_action_bins)
            )
        )
    return sum(p.numel() for p in vla.parameters())


def test_full_fine_tune_flops_are_6n_per_token_plus_attention():
    """step_flops of a full fine-tune: 6 x (the weights of each part's matrix products) x the tokens that
    part sees, less the patch embeddings' input gradients (nothing before them trains), plus attention
    (4 T^2 width forward, twice that backward, per layer); frozen towers cost their forward only."""
    from torch import nn

    from vla_train.config import LoraConfig, TrainConfig
    from vla_train.models.load import vla_config_from
    from vla_train.models.peft import set_finetune_mode
    from vla_train.models.tokenizer import build_local_tokenizer
    from vla_train.models.vla import VLA

    b = bench_gpu()
    tok = build_local_tokenizer(INSTRUCTIONS, TINY.text_vocab_size, TINY.n_action_bins)
    config = vla_config_from(TINY, tok)
    with torch.device("meta"):
        vla = VLA(config)
    cfg = TrainConfig(model=TINY, lora=LoraConfig(enabled=False))
    frames, text, labelled = 3, 30, 8
    P, c = config.num_patches, config
    T = {"featurizer": P + 1 + c.dino["registers"], "fused_featurizer": P, "projector": P}

    def weights(prefix: str) -> int:
        mods = [
            m
            for n, m in vla.named_modules()
            if n.startswith(prefix) and isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        return sum(m.weight.numel() for m in mods)

    def patch_embed() -> float:
        convs = [m for m in vla.vision_backbone.modules() if isinstance(m, nn.Conv2d)]
        return sum(2.0 * m.weight.numel() * P for m in convs)

    def vision_attn() -> float:
        return 4.0 * (
            len(vla.vision_backbone.featurizer.encoder.layer) * T["featurizer"] ** 2 * c.dino["hidden"]
            + len(vla.vision_backbone.fused_featurizer.encoder.layers) * P**2 * c.siglip["hidden"]
        )

    dino_conv = next(m for m in vla.vision_backbone.featurizer.modules() if isinstance(m, nn.Conv2d))
    dino_mm = (weights("vision_backbone.featurizer") - dino_conv.weight.numel()) * T["featurizer"]
    dino_mm += dino_conv.weight.numel() * P
    vision_mm = dino_mm + weights("vision_backbone.fused_featurizer") * P
    lm_head = vla.language_model.lm_head.weight.numel()
    L = P + text
    llm_mm = (weights("language_model") - lm_head) * L + lm_head * labelled
    other_mm = weights("projector") * P + llm_mm
    llm_attn = 4.0 * c.llm["num_hidden_layers"] * L**2 * c.llm["hidden_size"]

    set_finetune_mode(vla, "full")
    full = b.step_flops(vla, cfg, frames, text, labelled)
    expected = 6.0 * (vision_mm + other_mm) - patch_embed() + 3 * (vision_attn() + llm_attn)
    assert full["total"] == pytest.approx(expected * frames, rel=1e-12)
    set_finetune_mode(vla, "frozen_vision")
    frozen = b.step_flops(vla, cfg, frames, text, labelled)
    fc1 = 2.0 * vla.projector.fc1.weight.numel() * P  # its input's gradient: nothing before it trains
    expected = 2.0 * vision_mm + vision_attn() + 6.0 * other_mm - fc1 + 3 * llm_attn
    assert frozen["total"] == pytest.approx(expected * frames, rel=1e-12)

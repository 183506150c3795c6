"""FSDP2 loading without a whole copy of the model, on 2 CPU ranks through real `torchrun` (gloo, a
wall-clock timeout and the collective watchdog): the model is built on the meta device and sharded, and
each rank reads only its shard's rows of the weights file (models/load.py: SafetensorsRows,
training/distributed.py: shard_from_file).

- A model of more than 100M parameters, stored in fp32: each rank's peak resident memory grows by less
  than 0.6 of the model's bytes while loading, and the shards, gathered, equal a one-process
  `load_model_dir` bitwise (buffers too).
- A tiny Qwen2 with tied embeddings stored in bf16: full fine-tuning gets fp32 master weights, LoRA keeps
  the bf16 base and initializes its adapters exactly as on a loaded model (bitwise, modules_to_save and
  activation checkpointing included); the embeddings stay tied.
- Through the trainer: a 2-rank FSDP LoRA run matches the 1-rank FSDP run step by step.
- (unit, not slow) row reads equal safetensors' own reader, any dtype, empty and 0-d cases included.

This file is also the worker that torchrun starts (`python tests/test_sharded_load.py WORK_DIR`).
Measured on torch 2.13 CPU: RSS growth 0.52 of the model's bytes on each rank, 2-rank vs 1-rank loss
difference below 1e-6.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_test_utils import torchrun

MIN_PARAMS = 100_000_000
MAX_RSS_GROWTH_FRACTION = 0.6
LAUNCH_TIMEOUT_S = 300
LOSS_ATOL = 2e-5
INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the blue cube to the left"]


def big_model_config():
    from vla_train.config import ModelConfig

    return ModelConfig(
        image_size=64,
        patch_size=16,
        dino_hidden_size=64,
        dino_num_layers=2,
        dino_num_heads=2,
        siglip_hidden_size=64,
        siglip_num_layers=2,
        siglip_num_heads=2,
        llm_hidden_size=1024,
        llm_num_layers=8,
        llm_num_heads=8,
        llm_intermediate_size=2816,
        text_vocab_size=4096,
        max_length=128,
    )


def tied_model_config():
    from test_model import TINY

    return dataclasses.replace(TINY, llm_type="qwen2", llm_num_kv_heads=1, llm_tie_word_embeddings=True)


def lora_config():
    from vla_train.config import LoraConfig

    return LoraConfig(rank=4, modules_to_save=["projector"])


# ---- the worker (one per rank, under torchrun) ------------------------------------------------------


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _mismatches(sharded: torch.nn.Module, reference: torch.nn.Module | None) -> list[str]:
    """Names whose gathered value (or dtype) differs from `reference`'s (None on ranks other than 0).
    Gathering is a collective: every rank calls this."""
    ref = {} if reference is None else dict(reference.named_parameters()) | dict(reference.named_buffers())
    differ = []
    for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if reference is None:
            continue
        r = ref[name.replace("_checkpoint_wrapped_module.", "")]
        if full.dtype != r.dtype or full.shape != r.shape or not torch.equal(_bits(full), _bits(r)):
            differ.append(name)
    return differ


def worker(work: Path) -> None:
    import torch.distributed.fsdp  # noqa: F401  (imported before the measurement, as the model code below)

    from vla_train.config import DistributedConfig
    from vla_train.models.load import WEIGHTS_FILE, build_on_meta, load_model_dir, placeholder_weights
    from vla_train.models.peft import apply_lora, set_finetune_mode
    from vla_train.training.distributed import init_distributed, shard_from_file, shutdown

    torch.set_num_threads(1)
    dist_cfg = DistributedConfig(strategy="fsdp", timeout_s=120)
    ctx = init_distributed(dist_cfg)
    result: dict = {"rank": ctx.rank}

    big = work / "big"
    build_on_meta(big)  # imports the model classes and the tokenizer's code: not the loading's memory
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    rss_before = _status_kb("VmRSS")
    vla, _ = build_on_meta(big)
    set_finetune_mode(vla, "full")
    shard_from_file(vla.to(dtype=torch.float32), ctx, dist_cfg, big / WEIGHTS_FILE)
    growth = (_status_kb("VmHWM") - rss_before) * 1024
    num_params = sum(p.numel() for p in vla.parameters())
    result |= {"num_params": num_params, "rss_growth_fraction": growth / (4 * num_params)}
    result["local_numel"] = sum(p.to_local().numel() for p in vla.parameters())
    reference = load_model_dir(big)[0] if ctx.is_main else None
    result["big_mismatches"] = _mismatches(vla, reference)
    del vla, reference
    gc.collect()

    # tied embeddings, bf16 file: fp32 master weights for full fine-tuning
    tied = work / "tied_bf16"
    vla, _ = build_on_meta(tied)
    set_finetune_mode(vla, "full")
    shard_from_file(vla.to(dtype=torch.float32), ctx, dist_cfg, tied / WEIGHTS_FILE)
    lm = vla.language_model
    result["full_tied"] = lm.lm_head.weight is lm.model.embed_tokens.weight
    reference = load_model_dir(tied)[0].float() if ctx.is_main else None
    result["full_mismatches"] = _mismatches(vla, reference)

    # LoRA over the bf16 base, activation checkpointing: adapters as on a loaded model, seeded alike
    vla, _ = build_on_meta(tied)
    torch.manual_seed(0)
    with placeholder_weights(vla):
        vla = apply_lora(vla, lora_config(), ctx.device).get_base_model()
    lora_cfg = dataclasses.replace(dist_cfg, activation_checkpointing=True)
    shard_from_file(vla, ctx, lora_cfg, tied / WEIGHTS_FILE)
    lm = vla.language_model
    result["lora_tied"] = lm.lm_head.weight is lm.model.embed_tokens.weight
    result["lora_trainable"] = sorted(n for n, p in vla.named_parameters() if p.requires_grad)
    reference = None
    if ctx.is_main:
        loaded = load_model_dir(tied)[0]
        torch.manual_seed(0)
        reference = apply_lora(loaded, lora_config(), ctx.device).get_base_model()
    result["lora_mismatches"] = _mismatches(vla, reference)
    (work / f"result_rank{ctx.rank}.json").write_text(json.dumps(result, indent=1))
    shutdown(ctx)


# ---- the tests ------------------------------------------------------------------------------------


def test_row_reads_equal_safetensors_own_reader(tmp_path):
    from safetensors.torch import load_file, save_file

    from vla_train.models.load import SafetensorsRows

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 3, 5, generator=g),
        "b16": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    expected = load_file(str(tmp_path / "t.safetensors"))
    with SafetensorsRows(tmp_path / "t.safetensors") as f:
        assert {k: (t.dtype, t.shape) for k, t in f.tensors.items()} == {
            k: (t.dtype, tuple(t.shape)) for k, t in expected.items()
        }
        for start, stop in [(0, 7), (2, 5), (6, 7), (7, 7)]:
            assert torch.equal(f.read_rows("w", start, stop), expected["w"][start:stop])
        assert torch.equal(f.read_rows("b16", 1, 4), expected["b16"][1:4])
        assert torch.equal(f.read_rows("b16", 1, 4, torch.float32), expected["b16"][1:4].float())
        assert torch.equal(f.read_rows("ids", 3, 6), expected["ids"][3:])
        assert torch.equal(f.read_rows("scalar", 0, 1), expected["scalar"])
        with pytest.raises(ValueError, match="outside w"):
            f.read_rows("w", 5, 8)


def launch(*cmd: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N CMD`, which must succeed within LAUNCH_TIMEOUT_S."""
    proc = torchrun(*cmd, nproc=nproc, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Both ranks' results of the worker, over a >100M-parameter fp32 model and a tied bf16 one."""
    from vla_train.models.load import build_from_config, save_model_dir

    work = tmp_path_factory.mktemp("sharded_load")
    model, processor = build_from_config(big_model_config(), INSTRUCTIONS, seed=0)
    save_model_dir(work / "big", model, processor)
    del model
    model, processor = build_from_config(tied_model_config(), INSTRUCTIONS, seed=0)
    save_model_dir(work / "tied_bf16", model.to(torch.bfloat16), processor)
    launch(str(Path(__file__).resolve()), str(work))
    return [json.loads((work / f"result_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_each_rank_holds_only_its_shard_while_loading(sharded_results):
    for r in sharded_results:
        print(f"rank {r['rank']}: peak RSS growth while loading {r['rss_growth_fraction']:.3f} of the model")
        assert r["num_params"] >= MIN_PARAMS
        assert r["rss_growth_fraction"] < MAX_RSS_GROWTH_FRACTION, r
    assert sum(r["local_numel"] for r in sharded_results) == sharded_results[0]["num_params"]


@pytest.mark.slow
def test_gathered_shards_equal_a_one_process_load_bitwise(sharded_results):
    main = sharded_results[0]
    assert main["big_mismatches"] == []
    assert main["full_mismatches"] == []  # fp32 master weights of the bf16 file, buffers included


@pytest.mark.slow
def test_tied_embeddings_and_lora_adapters_load_as_on_one_process(sharded_results):
    main = sharded_results[0]
    assert all(r["full_tied"] and r["lora_tied"] for r in sharded_results)
    assert main["lora_mismatches"] == []  # bf16 base, adapters and modules_to_save copies, bitwise
    trainable = main["lora_trainable"]
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)


@pytest.mark.slow
def test_two_rank_fsdp_lora_run_matches_one_rank(small_synthetic, tmp_path):
    from test_trainer import tiny_args, train_losses

    from vla_test_utils import run_cli

    root, _ = small_synthetic
    common = [
        "--training.max_steps",
        "3",
        "--lora.rank",
        "4",
        "--lora.modules_to_save",
        "[projector]",
        "--training.data_sharding",
        "batch_slice",
        "--distributed.strategy",
        "fsdp",
        "--distributed.timeout_s",
        "120",
    ]
    one = run_cli("train_main", *tiny_args(root, tmp_path, "one", *common), timeout=LAUNCH_TIMEOUT_S)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    two = launch("-m", "vla_train.cli", *tiny_args(root, tmp_path, "two", *common))
    assert "fsdp on 2 process(es)" in two.stdout
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    diffs = [abs(a[s] - b[s]) for s in a]
    print(f"2-rank vs 1-rank FSDP LoRA: max |loss difference| = {max(diffs):.3g}")
    assert max(diffs) <= LOSS_ATOL, (a, b)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

"""The trainer in one process: gradient accumulation, schedules, freeze modes, LoRA / 4-bit and 8-bit
QLoRA (only adapters and explicitly unfrozen modules change; export round trip), FSDP2 with activation
checkpointing in a one-process group, metrics, and the launch checks made before any process group."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import TINY

from vla_test_utils import run_cli
from vla_train.config import ConfigError, ModelConfig, TrainConfig, TrainingConfig
from vla_train.config_cli import parse_config
from vla_train.training.logging import read_metrics


def tiny_args(data_root: Path, out_dir: Path, run_id: str, *extra: str) -> list[str]:
    """CLI arguments of a tiny run (the test model of test_model.py, 1 torch thread, no progress bar)."""
    default = ModelConfig()
    model = []
    for f in dataclasses.fields(TINY):
        if getattr(TINY, f.name) != getattr(default, f.name):
            model += [f"--model.{f.name}", str(getattr(TINY, f.name))]
    return [
        "--data.data_root_dir",
        str(data_root),
        "--data.shuffle_buffer_size",
        "64",
        "--data.num_parallel_calls",
        "1",
        *model,
        "--training.batch_size",
        "8",
        "--training.learning_rate",
        "0.003",
        "--training.num_val_frames",
        "8",
        "--training.num_threads",
        "1",
        "--logging.output_dir",
        str(out_dir),
        "--logging.run_id",
        run_id,
        "--logging.log_every",
        "1",
        "--logging.progress_bar",
        "false",
        *extra,
    ]


def train_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def run_in_process(args: list[str], return_model: bool = False) -> dict:
    from vla_train.training.trainer import train

    return train(parse_config(TrainConfig, args), return_model=return_model)


# ---- config checks made before any process group --------------------------------------------------


@pytest.mark.parametrize(
    "world, args, fragments",
    [
        (
            1,
            ["--distributed.strategy", "fsdp", "--lora.quantization", "nf4"],
            ["distributed.strategy", "cannot shard bitsandbytes"],
        ),
        (
            4,
            ["--distributed.strategy", "fsdp", "--distributed.fsdp_hybrid_replicas", "3"],
            ["distributed.fsdp_hybrid_replicas", "do not divide the world size 4"],
        ),
        (
            2,
            ["--distributed.strategy", "ddp", "--distributed.fsdp_hybrid_replicas", "2"],
            ["distributed.fsdp_hybrid_replicas", "strategy fsdp"],
        ),
        (2, ["--distributed.strategy", "single"], ["distributed.strategy", "single cannot run on 2"]),
        (
            2,
            ["--training.batch_size", "6", "--training.grad_accum_steps", "2"],
            ["training.batch_size", "multiple of 4"],
        ),
        (1, ["--training.finetune_mode", "sandwich"], ["training.finetune_mode", "lora.enabled false"]),
        (1, ["--lora.enabled", "false", "--lora.quantization", "nf4"], ["lora.quantization"]),
        (1, ["--training.lr_schedule", "cosine"], ["training.lr_schedule", "linear-warmup+cosine"]),
    ],
)
def test_impossible_combinations_are_rejected_before_launch(world, args, fragments, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    base = ["--config_path", "configs/demo.yaml", "--data.data_root_dir", str(tmp_path)]
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, [*base, "--logging.output_dir", str(tmp_path), *args])
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_cli_rejects_a_launch_before_starting_a_process_group(tmp_path):
    """Under torchrun's environment (WORLD_SIZE 2, no rendezvous reachable) the CLI fails on the config
    alone: exit code 2 and the reason, without trying to join a process group."""
    import os
    import subprocess
    import sys

    from vla_test_utils import REPO

    code = "import sys; from vla_train.cli import train_main; train_main(sys.argv[1:])"
    args = ["--config_path", "configs/demo.yaml", "--data.data_root_dir", str(tmp_path)]
    args += ["--logging.output_dir", str(tmp_path), "--distributed.strategy", "fsdp"]
    args += ["--lora.quantization", "nf4"]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "distributed.strategy" in proc.stderr, proc.stderr


# ---- pieces ---------------------------------------------------------------------------------------


def test_lr_schedules():
    from vla_train.training.optim import lr_factor

    t = TrainingConfig(max_steps=10, warmup_steps=2, lr_schedule="linear-warmup+cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, t) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0  # warmup, then the cosine starts at the peak
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert math.isclose(f[10], 0.1) and math.isclose(f[6], 0.1 + 0.9 * 0.5)
    c = TrainingConfig(max_steps=10, warmup_steps=4)
    assert [lr_factor(s, c) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_finetune_modes_choose_the_trainable_weights():
    from vla_train.models.load import build_from_config
    from vla_train.models.peft import set_finetune_mode

    model, _ = build_from_config(TINY, ["pick up the red block"], seed=0)
    last = len(model.language_model.model.layers) - 1

    def trainable(mode):
        set_finetune_mode(model, mode)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {
            "vision": any(n.startswith("vision_backbone.") for n in names),
            "projector": any(n.startswith("projector.") for n in names),
            "first_layer": any(n.startswith("language_model.model.layers.0.") for n in names),
            "last_layer": any(n.startswith(f"language_model.model.layers.{last}.") for n in names),
            "embed_and_head": "language_model.lm_head.weight" in names
            and "language_model.model.embed_tokens.weight" in names,
            "mask_token": any("mask_token" in n for n in names),
        }

    assert trainable("full") == dict.fromkeys(
        ["vision", "projector", "first_layer", "last_layer", "embed_and_head"], True
    ) | {"mask_token": False}
    assert trainable("frozen_vision")["vision"] is False and trainable("frozen_vision")["first_layer"]
    sandwich = trainable("sandwich")
    assert sandwich["vision"] and sandwich["projector"] and sandwich["last_layer"]
    assert sandwich["embed_and_head"] and not sandwich["first_layer"]
    last_layer = trainable("last_layer")
    assert last_layer["last_layer"] and last_layer["embed_and_head"]
    assert not (last_layer["vision"] or last_layer["projector"] or last_layer["first_layer"])


def test_per_dataset_metrics_add_up():
    from vla_train.models.action_tokenizer import ActionTokenizer
    from vla_train.models.vla import VLAOutput
    from vla_train.training.metrics import action_metrics, finalize

    tok = ActionTokenizer(1000, 256)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([990, 995, 2, 980, 985, 2, 999, 991, 2])  # 3 samples: 2 action tokens + EOS
    logits = torch.randn(9, 1100, generator=g)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    out = VLAOutput(loss, logits, labels, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    sums = action_metrics(out, tok, ["a", "b", "a"])
    m = finalize(sums, "train")
    assert sums["n_tok"] == 9 and sums["n"] == 6
    assert sums["ds/a/n"] + sums["ds/b/n"] == sums["n"]
    assert math.isclose(sums["ds/a/loss_sum"] + sums["ds/b/loss_sum"], sums["loss_sum"], rel_tol=1e-5)
    assert {"train/a/loss", "train/b/action_token_accuracy", "train/a/action_l1"} <= set(m)
    single = finalize(action_metrics(out, tok, ["a", "a", "a"]), "train")
    assert not any(k.startswith("train/a/") for k in single)  # one dataset: no per-dataset keys


def test_resume_data_position_on_another_world_size():
    """A data position carries over when the resumed run reads the same read shards (the same
    data.read_shards, or batch_slice's one global stream), at any world size; otherwise the stream
    restarts reshuffled."""
    from vla_train.config import DataConfig
    from vla_train.training.checkpoint import Restored
    from vla_train.training.distributed import DistContext
    from vla_train.training.trainer import data_plan, resume_data_position

    one = DistContext(0, 1, 0, torch.device("cpu"), "single", "fp32", None, False)

    def saved(rank, sharding="episodes", num_shards=2):
        shards = (
            {str(s): {"block": s} for s in range(rank, num_shards, 2)}
            if sharding == "episodes"
            else {"0": {}}
        )
        return {"stream": {"shards": shards}, "seed": 7, "sharding": sharding, "num_shards": num_shards}

    t = TrainingConfig(batch_size=8, seed=7)
    two_ranks = Restored(10, 2, [saved(0), saved(1)])
    seed, state, note = resume_data_position(two_ranks, data_plan(t, DataConfig(), one), t, one)
    assert (seed, state) == (17, None)
    assert "restarted from the beginning of a reshuffled stream" in note and "2 -> 1" in note
    fixed = DataConfig(read_shards=2)
    seed, state, note = resume_data_position(two_ranks, data_plan(t, fixed, one), t, one)
    assert seed == 7 and state == {"shards": {"0": {"block": 0}, "1": {"block": 1}}} and "kept" in note
    t = TrainingConfig(batch_size=8, seed=7, data_sharding="batch_slice")
    sliced = Restored(10, 2, [saved(0, "batch_slice", 1), saved(1, "batch_slice", 1)])
    seed, state, note = resume_data_position(sliced, data_plan(t, DataConfig(), one), t, one)
    assert seed == 7 and state == {"shards": {"0": {}}} and "kept" in note


# ---- training runs (in this process) --------------------------------------------------------------


def test_grad_accumulation_4x2_equals_8(small_synthetic, tmp_path):
    """4 micro-batches of 2 frames give the same losses and updates as one batch of 8 (the same frames):
    the loss is normalized by the step's supervised-token count. Equal up to float summation order."""
    root, _ = small_synthetic
    common = ["--lora.enabled", "false", "--training.max_steps", "4", "--training.weight_decay", "0.1"]
    run_in_process(tiny_args(root, tmp_path, "b8", *common))
    run_in_process(tiny_args(root, tmp_path, "b4x2", *common, "--training.grad_accum_steps", "4"))
    for key, tol in (("train/loss", 2e-6), ("train/grad_norm", 2e-5), ("train/action_token_accuracy", 0)):
        big, accum = train_losses(tmp_path / "b8", key), train_losses(tmp_path / "b4x2", key)
        assert sorted(big) == sorted(accum) == [1, 2, 3, 4]
        for s in big:
            assert abs(big[s] - accum[s]) <= tol * max(1.0, abs(big[s])), (key, s, big[s], accum[s])
    # the updates were equal too: validation after 4 steps agrees
    v8, v4 = read_metrics(tmp_path / "b8")[-1], read_metrics(tmp_path / "b4x2")[-1]
    assert abs(v8["val/loss"] - v4["val/loss"]) < 1e-5
    line = read_metrics(tmp_path / "b4x2")[0]
    assert (
        line["train/samples_per_s"] > 0 and line["train/tokens_per_s"] > 0 and line["train/step_time_s"] > 0
    )


def test_one_process_fsdp_with_activation_checkpointing_matches_single(small_synthetic, tmp_path):
    """FSDP2 (in a one-process group, no torchrun) with activation checkpointing and LoRA + an unfrozen
    projector computes what the unwrapped model computes."""
    root, _ = small_synthetic
    common = ["--training.max_steps", "3", "--lora.rank", "4", "--lora.modules_to_save", "[projector]"]
    run_in_process(tiny_args(root, tmp_path, "single", *common))
    fsdp = ["--distributed.strategy", "fsdp", "--distributed.activation_checkpointing", "true"]
    run_in_process(tiny_args(root, tmp_path, "fsdp", *common, *fsdp))
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    from vla_train.training.checkpoint import latest_checkpoint, load_checkpoint

    saved = {r: load_checkpoint(latest_checkpoint(tmp_path / r))["trainable"] for r in ("single", "fsdp")}
    assert sorted(saved["single"]) == sorted(saved["fsdp"])  # same names with and without the wrappers
    assert all("lora_" in k or ".modules_to_save." in k for k in saved["fsdp"])


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_lora_trains_only_adapters_and_exports(quantization, small_synthetic, tmp_path):
    """LoRA over full-precision, 4-bit NF4 and 8-bit base weights: the loss falls, only adapters and the
    explicitly unfrozen projector change, the checkpoint holds exactly those, and the export (merged into
    the unquantized base in one CPU process) predicts what base + adapters predict."""
    from vla_train.config import ExportConfig
    from vla_train.export import export_run, load_run_config, sample_frames
    from vla_train.models.load import load_model_dir
    from vla_train.models.peft import apply_lora
    from vla_train.models.policy import VLAPolicy
    from vla_train.training.checkpoint import latest_checkpoint, load_checkpoint

    root, _ = small_synthetic
    args = tiny_args(
        root,
        tmp_path,
        "lora",
        "--training.max_steps",
        "12",
        "--training.learning_rate",
        "0.01",
        "--lora.rank",
        "4",
        "--lora.target_modules",
        "[all-linear, lm_head]",
        "--lora.modules_to_save",
        "[projector]",
        "--lora.quantization",
        quantization,
        "--logging.log_every",
        "4",
    )
    result = run_in_process(args, return_model=True)
    trained = result["model"]
    losses = train_losses(tmp_path / "lora")
    assert losses[12] < losses[4] - 0.3, losses

    cfg = load_run_config(tmp_path / "lora")
    base, processor = load_model_dir(tmp_path / "lora" / "base_model")
    torch.manual_seed(cfg.training.seed)  # the trainer's adapter init
    fresh = apply_lora(base, cfg.lora, "cpu").get_base_model()
    before = dict(fresh.named_parameters())
    changed, unchanged = set(), set()
    for name, p in trained.named_parameters():
        (unchanged if torch.equal(p.data, before[name].data) else changed).add(name)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in changed) and any("lora_B" in n for n in changed)
    if quantization == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in trained.modules())

    saved = load_checkpoint(latest_checkpoint(tmp_path / "lora"))["trainable"]
    assert set(saved) == trainable
    out = export_run(ExportConfig(run_dir=str(tmp_path / "lora")))
    report = json.loads((out / "export_report.json").read_text())
    assert report["merged_equals_unmerged"] and report["reloaded_equals_merged"]
    if quantization == "none":  # the in-memory trained model predicts what the export predicts
        stats = json.loads((tmp_path / "lora" / "dataset_statistics.json").read_text())
        frames = sample_frames(cfg, stats, TINY.image_size, 8)
        exported = VLAPolicy.from_dir(out).predict_tokens(frames["image"], frames["instruction"])
        in_memory = VLAPolicy(trained.eval(), processor).predict_tokens(
            frames["image"], frames["instruction"]
        )
        assert torch.equal(exported, in_memory)


def test_single_process_resume_is_bitwise_exact(small_synthetic, tmp_path):
    """A run stopped after 10 of 20 steps and resumed logs exactly the losses of the uninterrupted run
    (through the CLI, as a user resumes). The resumed run starts from a copy holding only step 10."""
    import shutil

    root, _ = small_synthetic
    common = ["--lora.enabled", "false", "--training.max_steps", "20", "--training.checkpoint_every", "10"]
    common += ["--training.lr_schedule", "linear-warmup+cosine", "--training.warmup_steps", "3"]
    common += ["--training.weight_decay", "0.01"]
    proc = run_cli("train_main", *tiny_args(root, tmp_path, "full", *common), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "base_model", resumed / "base_model")
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010"
    )
    proc = run_cli("train_main", *tiny_args(root, tmp_path, "resumed", *common), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from step_00000010" in proc.stdout and "data position restored" in proc.stdout
    full, part = train_losses(tmp_path / "full"), train_losses(resumed)
    assert sorted(part) == list(range(11, 21))
    assert [full[s] for s in part] == [part[s] for s in part]  # bitwise
    assert np.isfinite(list(part.values())).all()


def test_validation_sees_images_as_the_exported_policy_does(small_synthetic, tmp_path):
    """A model trained with image augmentation is validated with the preprocessing its export carries
    (OpenVLA's centre crop of the augmentation's area): validating the exported directory reproduces the
    run's last validation line, and without the crop it would not."""
    import dataclasses as dc

    from vla_train.config import ExportConfig
    from vla_train.data.mixture import run_datasets
    from vla_train.export import export_run, load_run_config
    from vla_train.models.load import load_model_dir
    from vla_train.runs import stream_spec
    from vla_train.training.distributed import DistContext
    from vla_train.training.evaluate import validate

    root, _ = small_synthetic
    common = ["--lora.enabled", "false", "--training.max_steps", "2", "--data.image_augmentation", "true"]
    run_in_process(tiny_args(root, tmp_path, "aug", *common))
    out = export_run(ExportConfig(run_dir=str(tmp_path / "aug")))
    model, processor = load_model_dir(out)
    assert processor.settings.center_crop_area == 0.9
    cfg = load_run_config(tmp_path / "aug")
    stats = json.loads((tmp_path / "aug" / "dataset_statistics.json").read_text())
    spec = stream_spec(cfg, run_datasets(cfg.data), TINY.image_size, train=False, batch_size=8)
    one = DistContext(0, 1, 0, torch.device("cpu"), "single", "fp32", None, False)
    val = validate(model, processor, spec, stats, cfg.training.num_val_frames, one)
    logged = [m for m in read_metrics(tmp_path / "aug") if "val/loss" in m][-1]
    for key in ("val/loss", "val/action_token_accuracy", "val/generated_action_token_accuracy"):
        assert val[key] == logged[key], key  # the same weights, images and threads: bitwise
    processor.settings = dc.replace(processor.settings, center_crop_area=1.0)
    uncropped = validate(model, processor, spec, stats, cfg.training.num_val_frames, one)
    assert uncropped["val/loss"] != logged["val/loss"]


def test_bf16_export_halves_the_weights_and_reports_its_agreement(small_synthetic, tmp_path):
    """vla-export --dtype bf16: bf16 weights (about half the fp32 file), the reloaded directory predicts
    what the cast model predicted, and the agreement with the fp32 tokens is reported."""
    from safetensors import safe_open

    from vla_train.models.policy import VLAPolicy

    root, _ = small_synthetic
    run_in_process(tiny_args(root, tmp_path, "run", "--lora.enabled", "false", "--training.max_steps", "2"))
    outs = {}
    for dtype in ("fp32", "bf16"):
        proc = run_cli(
            "export_main",
            *("--run_dir", str(tmp_path / "run"), "--dtype", dtype, "--output_dir", str(tmp_path / dtype)),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[dtype] = tmp_path / dtype
    report = json.loads((outs["bf16"] / "export_report.json").read_text())
    assert report["dtype"] == "bf16" and report["reloaded_equals_merged"]
    assert 0.0 <= report["bf16_token_agreement"] <= 1.0 and "bf16 weights:" in proc.stdout
    with safe_open(str(outs["bf16"] / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    sizes = {d: (o / "model.safetensors").stat().st_size for d, o in outs.items()}
    assert 0.45 < sizes["bf16"] / sizes["fp32"] < 0.55, sizes
    policy = VLAPolicy.from_dir(outs["bf16"])
    images = np.zeros((2, TINY.image_size, TINY.image_size, 3), np.uint8)
    actions = policy.predict_action_batch(images, ["pick up the block", "open the drawer"])
    assert actions.shape == (2, 7) and np.isfinite(actions).all()


def test_threads_per_rank_come_from_the_cores_available_to_it(monkeypatch):
    """A rank bound to some cores uses its mask; otherwise the node's cores split among its ranks."""
    import os

    from vla_train.training import distributed

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.cores_per_rank() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed.cores_per_rank() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6})  # numactl / --cpu-bind
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.cores_per_rank() == 3


def test_validation_per_dimension_and_task_best_checkpoint_curves_and_rerun(small_synthetic, tmp_path):
    """num_val_frames -1 evaluates the whole val split; validation reports accuracy per action dimension,
    over the dimensions that vary and per instruction; the best checkpoint by training.best_metric is kept
    and exports; curves.png is drawn; launching the finished run again logs nothing new."""
    from PIL import Image

    root, cfg = small_synthetic
    metric = "val/generated_action_token_accuracy"
    extra = ["--lora.enabled", "false", "--training.max_steps", "6", "--training.val_every", "2"]
    extra += ["--training.num_val_frames", "-1", "--training.best_metric", metric]
    args = tiny_args(root, tmp_path, "best", *extra)
    run_in_process(args)
    run_dir = tmp_path / "best"
    vals = [m for m in read_metrics(run_dir) if "val/loss" in m]
    assert [m["step"] for m in vals] == [2, 4, 6]
    last = vals[-1]
    assert last["val/num_frames"] == cfg.num_val_episodes * cfg.steps_per_episode  # the whole split
    for d in range(7):
        assert 0 <= last[f"val/dim{d}/action_token_accuracy"] <= 1
        assert f"val/dim{d}/generated_action_token_accuracy" in last
    dims = np.mean([last[f"val/dim{d}/action_token_accuracy"] for d in range(7)])
    assert abs(dims - last["val/action_token_accuracy"]) < 1e-9  # every frame supervises all 7 dims
    assert last["val/action_token_accuracy_varying_dims"] == last["val/action_token_accuracy"]  # all vary
    tasks = [k for k in last if k.startswith("val/task/") and k.endswith("/action_token_accuracy")]
    assert len(tasks) > 1
    best = json.loads((run_dir / "best" / "best.json").read_text())
    top = max(m[metric] for m in vals)
    assert best["value"] == top and best["step"] == next(m["step"] for m in vals if m[metric] == top)
    assert (run_dir / "best" / "state.json").is_file()
    curves = np.asarray(Image.open(run_dir / "curves.png").convert("RGB"))
    assert curves.shape[0] > 100 and curves.std() > 5

    lines = (run_dir / "metrics.jsonl").read_text()
    result = run_in_process(args)  # the finished run again
    assert (run_dir / "metrics.jsonl").read_text() == lines
    assert result["val/loss"] == last["val/loss"]

    proc = run_cli(
        "export_main", "--run_dir", str(run_dir), "--checkpoint", "best", "--output_dir", str(tmp_path / "x")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "x" / "export_report.json").read_text())["checkpoint"].endswith("best")


def test_varying_dims_leave_out_constant_dimensions():
    from vla_train.training.metrics import _per_dim_sums, varying_dims

    stats = {"min": [-1, -1, -1, 0, 0, 0, 0], "max": [1, 1, 1, 0, 0, 0, 1]}  # a robot that never turns
    assert varying_dims(stats).tolist() == [True] * 3 + [False] * 3 + [True]
    correct = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1]], bool)
    sums = _per_dim_sums(correct, np.zeros(correct.shape), stats, "")
    assert sums["varying_n"] == 8 and sums["varying_correct"] == 4  # 10 of 14 over all dimensions

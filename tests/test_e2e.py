"""End-to-end through the real CLI: train -> validate -> checkpoint -> export -> reload -> predict, and the
modality ablations that prove the demo task needs both the image and the instruction."""

from __future__ import annotations

import json

import pytest
import torch

from vla_test_utils import run_cli
from vla_train.training.logging import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from vla_train.config import SyntheticDataConfig
    from vla_train.data.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("demo_data")
    build_synthetic_dataset(root, SyntheticDataConfig())  # the demo's dataset (400 + 40 episodes, 64 px)
    return root


def train(data_root, out, run_id, *extra):
    proc = run_cli(
        "train_main",
        "--config_path",
        "configs/demo.yaml",
        "--data.data_root_dir",
        str(data_root),
        "--logging.output_dir",
        str(out),
        "--logging.run_id",
        run_id,
        "--logging.progress_bar",
        "false",
        *extra,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / run_id, proc


def test_train_export_reload_predict(demo_data, tmp_path):
    run_dir, proc = train(
        demo_data,
        tmp_path,
        "e2e",
        "--training.max_steps",
        "30",
        "--logging.log_every",
        "10",
        "--training.num_val_frames",
        "64",
        "--logging.wandb_mode",
        "offline",
    )
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [10, 20, 30]
    final = metrics[-1]
    assert (
        final["step"] == 30
        and 0.0 <= final["val/action_token_accuracy"] <= 1.0
        and final["val/num_frames"] == 64
    )
    assert "val/action_token_accuracy" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline wandb run file"
    assert (run_dir / "checkpoints" / "step_00000030" / "state.json").is_file()
    stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    assert stats["vla_synthetic"]["num_trajectories"] == 440

    proc = run_cli("export_main", "--run_dir", str(run_dir), "--predict_samples", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        proc.stdout.count("instruction:") == 2
        and "predicted action:" in proc.stdout
        and "true action:" in proc.stdout
    )
    export_dir = run_dir / "export"
    config = json.loads((export_dir / "config.json").read_text())
    assert config["norm_stats"] == stats == json.loads((export_dir / "dataset_statistics.json").read_text())

    # The exported directory predicts exactly what the in-memory merged model predicts.
    from vla_train.export import load_run_config, sample_frames
    from vla_train.models.load import load_model_dir
    from vla_train.models.peft import apply_lora, load_adapter_state_dict
    from vla_train.models.policy import VLAPolicy
    from vla_train.training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_run_config(run_dir)
    base, proc_ = load_model_dir(run_dir / "base_model")
    peft_model = apply_lora(base, cfg.lora)
    load_adapter_state_dict(peft_model, load_checkpoint(latest_checkpoint(run_dir))["trainable"])
    merged = peft_model.merge_and_unload()
    frames = sample_frames(cfg, stats, 64, 16)
    in_memory = VLAPolicy(merged, proc_).predict_tokens(frames["image"], frames["instruction"])
    exported = VLAPolicy.from_dir(export_dir).predict_tokens(frames["image"], frames["instruction"])
    assert torch.equal(in_memory, exported)
    # and the merge changed something: adapters were trained
    fresh, _ = load_model_dir(run_dir / "base_model")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh.state_dict()[name], merged.state_dict()[name])


ABLATION_RECIPE = [
    "--lora.enabled",
    "false",
    "--training.learning_rate",
    "0.001",
    "--training.max_steps",
    "300",
    "--training.num_val_frames",
    "400",
    "--logging.log_every",
    "100",
]


def test_policy_needs_both_image_and_instruction(demo_data, tmp_path):
    """Trained the same way, blank images or one fixed instruction stay far below the real run."""
    acc = {}
    for ablation in ("none", "blank_image", "fixed_instruction"):
        run_dir, _ = train(demo_data, tmp_path, ablation, *ABLATION_RECIPE, "--data.ablation", ablation)
        acc[ablation] = read_metrics(run_dir)[-1]["val/action_token_accuracy"]
    print("val/action_token_accuracy by ablation:", acc)
    assert acc["none"] >= 0.6, acc
    assert acc["blank_image"] <= acc["none"] - 0.25, acc
    assert acc["fixed_instruction"] <= acc["none"] - 0.25, acc

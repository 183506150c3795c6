"""End-to-end through the real CLI: train -> validate -> checkpoint -> export -> reload -> predict, and the
modality ablations that prove the demo task needs both the image and the instruction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vla_test_utils import REPO, run_cli
from vla_train.training.logging import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's synthetic dataset (configs/demo.yaml's data.synthetic), built once for this module."""
    from vla_train.config import TrainConfig, parse_config
    from vla_train.data.synthetic import build_synthetic_dataset

    demo = parse_config(TrainConfig, ["--config_path", str(REPO / "configs/demo.yaml")], validate=False)
    root = tmp_path_factory.mktemp("demo_data")
    build_synthetic_dataset(root, demo.data.synthetic)
    return root


def cli_args(data_root, out, run_id, *extra):
    return [
        "--config_path", "configs/demo.yaml", "--data.data_root_dir", str(data_root),
        "--logging.output_dir", str(out), "--logging.run_id", run_id, "--logging.progress_bar", "false", *extra,
    ]  # fmt: skip


def train(data_root, out, run_id, *extra):
    proc = run_cli("train_main", *cli_args(data_root, out, run_id, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / run_id, proc


def test_train_export_reload_predict(demo_data, tmp_path):
    run_dir, proc = train(
        demo_data, tmp_path, "e2e", "--training.max_steps", "30", "--logging.log_every", "10",
        "--training.num_val_frames", "64", "--logging.wandb_mode", "offline",
    )  # fmt: skip
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
    assert stats["vla_synthetic"]["num_trajectories"] == 3100

    proc = run_cli("export_main", "--run_dir", str(run_dir), "--predict_samples", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("instruction:") == 2 and "predicted action:" in proc.stdout
    assert "true action:" in proc.stdout
    export_dir = run_dir / "export"
    config = json.loads((export_dir / "config.json").read_text())
    assert config["norm_stats"] == stats == json.loads((export_dir / "dataset_statistics.json").read_text())

    # The exported directory predicts exactly what the in-memory merged model predicts.
    from vla_train.export import load_run_config, load_trained, sample_frames
    from vla_train.models.load import load_model_dir
    from vla_train.models.policy import VLAPolicy

    cfg = load_run_config(run_dir)
    peft_model, proc_ = load_trained(run_dir, cfg)
    merged = peft_model.merge_and_unload()
    frames = sample_frames(cfg, stats, 48, 16)
    in_memory = VLAPolicy(merged, proc_).predict_tokens(frames["image"], frames["instruction"])
    exported = VLAPolicy.from_dir(export_dir).predict_tokens(frames["image"], frames["instruction"])
    assert torch.equal(in_memory, exported)
    # and the merge changed something: adapters were trained
    fresh, _ = load_model_dir(run_dir / "base_model")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh.state_dict()[name], merged.state_dict()[name])


# The demo recipe, shorter; one torch thread per run so that the three runs share the two cores well.
ABLATION_RECIPE = ["--training.max_steps", "600", "--training.num_val_frames", "210", "--logging.log_every", "100",
                   "--training.num_threads", "1"]  # fmt: skip


def test_policy_needs_both_image_and_instruction(demo_data, tmp_path):
    """Trained the same way, blank images or one fixed instruction stay far below the real run.

    Compared on generated actions (greedy decoding, what predict_action returns): with teacher forcing a
    policy that lacks the instruction can still read the signed speed off the first true action token and
    get the rest right, which says nothing about what it knows on its own.
    """
    runs = {}
    for ablation in ("none", "blank_image", "fixed_instruction"):
        args = cli_args(demo_data, tmp_path, ablation, *ABLATION_RECIPE, "--data.ablation", ablation)
        code = "import sys; from vla_train.cli import train_main; train_main(sys.argv[1:])"
        runs[ablation] = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    gen, tf = {}, {}
    for ablation, p in runs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
        final = read_metrics(tmp_path / ablation)[-1]
        gen[ablation] = final["val/generated_action_token_accuracy"]
        tf[ablation] = final["val/action_token_accuracy"]
    print("generated action-token accuracy:", gen, "teacher-forced:", tf)
    assert gen["none"] >= 0.55, gen
    # Knowing only the instruction, a policy gets the gripper and the 1/3 of dimensions whose attribute is
    # the middle value (3/7 = 0.43); knowing only the image, about half.
    assert gen["blank_image"] <= gen["none"] - 0.12, gen
    assert gen["fixed_instruction"] <= gen["none"] - 0.12, gen
    assert tf["blank_image"] <= tf["none"] - 0.12, tf

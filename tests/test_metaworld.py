"""Meta-World demonstrations and closed-loop evaluation: the generator writes a dataset that reads back
through the pipeline, the recorded actions replay to success (bit for bit the same observations),
`vla-eval` scores 100% with a replay of those actions and runs a random-weights model end to end, writing
every output. The simulator-free parts (seeds, action mapping, failure classes, intervals, config errors)
are unit tests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_test_utils import ensure_osmesa, run_cli
from vla_train.config import ConfigError, EvalConfig, MetaWorldDataConfig, RolloutConfig
from vla_train.config_cli import parse_config
from vla_train.eval.report import wilson_interval
from vla_train.sim.metaworld_env import (
    MT10,
    SEED_BASE,
    TrialSignals,
    resolve_tasks,
    seed_for,
    supported_failure_classes,
    to_metaworld_action,
    to_openvla_action,
)

TASKS = "reach,pick-place"


# ---- no simulator --------------------------------------------------------------------------------
def test_seed_ranges_are_disjoint_and_tasks_resolve():
    seeds = {split: {seed_for(split, t, k) for t in MT10 for k in range(1000)} for split in SEED_BASE}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["eval"])
    assert not (seeds["train"] & seeds["eval"])
    assert resolve_tasks("mt10") == list(MT10)
    assert resolve_tasks("reach, push-v3,reach") == ["reach-v3", "push-v3"]
    with pytest.raises(ValueError, match="unknown Meta-World task 'rech'"):
        resolve_tasks("reach,rech")


def test_action_mapping_thresholds_the_gripper():
    # the experts' "open" commands are -1 and 0, their "closed" 0.6 and 1 (shared/reference/metaworld.md)
    for grip, open_ in ((-1.0, 1.0), (0.0, 1.0), (0.6, 0.0), (1.0, 0.0)):
        a7 = to_openvla_action(np.array([0.5, -2.0, 1.0, grip]))
        np.testing.assert_array_equal(a7, [0.5, -1.0, 1.0, 0, 0, 0, open_])
        back = to_metaworld_action(a7)
        assert (back[3] <= 0) == (grip <= 0)  # open stays open, closed stays closed


def test_failure_classes_follow_the_simulator_signals():
    def classify(task, infos):
        s = TrialSignals(task)
        for info in infos:
            s.update(info)
        return s.failure_class()

    far = {"success": 0.0, "near_object": 0.0, "grasp_success": 0.0, "obj_to_target": 0.5}
    assert classify("pick-place-v3", [far] * 3) == "never_reached_object"
    assert classify("pick-place-v3", [far, far | {"near_object": 1.0}]) == "reached_never_grasped"
    grasped = far | {"near_object": 1.0, "grasp_success": 1.0}
    assert classify("pick-place-v3", [grasped, grasped]) == "grasped_not_placed"
    assert classify("pick-place-v3", [grasped, grasped | {"obj_to_target": 0.1}]) == "timed_out_near_goal"
    assert classify("pick-place-v3", [grasped, far | {"success": 1.0}]) is None
    # reach reports a distance in near_object and a constant grasp flag: neither is used
    assert (
        classify("reach-v3", [{"near_object": 0.2, "grasp_success": 1.0, "obj_to_target": 0.2}])
        == "did_not_complete"
    )
    assert classify("reach-v3", [{"near_object": 0.08, "obj_to_target": 0.08}]) == "timed_out_near_goal"
    for task in MT10:
        assert supported_failure_classes(task), task
    assert "reached_never_grasped" not in supported_failure_classes("drawer-close-v3")


def test_wilson_interval():
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2
    low, high = wilson_interval(14, 20)
    assert low < 0.7 < high and 0.45 < low and high < 0.87


def test_bad_generation_and_eval_configs_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(MetaWorldDataConfig, ["--tasks", "reach,nope", "--episodes_per_task", "0"])
    assert "tasks: unknown Meta-World task 'nope'" in str(e.value) and "episodes_per_task" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(EvalConfig, ["--policy", str(tmp_path), "--trials", "0", "--seed_split", "test"])
    msg = str(e.value)
    assert "policy: " in msg and "trials: must be >= 1" in msg and "seed_split: unknown 'test'" in msg
    with pytest.raises(ConfigError, match="seed_split: a replay policy plays recorded episodes"):
        parse_config(EvalConfig, ["--policy", f"replay:{tmp_path}"])
    with pytest.raises(ConfigError, match="trials: first_seed \\+ trials must be <= 1000"):
        parse_config(EvalConfig, ["--policy", "expert", "--first_seed", "990", "--trials", "20"])
    assert RolloutConfig(tasks="mt10").validate() == []
    proc = run_cli("data_main", "metaworld", "--tasks", "mt11", "--out", str(tmp_path))
    assert proc.returncode == 2 and "tasks: unknown Meta-World task 'mt11'" in proc.stderr


# ---- with the simulator --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mw_data(tmp_path_factory):
    """A 2-task dataset: 2 train + 1 val expert episodes per task, 64 px frames."""
    ensure_osmesa()
    from vla_train.sim.demos import build_metaworld_dataset

    root = tmp_path_factory.mktemp("mw")
    cfg = MetaWorldDataConfig(
        tasks=TASKS,
        episodes_per_task=2,
        val_episodes_per_task=1,
        out=str(root),
        image_size=64,
        msaa_samples=0,
        progress_bar=False,
    )
    return root, cfg, build_metaworld_dataset(cfg)


def _episodes(root, split):
    from vla_train.data.tf_setup import tfds
    from vla_train.sim.demos import dataset_dir

    builder = tfds.builder_from_directory(str(dataset_dir(root)))
    out = []
    for ep in builder.as_dataset(split=split):
        steps = list(ep["steps"])
        out.append(
            {
                "task": ep["episode_metadata"]["task"].numpy().decode(),
                "seed": int(ep["episode_metadata"]["seed"]),
                "raw_action": np.stack([s["raw_action"].numpy() for s in steps]),
                "action": np.stack([s["action"].numpy() for s in steps]),
                "env_state": np.stack([s["observation"]["env_state"].numpy() for s in steps]),
                "image": np.stack([s["observation"]["image"].numpy() for s in steps]),
                "instruction": steps[0]["language_instruction"].numpy().decode(),
            }
        )
    return out


@pytest.mark.slow
def test_generated_dataset_reads_back_through_the_pipeline(mw_data, tmp_path):
    from vla_train.config import TrainConfig
    from vla_train.data.mixture import run_datasets
    from vla_train.data.rlds import get_statistics
    from vla_train.data.stream import FrameStream
    from vla_train.runs import stream_spec
    from vla_train.sim.demos import build_metaworld_dataset, episodes_dir
    from vla_train.sim.metaworld_env import INSTRUCTIONS

    root, gen_cfg, summary = mw_data
    assert summary["num_episodes"] == {"train": 4, "val": 2}
    train, val = _episodes(root, "train"), _episodes(root, "val")
    assert sorted((e["task"], e["seed"]) for e in train) == [
        ("pick-place-v3", 2000),
        ("pick-place-v3", 2001),
        ("reach-v3", 0),
        ("reach-v3", 1),
    ]
    assert all(SEED_BASE["val"] <= e["seed"] < SEED_BASE["eval"] for e in val)
    for e in train + val:
        assert e["instruction"] == INSTRUCTIONS[e["task"]]
        np.testing.assert_array_equal(e["action"][:, 3:6], 0)
        assert set(np.unique(e["action"][:, 6])) <= {0.0, 1.0}
        assert e["image"].shape[1:] == (64, 64, 3) and e["image"].std() > 10
    pick = next(e for e in train if e["task"] == "pick-place-v3")
    assert set(np.unique(pick["action"][:, 6])) == {0.0, 1.0}  # the gripper closes on the puck

    cfg = parse_config(
        TrainConfig,
        [
            "--config_path",
            "configs/demo.yaml",
            "--data.data_root_dir",
            str(root),
            "--data.dataset_name",
            "metaworld_mt10",
            "--data.build_synthetic",
            "false",
            "--data.stats_cache_dir",
            str(tmp_path / "stats"),
        ],
    )
    stats = get_statistics(str(root), "metaworld_mt10", cfg.data.stats_cache_dir, "raise")
    assert stats["num_transitions"] == summary["num_frames"]["train"] + summary["num_frames"]["val"]
    spec = stream_spec(cfg, run_datasets(cfg.data), 48, train=False, batch_size=16)
    batch = next(iter(FrameStream(spec, {"metaworld_mt10": stats})))
    assert batch["image"].shape == (16, 48, 48, 3) and batch["proprio"].shape == (16, 4)
    assert set(batch["instruction"]) <= {INSTRUCTIONS["reach-v3"], INSTRUCTIONS["pick-place-v3"]}

    # resumable: a second run records nothing and keeps the dataset
    files = {p: p.stat().st_mtime_ns for p in episodes_dir(gen_cfg).rglob("*")}
    again = build_metaworld_dataset(gen_cfg)
    assert again["identity"] == summary["identity"]
    assert {p: p.stat().st_mtime_ns for p in episodes_dir(gen_cfg).rglob("*")} == files


@pytest.mark.slow
def test_recorded_actions_replay_to_success_bit_for_bit(mw_data):
    """The raw 4-D commands of every recorded episode, replayed open loop from its seed (in a simulator
    worker: MuJoCo does not share a process with TensorFlow), give the recorded observations bit for bit
    and end in success."""
    from vla_train.eval.runner import SimWorkers
    from vla_train.sim.metaworld_env import RenderSettings

    root, _, _ = mw_data
    with SimWorkers(RenderSettings(image_size=64, msaa_samples=0), 1, max_path_length=400) as workers:
        for e in _episodes(root, "train"):
            replay = workers.replay(e["task"], e["seed"], e["raw_action"])
            np.testing.assert_array_equal(replay["observations"], e["env_state"])
            assert replay["infos"][-1]["success"] == 1.0, (e["task"], e["seed"])


@pytest.mark.slow
def test_vla_eval_replay_of_the_dataset_scores_100_percent(mw_data, tmp_path):
    root, _, _ = mw_data
    out = tmp_path / "replay"
    proc = run_cli(
        "eval_main",
        "--policy",
        f"replay:{root}",
        "--tasks",
        TASKS,
        "--seed_split",
        "dataset",
        "--trials",
        "2",
        "--video_trials",
        "0",
        "--out",
        str(out),
        "--progress_bar",
        "false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["success_rate"] == 1.0 and results["num_trials"] == 4
    assert results["tasks"]["reach-v3"]["seeds"] == [0, 1]
    assert results["tasks"]["pick-place-v3"]["seeds"] == [2000, 2001]
    assert results["render"]["image_size"] == 64  # rendered as the dataset was


@pytest.mark.slow
def test_vla_eval_runs_a_random_model_and_writes_every_output(mw_data, tmp_path):
    from PIL import Image

    from vla_train.config import ModelConfig
    from vla_train.data.rlds import get_statistics
    from vla_train.models.load import build_from_config, save_model_dir
    from vla_train.sim.metaworld_env import INSTRUCTIONS

    root, _, _ = mw_data
    model_cfg = ModelConfig(
        image_size=32,
        patch_size=8,
        dino_hidden_size=32,
        dino_num_layers=1,
        dino_num_heads=2,
        siglip_hidden_size=32,
        siglip_num_layers=1,
        siglip_num_heads=2,
        llm_hidden_size=64,
        llm_num_layers=1,
        llm_num_heads=2,
        llm_intermediate_size=128,
    )
    model, processor = build_from_config(model_cfg, list(INSTRUCTIONS.values()), seed=0)
    stats = get_statistics(str(root), "metaworld_mt10", str(tmp_path / "stats"), "raise")
    model_dir = save_model_dir(tmp_path / "model", model, processor, {"metaworld_mt10": stats})
    out = tmp_path / "eval"
    proc = run_cli(
        "eval_main",
        "--policy",
        str(model_dir),
        "--tasks",
        TASKS,
        "--trials",
        "2",
        "--max_steps",
        "12",
        "--video_trials",
        "1",
        "--out",
        str(out),
        "--data_root_dir",
        str(root),
        "--progress_bar",
        "false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| reach-v3 |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["num_trials"] == 4 and results["policy"]["kind"] == "model_dir"
    for t in results["tasks"].values():
        assert all(SEED_BASE["eval"] <= s for s in t["seeds"]) and len(t["seeds"]) == 2
        failures = t["num_trials"] - t["num_successes"]
        assert sum(t["failure_classes"].values()) == failures
        assert set(t["failure_classes"]) <= set(t["failure_classes_supported"])
        for trial in t["trials"]:
            assert trial["num_steps"] <= 12
    lat = results["policy_latency"]
    assert lat["num_calls"] > 0 and lat["call_ms_p50"] > 0 and lat["call_ms_p99"] >= lat["call_ms_p50"]
    assert "| **all** |" in (out / "results.md").read_text()
    for task in ("reach-v3", "pick-place-v3"):
        gif = Image.open(out / "videos" / f"{task}.gif")
        assert gif.n_frames >= 6  # 13 observations, every second one, then the held last frame
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames // 3)
        middle = np.asarray(gif.convert("RGB"))
        assert first.std() > 20 and middle.std() > 20  # a rendered scene, not a blank frame
    png = np.asarray(Image.open(out / "success.png").convert("RGB"))
    assert png.shape[0] > 100 and png.std() > 5 and (png < 200).any()


@pytest.mark.slow
def test_rollouts_during_training_are_logged_like_validation(mw_data, tmp_path):
    from test_trainer import run_in_process, tiny_args

    root, _, _ = mw_data
    args = tiny_args(
        root, tmp_path, "roll", "--data.dataset_name", "metaworld_mt10", "--lora.enabled", "false"
    )
    args += ["--training.max_steps", "4", "--eval.rollouts_every", "2", "--eval.tasks", "reach"]
    args += ["--eval.trials", "1", "--eval.max_steps", "6", "--eval.num_workers", "1"]
    run_in_process(args)
    from vla_train.training.logging import read_metrics

    rounds = [m for m in read_metrics(tmp_path / "roll") if "rollout/success_rate" in m]
    assert [m["step"] for m in rounds] == [2, 4]
    assert all(0 <= m["rollout/reach-v3/success_rate"] <= 1 and m["rollout/num_trials"] == 1 for m in rounds)
    results = json.loads((tmp_path / "roll" / "rollouts" / "step_00000002" / "results.json").read_text())
    assert results["seed_split"] == "val" and results["tasks"]["reach-v3"]["seeds"] == [
        seed_for("val", "reach-v3", 0)
    ]
    assert (tmp_path / "roll" / "rollouts" / "step_00000004" / "videos" / "reach-v3.gif").is_file()

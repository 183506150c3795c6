"""The synthetic tfds builder, RLDS reading, statistics caching and the frame stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_test_utils import frame_spec
from vla_train.config import SyntheticDataConfig
from vla_train.data import rlds
from vla_train.data.stream import FrameStream
from vla_train.data.synthetic import DATASET_NAME, Block, generate_episode, target_action


def test_builder_writes_oxe_layout(small_synthetic):
    root, cfg = small_synthetic
    builder = rlds.open_builder(root, DATASET_NAME)
    assert set(builder.info.splits) == {"train", "val"}
    assert builder.info.splits["train"].num_examples == cfg.num_train_episodes
    steps = builder.info.features["steps"]
    assert set(steps.keys()) >= {
        "observation",
        "action",
        "language_instruction",
        "is_first",
        "is_last",
        "is_terminal",
        "reward",
        "discount",
    }
    assert steps["observation"]["image"].shape == (32, 32, 3)
    assert steps["observation"]["image"].encoding_format == "jpeg"
    ep = next(iter(builder.as_dataset("train").take(1)))
    assert ep["steps"].cardinality() == cfg.steps_per_episode
    first = next(iter(ep["steps"]))
    assert bool(first["is_first"]) and first["action"].shape == (7,)


def test_task_needs_image_and_instruction():
    """The same instruction in different scenes, and different instructions in one scene, demand
    different actions; every action dimension reads its own attribute of the block."""
    rng = np.random.default_rng(0)
    eps = [generate_episode(rng, SyntheticDataConfig(steps_per_episode=2, image_size=32)) for _ in range(300)]
    by_instruction: dict[str, set] = {}
    for e in eps:
        s = e["steps"][0]
        by_instruction.setdefault(s["language_instruction"], set()).add(tuple(np.round(s["action"], 3)))
    assert len(by_instruction) == 36 and all(len(actions) > 1 for actions in by_instruction.values())
    block = Block(col=0, row=2, size=1, shade=2, shape=0, color=1)
    np.testing.assert_allclose(
        target_action(block, +1, 1), [-0.025, 0.025, 0.0, 0.05, -0.05, 0.0, 1.0], atol=1e-7
    )
    np.testing.assert_allclose(
        target_action(block, -1, 2), [0.05, -0.05, 0.0, -0.1, 0.1, 0.0, 0.0], atol=1e-7
    )
    other = Block(col=2, row=0, size=0, shade=1, shape=2, color=2)
    np.testing.assert_allclose(
        target_action(other, +1, 2), [0.05, -0.05, -0.04, 0.0, 0.1, 0.1, 1.0], atol=1e-7
    )


def test_statistics_match_numpy_and_are_cached(small_synthetic, tmp_path, monkeypatch):
    root, _ = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path))
    builder = rlds.open_builder(root, DATASET_NAME)
    actions = np.concatenate([t["action"] for t in rlds.numeric_trajectories(builder, DATASET_NAME)])
    assert stats["num_transitions"] == len(actions) == 30 * 4 and stats["num_trajectories"] == 30
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-6)
    files = list(tmp_path.glob(f"{DATASET_NAME}_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == stats

    def fail(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(rlds, "numeric_trajectories", fail)
    assert rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path)) == stats


def spec(root, **kw):
    return frame_spec(root, **kw)


def test_frame_stream_batches_are_normalized_and_resized(small_synthetic, tmp_path):
    root, _ = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path))
    batch = next(iter(FrameStream(spec(root), stats)))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["action"].shape == (8, 7) and np.abs(batch["action"]).max() <= 1.0
    assert set(np.unique(batch["action"][:, 6])) <= {0.0, 1.0}  # gripper passes raw
    assert all(isinstance(s, str) and s for s in batch["instruction"])


def test_stream_is_deterministic_and_resumes_exactly(small_synthetic, tmp_path):
    root, _ = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path))
    stream = FrameStream(spec(root), stats)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    state = stream.state_dict()
    rest = [next(it) for _ in range(20)]  # 23 batches of 8 > 96 train frames: crosses an epoch boundary
    restored = FrameStream(spec(root), stats)
    restored.load_state_dict(state)
    again = iter(restored)
    for want in rest:
        got = next(again)
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["instruction"] == want["instruction"]
    replay = next(iter(FrameStream(spec(root), stats)))
    np.testing.assert_array_equal(replay["image"], first[0]["image"])


def test_ablations(small_synthetic, tmp_path):
    root, _ = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path))
    blank = next(iter(FrameStream(spec(root, ablation="blank_image"), stats)))
    assert blank["image"].max() == 0
    fixed = next(iter(FrameStream(spec(root, ablation="fixed_instruction"), stats)))
    assert len(set(fixed["instruction"])) == 1


def test_eval_stream_is_one_ordered_pass_over_val(small_synthetic, tmp_path):
    root, cfg = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(tmp_path))
    batches = list(FrameStream(spec(root, train=False), stats))
    assert sum(len(b["instruction"]) for b in batches) == cfg.num_val_episodes * cfg.steps_per_episode


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(rlds.DatasetError, match="dataset 'nope'"):
        rlds.open_builder(tmp_path, "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(rlds.DatasetError, match="dataset 'half'.*dataset_info.json"):
        rlds.open_builder(tmp_path, "half")


def test_own_dataset_needs_only_a_registry_yaml(small_synthetic, tmp_path):
    """A dataset in an already-supported layout is a YAML edit away: no code changes."""
    import shutil

    from vla_train.config import DataConfig
    from vla_train.data.mixture import run_datasets
    from vla_train.data.registry import reset_default_registry

    root, _ = small_synthetic
    shutil.copytree(root / DATASET_NAME, tmp_path / "my_robot")
    registry = tmp_path / "my_registry.yaml"
    registry.write_text(
        "datasets:\n"
        "  my_robot:\n"
        "    image_obs_keys: {primary: image, secondary: null, wrist: null}\n"
        "    state_obs_keys: [state]\n"
        "    state_encoding: POS_EULER\n"
        "    action_encoding: EEF_POS\n"
        "    standardize_fn: identity\n"
    )
    bad = DataConfig(data_root_dir=str(tmp_path), dataset_name="my_robot")
    assert any("data.dataset_name" in e and "my_robot" in e for e in bad.validate())
    cfg = DataConfig(data_root_dir=str(tmp_path), dataset_name="my_robot", registry_files=[str(registry)])
    assert cfg.validate() == []
    try:
        assert run_datasets(cfg) == (("my_robot", 1.0),)  # where a run starts: registers registry_files
        stats = rlds.get_statistics(str(tmp_path), "my_robot", str(tmp_path / "stats"))
        batch = next(iter(FrameStream(spec(tmp_path, dataset_name="my_robot"), stats)))
        assert batch["dataset_name"][0] == "my_robot" and batch["image"].shape == (8, 16, 16, 3)
    finally:
        reset_default_registry()  # run_datasets registered my_registry.yaml process-wide

"""Dataset mixtures in the frame stream: weighted interleaving, per-dataset normalization, size-balanced
weights, thread allocation, the DataConfig fields, and trajectory transforms through the loader."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from vla_test_utils import frame_spec, registry_yaml, synthetic_copies
from vla_train.data import rlds
from vla_train.data.mixture import allocate_threads, balance_weights, resolve_mixture
from vla_train.data.normalize import normalize
from vla_train.data.stream import FrameStream, normalize_batch
from vla_train.data.synthetic import DATASET_NAME

SECOND = "syn_b"


@pytest.fixture(scope="module")
def two_datasets(small_synthetic, tmp_path_factory):
    """A data root with the synthetic dataset under two names, a registry YAML with the second one and a
    mixture 'syn_pair' of both (3:1), and {name: statistics} (the second's action bounds doubled)."""
    from vla_train.data.registry import add_registry_files, reset_default_registry

    src, _ = small_synthetic
    root = tmp_path_factory.mktemp("mix")
    registry = synthetic_copies(
        src,
        root,
        [DATASET_NAME, SECOND],
        {SECOND: "identity"},
        {"syn_pair": [(DATASET_NAME, 3.0), (SECOND, 1.0)]},
    )
    add_registry_files([registry])
    stats = {
        DATASET_NAME: rlds.get_statistics(str(root), DATASET_NAME, str(root / "stats")),
        SECOND: rlds.get_statistics(str(root), SECOND, str(root / "stats")),
    }
    b = stats[SECOND]["action"]
    stats[SECOND] = {
        **stats[SECOND],
        "action": {**b, "q01": [2 * x for x in b["q01"]], "q99": [2 * x for x in b["q99"]]},
    }
    yield root, registry, stats
    reset_default_registry()


def spec(root, **kw):
    return frame_spec(root, **{"batch_size": 50, "datasets": [(DATASET_NAME, 0.75), (SECOND, 0.25)], **kw})


def test_balance_weights_and_thread_allocation_math():
    # weight x num_transitions, renormalized: 1*100 : 1*300 and 3*120 : 1*360
    np.testing.assert_allclose(balance_weights([1, 1], [100, 300]), [0.25, 0.75])
    np.testing.assert_allclose(balance_weights([3, 1], [120, 360]), [0.5, 0.5])
    np.testing.assert_allclose(balance_weights([2, 1, 1], [10, 10, 20]), [0.4, 0.2, 0.4])
    assert resolve_mixture([("a", 3), ("b", 1)]) == [("a", 0.75), ("b", 0.25)]
    assert resolve_mixture([("a", 1), ("b", 1)], True, {"a": 100, "b": 300}) == [("a", 0.25), ("b", 0.75)]
    with pytest.raises(ValueError):
        resolve_mixture([("a", 1), ("b", 1)], True, {"a": 100})

    assert allocate_threads(16, [0.75, 0.25]) == [12, 4]
    assert allocate_threads(10, [0.98, 0.01, 0.01]) == [8, 1, 1]  # the small ones still get one each
    for budget, weights in [(7, [1, 1, 1]), (5, [0.5, 0.3, 0.2]), (32, [5, 1, 0.1, 0.01]), (3, [1, 1, 1])]:
        got = allocate_threads(budget, weights)
        assert sum(got) == budget and min(got) >= 1
    assert allocate_threads(7, [1, 1, 1]) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ValueError):
        allocate_threads(1, [1, 1])


def test_normalize_batch_uses_each_frames_dataset_statistics(two_datasets):
    _, _, stats = two_datasets
    action = np.random.default_rng(0).uniform(-0.1, 0.1, size=(4, 7)).astype(np.float32)
    names = [DATASET_NAME, SECOND, SECOND, DATASET_NAME]
    got = normalize_batch(action, names, stats, "bounds_q99")
    for i, name in enumerate(names):
        s = stats[name]["action"]
        np.testing.assert_allclose(got[i], normalize(action[i : i + 1], s, "bounds_q99", s["mask"])[0])
    assert not np.allclose(got[0], normalize_batch(action[:1], [SECOND], stats, "bounds_q99")[0])
    # one dataset's statistics (the single-dataset form) still works
    single = normalize_batch(action, names, stats[DATASET_NAME], "bounds_q99")
    np.testing.assert_allclose(single[0], got[0])
    with pytest.raises(KeyError, match="nope"):
        normalize_batch(action[:1], ["nope"], stats, "bounds_q99")


def test_mixture_stream_follows_weights_and_normalizes_per_dataset(two_datasets):
    root, _, stats = two_datasets
    it = iter(FrameStream(spec(root), stats))
    batches = [next(it) for _ in range(8)]  # 400 frames
    names = [n for b in batches for n in b["dataset_name"]]
    share = names.count(DATASET_NAME) / len(names)
    assert set(names) == {DATASET_NAME, SECOND} and abs(share - 0.75) < 0.08
    for b in batches[:2]:
        for i, name in enumerate(b["dataset_name"]):
            s = stats[name]["action"]
            want = normalize(b["action_raw"][i : i + 1], s, "bounds_q99", s["mask"])[0]
            np.testing.assert_allclose(b["action"][i], want, rtol=1e-6)
    with pytest.raises(ValueError, match="statistics per dataset"):
        next(iter(FrameStream(spec(root), stats[DATASET_NAME])))


def test_balanced_mixture_and_eval_pass(two_datasets):
    root, _, stats = two_datasets
    # equal weights, but the second dataset claims 3x the transitions: 0.25 / 0.75
    skewed = {
        **stats,
        SECOND: {**stats[SECOND], "num_transitions": 3 * stats[DATASET_NAME]["num_transitions"]},
    }
    s = spec(root, datasets=[(DATASET_NAME, 1.0), (SECOND, 1.0)], balance_weights=True, num_parallel_calls=4)
    it = iter(FrameStream(s, skewed))
    names = [n for _ in range(8) for n in next(it)["dataset_name"]]
    assert abs(names.count(SECOND) / len(names) - 0.75) < 0.08
    # evaluation: one pass over both datasets' val episodes (6 episodes x 4 steps each)
    frames = [
        n for b in FrameStream(spec(root, train=False, batch_size=16), stats) for n in b["dataset_name"]
    ]
    assert frames.count(DATASET_NAME) == 24 and frames.count(SECOND) == 24


def test_stream_transforms_chunk_and_goal(two_datasets):
    root, _, stats = two_datasets
    s = spec(root, datasets=[], batch_size=16, future_action_window_size=2, goal_relabeling=True)
    b = next(iter(FrameStream(s, stats[DATASET_NAME])))
    assert b["action"].shape == (16, 3, 7) and b["action_pad_mask"].shape == (16, 3)
    assert b["goal_image"].shape == (16, 16, 16, 3)
    pad = ~b["action_pad_mask"]
    assert pad.any()  # 4-step episodes: the last steps' chunks run past the end
    # padded positions: normalized deltas are 0 (OpenVLA's neutral), the gripper is a raw 0/1
    np.testing.assert_array_equal(b["action"][pad][:, :6], 0.0)
    assert set(np.unique(b["action"][..., 6])) <= {0.0, 1.0}
    sub = spec(root, datasets=[], batch_size=16, subsample_length=2, max_action=1e6)
    assert next(iter(FrameStream(sub, stats[DATASET_NAME])))["action"].shape == (16, 7)


def test_data_config_mixture_fields(two_datasets):
    from vla_train.config import DataConfig

    root, registry, _ = two_datasets
    from vla_train.data.mixture import run_datasets

    ok = DataConfig(data_root_dir=str(root), mixture="syn_pair", registry_files=[str(registry)])
    assert ok.validate() == [] and run_datasets(ok) == ((DATASET_NAME, 3.0), (SECOND, 1.0))
    assert run_datasets(DataConfig(data_root_dir=str(root))) == ((DATASET_NAME, 1.0),)
    typo = DataConfig(data_root_dir=str(root), mixture="syn_pari", registry_files=[str(registry)])
    errs = typo.validate()
    assert any(e.startswith("data.mixture") and "syn_pair" in e for e in errs)
    bad = DataConfig(
        data_root_dir=str(root),
        future_action_window_size=-1,
        max_action=-1.0,
        subsample_length=-2,
        window_size=0,
    )
    fields = {e.split(":")[0] for e in bad.validate()}
    assert {
        "data.future_action_window_size",
        "data.max_action",
        "data.subsample_length",
        "data.window_size",
    } <= fields
    (root / "registry2.yaml").write_text(
        f"mixtures:\n  with_missing: [[{DATASET_NAME}, 1.0], [bridge_orig, 1.0]]\n"
    )
    missing = DataConfig(
        data_root_dir=str(root), mixture="with_missing", registry_files=[str(root / "registry2.yaml")]
    )
    assert any("bridge_orig" in e and e.startswith("data.mixture") for e in missing.validate())


def test_mixture_resume_on_two_ranks_across_an_epoch_boundary(two_datasets):
    """Each of 2 ranks reads its own shard of a 2-dataset mixture (augmentation on). A loader restored
    from the state after N batches yields exactly the batches the original yields next; N is past the
    point where the rank has read every frame of its shard of the smaller-weighted dataset (an epoch
    boundary), and the compared batches cross further boundaries."""
    root, _, stats = two_datasets

    def rank_spec(rank):
        return spec(root, batch_size=8, num_shards=2, shard_index=rank, image_augmentation=True)

    # train split: 24 episodes x 4 steps; a rank's shard holds 12 episodes = 48 frames per dataset
    shard_frames = 48
    seen_by_rank = []
    for rank in (0, 1):
        stream = FrameStream(rank_spec(rank), stats)
        it = iter(stream)
        head = [next(it) for _ in range(30)]
        state = stream.state_dict()
        tail = [next(it) for _ in range(12)]
        second = sum(n == SECOND for b in head for n in b["dataset_name"])
        assert second > shard_frames, "the resume point must lie past an epoch of the second dataset"
        first = sum(n == DATASET_NAME for b in head + tail for n in b["dataset_name"])
        assert first > 2 * shard_frames  # and the first dataset crosses two of its own
        restored = FrameStream(rank_spec(rank), stats)
        restored.load_state_dict(state)
        again = iter(restored)
        for want in tail:
            got = next(again)
            for key in ("image", "action", "action_raw", "proprio"):
                np.testing.assert_array_equal(got[key], want[key])
            assert got["instruction"] == want["instruction"]
            assert got["dataset_name"] == want["dataset_name"]
            assert got["episode_id"] == want["episode_id"]
        assert restored.state_dict() == stream.state_dict()
        seen_by_rank.append({e for b in head + tail for e in b["episode_id"]})
    # disjoint shards: no episode is read by both ranks
    assert seen_by_rank[0] and seen_by_rank[1] and not seen_by_rank[0] & seen_by_rank[1]


def test_cameras_absent_from_a_dataset_are_black_and_masked(two_datasets, tmp_path):
    """A mixture where one dataset has a wrist camera (the same stored image, registered as wrist too)
    and the other has none: batches carry image_wrist and image_wrist_mask; the missing camera is a
    black frame with mask False, the present one equals the primary image's pipeline output."""
    from vla_train.data.registry import add_registry_files

    root, _, stats = two_datasets
    extra = tmp_path / "wrist.yaml"
    extra.write_text(registry_yaml({"syn_wrist": "identity"}, wrist=True))
    add_registry_files([extra])
    shutil.copytree(root / SECOND, root / "syn_wrist", dirs_exist_ok=True)
    all_stats = {**stats, "syn_wrist": stats[SECOND]}
    s = spec(root, datasets=[(DATASET_NAME, 0.5), ("syn_wrist", 0.5)], cameras=["primary", "wrist"])
    batch = next(iter(FrameStream(s, all_stats)))
    assert batch["image_wrist"].shape == batch["image"].shape
    mask = batch["image_wrist_mask"]
    names = np.array(batch["dataset_name"])
    np.testing.assert_array_equal(mask, names == "syn_wrist")
    assert 0 < mask.sum() < len(mask)
    assert not batch["image_wrist"][~mask].any()
    np.testing.assert_array_equal(batch["image_wrist"][mask], batch["image"][mask])


def test_memory_plan_sizes_shuffle_buffer_and_prefetch():
    from vla_train.data.pipeline import memory_plan

    def s(ram_budget_gb):
        return frame_spec(
            "/nowhere",
            image_size=224,
            batch_size=32,
            shuffle_buffer_size=100_000,
            ram_budget_gb=ram_budget_gb,
        )

    assert memory_plan(s(0.0), 20_000)["shuffle_buffer_size"] == 100_000  # no budget: as configured
    plan = memory_plan(s(1.0), 20_000)
    # 70% of 1 GiB over 3 blocks in memory x 1.5 x 20 kB per encoded frame
    assert plan["shuffle_buffer_size"] == int(0.7 * 1024**3 / (3 * 30_000))
    assert plan["autotune_ram_bytes"] == int(0.2 * 1024**3)
    assert 1 <= plan["prefetch"] <= 4
    assert memory_plan(s(64.0), 20_000)["shuffle_buffer_size"] == 100_000  # the budget only caps it

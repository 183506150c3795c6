"""Read shards and bounded resume in the frame stream: each read shard reads only its own files (before
anything is parsed) of every dataset of a mixture, and a resumed stream reaches its position by seeking,
reading at most about one shuffle block, whatever the position."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from vla_test_utils import frame_spec, multi_file_mixture
from vla_train.data import rlds
from vla_train.data.stream import FrameStream, ShardedStream
from vla_train.data.synthetic import DATASET_NAME

SECOND = "syn_files_b"


@pytest.fixture(scope="module")
def multi_file(tmp_path_factory):
    """A 2-dataset mixture of 4-file datasets and a 1-file dataset (vla_test_utils.multi_file_mixture),
    registered, and {name: statistics}."""
    from vla_train.data.registry import add_registry_files, reset_default_registry

    root = tmp_path_factory.mktemp("files")
    add_registry_files([multi_file_mixture(root, tmp_path_factory.mktemp("builds"))])
    names = [DATASET_NAME, SECOND, "syn_one_file"]
    stats = {n: rlds.get_statistics(str(root), n, str(root / "stats")) for n in names}
    yield root, stats
    reset_default_registry()


def _spec(root, **kw):
    base = {"datasets": [(DATASET_NAME, 0.5), (SECOND, 0.5)], "shuffle_buffer_size": 16, "ram_budget_gb": 0.0}
    base["num_parallel_calls"] = 1
    return frame_spec(root, **{**base, **kw})


def _consume(stream, batches: int) -> set[tuple[str, str]]:
    """The (dataset, episode id) of every frame of the stream's first `batches` batches."""
    it = iter(stream)
    return {
        pair
        for _ in range(batches)
        for pair in zip(*(lambda b: (b["dataset_name"], b["episode_id"]))(next(it)))
    }


def test_two_read_shards_read_disjoint_files_and_half_the_records(multi_file):
    """Two read shards of a 2-dataset mixture (4 files each) read disjoint files, 2 per dataset, and each
    reads about half the records a single stream reads for the same global batches."""
    root, stats = multi_file
    whole = FrameStream(_spec(root, batch_size=16), stats)
    seen_whole = _consume(whole, 200)
    shards = [FrameStream(_spec(root, batch_size=8, num_shards=2, shard_index=s), stats) for s in (0, 1)]
    seen = [_consume(s, 200) for s in shards]
    assert not seen[0] & seen[1]
    files = [{(d, e.split("__")[0]) for d, e in ids} for ids in seen]
    assert not files[0] & files[1] and len(files[0]) == len(files[1]) == 2 * 2  # 2 of 4 files per dataset
    for shard in shards:
        fraction = shard.records_read() / whole.records_read()
        print(f"shard records read: {shard.records_read()} of {whole.records_read()} ({fraction:.3f})")
        assert fraction <= 0.55
    assert {(d, e.split("__")[0]) for d, e in seen_whole} == files[0] | files[1]


def test_fewer_files_than_shards_fall_back_to_episode_sharding(multi_file, caplog):
    root, stats = multi_file
    caplog.set_level(logging.INFO, logger="vla_train.data.rlds")
    spec = {"datasets": [("syn_one_file", 1.0)], "batch_size": 4}
    seen = [
        _consume(FrameStream(_spec(root, num_shards=2, shard_index=s, **spec), stats), 12) for s in (0, 1)
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert "1 file(s) for 2 read shards" in caplog.text


def test_one_process_reading_two_shards_yields_what_two_processes_yield_together(multi_file):
    root, stats = multi_file
    specs = [_spec(root, batch_size=4, num_shards=2, shard_index=s, image_augmentation=True) for s in (0, 1)]
    joined = iter(ShardedStream(specs, stats))
    apart = [iter(FrameStream(s, stats)) for s in specs]
    for _ in range(5):
        batch, parts = next(joined), [next(it) for it in apart]
        assert batch["episode_id"] == parts[0]["episode_id"] + parts[1]["episode_id"]
        np.testing.assert_array_equal(batch["image"], np.concatenate([p["image"] for p in parts]))


def _first_batch_after(spec, stats, position: int) -> tuple[float, list, dict]:
    """(seconds from building a stream restored at `position` batches to its first batch, the next 3
    batches of the uninterrupted stream, those of the restored one)."""
    stream = FrameStream(spec, stats)
    it = iter(stream)
    for _ in range(position):
        next(it)
    state = stream.state_dict()
    expected = [next(it) for _ in range(3)]
    times = []
    for _ in range(2):  # the faster of two restores: the machine's noise, not the design, varies
        start = time.perf_counter()
        restored = FrameStream(spec, stats)
        restored.load_state_dict(state)
        again = iter(restored)
        got = [next(again)]
        times.append(time.perf_counter() - start)
    got += [next(again) for _ in range(2)]
    return min(times), expected, got


@pytest.mark.slow
@pytest.mark.exclusive  # a time bound: run alone (make test)
def test_resume_takes_the_same_time_after_200_and_after_2000_batches(small_synthetic):
    """The data section of the reference tiny recipe (chunks, augmentation, 64-frame shuffle blocks):
    restoring the position after 2000 batches costs no more than after 200 (the stream seeks to its
    block instead of replaying), and both continue with exactly the uninterrupted stream's batches."""
    root, _ = small_synthetic
    stats = rlds.get_statistics(str(root), DATASET_NAME)
    spec = frame_spec(
        root,
        image_size=32,
        shuffle_buffer_size=64,
        num_parallel_calls=1,
        image_augmentation=True,
        future_action_window_size=1,
    )
    seconds = {}
    for position in (200, 2000):
        seconds[position], expected, got = _first_batch_after(spec, stats, position)
        for want, have in zip(expected, got, strict=True):
            assert have["episode_id"] == want["episode_id"]
            for key in ("image", "action", "action_pad_mask"):
                np.testing.assert_array_equal(have[key], want[key])
    ratio = seconds[2000] / seconds[200]
    print(
        f"first batch after resume: {seconds[200]:.2f} s at 200 batches, {seconds[2000]:.2f} s at 2000 ({ratio:.2f})"
    )
    assert ratio < 1.5

"""Bad input, case by case: each either raises a DatasetError naming the dataset (and the episode, key or
file), or, where the config says skip, is dropped and counted. The bad datasets are written by real tfds
builders (the synthetic builder with a hook that spoils one episode) or are copies of a good one with a
spoiled registry entry, dataset_info.json or TFRecord file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vla_test_utils import frame_spec, synthetic_copies
from vla_train.config import DataConfig, SyntheticDataConfig
from vla_train.data import rlds
from vla_train.data.errors import DatasetError, diagnose_read_error
from vla_train.data.stream import FrameStream
from vla_train.data.synthetic import DATASET_NAME

REGISTERED = {  # registry entries (vla_test_utils.registry_yaml)
    "bad_no_dir": "identity",
    "bad_missing_key": {"standardize_fn": "identity", "state": "joint_state"},  # episodes: 'state'
    "bad_action_dim": {"standardize_fn": "identity", "action_dim": 8},  # the episodes have 7
    "bad_layout": "rt1",  # rt1 reads dict actions and an observation instruction
    "bad_empty": "identity",
    "bad_nan": "identity",
    "bad_jpeg": "identity",
    "bad_tfrecord": "identity",
}
TFDS_ID = r"-(train|val)\.tfrecord-\d{5}-of-\d{5}__\d+"


def _spoiled_builder(name: str, spoil):
    """The synthetic tfds builder under another name, with spoil(split, index, episode) applied to each
    episode it writes (images already JPEG bytes)."""
    from vla_train.data.synthetic import _builder_class

    base = _builder_class()

    class Spoiled(base, skip_registration=True):
        def _split_generators(self, dl_manager):
            cfg = self._synthetic
            return {
                "train": self._spoil("train", cfg.num_train_episodes, cfg.seed * 2 + 1),
                "val": self._spoil("val", cfg.num_val_episodes, cfg.seed * 2 + 2),
            }

        def _spoil(self, split, num_episodes, seed):
            for i, (key, episode) in enumerate(self._generate_examples(num_episodes, seed)):
                spoil(split, i, episode)
                yield key, episode

    Spoiled.name = name
    return Spoiled


def _build(root: Path, name: str, spoil) -> None:
    import tensorflow_datasets as tfds

    cfg = SyntheticDataConfig(num_train_episodes=4, num_val_episodes=3, steps_per_episode=3, image_size=32)
    builder = _spoiled_builder(name, spoil)(synthetic=cfg, data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, verify_ssl=False)
    )


def _nan_action(split, i, episode):
    if split == "train" and i == 1:
        episode["steps"][1]["action"] = np.full_like(episode["steps"][1]["action"], np.nan)


def _truncated_jpeg(split, i, episode):
    if split == "val" and i == 0:
        image = episode["steps"][1]["observation"]["image"]
        episode["steps"][1]["observation"]["image"] = image[: len(image) // 2]  # no FFD9 end marker


def _episode_ids(root: Path, name: str, bad) -> list[str]:
    """tfds ids of the stored episodes for which bad(steps) holds."""
    import tensorflow_datasets as tfds

    builder = rlds.open_builder(root, name)
    ds = builder.as_dataset(
        split="all",
        decoders={"steps": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    ds = ds.map(lambda e: {"id": e["tfds_id"], "steps": e["steps"]})
    return [e["id"].decode() for e in ds.as_numpy_iterator() if bad(e["steps"])]


@pytest.fixture(scope="module")
def bad(small_synthetic, tmp_path_factory):
    """A data root with one bad dataset per case (registered in a registry YAML), the ids of the spoiled
    episodes, and statistics of the good dataset (for streams that never get as far as normalizing)."""
    from vla_train.data.registry import add_registry_files, reset_default_registry

    src, _ = small_synthetic
    root = tmp_path_factory.mktemp("bad")
    copies = [DATASET_NAME, "bad_missing_key", "bad_action_dim", "bad_layout", "bad_empty", "bad_tfrecord"]
    copies.append("bad_unregistered")  # a dataset on disk that no registry names
    add_registry_files([synthetic_copies(src, root, copies, REGISTERED)])

    # empty: the train split lists no shards (tfds itself refuses to write an empty split)
    version = next((root / "bad_empty").iterdir())
    info = json.loads((version / "dataset_info.json").read_text())
    for split in info["splits"]:
        if split["name"] == "train":
            split["shardLengths"], split["numBytes"] = [], "0"
    (version / "dataset_info.json").write_text(json.dumps(info))
    for f in version.glob("*-train.tfrecord-*"):
        f.unlink()

    # corrupt TFRecord: 16 flipped bytes in the middle of the train file (record CRCs no longer match)
    corrupt = next(next((root / "bad_tfrecord").iterdir()).glob("*-train.tfrecord-*"))
    data = bytearray(corrupt.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    _build(root, "bad_nan", _nan_action)
    _build(root, "bad_jpeg", _truncated_jpeg)
    ids = {
        "nan": _episode_ids(root, "bad_nan", lambda s: not np.isfinite(s["action"]).all()),
        "jpeg": _episode_ids(
            root, "bad_jpeg", lambda s: any(not b.endswith(b"\xff\xd9") for b in s["observation"]["image"])
        ),
        "corrupt_file": corrupt.name,
    }
    assert len(ids["nan"]) == 1 and len(ids["jpeg"]) == 1
    stats = rlds.get_statistics(str(root), DATASET_NAME, str(root / "stats"))
    yield root, ids, stats
    reset_default_registry()


def _spec(root, name, **kw):
    return frame_spec(root, dataset_name=name, **kw)


def stream_error(spec, stats, batches: int = 30) -> DatasetError:
    """The DatasetError a FrameStream raises within `batches` batches (FrameStream converts the
    TensorFlow error of a failed check with errors.diagnose_read_error)."""
    with pytest.raises(DatasetError) as info:
        for _, _batch in zip(range(batches), FrameStream(spec, stats), strict=False):
            pass
    return info.value


def statistics_error(root, name, **kw) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        rlds.get_statistics(str(root), name, str(root / "stats"), **kw)
    return info.value


# Each case: (id, how to provoke it, what the message must contain: literal strings, or regexes as re.Pattern)
def _cases():
    return [
        (
            "missing_dir",
            lambda r, ids, st: stream_error(_spec(r, "bad_no_dir"), st),
            ["'bad_no_dir'", "does not exist"],
        ),
        (
            "missing_dir_statistics",
            lambda r, ids, st: statistics_error(r, "bad_no_dir"),
            ["'bad_no_dir'", "data_root_dir"],
        ),
        (
            "unknown_dataset",
            lambda r, ids, st: stream_error(_spec(r, "bad_unregistered"), st),
            ["unknown dataset 'bad_unregistered'", "registry_files"],
        ),
        (
            "unknown_dataset_spec",
            lambda r, ids, st: _raises(rlds.dataset_spec, "bad_nan_robot"),
            ["unknown dataset 'bad_nan_robot'", "close matches", "bad_nan"],
        ),
        (
            "missing_key",
            lambda r, ids, st: stream_error(_spec(r, "bad_missing_key"), st),
            ["dataset 'bad_missing_key'", "['joint_state']", "available: ['image', 'state']"],
        ),
        (
            "missing_key_statistics",
            lambda r, ids, st: statistics_error(r, "bad_missing_key"),
            ["dataset 'bad_missing_key'", "joint_state", "'state'"],
        ),
        (
            "wrong_action_dim",
            lambda r, ids, st: stream_error(_spec(r, "bad_action_dim"), st),
            ["dataset 'bad_action_dim'", "key 'action'", "7-dim", "action_dim 8", "every episode"],
        ),
        (
            "wrong_action_dim_statistics",
            lambda r, ids, st: statistics_error(r, "bad_action_dim"),
            ["dataset 'bad_action_dim'", "key 'action'", "action_dim 8"],
        ),
        (
            "standardize_fn_for_another_layout",
            lambda r, ids, st: stream_error(_spec(r, "bad_layout"), st),
            ["dataset 'bad_layout'", "standardize_fn 'rt1'", "steps/observation has ['image', 'state']"],
        ),
        (
            "empty_split",
            lambda r, ids, st: stream_error(_spec(r, "bad_empty"), st),
            ["dataset 'bad_empty'", "split 'train'", "no episodes"],
        ),
        (
            "every_episode_filtered",
            lambda r, ids, st: stream_error(_spec(r, DATASET_NAME, max_action=1e-9), st),
            [f"dataset '{DATASET_NAME}'", "dropped all 24 episodes of split 'train'", "max_action=24"],
        ),
        (
            "nan_action_statistics",
            lambda r, ids, st: statistics_error(r, "bad_nan"),
            ["dataset 'bad_nan'", "episode '{nan}'", "'action'", "on_bad_data=skip"],
        ),
        (
            "nan_action_stream",
            lambda r, ids, st: stream_error(_spec(r, "bad_nan"), st),
            ["dataset 'bad_nan'", "episode '{nan}'", "'action'", "on_bad_data=skip"],
        ),
        (
            "corrupt_tfrecord_statistics",
            lambda r, ids, st: statistics_error(r, "bad_tfrecord"),
            ["dataset 'bad_tfrecord'", "{corrupt_file}", "corrupt", "re-download"],
        ),
        (
            "corrupt_tfrecord_stream",
            lambda r, ids, st: stream_error(_spec(r, "bad_tfrecord"), st),
            ["dataset 'bad_tfrecord'", "{corrupt_file}", "corrupt", "re-download"],
        ),
    ]


def _raises(fn, *args) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_raises_a_dataset_error_naming_it(bad, case):
    root, ids, stats = bad
    _, provoke, wanted = case
    error = provoke(root, ids, stats)
    assert issubclass(DatasetError, ValueError)  # callers catching ValueError see it too
    message = str(error)
    for w in wanted:
        w = w.format(nan=ids["nan"][0], corrupt_file=ids["corrupt_file"])
        assert w in message, f"{w!r} not in {message!r}"


def test_config_names_unknown_dataset_and_mixture(bad):
    root, _, _ = bad
    problems = DataConfig(data_root_dir=str(root), dataset_name="bad_nan_robot").validate()
    assert any("data.dataset_name" in p and "'bad_nan_robot'" in p for p in problems), problems
    problems = DataConfig(data_root_dir=str(root), mixture="bad_mixx").validate()
    assert any("data.mixture" in p and "'bad_mixx'" in p for p in problems), problems
    problems = DataConfig(data_root_dir=str(root), dataset_name="bad_no_dir").validate()
    assert any("data.dataset_name" in p and "'bad_no_dir'" in p for p in problems), problems
    problems = DataConfig(data_root_dir=str(root / "nowhere"), dataset_name=DATASET_NAME).validate()
    assert any("data.data_root_dir" in p and "nowhere" in p for p in problems), problems


def test_nan_actions_skipped_and_counted(bad):
    """on_bad_data=skip: the episode is left out of the statistics (counted there) and of the stream
    (counted by the episode filter, whose counts the trainer logs); no NaN reaches a batch."""
    root, ids, _ = bad
    stats = rlds.get_statistics(str(root), "bad_nan", str(root / "stats"), on_bad_data="skip")
    assert stats["num_trajectories"] == 4 + 3 - 1 and stats[rlds.SKIPPED_KEY] == 1
    assert np.isfinite(stats["action"]["mean"]).all()
    # raise mode does not trust a cache that left episodes out: it recomputes and names the episode
    assert f"episode '{ids['nan'][0]}'" in str(statistics_error(root, "bad_nan"))

    stream = FrameStream(_spec(root, "bad_nan", on_bad_data="skip"), stats)
    for _, batch in zip(range(6), stream, strict=False):  # 48 frames: passes over the 3 good episodes
        assert np.isfinite(batch["action_raw"]).all() and ids["nan"][0] not in batch["episode_id"]
    counts = stream.drop_counts()
    assert counts["non_finite"] >= 1 and counts["no_instruction"] == 0, counts


def test_episode_filter_names_non_finite_proprio():
    import tensorflow as tf

    from vla_train.data.transforms import EpisodeFilter

    def episode(proprio_value):
        T = 3
        return {
            "observation": {"proprio": tf.fill([T, 2], proprio_value), "image_primary": tf.fill([T], "x")},
            "task": {"language_instruction": tf.fill([T], "pick")},
            "action": tf.zeros([T, 7]),
            "dataset_name": tf.fill([T], "robot_x"),
            "episode_id": tf.fill([T], "robot_x-train.tfrecord-00003-of-00010__17"),
        }

    ds = tf.data.Dataset.from_tensors(episode(0.0)).concatenate(tf.data.Dataset.from_tensors(episode(np.inf)))
    skip = EpisodeFilter(on_bad_data="skip")
    assert len(list(ds.filter(skip).as_numpy_iterator())) == 1 and skip.counts()["non_finite"] == 1
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        list(ds.filter(EpisodeFilter(on_bad_data="raise")).as_numpy_iterator())
    error = diagnose_read_error("/nowhere", ["robot_x"], info.value)
    assert str(error) == (
        "dataset 'robot_x': episode 'robot_x-train.tfrecord-00003-of-00010__17' has NaN or inf values in "
        "'observation/proprio'; fix the data, or set data.on_bad_data=skip to drop and count such episodes"
    )
    assert EpisodeFilter().counts() == {"no_instruction": 0, "max_action": 0, "max_proprio": 0}


def test_diagnose_leaves_other_errors_alone():
    import tensorflow as tf

    assert (
        diagnose_read_error("/nowhere", "x", tf.errors.InvalidArgumentError(None, None, "shape mismatch"))
        is None
    )
    assert diagnose_read_error("/nowhere", "x", RuntimeError("boom")) is None


def test_frames_carry_their_episode_id_through_the_transforms(bad):
    """Every frame names its episode (tfds id: file and record), with chunking, history, subsampling and
    goal relabeling on."""
    from vla_train.data.pipeline import _dataset_frames

    root, _, _ = bad
    spec = _spec(
        root,
        DATASET_NAME,
        future_action_window_size=2,
        window_size=2,
        subsample_length=2,
        goal_relabeling=True,
    )
    parts = {"filters": [], "readers": []}
    frames = list(_dataset_frames(spec, DATASET_NAME, 0, 1, (0, 0, 0, 0), parts).take(20).as_numpy_iterator())
    assert all(re.fullmatch(DATASET_NAME + TFDS_ID, f["episode_id"].decode()) for f in frames)
    assert frames[0]["action"].shape == (3, 7) and "image_primary" in frames[0]["task"]
    assert len({f["episode_id"] for f in frames}) > 1


def test_corrupt_jpeg_raises_naming_dataset_episode_and_key(bad):
    """A JPEG without its end-of-image marker (truncated) in one frame of one val episode."""

    root, ids, stats = bad
    spec = _spec(root, "bad_jpeg", train=False)
    with pytest.raises(DatasetError) as error:
        sum(len(b["instruction"]) for b in FrameStream(spec, stats))
    message = str(error.value)
    for w in ("bad_jpeg", ids["jpeg"][0], "image_primary"):
        assert w in message, f"{w!r} not in {message!r}"


def test_corrupt_jpeg_skipped_and_counted(bad):
    root, _, stats = bad
    stream = FrameStream(_spec(root, "bad_jpeg", train=False, on_bad_data="skip"), stats)
    frames = sum(len(b["instruction"]) for b in stream)
    assert frames == 3 * 3 - 1  # one pass over val: the frame with the truncated JPEG is dropped
    assert stream.drop_counts()["corrupt_image"] == 1

"""Reading RLDS datasets written by tfds: open a builder directory without network access, pick splits,
and restructure episodes into vla_train's trajectory layout with images still JPEG-encoded:

    {observation: {image_primary: string[T], proprio: float32[T, P]},
     task: {language_instruction: string[T]}, action: float32[T, A], dataset_name: string[T]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_train.data import tf_setup  # noqa: F401  (keeps TensorFlow off the GPU before it initializes)
from vla_train.data.normalize import (
    cache_key,
    default_action_mask,
    load_cached,
    save_cached,
    statistics_from_trajectories,
    stats_cache_path,
)

IMAGE_KEY, STATE_KEY = "image", "state"
STANDARDIZE_FN = "identity"  # issue-3 registry will name per-dataset functions


class DatasetError(ValueError):
    """A problem with a dataset on disk; the message names the dataset and what to do."""


def version_dir(data_root_dir: str | Path, dataset_name: str) -> Path:
    root = Path(data_root_dir) / dataset_name
    if not root.is_dir():
        raise DatasetError(
            f"dataset '{dataset_name}': directory {root} does not exist; check data.data_root_dir and "
            "data.dataset_name"
        )
    versions = sorted(
        (p for p in root.iterdir() if (p / "dataset_info.json").is_file()),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.name.split(".")],
    )
    if not versions:
        raise DatasetError(
            f"dataset '{dataset_name}': no <version>/dataset_info.json under {root}; is it a complete tfds build?"
        )
    return versions[-1]


def open_builder(data_root_dir: str | Path, dataset_name: str):
    import tensorflow_datasets as tfds

    # builder_from_directory reads the files without asking the network (tfds.builder would, for RT-X names).
    return tfds.builder_from_directory(str(version_dir(data_root_dir, dataset_name)))


def split_for(builder, train: bool) -> str:
    """`train` / `val` when the dataset has a val split, else the first 95% / last 5% of episodes."""
    if "val" in builder.info.splits:
        return "train" if train else "val"
    return "train[:95%]" if train else "train[95%:]"


def dataset_fingerprint(builder) -> dict[str, Any]:
    info = builder.info
    return {
        "name": info.name,
        "version": str(info.version),
        "splits": {k: [v.num_examples, v.num_bytes] for k, v in sorted(info.splits.items())},
        "features": str(info.features),
    }


def read_episodes(builder, split: str, *, shuffle_files: bool, seed: int, dataset_name: str):
    """tf.data of restructured trajectories (images left encoded)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    steps_feature = builder.info.features["steps"].feature
    for key, owner in ((IMAGE_KEY, "observation"), (STATE_KEY, "observation")):
        if key not in steps_feature[owner].keys():
            raise DatasetError(
                f"dataset '{dataset_name}': steps/{owner} has no '{key}' key (has {sorted(steps_feature[owner].keys())})"
            )
    ds = builder.as_dataset(
        split=split,
        decoders={"steps": tfds.decode.SkipDecoding()},
        shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False),
    )

    def restructure(episode):
        steps = episode["steps"]
        T = tf.shape(steps["action"])[0]
        return {
            "observation": {
                "image_primary": steps["observation"][IMAGE_KEY],
                "proprio": tf.cast(steps["observation"][STATE_KEY], tf.float32),
            },
            "task": {"language_instruction": steps["language_instruction"]},
            "action": tf.cast(steps["action"], tf.float32),
            "dataset_name": tf.fill([T], dataset_name),
        }

    return ds.map(restructure, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def numeric_trajectories(builder, dataset_name: str):
    """Numpy action/proprio of every episode of every split, without decoding a single image."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split="all", decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False)
    ds = ds.map(
        lambda ep: {"action": ep["steps"]["action"], "proprio": ep["steps"]["observation"][STATE_KEY]}
    )
    for traj in ds.as_numpy_iterator():
        if traj["action"].ndim != 2:
            raise DatasetError(f"dataset '{dataset_name}': steps/action must be [T, action_dim]")
        yield traj


def get_statistics(data_root_dir: str, dataset_name: str, cache_dir: str = "") -> dict[str, Any]:
    """Statistics of one dataset, from the cache when the data and standardization are unchanged."""
    builder = open_builder(data_root_dir, dataset_name)
    key = cache_key(dataset_fingerprint(builder), [STATE_KEY], STANDARDIZE_FN)
    cache_dir = cache_dir or str(Path(data_root_dir) / "vla_train_stats")
    path = stats_cache_path(cache_dir, dataset_name, key)
    stats = load_cached(path)
    if stats is None:
        action_dim = builder.info.features["steps"]["action"].shape[-1]
        try:
            stats = statistics_from_trajectories(
                numeric_trajectories(builder, dataset_name), default_action_mask(action_dim)
            )
        except ValueError as e:
            raise DatasetError(f"dataset '{dataset_name}': {e}") from None
        save_cached(path, stats)
    return stats


def collect_instructions(builder, split: str, limit: int = 100_000) -> list[str]:
    """Unique language instructions of a split (text only), to train a local tokenizer."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False)
    ds = ds.map(lambda ep: ep["steps"]["language_instruction"])
    seen: set[str] = set()
    for arr in ds.as_numpy_iterator():
        seen.update(s.decode() for s in np.unique(arr))
        if len(seen) >= limit:
            break
    seen.discard("")
    return sorted(seen)

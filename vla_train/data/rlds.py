"""Reading RLDS datasets written by tfds: open a builder directory without network access, pick splits,
apply the dataset's registered standardization (datasets_registry/), and restructure episodes into
vla_train's trajectory layout with images still JPEG-encoded:

    {observation: {image_primary: string[T], (image_secondary, image_wrist,) proprio: float32[T, P]},
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


def dataset_spec(dataset_name: str):
    """The registry entry of a dataset (built-in or from data.registry_files), or a DatasetError."""
    from vla_train.data.registry import UnknownNameError, get_dataset_spec

    try:
        return get_dataset_spec(dataset_name)
    except UnknownNameError as e:
        raise DatasetError(
            f"{e}. Register it in a YAML file (see datasets_registry/datasets.yaml) and pass it with "
            "data.registry_files"
        ) from None


def standardization_fingerprint(spec) -> str:
    """Changes when the standardization changes: its name, keys and the function's source code."""
    import hashlib
    import inspect

    from vla_train.data.registry import resolve_standardize_fn

    try:
        source = inspect.getsource(resolve_standardize_fn(spec.standardize_fn))
    except (OSError, TypeError):
        source = ""
    return f"{spec.standardize_fn}:{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def dataset_fingerprint(builder) -> dict[str, Any]:
    info = builder.info
    return {
        "name": info.name,
        "version": str(info.version),
        "splits": {k: [v.num_examples, v.num_bytes] for k, v in sorted(info.splits.items())},
        "features": str(info.features),
    }


def _standardized_steps(builder, split: str, *, shuffle_files: bool, seed: int, spec):
    import tensorflow_datasets as tfds

    from vla_train.data.standardize import make_standardizer

    ds = builder.as_dataset(
        split=split,
        decoders={"steps": tfds.decode.SkipDecoding()},
        shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False),
    )
    standardize = make_standardizer(spec)
    return ds.map(lambda episode: standardize(episode["steps"]))


def read_episodes(builder, split: str, *, shuffle_files: bool, seed: int, dataset_name: str):
    """tf.data of standardized, restructured trajectories (images left encoded)."""
    import tensorflow as tf

    from vla_train.data.standardize import proprio_from_state_keys

    spec = dataset_spec(dataset_name)
    if spec.image_obs_keys.get("primary") is None:
        raise DatasetError(
            f"dataset '{dataset_name}': the registry names no primary camera (image_obs_keys.primary)"
        )

    def restructure(traj):
        T = tf.shape(traj["action"])[0]
        obs = traj["observation"]
        observation = {
            f"image_{role}": obs[key] for role, key in spec.image_obs_keys.items() if key is not None
        }
        observation["proprio"] = proprio_from_state_keys(obs, spec.state_obs_keys)
        return {
            "observation": observation,
            "task": {"language_instruction": traj["language_instruction"]},
            "action": tf.cast(traj["action"], tf.float32),
            "dataset_name": tf.fill([T], dataset_name),
        }

    ds = _standardized_steps(builder, split, shuffle_files=shuffle_files, seed=seed, spec=spec)
    return ds.map(restructure, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def numeric_trajectories(builder, dataset_name: str):
    """Standardized action/proprio (numpy) of every episode of every split; images are never decoded."""
    from vla_train.data.standardize import proprio_from_state_keys

    spec = dataset_spec(dataset_name)
    ds = _standardized_steps(builder, "all", shuffle_files=False, seed=0, spec=spec)
    ds = ds.map(
        lambda t: {
            "action": t["action"],
            "proprio": proprio_from_state_keys(t["observation"], spec.state_obs_keys),
        }
    )
    yield from ds.as_numpy_iterator()


def get_statistics(data_root_dir: str, dataset_name: str, cache_dir: str = "") -> dict[str, Any]:
    """Statistics of one dataset, from the cache when the data and standardization are unchanged."""
    spec = dataset_spec(dataset_name)
    builder = open_builder(data_root_dir, dataset_name)
    key = cache_key(
        dataset_fingerprint(builder), list(map(str, spec.state_obs_keys)), standardization_fingerprint(spec)
    )
    cache_dir = cache_dir or str(Path(data_root_dir) / "vla_train_stats")
    path = stats_cache_path(cache_dir, dataset_name, key)
    stats = load_cached(path)
    if stats is None:
        mask = default_action_mask(spec.action_dim) if spec.has_gripper else [True] * spec.action_dim
        try:
            stats = statistics_from_trajectories(numeric_trajectories(builder, dataset_name), mask)
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

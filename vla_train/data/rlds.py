"""Reading RLDS datasets written by tfds: open a builder directory without network access, pick splits,
apply the dataset's registered standardization (datasets_registry/), and restructure episodes into
vla_train's trajectory layout with images still JPEG-encoded:

    {observation: {image_primary: string[T], (image_secondary, image_wrist,) proprio: float32[T, P]},
     task: {language_instruction: string[T]}, action: float32[T, A], dataset_name: string[T],
     episode_id: string[T]}

`episode_id` is tfds' id of the episode's record, "<name>-<split>.tfrecord-<shard>-of-<n>__<index>": it names
the file and the record, so every error about an episode can point at it.

Structural problems raise a `DatasetError` naming the dataset (and the split, key or file) before any data
flows: a missing directory, an unknown dataset or mixture name, a key the registry names that the stored
episodes lack, an action width other than the registry's `action_dim`, an empty split. Bad values (NaN/inf)
are handled by `on_bad_data` (raise or skip and count): in the statistics pass here, in the stream by
`transforms.EpisodeFilter`; see errors.py for the errors raised while a pipeline runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_train.data.errors import SKIP_HINT, DatasetError, non_finite_key, read_errors_named
from vla_train.data.normalize import (
    cache_key,
    default_action_mask,
    load_cached,
    save_cached,
    statistics_from_trajectories,
    stats_cache_path,
)
from vla_train.data.standardize import StandardizeError, make_standardizer, proprio_from_state_keys
from vla_train.data.tf_setup import tf, tfds


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


def split_size(builder, split: str, dataset_name: str) -> int:
    """Number of episodes in `split` (a tfds split or slice such as 'train[:95%]'); a missing or empty
    split raises a DatasetError naming the dataset and the split."""
    splits = builder.info.splits
    base = split.split("[", 1)[0]
    available = {k: v.num_examples for k, v in splits.items()}
    if base != "all" and base not in splits:
        raise DatasetError(
            f"dataset '{dataset_name}': no split '{base}' (the dataset has {available or 'no splits'}); "
            "is it a complete tfds build?"
        )
    if split == "all":
        n = sum(int(v.num_examples or 0) for v in splits.values())
    else:
        try:
            n = int(splits[split].num_examples or 0)
        except (ValueError, KeyError):  # tfds cannot slice a split without data
            n = 0
    if n <= 0:
        if "[" in split:
            fix = (
                "without a 'val' split evaluation reads the last 5% of 'train': give the dataset a 'val' "
                "split or more episodes"
            )
        else:
            fix = "re-download or rebuild the dataset"
        raise DatasetError(
            f"dataset '{dataset_name}': split '{split}' has no episodes (episodes per split: {available}); {fix}"
        )
    return n


def _features_keys(builder) -> str:
    """The stored step keys, for error messages: 'steps: [...]; steps/observation: [...]'."""
    try:
        steps = builder.info.features["steps"]
        obs = steps["observation"] if "observation" in steps.keys() else {}
        return (
            f"steps has {sorted(steps.keys())}; steps/observation has {sorted(getattr(obs, 'keys', dict)())}"
        )
    except Exception:  # noqa: BLE001 (only for a message)
        return "the stored keys could not be listed"


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
    """Standardized episodes {observation, action, language_instruction, episode_id (scalar)}. A key the
    standardization or the registry needs but the stored episodes lack, or an action width other than
    the registry's action_dim, raises a DatasetError here (at trace time, before any data flows)."""

    split_size(builder, split, spec.name)
    ds = builder.as_dataset(
        split=split,
        decoders={"steps": tfds.decode.SkipDecoding()},
        shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True),
    )
    standardize = make_standardizer(spec)

    @tf.autograph.experimental.do_not_convert  # keeps our exceptions' types at trace time
    def standardized(episode):
        traj = dict(standardize(episode["steps"]))
        traj["episode_id"] = episode["tfds_id"]
        return traj

    where = f"registry entry in {spec.source}" if spec.source else "registry entry"
    try:
        return ds.map(standardized)
    except StandardizeError as e:
        if "action_dim" in str(e):
            shape = _stored_action_shape(builder)
            raise DatasetError(
                f"{e}: key 'action' has the wrong dimension in every episode (stored steps/action: {shape}); "
                f"fix action_dim or standardize_fn in the {where}"
            ) from None
        raise DatasetError(f"{e}; fix the key names in the {where} or the standardize_fn") from None
    except KeyError as e:  # a standardize_fn indexing a key the episodes lack
        raise DatasetError(
            f"dataset '{spec.name}': the stored episodes have no key {e} that standardize_fn "
            f"'{spec.standardize_fn}' reads ({_features_keys(builder)}); fix the {where}"
        ) from None
    except TypeError as e:  # e.g. a standardize_fn for dict actions given a tensor: another layout
        raise DatasetError(
            f"dataset '{spec.name}': standardize_fn '{spec.standardize_fn}' does not fit the stored episodes "
            f"({type(e).__name__}: {e}; {_features_keys(builder)}); fix the {where}"
        ) from None


def _stored_action_shape(builder) -> str:
    try:
        return str(builder.info.features["steps"]["action"])
    except Exception:  # noqa: BLE001 (only for a message)
        return "unknown"


def read_episodes(
    builder,
    split: str,
    *,
    shuffle_files: bool,
    seed: int,
    dataset_name: str,
    cameras: tuple[str, ...] = ("primary",),
):
    """tf.data of standardized, restructured trajectories (images left encoded): image_<role> for each
    of `cameras`, empty strings for a camera the dataset does not have (so that every dataset of a
    mixture gives frames of the same structure)."""

    spec = dataset_spec(dataset_name)
    if spec.image_obs_keys.get("primary") is None:
        raise DatasetError(
            f"dataset '{dataset_name}': the registry names no primary camera (image_obs_keys.primary)"
        )

    def restructure(traj):
        T = tf.shape(traj["action"])[0]
        obs = traj["observation"]
        observation = {}
        for role in cameras:
            key = spec.image_obs_keys.get(role)
            observation[f"image_{role}"] = obs[key] if key is not None else tf.fill([T], "")
        observation["proprio"] = proprio_from_state_keys(obs, spec.state_obs_keys)
        return {
            "observation": observation,
            "task": {"language_instruction": traj["language_instruction"]},
            "action": tf.cast(traj["action"], tf.float32),
            "dataset_name": tf.fill([T], dataset_name),
            "episode_id": tf.fill([T], traj["episode_id"]),
        }

    ds = _standardized_steps(builder, split, shuffle_files=shuffle_files, seed=seed, spec=spec)
    return ds.map(restructure, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def numeric_trajectories(builder, dataset_name: str):
    """Standardized action/proprio (numpy) and episode_id (bytes) of every episode of every split; images
    are never decoded."""
    spec = dataset_spec(dataset_name)
    ds = _standardized_steps(builder, "all", shuffle_files=False, seed=0, spec=spec)
    ds = ds.map(
        lambda t: {
            "action": t["action"],
            "proprio": proprio_from_state_keys(t["observation"], spec.state_obs_keys),
            "episode_id": t["episode_id"],
        }
    )
    yield from ds.as_numpy_iterator()


def _finite_trajectories(trajectories, dataset_name: str, on_bad_data: str, skipped: list[str]):
    """Passes the episodes whose action and proprio are finite; an episode with NaN/inf raises a
    DatasetError naming it (on_bad_data=raise) or is left out and its id appended to `skipped`."""
    for traj in trajectories:
        key = non_finite_key(np.asarray(traj["action"]), np.asarray(traj["proprio"]))
        if key is None:
            yield traj
            continue
        episode = traj.get("episode_id", b"?")
        episode = episode.decode() if isinstance(episode, bytes) else str(episode)
        if on_bad_data != "skip":
            raise DatasetError(
                f"dataset '{dataset_name}': episode '{episode}' has NaN or inf values in '{key}' (found while "
                f"computing statistics); fix the data, or {SKIP_HINT}"
            )
        skipped.append(episode)


SKIPPED_KEY = "num_trajectories_skipped_non_finite"


def get_statistics(
    data_root_dir: str, dataset_name: str, cache_dir: str = "", on_bad_data: str = "raise"
) -> dict[str, Any]:
    """Statistics of one dataset, from the cache when the data and standardization are unchanged.

    Episodes with NaN/inf action or proprio never reach the statistics: on_bad_data=raise raises a
    DatasetError naming the dataset, the episode and the key; skip leaves them out, logs a warning and
    records their number under `num_trajectories_skipped_non_finite` (present only when > 0). A cached
    result that left episodes out is recomputed under raise, so that the error names the episode. A corrupt
    TFRecord file raises a DatasetError naming the file (errors.diagnose_read_error).
    """
    import logging

    spec = dataset_spec(dataset_name)
    builder = open_builder(data_root_dir, dataset_name)
    key = cache_key(
        dataset_fingerprint(builder), list(map(str, spec.state_obs_keys)), standardization_fingerprint(spec)
    )
    cache_dir = cache_dir or str(Path(data_root_dir) / "vla_train_stats")
    path = stats_cache_path(cache_dir, dataset_name, key)
    stats = load_cached(path)
    if stats is not None and stats.get(SKIPPED_KEY) and on_bad_data != "skip":
        stats = None
    if stats is None:
        mask = default_action_mask(spec.action_dim) if spec.has_gripper else [True] * spec.action_dim
        skipped: list[str] = []
        trajectories = _finite_trajectories(
            numeric_trajectories(builder, dataset_name), dataset_name, on_bad_data, skipped
        )
        try:
            with read_errors_named(data_root_dir, dataset_name):
                stats = statistics_from_trajectories(trajectories, mask)
        except DatasetError:
            raise
        except ValueError as e:
            what = f" ({len(skipped)} episodes with NaN/inf values were skipped)" if skipped else ""
            raise DatasetError(f"dataset '{dataset_name}': {e}{what}") from None
        if skipped:
            stats[SKIPPED_KEY] = len(skipped)
            logging.getLogger(__name__).warning(
                "dataset '%s': %d episode(s) with NaN/inf action or proprio left out of the statistics "
                "(on_bad_data=skip), e.g. %s",
                dataset_name,
                len(skipped),
                skipped[:3],
            )
        save_cached(path, stats)
    return stats


def collect_instructions(builder, split: str, limit: int = 100_000) -> list[str]:
    """Unique language instructions of a split (text only), to train a local tokenizer."""

    ds = builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False)
    ds = ds.map(lambda ep: ep["steps"]["language_instruction"])
    seen: set[str] = set()
    directory = Path(builder.data_dir)  # <root>/<dataset>/<version>
    with read_errors_named(directory.parent.parent, directory.parent.name):
        for arr in ds.as_numpy_iterator():
            seen.update(s.decode() for s in np.unique(arr))
            if len(seen) >= limit:
                break
    seen.discard("")
    return sorted(seen)

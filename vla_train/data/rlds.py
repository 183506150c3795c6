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

from dataclasses import dataclass
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


def _sources(fn, seen: set | None = None) -> list[str]:
    """The source of fn and of every function of its own module it calls, directly or through others
    (the helpers a standardization is made of)."""
    import inspect

    seen = set() if seen is None else seen
    if fn in seen:
        return []
    seen.add(fn)
    try:
        out = [inspect.getsource(fn)]
    except (OSError, TypeError):
        return []
    module = getattr(fn, "__module__", None)
    for name in getattr(getattr(fn, "__code__", None), "co_names", ()):
        helper = getattr(fn, "__globals__", {}).get(name)
        if inspect.isfunction(helper) and helper.__module__ == module:
            out += _sources(helper, seen)
    return out


def standardization_fingerprint(spec) -> str:
    """Changes when the standardization changes: its name and the source code of the function and of
    every helper of its module it calls."""
    import hashlib

    from vla_train.data.registry import resolve_standardize_fn

    source = "\n".join(_sources(resolve_standardize_fn(spec.standardize_fn)))
    return f"{spec.standardize_fn}:{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def dataset_fingerprint(builder) -> dict[str, Any]:
    info = builder.info
    return {
        "name": info.name,
        "version": str(info.version),
        "splits": {k: [v.num_examples, v.num_bytes] for k, v in sorted(info.splits.items())},
        "features": str(info.features),
    }


def _standardized(ds, builder, spec):
    """Episodes {steps, tfds_id, ...} -> standardized episodes {observation, action, language_instruction,
    episode_id (scalar), ...}. A key the standardization or the registry needs but the stored episodes
    lack, or an action width other than the registry's action_dim, raises a DatasetError here (at trace
    time, before any data flows)."""
    standardize = make_standardizer(spec)
    extra = [k for k in ("episode_position", "episode_key") if k in ds.element_spec]

    @tf.autograph.experimental.do_not_convert  # keeps our exceptions' types at trace time
    def standardized(episode):
        traj = dict(standardize(episode["steps"]))
        traj["episode_id"] = episode["tfds_id"]
        traj.update({k: episode[k] for k in extra})  # the reader's position of the episode
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


def _all_episodes(builder, split: str, spec):
    """Standardized episodes of a split in stored order, through tfds (the statistics pass)."""
    split_size(builder, split, spec.name)
    ds = builder.as_dataset(
        split=split,
        decoders={"steps": tfds.decode.SkipDecoding()},
        shuffle_files=False,
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    return _standardized(ds, builder, spec)


def _stored_action_shape(builder) -> str:
    try:
        return str(builder.info.features["steps"]["action"])
    except Exception:  # noqa: BLE001 (only for a message)
        return "unknown"


@dataclass(frozen=True)
class EpisodeOrder:
    """Which episodes of a split a stream reads, in which order, from where.

    Training: every epoch visits this read shard's files in a fresh order (seeded by the run seed, the
    dataset and the epoch), each file's records in stored order, forever. Evaluation: one pass over all
    files in stored order. Sharding happens before anything is read: read shard s of V takes the files
    f with f % V == s; a split with fewer files than shards is read whole by every shard, which keeps the
    records whose position in the epoch is s modulo V (episode-level sharding; it costs V x the reads).
    `start` (epoch, file position in that epoch's order, record in that file) is where reading begins,
    which a resumed stream reaches by seeking in the files, not by reading what comes before.
    """

    train: bool
    seed: int
    dataset_index: int = 0  # the dataset's place in the stream's mixture (its own file orders)
    num_shards: int = 1
    shard_index: int = 0
    start: tuple[int, int, int] = (0, 0, 0)


class RecordCounter:
    """Counts the episode records a reader reads from its files (before episode-level sharding drops
    any), in a tf.Variable updated as the pipeline runs."""

    def __init__(self) -> None:
        self._read = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, record):
        with tf.control_dependencies([self._read.assign_add(1)]):
            return tf.nest.map_structure(tf.identity, record)

    def counts(self) -> dict[str, int]:
        return {"records_read": int(self._read.numpy())}


_TFRECORD_BUFFER = 8 << 20  # bytes of read-ahead per file: sequential reads of large episode records


def _split_files(builder, split: str, dataset_name: str) -> list:
    """tfds' file instructions of a split (file, first record, records to read), files with none left out;
    only TFRecord files can be read by position."""
    fmt = str(getattr(builder.info, "file_format", "tfrecord") or "tfrecord").lower()
    if "tfrecord" not in fmt:
        raise DatasetError(
            f"dataset '{dataset_name}': its records are stored as {fmt}; the reader reads TFRecord files "
            "(rebuild the dataset with file_format tfrecord)"
        )
    return [i for i in builder.info.splits[split].file_instructions if i.take > 0]


def _shard_files(takes: list[int], shards: int, shard: int) -> tuple[list[int], bool, int]:
    """(the files read shard `shard` of `shards` reads, whether it reads them whole (file-level sharding)
    or keeps every shards-th episode of all files (fewer files than shards), its episodes per epoch)."""
    if shards > 1 and len(takes) >= shards:
        mine = [f for f in range(len(takes)) if f % shards == shard]
        return mine, True, sum(takes[f] for f in mine)
    total = sum(takes)
    return list(range(len(takes))), shards == 1, len(range(shard, total, shards))


def shard_episodes(builder, split: str, dataset_name: str, shards: int = 1, shard: int = 0) -> int:
    """Episodes per epoch of read shard `shard` of `shards` of a split (see EpisodeOrder)."""
    takes = [i.take for i in _split_files(builder, split, dataset_name)]
    return _shard_files(takes, shards, shard)[2]


def _episode_records(builder, split: str, order: EpisodeOrder, dataset_name: str, counter: RecordCounter):
    """tf.data of {serialized, tfds_id, episode_position [epoch, file position, record], episode_key}: the
    raw episode records `order` asks for, read by position (see EpisodeOrder)."""
    import logging

    instructions = _split_files(builder, split, dataset_name)
    num_files, shards, shard = len(instructions), order.num_shards, order.shard_index
    takes_all = [i.take for i in instructions]
    mine, by_file, episodes = _shard_files(takes_all, shards, shard)
    by_file = by_file and shards > 1
    if order.train and episodes == 0:
        raise DatasetError(
            f"dataset '{dataset_name}': split '{split}' has fewer episodes than the {shards} read shards, so "
            f"shard {shard} would read nothing; use fewer ranks or data.read_shards"
        )
    if shards > 1 and not by_file:
        logging.getLogger(__name__).info(
            "dataset '%s': %d file(s) for %d read shards: every shard reads all files and keeps every %d-th "
            "episode", dataset_name, num_files, shards, shards,
        )  # fmt: skip
    paths = tf.constant([i.filename for i in instructions])
    prefixes = tf.constant([Path(i.filename).name for i in instructions])
    skips = tf.constant([i.skip for i in instructions], tf.int64)
    takes = tf.constant(takes_all, tf.int64)
    mine_t = tf.constant(mine, tf.int64)
    e0, p0, r0 = (int(x) for x in order.start) if order.train else (0, 0, 0)
    file_seed = order.seed * 1000 + order.dataset_index

    def epoch_files(epoch):
        files = (
            tf.random.experimental.stateless_shuffle(mine_t, seed=[file_seed, epoch])
            if order.train
            else mine_t
        )
        first = tf.where(tf.equal(epoch, e0), tf.constant(p0, tf.int64), tf.constant(0, tf.int64))
        positions = tf.range(first, tf.size(files, out_type=tf.int64))
        offsets = tf.cumsum(tf.gather(takes, files), exclusive=True)  # the file's first episode in the epoch
        return tf.data.Dataset.from_tensor_slices(
            {
                "epoch": tf.fill(tf.shape(positions), epoch),
                "position": positions,
                "file": tf.gather(files, positions),
                "offset": tf.gather(offsets, positions),
            }
        )

    def file_records(item):
        starts_here = tf.logical_and(tf.equal(item["epoch"], e0), tf.equal(item["position"], p0))
        first = tf.minimum(tf.where(starts_here, tf.constant(r0, tf.int64), 0), takes[item["file"]])
        count = takes[item["file"]] - first
        raw = tf.data.TFRecordDataset(paths[item["file"]], buffer_size=_TFRECORD_BUFFER)
        raw = raw.skip(skips[item["file"]] + first).take(count)
        return tf.data.Dataset.zip(raw, tf.data.Dataset.range(first, first + count)).map(
            lambda serialized, record: {"serialized": serialized, "record": record, **item}
        )

    def identify(x):
        index = skips[x["file"]] + x["record"]  # the record's index in its file, as tfds numbers it
        return {
            "serialized": x["serialized"],
            "tfds_id": tf.strings.join([prefixes[x["file"]], tf.strings.as_string(index)], separator="__"),
            "episode_position": tf.stack([x["epoch"], x["position"], x["record"]]),
            # seeds the episode's random transforms: the same episode gets the same ones when read again
            "episode_key": x["epoch"] * (1 << 40) + x["file"] * (1 << 20) + x["record"],
        }

    epochs = tf.data.Dataset.range(e0, 2**62) if order.train else tf.data.Dataset.range(1)
    ds = epochs.flat_map(epoch_files).flat_map(file_records)
    if shards > 1 and not by_file:  # every record is read, and counted, before a shard keeps its own
        ds = ds.map(counter).filter(lambda x: tf.equal((x["offset"] + x["record"]) % shards, shard))
        return ds.map(identify)
    return ds.map(lambda x: identify(counter(x)))


def read_episodes(
    builder,
    split: str,
    order: EpisodeOrder,
    *,
    dataset_name: str,
    cameras=("primary",),
    counter=None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
):
    """tf.data of standardized, restructured trajectories (images left encoded), in `order`: image_<role>
    for each of `cameras`, empty strings for a camera the dataset does not have (so that every dataset
    of a mixture gives frames of the same structure), and each step's episode_position [T, 3] and
    episode_key [T] (the reader's position of its episode, see EpisodeOrder). `counter` (a
    RecordCounter) counts the records read; num_parallel_calls bounds the episodes parsed at once (and so
    how far the reader reads ahead)."""
    spec = dataset_spec(dataset_name)
    if spec.image_obs_keys.get("primary") is None:
        raise DatasetError(
            f"dataset '{dataset_name}': the registry names no primary camera (image_obs_keys.primary)"
        )
    split_size(builder, split, dataset_name)
    features, decoders = builder.info.features, {"steps": tfds.decode.SkipDecoding()}
    records = _episode_records(builder, split, order, dataset_name, counter or RecordCounter())

    def parse(x):
        episode = dict(features.deserialize_example(x["serialized"], decoders=decoders))
        return {**episode, **{k: v for k, v in x.items() if k != "serialized"}}

    episodes = records.map(parse, num_parallel_calls=num_parallel_calls, deterministic=True)

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
            "episode_position": tf.tile(traj["episode_position"][None], [T, 1]),
            "episode_key": tf.fill([T], traj["episode_key"]),
        }

    ds = _standardized(episodes, builder, spec)
    return ds.map(restructure, num_parallel_calls=num_parallel_calls, deterministic=True)


def numeric_trajectories(builder, dataset_name: str):
    """Standardized action/proprio (numpy) and episode_id (bytes) of every episode of every split; images
    are never decoded."""
    spec = dataset_spec(dataset_name)
    ds = _all_episodes(builder, "all", spec)
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


def action_mask(spec) -> list[bool]:
    """Which action dimensions are normalized: all but the gripper of a dataset with one."""
    return default_action_mask(spec.action_dim) if spec.has_gripper else [True] * spec.action_dim


def _statistics_cache(data_root_dir: str, dataset_name: str, cache_dir: str, spec, builder) -> Path:
    key = cache_key(
        dataset_fingerprint(builder),
        list(map(str, spec.state_obs_keys)),
        standardization_fingerprint(spec),
        action_mask(spec),
    )
    return stats_cache_path(cache_dir or str(Path(data_root_dir) / "vla_train_stats"), dataset_name, key)


def statistics_cached(
    data_root_dir: str, dataset_name: str, cache_dir: str = "", on_bad_data: str = "raise"
) -> bool:
    """Whether get_statistics would answer from its cache (no pass over the data)."""
    builder = open_builder(data_root_dir, dataset_name)
    stats = load_cached(
        _statistics_cache(data_root_dir, dataset_name, cache_dir, dataset_spec(dataset_name), builder)
    )
    return stats is not None and not (stats.get(SKIPPED_KEY) and on_bad_data != "skip")


def check_stored_keys(builder, spec) -> None:
    """A dataset read as stored (standardize_fn identity) must store every image, depth and state key its
    registry entry names; checked from the dataset's features (no episode is read), so that a wrong key
    fails before a model is built, not at the first batch. Other standardizations may derive keys."""
    if spec.standardize_fn != "identity":
        return
    steps = builder.info.features["steps"]
    stored = set(steps["observation"].keys()) if "observation" in steps.keys() else set()
    named = [*spec.image_obs_keys.values(), *spec.depth_obs_keys.values(), *spec.state_obs_keys]
    missing = [k for k in named if k is not None and k not in stored]
    if missing:
        where = f" ({spec.source})" if spec.source else ""
        raise DatasetError(
            f"dataset '{spec.name}': its registry entry{where} names observation key(s) {missing} that the "
            f"stored episodes do not have ({_features_keys(builder)}); fix image_obs_keys / state_obs_keys"
        )


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
    check_stored_keys(builder, spec)  # the trainer computes statistics before it builds the model
    path = _statistics_cache(data_root_dir, dataset_name, cache_dir, spec, builder)
    stats = load_cached(path)
    if stats is not None and stats.get(SKIPPED_KEY) and on_bad_data != "skip":
        stats = None
    if stats is None:
        mask = action_mask(spec)
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

"""The frame stream: RLDS trajectories -> filters and trajectory transforms (transforms.py) -> frames ->
(weighted mixture of datasets) -> shuffle (encoded) -> decode/resize/augment -> numpy batches with
normalized actions, and its torch-side iterable with a resumable position.

A mixture (`StreamSpec.datasets`) reads every dataset with its own registry standardization, interleaves
their frames with `tf.data.Dataset.sample_from_datasets` at the (optionally size-balanced) weights, and
`FrameStream` normalizes each frame with the statistics of the dataset it came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_train.data import tf_setup  # noqa: F401
from vla_train.data.mixture import allocate_threads, is_per_dataset, resolve_mixture
from vla_train.data.normalize import default_action_mask, normalize
from vla_train.data.rlds import open_builder, read_episodes, split_for

FIXED_INSTRUCTION = "complete the task"


@dataclass
class StreamSpec:
    data_root_dir: str
    dataset_name: str
    image_size: int
    batch_size: int
    seed: int
    train: bool  # train: shuffled, repeated, augmented (if enabled); eval: one ordered pass
    normalization: str = "bounds_q99"
    shuffle_buffer_size: int = 20000
    image_augmentation: bool = False
    ablation: str = "none"
    num_parallel_calls: int = 0
    # Data parallelism: this stream reads only episodes i with i % num_shards == shard_index, so the
    # ranks of a job read disjoint data.
    num_shards: int = 1
    shard_index: int = 0
    # Mixture: (dataset, weight) pairs read instead of dataset_name (empty = dataset_name alone), e.g.
    # registry.get_mixture(name). balance_weights multiplies each weight by the dataset's num_transitions.
    datasets: list[tuple[str, float]] = field(default_factory=list)
    balance_weights: bool = False
    stats_cache_dir: str = ""  # where balance_weights finds statistics (empty = the rlds default)
    # Trajectory transforms (transforms.py); the defaults leave frames as they were.
    future_action_window_size: int = 0  # > 0: action [F + 1, A] per frame, plus action_pad_mask
    window_size: int = 1  # > 1: proprio history [W, P], plus proprio_pad_mask
    max_action: float = 0.0  # > 0: drop episodes with any |action| above it
    max_proprio: float = 0.0  # > 0: drop episodes with any |proprio| above it
    subsample_length: int = 0  # > 0 (train only): keep at most this many steps per episode
    goal_relabeling: bool = False  # adds goal_image, uniform from the same episode's future

    def mixture(self) -> list[tuple[str, float]]:
        """The (dataset, raw weight) pairs this stream reads."""
        return [(d, float(w)) for d, w in self.datasets] or [(self.dataset_name, 1.0)]


def _decode_resize(image_bytes, size: int):
    import tensorflow as tf

    img = tf.io.decode_jpeg(image_bytes, channels=3)
    same = tf.logical_and(tf.shape(img)[0] == size, tf.shape(img)[1] == size)
    img = tf.cond(
        same,
        lambda: img,
        lambda: tf.cast(
            tf.clip_by_value(
                tf.round(tf.image.resize(img, [size, size], method="lanczos3", antialias=True)), 0, 255
            ),
            tf.uint8,
        ),
    )
    return tf.ensure_shape(img, [size, size, 3])


def _absolute_action_mask(dataset_name: str) -> list[bool] | None:
    """The gripper (last dim of a dataset with one) is absolute: chunk padding repeats it."""
    from vla_train.data.rlds import dataset_spec

    spec = dataset_spec(dataset_name)
    if not spec.has_gripper:
        return None
    return [not m for m in default_action_mask(spec.action_dim)]


def _dataset_frames(spec: StreamSpec, dataset_name: str, index: int, threads: int, episode_filter):
    """Frames (still encoded) of one dataset: filtered, transformed, repeated when training."""
    import tensorflow as tf

    from vla_train.data.transforms import apply_trajectory_transforms

    builder = open_builder(spec.data_root_dir, dataset_name)
    ds = read_episodes(
        builder,
        split_for(builder, spec.train),
        shuffle_files=spec.train,
        seed=spec.seed,
        dataset_name=dataset_name,
    )
    if spec.num_shards > 1:
        ds = ds.shard(spec.num_shards, spec.shard_index)
    # Episodes without an instruction carry no supervision for a language-conditioned policy; episodes
    # beyond max_action / max_proprio are dropped too (episode_filter counts both).
    ds = ds.filter(episode_filter)
    if spec.train:
        ds = ds.repeat()  # at episode level, so each pass draws new random transforms
    transformed = (
        spec.future_action_window_size > 0
        or spec.window_size > 1
        or (spec.train and spec.subsample_length > 0)
        or spec.goal_relabeling
    )
    if transformed:
        absolute = _absolute_action_mask(dataset_name)

        def transform(episode_index, traj):
            seed = tf.stack([tf.cast(spec.seed * 1000 + index, tf.int64), episode_index])
            return apply_trajectory_transforms(
                traj,
                seed,
                future_action_window_size=spec.future_action_window_size,
                window_size=spec.window_size,
                subsample_length=spec.subsample_length if spec.train else 0,
                goal_relabeling=spec.goal_relabeling,
                absolute_action_mask=absolute,
            )

        ds = ds.enumerate().map(transform, num_parallel_calls=threads, deterministic=True)
    return ds.flat_map(tf.data.Dataset.from_tensor_slices)


def build_tf_dataset(spec: StreamSpec, num_transitions: dict[str, int] | None = None, filters=None):
    """tf.data.Dataset of batches {image [B,S,S,3] uint8, instruction [B] string, action [B,A] (or
    [B,F+1,A] with action_pad_mask), proprio, dataset_name (, goal_image)}.

    num_transitions: {dataset: count} for balance_weights (read from the statistics cache when absent).
    filters: an optional list that receives each dataset's transforms.EpisodeFilter (drop counts).
    """
    import tensorflow as tf

    from vla_train.data.augment import augment_image
    from vla_train.data.transforms import EpisodeFilter

    parallel = spec.num_parallel_calls or tf.data.AUTOTUNE
    mixture = spec.mixture()
    if spec.balance_weights and len(mixture) > 1 and num_transitions is None:
        from vla_train.data.rlds import get_statistics

        num_transitions = {
            d: get_statistics(spec.data_root_dir, d, spec.stats_cache_dir)["num_transitions"]
            for d, _ in mixture
        }
    weighted = resolve_mixture(mixture, spec.balance_weights and len(mixture) > 1, num_transitions)
    if spec.num_parallel_calls:
        threads = allocate_threads(max(spec.num_parallel_calls, len(weighted)), [w for _, w in weighted])
    else:
        threads = [tf.data.AUTOTUNE] * len(weighted)
    streams = []
    for i, ((name, _), n) in enumerate(zip(weighted, threads, strict=True)):
        episode_filter = EpisodeFilter(max_action=spec.max_action, max_proprio=spec.max_proprio)
        if filters is not None:
            filters.append(episode_filter)
        streams.append(_dataset_frames(spec, name, i, n, episode_filter))
    if len(streams) == 1:
        ds = streams[0]
    else:
        ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=[w for _, w in weighted], seed=spec.seed, stop_on_empty_dataset=False
        )
    if spec.train:
        ds = ds.shuffle(spec.shuffle_buffer_size, seed=spec.seed, reshuffle_each_iteration=True)
    ds = ds.enumerate()

    def frame(index, f):
        img = _decode_resize(f["observation"]["image_primary"], spec.image_size)
        if spec.train and spec.image_augmentation:
            seed = tf.stack([tf.cast(spec.seed, tf.int64), index])
            img = augment_image(tf.image.convert_image_dtype(img, tf.float32), seed)
            img = tf.image.convert_image_dtype(img, tf.uint8, saturate=True)
        if spec.ablation == "blank_image":
            img = tf.zeros_like(img)
        instruction = f["task"]["language_instruction"]
        if spec.ablation == "fixed_instruction":
            instruction = tf.constant(FIXED_INSTRUCTION)
        out = {
            "image": img,
            "instruction": instruction,
            "action": f["action"],
            "proprio": f["observation"]["proprio"],
            "dataset_name": f["dataset_name"],
        }
        for key in ("action_pad_mask",):
            if key in f:
                out[key] = f[key]
        if "proprio_pad_mask" in f["observation"]:
            out["proprio_pad_mask"] = f["observation"]["proprio_pad_mask"]
        if "image_primary" in f["task"]:
            out["goal_image"] = _decode_resize(f["task"]["image_primary"], spec.image_size)
        return out

    ds = ds.map(frame, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(spec.batch_size, drop_remainder=spec.train)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(2)


def normalize_batch(
    action: np.ndarray,
    dataset_names: list[str],
    statistics: dict[str, Any],
    mode: str,
    action_pad_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Normalize each frame's action [B, A] or [B, F+1, A] with the statistics of its dataset
    (`statistics`: one dataset's stats, or {dataset_name: stats}). Chunk positions past the episode end
    become 0 on the normalized dims (OpenVLA's neutral action, as it chunks normalized actions)."""
    if not is_per_dataset(statistics):
        stats = statistics["action"]
        out = normalize(action, stats, mode, stats["mask"])
        masks = {None: np.asarray(stats["mask"], bool)}
        names = [None] * len(dataset_names)
    else:
        out = np.empty(np.shape(action), np.float32)
        names = list(dataset_names)
        masks = {}
        for name in sorted(set(names)):
            if name not in statistics:
                raise KeyError(f"no statistics for dataset '{name}' (have {sorted(statistics)})")
            stats = statistics[name]["action"]
            rows = np.asarray([n == name for n in names])
            out[rows] = normalize(np.asarray(action)[rows], stats, mode, stats["mask"])
            masks[name] = np.asarray(stats["mask"], bool)
    if action_pad_mask is not None:
        for i, name in enumerate(names):
            past_end = ~np.asarray(action_pad_mask[i], bool)  # [F+1]
            out[i][np.ix_(past_end, masks[name])] = 0.0
    return out


class FrameStream:
    """Iterates numpy batches with normalized actions; `state_dict` records how many were consumed, and
    `load_state_dict` makes the next batch the one the original stream would have yielded next."""

    def __init__(self, spec: StreamSpec, statistics: dict[str, Any]):
        """statistics: one dataset's statistics, or {dataset_name: statistics} (needed for a mixture)."""
        self.spec = spec
        self.statistics = statistics
        self.num_batches_yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        per_dataset = is_per_dataset(self.statistics)
        if len(self.spec.mixture()) > 1 and not per_dataset:
            raise ValueError("a mixture needs statistics per dataset: {dataset_name: statistics}")
        counts = {d: s["num_transitions"] for d, s in self.statistics.items()} if per_dataset else None
        ds = build_tf_dataset(self.spec, counts)
        if self._skip:
            ds = ds.skip(self._skip)
        self.num_batches_yielded = self._skip
        for batch in ds.as_numpy_iterator():
            self.num_batches_yielded += 1
            names = [s.decode() for s in batch["dataset_name"]]
            out = {
                "image": batch["image"],
                "instruction": [s.decode() for s in batch["instruction"]],
                "action": normalize_batch(
                    batch["action"],
                    names,
                    self.statistics,
                    self.spec.normalization,
                    batch.get("action_pad_mask"),
                ),
                "action_raw": batch["action"],
                "proprio": batch["proprio"],
                "dataset_name": names,
            }
            for key in ("action_pad_mask", "proprio_pad_mask", "goal_image"):
                if key in batch:
                    out[key] = batch[key]
            yield out

    def state_dict(self) -> dict[str, int]:
        return {"num_batches_yielded": self.num_batches_yielded, "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.spec.seed) != self.spec.seed:
            raise ValueError("cannot restore a data stream position saved under a different seed")
        self._skip = int(state["num_batches_yielded"])

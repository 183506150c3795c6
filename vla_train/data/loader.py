"""The frame stream: RLDS trajectories -> filters and trajectory transforms (transforms.py) -> frames ->
(weighted mixture of datasets) -> shuffle (encoded) -> decode/resize/augment -> numpy batches with
normalized actions, and its torch-side iterable with a resumable position.

A mixture (`StreamSpec.datasets`) reads every dataset with its own registry standardization, interleaves
their frames with `tf.data.Dataset.sample_from_datasets` at the (optionally size-balanced) weights, and
`FrameStream` normalizes each frame with the statistics of the dataset it came from.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_train.data import tf_setup  # noqa: F401
from vla_train.data.mixture import allocate_threads, is_per_dataset, resolve_mixture
from vla_train.data.normalize import default_action_mask, normalize
from vla_train.data.rlds import open_builder, read_episodes, split_for

log = logging.getLogger(__name__)
FIXED_INSTRUCTION = "complete the task"
_END = object()  # FrameStream's producer: the stream has ended


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
    # Trajectory transforms (transforms.py); the defaults leave frames as they were.
    future_action_window_size: int = 0  # > 0: action [F + 1, A] per frame, plus action_pad_mask
    window_size: int = 1  # > 1: proprio history [W, P], plus proprio_pad_mask
    max_action: float = 0.0  # > 0: drop episodes with any |action| above it
    max_proprio: float = 0.0  # > 0: drop episodes with any |proprio| above it
    subsample_length: int = 0  # > 0 (train only): keep at most this many steps per episode
    goal_relabeling: bool = False  # adds goal_image, uniform from the same episode's future
    cameras: list[str] = field(default_factory=lambda: ["primary"])  # image (primary), image_<role>
    ram_budget_gb: float = 0.0  # > 0: caps the shuffle buffer and prefetch depth (see memory_plan)
    on_bad_data: str = "raise"  # raise | skip (and count) NaN actions/proprio, corrupt JPEGs

    def mixture(self) -> list[tuple[str, float]]:
        """The (dataset, raw weight) pairs this stream reads."""
        return [(d, float(w)) for d, w in self.datasets] or [(self.dataset_name, 1.0)]


def _jpeg_markers_ok(image_bytes):
    """Cheap integrity check of an encoded JPEG: start-of-image marker first, end-of-image marker last
    (a truncated or overwritten file fails it; decoding is what would catch subtler damage)."""
    import tensorflow as tf

    n = tf.strings.length(image_bytes)
    head = tf.strings.substr(image_bytes, 0, 2)
    pos = tf.maximum(n - 2, 0)
    tail = tf.strings.substr(image_bytes, pos, tf.fill(tf.shape(pos), 2))
    return tf.logical_and(tf.equal(head, b"\xff\xd8"), tf.equal(tail, b"\xff\xd9"))


def decode_frame(image_bytes, may_be_missing: bool = True):
    """Encoded JPEG -> (uint8 [H, W, 3], shape [2]); an empty string (a camera the dataset does not have;
    never the primary one) gives a 0 x 0 image, which FrameStream turns into a black frame."""
    import tensorflow as tf

    if not may_be_missing:
        img = tf.io.decode_jpeg(image_bytes, channels=3)
    else:
        img = tf.cond(
            tf.strings.length(image_bytes) > 0,
            lambda: tf.io.decode_jpeg(image_bytes, channels=3),
            lambda: tf.zeros([0, 0, 3], tf.uint8),
        )
    return img, tf.shape(img)[:2]


class FrameCheck:
    """`ds.map(FrameCheck(...))` on trajectories (after their transforms, before they are split into
    frames): a frame whose JPEG (any requested camera, or its goal image) fails the marker check raises
    (on_bad_data=raise: the error names the dataset, episode and camera key) or is dropped and counted
    (skip; `counts()`). Checking whole trajectories keeps the per-frame cost to a few microseconds."""

    def __init__(self, cameras: list[str], on_bad_data: str):
        import tensorflow as tf

        self.cameras = cameras  # every trajectory has image_<role> for each (rlds.read_episodes)
        self.on_bad_data = on_bad_data
        self._dropped = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, traj):
        import tensorflow as tf

        from vla_train.data.validate import bad_data_message, first_string

        n = tf.shape(traj["action"])[0]
        ok = tf.ones([n], tf.bool)
        keys = [f"observation/image_{r}" for r in self.cameras]
        if "image_primary" in traj.get("task", {}):
            keys.append("task/image_primary")
        checks = []
        for key in keys:
            group, name = key.split("/")
            data = traj[group][name]
            # an empty string is a camera the dataset does not have (a black frame), not a corrupt one
            good = tf.logical_or(tf.equal(tf.strings.length(data), 0), _jpeg_markers_ok(data))
            if self.on_bad_data == "raise":
                message = bad_data_message(
                    "dataset '", first_string(traj["dataset_name"]), "': episode '",
                    first_string(traj["episode_id"]), "' step ",
                    tf.strings.as_string(tf.argmin(tf.cast(good, tf.int32))),
                    f" has a corrupt JPEG (no start/end-of-image marker) in '{key}'; set "
                    "data.on_bad_data=skip to drop and count such frames",
                )  # fmt: skip
                checks.append(tf.debugging.Assert(tf.reduce_all(good), [message]))
            ok = tf.logical_and(ok, good)
        with tf.control_dependencies(checks):
            dropped = tf.reduce_sum(tf.cast(tf.logical_not(ok), tf.int64))
        with tf.control_dependencies([self._dropped.assign_add(dropped)]):
            return tf.nest.map_structure(lambda x: tf.boolean_mask(x, ok), traj)

    def counts(self) -> dict[str, int]:
        return {"corrupt_jpeg": int(self._dropped.numpy())}


def memory_plan(spec: StreamSpec, bytes_per_frame: float) -> dict[str, int]:
    """Shuffle buffer (frames) and prefetch depth (batches) within spec.ram_budget_gb: 70% for the
    shuffle buffer of encoded frames (counted at 1.5x their stored size for tensor overhead), 20% for
    decoded batches in flight (prefetch + tf.data's autotuned buffers, capped by `autotune_ram_bytes`),
    the rest for the readers. With no budget the configured shuffle_buffer_size is used as is."""
    batch_bytes = spec.batch_size * spec.image_size**2 * 3 * (len(spec.cameras) + int(spec.goal_relabeling))
    if spec.ram_budget_gb <= 0:
        return {"shuffle_buffer_size": spec.shuffle_buffer_size, "prefetch": 2, "autotune_ram_bytes": 0}
    budget = spec.ram_budget_gb * 1024**3
    fit = int(0.7 * budget / max(1.5 * bytes_per_frame, 1.0))
    return {
        "shuffle_buffer_size": max(1, min(spec.shuffle_buffer_size, fit)),
        "prefetch": int(max(1, min(4, 0.05 * budget // max(batch_bytes, 1)))),
        "autotune_ram_bytes": int(0.2 * budget),
    }


def bytes_per_frame(data_root_dir: str, num_transitions: dict[str, int]) -> float:
    """The largest average stored size of one frame (all its fields) over the datasets read: the bytes
    of every split in each dataset's dataset_info.json (no builder is opened) over its transitions."""
    import json

    from vla_train.data.rlds import version_dir

    worst = 0.0
    for name, steps in num_transitions.items():
        info = json.loads((version_dir(data_root_dir, name) / "dataset_info.json").read_text())
        total = sum(int(split.get("numBytes", 0)) for split in info.get("splits", []))
        worst = max(worst, total / max(steps, 1))
    return worst


def _absolute_action_mask(dataset_name: str) -> list[bool] | None:
    """The gripper (last dim of a dataset with one) is absolute: chunk padding repeats it."""
    from vla_train.data.rlds import dataset_spec

    spec = dataset_spec(dataset_name)
    if not spec.has_gripper:
        return None
    return [not m for m in default_action_mask(spec.action_dim)]


def _dataset_frames(spec: StreamSpec, dataset_name: str, index: int, threads: int, filters: list):
    """Frames (still encoded) of one dataset: filtered, transformed, checked, repeated when training.
    `filters` receives the dataset's transforms.EpisodeFilter and FrameCheck (their `counts()`)."""
    import tensorflow as tf

    from vla_train.data.rlds import DatasetError, split_size
    from vla_train.data.transforms import EpisodeFilter, apply_trajectory_transforms

    builder = open_builder(spec.data_root_dir, dataset_name)
    split = split_for(builder, spec.train)
    # read_episodes raises a DatasetError for an empty split, a missing key or a wrong action width
    ds = read_episodes(
        builder,
        split,
        shuffle_files=spec.train,
        seed=spec.seed,
        dataset_name=dataset_name,
        cameras=tuple(spec.cameras),
    )
    episodes = split_size(builder, split, dataset_name)
    if spec.num_shards > 1:
        ds = ds.shard(spec.num_shards, spec.shard_index)
        episodes = len(range(spec.shard_index, episodes, spec.num_shards))
        if episodes == 0 and spec.train:
            raise DatasetError(
                f"dataset '{dataset_name}': split '{split}' has fewer episodes than the {spec.num_shards} "
                f"data-parallel ranks, so rank {spec.shard_index} would read nothing; use fewer ranks"
            )
    # Episodes without an instruction carry no supervision for a language-conditioned policy; episodes
    # beyond max_action / max_proprio are dropped too, and episodes with NaN/inf action or proprio raise or
    # are dropped (on_bad_data). episode_filter counts every drop; a training pass that keeps no episode
    # raises with those counts instead of ending the dataset's stream.
    episode_filter = EpisodeFilter(
        max_action=spec.max_action,
        max_proprio=spec.max_proprio,
        on_bad_data=spec.on_bad_data,
        episodes_per_pass=episodes if spec.train else 0,
        split=split,
    )
    frame_check = FrameCheck(spec.cameras, spec.on_bad_data)
    filters += [episode_filter, frame_check]
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
    # plain TF code: skipping autograph's conversion makes tracing (per dataset of a mixture) faster
    check = tf.autograph.experimental.do_not_convert(frame_check)
    ds = ds.map(check, num_parallel_calls=threads, deterministic=True)
    return ds.unbatch()  # frames (much cheaper than flat_map(from_tensor_slices))


def build_tf_dataset(spec: StreamSpec, num_transitions: dict[str, int], filters=None, skip_batches: int = 0):
    """tf.data.Dataset of batches {image/raw [B,H,W,3] uint8 decoded frames (zero-padded to the batch's
    largest) and image/shape [B,2] (the primary camera; image_<role>/raw, /shape and image_<role>_mask for
    the other spec.cameras), frame_index [B] (train with augmentation: the frames' positions in the
    stream, which seed their augmentation), instruction [B] string, action
    [B,A] (or [B,F+1,A] with action_pad_mask), proprio, dataset_name, episode_id (, goal_image/raw)}.
    FrameStream resizes (and augments) the images and normalizes the actions.

    num_transitions: {dataset: count} of every dataset read (its statistics' num_transitions), for
    balance_weights and the memory plan. filters: an optional list that receives each dataset's
    transforms.EpisodeFilter and the FrameCheck (their `counts()` are the drops). skip_batches: start
    after this many batches (resume).
    """
    import tensorflow as tf

    parallel = spec.num_parallel_calls or tf.data.AUTOTUNE
    mixture = spec.mixture()
    weighted = resolve_mixture(mixture, spec.balance_weights and len(mixture) > 1, num_transitions)
    if spec.num_parallel_calls:
        threads = allocate_threads(max(spec.num_parallel_calls, len(weighted)), [w for _, w in weighted])
    else:
        threads = [tf.data.AUTOTUNE] * len(weighted)
    filters = [] if filters is None else filters
    streams = [
        _dataset_frames(spec, name, i, n, filters)
        for i, ((name, _), n) in enumerate(zip(weighted, threads, strict=True))
    ]
    streams = _uniform_frames(streams, [n for n, _ in weighted])
    if len(streams) == 1:
        ds = streams[0]
    else:
        ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=[w for _, w in weighted], seed=spec.seed, stop_on_empty_dataset=False
        )
    plan = memory_plan(spec, bytes_per_frame(spec.data_root_dir, num_transitions))
    if spec.train:
        log.info(
            "data: shuffle buffer %d frames, prefetch %d batches (ram_budget_gb %s)",
            plan["shuffle_buffer_size"], plan["prefetch"], spec.ram_budget_gb or "no cap",
        )  # fmt: skip
        ds = ds.shuffle(plan["shuffle_buffer_size"], seed=spec.seed, reshuffle_each_iteration=True)
    ds = ds.enumerate()
    if skip_batches:
        # resume: skip still-encoded frames (cheap) rather than decoded batches; enumerate keeps each
        # frame's index, hence its augmentation seed
        ds = ds.skip(skip_batches * spec.batch_size)

    augment = spec.train and spec.image_augmentation
    roles = [("image" if r == "primary" else f"image_{r}", f"image_{r}") for r in spec.cameras]

    def frame(index, f):
        """Decoded (not yet resized) cameras with their sizes, and the frame's augmentation parameters:
        FrameStream resizes and augments whole batches outside TensorFlow (image_ops)."""
        out = {}
        for key, obs_key in roles:
            out[f"{key}/raw"], out[f"{key}/shape"] = decode_frame(f["observation"][obs_key], key != "image")
            if key != "image":
                out[f"{key}_mask"] = tf.strings.length(f["observation"][obs_key]) > 0
        if augment:
            out["frame_index"] = index  # seeds the frame's augmentation (augment.augment_params)
        instruction = f["task"]["language_instruction"]
        if spec.ablation == "fixed_instruction":
            instruction = tf.constant(FIXED_INSTRUCTION)
        out.update(
            instruction=instruction,
            action=f["action"],
            proprio=f["observation"]["proprio"],
            dataset_name=f["dataset_name"],
            episode_id=f["episode_id"],
        )
        if "action_pad_mask" in f:
            out["action_pad_mask"] = f["action_pad_mask"]
        if "proprio_pad_mask" in f["observation"]:
            out["proprio_pad_mask"] = f["observation"]["proprio_pad_mask"]
        if "image_primary" in f["task"]:
            out["goal_image/raw"], out["goal_image/shape"] = decode_frame(f["task"]["image_primary"], False)
        return out

    ds = ds.map(
        tf.autograph.experimental.do_not_convert(frame), num_parallel_calls=parallel, deterministic=True
    )
    # frames of datasets stored at different sizes share a batch zero-padded (their sizes are kept)
    ds = ds.padded_batch(spec.batch_size, drop_remainder=spec.train)
    options = tf.data.Options()
    options.deterministic = True
    if plan["autotune_ram_bytes"]:
        options.autotune.ram_budget = plan["autotune_ram_bytes"]
    return ds.with_options(options).prefetch(plan["prefetch"])


def _uniform_frames(streams, names: list[str]):
    """Give every dataset's frames the same structure so a mixture can interleave and batch them (the
    cameras already agree, rlds.read_episodes): proprio zero-padded to the widest dataset's. Datasets
    whose actions differ in width cannot share a batch: that raises."""
    import tensorflow as tf

    from vla_train.data.rlds import DatasetError

    widths = {n: s.element_spec["action"].shape[-1] for n, s in zip(names, streams, strict=True)}
    if len(set(widths.values())) > 1:
        raise DatasetError(
            f"the mixture's datasets have different action widths {widths}; a batch needs one width "
            "(standardize them to the same action encoding, e.g. 7-dim EEF_POS)"
        )
    proprio_widths = [s.element_spec["observation"]["proprio"].shape[-1] for s in streams]
    if None in proprio_widths or len(set(proprio_widths)) == 1:
        return streams  # nothing to pad (unknown static widths are left as they are)
    widest = max(proprio_widths)

    def pad_proprio(f):
        p = f["observation"]["proprio"]
        pad = [*[[0, 0]] * (len(p.shape) - 1), [0, widest - p.shape[-1]]]
        return {**f, "observation": {**f["observation"], "proprio": tf.pad(p, pad)}}

    convert = tf.autograph.experimental.do_not_convert(pad_proprio)
    return [s if w == widest else s.map(convert) for s, w in zip(streams, proprio_widths, strict=True)]


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


# Decoded frames are allocated by tf.data's threads and freed by others; glibc keeps the freed memory in
# per-thread arenas, fragmented, so the process's RSS creeps up by hundreds of MB over minutes (measured
# in scripts/bench_data.py). Handing free memory back to the OS every so often keeps RSS flat.
TRIM_EVERY_BATCHES = 50


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): returns the free memory of every malloc arena to the OS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class FrameStream:
    """Iterates numpy batches with normalized actions; `state_dict` records how many were consumed, and
    `load_state_dict` makes the next batch the one the original stream would have yielded next."""

    def __init__(self, spec: StreamSpec, statistics: dict[str, Any]):
        """statistics: one dataset's statistics, or {dataset_name: statistics} (needed for a mixture)."""
        self.spec = spec
        self.statistics = statistics
        self.num_batches_yielded = 0
        self._skip = 0
        self.filters: list = []  # EpisodeFilter per dataset and the FrameCheck, once iterated

    def __iter__(self) -> Iterator[dict[str, Any]]:
        per_dataset = is_per_dataset(self.statistics)
        if len(self.spec.mixture()) > 1 and not per_dataset:
            raise ValueError("a mixture needs statistics per dataset: {dataset_name: statistics}")
        if per_dataset:
            counts = {d: s["num_transitions"] for d, s in self.statistics.items()}
        else:
            counts = {self.spec.mixture()[0][0]: self.statistics["num_transitions"]}
        self.filters = []
        ds = build_tf_dataset(self.spec, counts, self.filters, skip_batches=self._skip)
        self.num_batches_yielded = self._skip
        # A producer thread pulls decoded batches from tf.data and finishes them (resize + augmentation
        # on a GIL-free thread pool, normalization), up to two batches ahead of the consumer.
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(ds, ready, stop), daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.num_batches_yielded += 1
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _produce(self, ds, ready: queue.Queue, stop: threading.Event) -> None:
        from vla_train.data.validate import read_errors_named

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with read_errors_named(self.spec.data_root_dir, [d for d, _ in self.spec.mixture()]):
                for i, batch in enumerate(ds.as_numpy_iterator(), 1):
                    if not put(self._finish(batch)):
                        return
                    if i % TRIM_EVERY_BATCHES == 0:
                        release_freed_memory()
            put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, which raises it)
            put(e)

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A tf.data batch -> what the trainer consumes: images resized (and augmented), actions
        normalized with each frame's dataset statistics, strings decoded."""
        from vla_train.data import image_ops
        from vla_train.data.augment import augment_params

        names = [s.decode() for s in batch["dataset_name"]]
        out = {}
        params = augment_params(self.spec.seed, batch["frame_index"]) if "frame_index" in batch else None
        for key in [k[: -len("/raw")] for k in batch if k.endswith("/raw")]:
            raw, shapes = batch[f"{key}/raw"], batch[f"{key}/shape"]
            if self.spec.ablation == "blank_image" and key != "goal_image":
                out[key] = np.zeros((len(raw), self.spec.image_size, self.spec.image_size, 3), np.uint8)
            else:
                out[key] = image_ops.process_batch(
                    raw,
                    shapes,
                    self.spec.image_size,
                    params if key != "goal_image" else None,
                    threads=self.spec.num_parallel_calls,
                )
        out.update(
            instruction=[s.decode() for s in batch["instruction"]],
            action=normalize_batch(
                batch["action"], names, self.statistics, self.spec.normalization, batch.get("action_pad_mask")
            ),
            action_raw=batch["action"],
            proprio=batch["proprio"],
            dataset_name=names,
            episode_id=[s.decode() for s in batch["episode_id"]],
        )
        for key, value in batch.items():
            if key not in out and key != "frame_index" and not key.endswith(("/raw", "/shape")):
                out[key] = value  # pad masks, other cameras' masks
        return out

    def drop_counts(self) -> dict[str, int]:
        """What the pipeline has dropped so far, by reason, summed over datasets (episodes without an
        instruction, beyond max_action/max_proprio, with NaN/inf values; frames with a corrupt JPEG)."""
        total: dict[str, int] = {}
        for f in self.filters:
            for reason, n in f.counts().items():
                total[reason] = total.get(reason, 0) + n
        return total

    def state_dict(self) -> dict[str, int]:
        return {"num_batches_yielded": self.num_batches_yielded, "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.spec.seed) != self.spec.seed:
            raise ValueError("cannot restore a data stream position saved under a different seed")
        self._skip = int(state["num_batches_yielded"])

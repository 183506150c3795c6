"""The numpy side of a frame stream: `StreamSpec` (what one stream reads), and `FrameStream`, which runs
the tf.data graph (pipeline.py) in a producer thread, resizes and augments each batch on a GIL-free thread
pool (image_ops), normalizes actions with each frame's own dataset statistics, and keeps a resumable
position (`StreamPosition`) that a resumed stream reaches by reading at most one shuffle block.
`ShardedStream` joins the read shards one process reads into one stream.

A mixture (`StreamSpec.datasets`) reads every dataset with its own registry standardization, interleaves
their frames at the (optionally size-balanced) weights, and every frame is normalized with the statistics
of the dataset it came from.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_train.config import DataConfig
from vla_train.data import image_ops
from vla_train.data.augment import augment_params
from vla_train.data.errors import read_errors_named
from vla_train.data.mixture import is_per_dataset
from vla_train.data.normalize import normalize, normalize_proprio_batch
from vla_train.data.pipeline import StreamStart, build_tf_dataset, shuffle_block_size

_END = object()  # FrameStream's producer: the stream has ended


@dataclass(frozen=True)
class StreamSpec:
    """One frame stream: the run's data section as configured, the datasets it resolved to, and the
    fields only the run knows."""

    data: DataConfig
    # (dataset, raw weight) pairs read: data.mixture's or [(data.dataset_name, 1.0)], resolved once per run
    # (mixture.run_datasets)
    datasets: tuple[tuple[str, float], ...]
    image_size: int  # the model's input side, in pixels
    batch_size: int
    seed: int
    train: bool  # train: shuffled, repeated, augmented (if enabled); eval: one ordered pass
    # Data parallelism: this stream is read shard shard_index of num_shards, disjoint from the others (the
    # files it reads, rlds.EpisodeOrder), with its own augmentation draws.
    num_shards: int = 1
    shard_index: int = 0
    # CPU threads of tf.data and of the image kernels (0 = every core; a rank of several on a node gets
    # its share, training.distributed.cores_per_rank)
    num_threads: int = 0

    @property
    def augment(self) -> bool:
        return self.train and self.data.image_augmentation

    @property
    def subsample_length(self) -> int:
        return self.data.subsample_length if self.train else 0

    @property
    def dataset_names(self) -> list[str]:
        return [name for name, _ in self.datasets]


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


INTERNAL_KEYS = ("_cursor", "_episode_frames", "_position")  # the graph's position fields (pipeline.py)


def _successor(cursor: tuple[int, ...], episode_frames: int) -> tuple[int, int, int, int]:
    """The reader cursor of the frame after `cursor` (epoch, file position, record, frame)."""
    epoch, position, record, frame = (int(c) for c in cursor)
    if frame + 1 < episode_frames:
        return epoch, position, record, frame + 1
    return epoch, position, record + 1, 0


class StreamPosition:
    """The resumable position of a training stream, kept from the frames consumed: the shuffle block being
    emitted, how many of its frames were consumed, and per dataset the cursor of the first frame that
    block draws from (pipeline.StreamStart). A block's start cursors are known once all its predecessor's
    frames were consumed, which the stream's block order guarantees when its first frame arrives."""

    def __init__(self, block_size: int, start: StreamStart):
        self.block_size = block_size
        self.frames = start.block * block_size + start.in_block
        self._block = start.block
        self._block_start = dict(start.cursors)
        self._latest: dict[str, tuple[tuple[int, ...], int]] = {}  # dataset -> (cursor, frames) in the block

    def consume(self, names: list[str], cursors: np.ndarray, episode_frames: np.ndarray, positions) -> None:
        for name, cursor, frames, position in zip(names, cursors, episode_frames, positions, strict=True):
            assert position == self.frames, (position, self.frames)  # frames arrive in stream order
            if position // self.block_size != self._block:
                self._close_block()
            cursor = tuple(int(c) for c in cursor)
            if name not in self._latest or cursor > self._latest[name][0]:
                self._latest[name] = (cursor, int(frames))
            self.frames += 1

    def _close_block(self) -> None:
        """Every frame of the current block was consumed: its datasets' next cursors start the next."""
        for name, (cursor, frames) in self._latest.items():
            self._block_start[name] = _successor(cursor, frames)
        self._latest, self._block = {}, self._block + 1

    def start(self) -> StreamStart:
        """Where a stream that continues after the consumed frames starts."""
        block = self.frames // self.block_size
        if block != self._block:  # the current block was consumed to its last frame
            self._close_block()
        return StreamStart(block, self.frames - block * self.block_size, dict(self._block_start))


class FrameStream:
    """Iterates numpy batches with normalized actions; `state_dict` records the position after the
    consumed batches, and `load_state_dict` makes the next batch the one the original stream would have
    yielded next (training streams), reading at most one shuffle block to get there."""

    def __init__(self, spec: StreamSpec, statistics: dict[str, Any]):
        """statistics: one dataset's statistics, or {dataset_name: statistics} (needed for a mixture)."""
        self.spec = spec
        self.statistics = statistics
        self.num_batches_yielded = 0
        self._start = StreamStart()
        self._start_batches = 0
        self._position: StreamPosition | None = None
        self.filters: list = []  # EpisodeFilter per dataset and the FrameCheck, once iterated
        self.readers: list = []  # rlds.RecordCounter per dataset, once iterated
        self._running = threading.Event()  # cleared by paused(): the producer waits before its next batch
        self._running.set()

    @contextlib.contextmanager
    def paused(self):
        """The producer thread finishes no batch inside this block (tf.data's own prefetch fills its
        bounded buffers, then idles): for work that needs the cores meanwhile, such as rollouts."""
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def _num_transitions(self) -> dict[str, int]:
        if is_per_dataset(self.statistics):
            return {d: s["num_transitions"] for d, s in self.statistics.items()}
        return {self.spec.dataset_names[0]: self.statistics["num_transitions"]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if len(self.spec.datasets) > 1 and not is_per_dataset(self.statistics):
            raise ValueError("a mixture needs statistics per dataset: {dataset_name: statistics}")
        counts = self._num_transitions()
        parts: dict[str, list] = {"filters": [], "readers": []}
        ds = build_tf_dataset(self.spec, counts, parts, start=self._start)
        self.filters, self.readers = parts["filters"], parts["readers"]
        self.num_batches_yielded = self._start_batches
        if self.spec.train:
            self._position = StreamPosition(shuffle_block_size(self.spec, counts), self._start)
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
                internal = {k: item.pop(k) for k in INTERNAL_KEYS if k in item}
                if self._position is not None:
                    self._position.consume(
                        item["dataset_name"],
                        internal["_cursor"],
                        internal["_episode_frames"],
                        internal["_position"],
                    )
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
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with read_errors_named(self.spec.data.data_root_dir, self.spec.dataset_names):
                for i, batch in enumerate(ds.as_numpy_iterator(), 1):
                    while not self._running.wait(0.1):
                        if stop.is_set():
                            return
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
        spec, d = self.spec, self.spec.data
        names = [s.decode() for s in batch["dataset_name"]]
        out = {}
        params = None
        if "frame_index" in batch:
            params = augment_params(spec.seed, batch["frame_index"], stream=spec.shard_index)
        for key in [k[: -len("/raw")] for k in batch if k.endswith("/raw")]:
            raw, shapes = batch[f"{key}/raw"], batch[f"{key}/shape"]
            if d.ablation == "blank_image" and key != "goal_image":
                out[key] = np.zeros((len(raw), spec.image_size, spec.image_size, 3), np.uint8)
            else:
                out[key] = image_ops.process_batch(
                    raw,
                    shapes,
                    spec.image_size,
                    params if key != "goal_image" else None,
                    threads=d.num_parallel_calls or spec.num_threads,
                )
        out.update(
            instruction=[s.decode() for s in batch["instruction"]],
            action=normalize_batch(
                batch["action"], names, self.statistics, d.normalization, batch.get("action_pad_mask")
            ),
            action_raw=batch["action"],
            proprio=batch["proprio"],
            proprio_norm=normalize_proprio_batch(batch["proprio"], names, self.statistics, d.normalization),
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
        return _summed([f.counts() for f in self.filters])

    def records_read(self) -> int:
        """Episode records read from the files so far (all datasets; see rlds.RecordCounter)."""
        return sum(r.counts()["records_read"] for r in self.readers)

    def state_dict(self) -> dict[str, Any]:
        """The position after the consumed batches (a training stream; JSON-serializable)."""
        if self._position is None:  # not iterated yet: where it would start
            block = shuffle_block_size(self.spec, self._num_transitions())
            self._position = StreamPosition(block, self._start)
        start = self._position.start()
        return {
            "seed": self.spec.seed,
            "num_shards": self.spec.num_shards,
            "shard_index": self.spec.shard_index,
            "block_size": self._position.block_size,
            "block": start.block,
            "in_block": start.in_block,
            "cursors": {name: list(c) for name, c in sorted(start.cursors.items())},
            "num_batches_yielded": self.num_batches_yielded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; a ValueError says why a position cannot be continued here."""
        block = shuffle_block_size(self.spec, self._num_transitions())
        mine = {
            "seed": self.spec.seed,
            "num_shards": self.spec.num_shards,
            "shard_index": self.spec.shard_index,
        }
        mine["block_size"] = block
        differ = [f"{k} {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise ValueError(f"the saved data position is of another stream ({', '.join(differ)})")
        cursors = {name: tuple(int(x) for x in c) for name, c in state["cursors"].items()}
        self._start = StreamStart(int(state["block"]), int(state["in_block"]), cursors)
        self._start_batches = int(state.get("num_batches_yielded", 0))
        self._position = None


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return total


def _concatenate(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, first in batches[0].items():
        if isinstance(first, list):
            out[key] = [x for b in batches for x in b[key]]
        else:
            out[key] = np.concatenate([b[key] for b in batches])
    return out


class ShardedStream:
    """The read shards of one process as one stream: each batch is a batch of every shard, concatenated in
    shard order, so one process reading shards 0 and 1 yields the rows two processes reading one each
    yield together (the same global batch at any world size that divides the number of shards)."""

    def __init__(self, specs: list[StreamSpec], statistics: dict[str, Any]):
        self.streams = [FrameStream(spec, statistics) for spec in specs]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = [iter(s) for s in self.streams]
        while True:
            try:
                batches = [next(it) for it in iterators]
            except StopIteration:
                return
            yield _concatenate(batches) if len(batches) > 1 else batches[0]

    def drop_counts(self) -> dict[str, int]:
        return _summed([s.drop_counts() for s in self.streams])

    @contextlib.contextmanager
    def paused(self):
        """Every shard's producer paused (FrameStream.paused)."""
        with contextlib.ExitStack() as stack:
            for s in self.streams:
                stack.enter_context(s.paused())
            yield

    def records_read(self) -> int:
        return sum(s.records_read() for s in self.streams)

    def state_dict(self) -> dict[str, Any]:
        return {"shards": {str(s.spec.shard_index): s.state_dict() for s in self.streams}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue every shard from its saved position (a ValueError says why that is not possible)."""
        shards = state.get("shards", {})
        missing = [s.spec.shard_index for s in self.streams if str(s.spec.shard_index) not in shards]
        if missing:
            raise ValueError(f"the saved data position has no read shard {missing} (saved: {sorted(shards)})")
        for stream in self.streams:
            stream.load_state_dict(shards[str(stream.spec.shard_index)])

"""The numpy side of a frame stream: `StreamSpec` (what one stream reads), and `FrameStream`, which runs
the tf.data graph (pipeline.py) in a producer thread, resizes and augments each batch on a GIL-free thread
pool (image_ops), normalizes actions with each frame's own dataset statistics, and keeps a resumable
position.

A mixture (`StreamSpec.datasets`) reads every dataset with its own registry standardization, interleaves
their frames at the (optionally size-balanced) weights, and every frame is normalized with the statistics
of the dataset it came from.
"""

from __future__ import annotations

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
from vla_train.data.normalize import normalize
from vla_train.data.pipeline import build_tf_dataset

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
    # Data parallelism: this stream reads only episodes i with i % num_shards == shard_index, so the ranks
    # of a job read disjoint data (and draw different augmentations).
    num_shards: int = 1
    shard_index: int = 0

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
        if len(self.spec.datasets) > 1 and not per_dataset:
            raise ValueError("a mixture needs statistics per dataset: {dataset_name: statistics}")
        if per_dataset:
            counts = {d: s["num_transitions"] for d, s in self.statistics.items()}
        else:
            counts = {self.spec.dataset_names[0]: self.statistics["num_transitions"]}
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
                    threads=d.num_parallel_calls,
                )
        out.update(
            instruction=[s.decode() for s in batch["instruction"]],
            action=normalize_batch(
                batch["action"], names, self.statistics, d.normalization, batch.get("action_pad_mask")
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

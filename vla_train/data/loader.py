"""The frame stream: RLDS trajectories -> frames -> shuffle (encoded) -> decode/resize/augment -> numpy
batches with normalized actions, and its torch-side iterable with a resumable position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vla_train.data import tf_setup  # noqa: F401
from vla_train.data.normalize import normalize
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


def build_tf_dataset(spec: StreamSpec):
    """tf.data.Dataset of batches {image [B,S,S,3] uint8, instruction [B] string, action [B,A], proprio}."""
    import tensorflow as tf

    from vla_train.data.augment import augment_image

    builder = open_builder(spec.data_root_dir, spec.dataset_name)
    parallel = spec.num_parallel_calls or tf.data.AUTOTUNE
    ds = read_episodes(
        builder,
        split_for(builder, spec.train),
        shuffle_files=spec.train,
        seed=spec.seed,
        dataset_name=spec.dataset_name,
    )
    if spec.num_shards > 1:
        ds = ds.shard(spec.num_shards, spec.shard_index)
    # Episodes without an instruction carry no supervision for a language-conditioned policy.
    ds = ds.filter(lambda t: tf.strings.length(t["task"]["language_instruction"][0]) > 0)
    ds = ds.flat_map(tf.data.Dataset.from_tensor_slices)
    if spec.train:
        ds = ds.repeat().shuffle(spec.shuffle_buffer_size, seed=spec.seed, reshuffle_each_iteration=True)
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
        return {
            "image": img,
            "instruction": instruction,
            "action": f["action"],
            "proprio": f["observation"]["proprio"],
            "dataset_name": f["dataset_name"],
        }

    ds = ds.map(frame, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(spec.batch_size, drop_remainder=spec.train)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(2)


class FrameStream:
    """Iterates numpy batches with normalized actions; `state_dict` records how many were consumed, and
    `load_state_dict` makes the next batch the one the original stream would have yielded next."""

    def __init__(self, spec: StreamSpec, statistics: dict[str, Any]):
        self.spec = spec
        self.statistics = statistics
        self.num_batches_yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = build_tf_dataset(self.spec)
        if self._skip:
            ds = ds.skip(self._skip)
        self.num_batches_yielded = self._skip
        stats = self.statistics
        for batch in ds.as_numpy_iterator():
            self.num_batches_yielded += 1
            yield {
                "image": batch["image"],
                "instruction": [s.decode() for s in batch["instruction"]],
                "action": normalize(
                    batch["action"], stats["action"], self.spec.normalization, stats["action"]["mask"]
                ),
                "action_raw": batch["action"],
                "proprio": batch["proprio"],
                "dataset_name": [s.decode() for s in batch["dataset_name"]],
            }

    def state_dict(self) -> dict[str, int]:
        return {"num_batches_yielded": self.num_batches_yielded, "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.spec.seed) != self.spec.seed:
            raise ValueError("cannot restore a data stream position saved under a different seed")
        self._skip = int(state["num_batches_yielded"])

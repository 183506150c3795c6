"""The tf.data graph of a frame stream: RLDS trajectories of every dataset read (rlds.read_episodes, with
their registry standardization, each read shard reading only its own files) -> filters and trajectory
transforms (transforms.py) -> an image file check -> frames -> a weighted interleave of the datasets -> block
shuffle (still encoded) -> decode -> padded batches.

Every step is a function of positions, not of history, so that a training stream can start anywhere
(`StreamStart`) after reading at most one shuffle block:
- each dataset's frames come in reader order (rlds.EpisodeOrder: epoch, file position, record) and each
  frame knows its place there (`_cursor`: epoch, file position, record, frame in the episode);
- frame m of the mixture comes from the dataset drawn by a counter-based draw of (seed, m);
- the mixture's frames are shuffled in consecutive blocks of `shuffle_block_size` frames, block j by a
  permutation drawn from (seed, j); `_position` is a frame's place in the shuffled stream.

Resizing, augmentation and normalization happen after the graph, in numpy (stream.py), so this module
ends at decoded frames of each dataset's stored size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vla_train.data.errors import DatasetError, bad_data_message, first_string
from vla_train.data.mixture import allocate_threads, resolve_mixture
from vla_train.data.normalize import default_action_mask
from vla_train.data.rlds import (
    EpisodeOrder,
    RecordCounter,
    dataset_spec,
    open_builder,
    read_episodes,
    shard_episodes,
    split_for,
    version_dir,
)
from vla_train.data.tf_setup import tf
from vla_train.data.transforms import EpisodeFilter, apply_trajectory_transforms

if TYPE_CHECKING:
    from vla_train.data.stream import StreamSpec

log = logging.getLogger(__name__)
FIXED_INSTRUCTION = "complete the task"
_CHOICES_PER_DRAW = 1024  # mixture draws made per stateless op (each frame's draw depends on its index only)
# Shuffle blocks held at once: the one being emitted, the next one (prefetched) and the one being filled.
BLOCKS_IN_MEMORY = 3


@dataclass(frozen=True)
class StreamStart:
    """Where a training stream starts: the shuffle block being emitted, how many of its frames were
    consumed already, and for each dataset the first of its frames that block draws from (epoch, file
    position, record, frame in the episode; a dataset not listed starts at the beginning)."""

    block: int = 0
    in_block: int = 0
    cursors: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


TAIL_BYTES = 4096  # where an image file's end marker is looked for (trailing bytes after it are allowed)


def _contains(data, needle: bytes):
    """Per string: whether `needle` occurs in it (splitting on a byte separator is byte-exact)."""
    return tf.strings.split(data, sep=needle).row_lengths() > 1


def image_file_ok(image_bytes):
    """Cheap integrity check of encoded frames (a 1-D string tensor): a JPEG starts with its
    start-of-image marker and has its end-of-image marker in the last TAIL_BYTES (bytes after it, as some
    cameras write, are allowed); a PNG starts with its signature and has its IEND chunk there. A truncated
    or overwritten file fails it; decoding is what would catch subtler damage."""
    n = tf.strings.length(image_bytes)
    start = tf.maximum(n - TAIL_BYTES, 0)
    tail = tf.strings.substr(image_bytes, start, tf.fill(tf.shape(start), TAIL_BYTES))
    jpeg = tf.logical_and(
        tf.equal(tf.strings.substr(image_bytes, 0, 2), b"\xff\xd8"), _contains(tail, b"\xff\xd9")
    )
    png = tf.logical_and(
        tf.equal(tf.strings.substr(image_bytes, 0, 8), b"\x89PNG\r\n\x1a\n"), _contains(tail, b"IEND")
    )
    return tf.logical_or(jpeg, png)


def decode_frame(image_bytes, may_be_missing: bool = True):
    """Encoded JPEG or PNG -> (uint8 [H, W, 3], shape [2]); an empty string (a camera the dataset does not
    have; never the primary one) gives a 0 x 0 image, which FrameStream turns into a black frame. JPEGs
    decode exactly as tf.io.decode_jpeg decodes them."""

    def decode():
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

    if not may_be_missing:
        img = decode()
    else:
        img = tf.cond(tf.strings.length(image_bytes) > 0, decode, lambda: tf.zeros([0, 0, 3], tf.uint8))
    return img, tf.shape(img)[:2]


class FrameCheck:
    """`ds.map(FrameCheck(...))` on trajectories (after their transforms, before they are split into
    frames): a frame whose image (any requested camera, or its goal image) fails `image_file_ok` raises
    (on_bad_data=raise: the error names the dataset, episode and camera key) or is dropped and counted
    (skip; `counts()`). Checking whole trajectories keeps the per-frame cost to a few microseconds.

    episodes_per_pass > 0 (a training stream, which repeats its episodes): once that many trajectories
    have been checked without one good frame, the pipeline fails with the count instead of reading the
    dataset forever for a frame it never gets."""

    def __init__(self, cameras: list[str], on_bad_data: str, episodes_per_pass: int = 0):
        self.cameras = cameras  # every trajectory has image_<role> for each (rlds.read_episodes)
        self.on_bad_data = on_bad_data
        self.episodes_per_pass = int(episodes_per_pass or 0)
        self._dropped = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._kept = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, traj):
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
            good = tf.logical_or(tf.equal(tf.strings.length(data), 0), image_file_ok(data))
            if self.on_bad_data == "raise":
                message = bad_data_message(
                    "dataset '", first_string(traj["dataset_name"]), "': episode '",
                    first_string(traj["episode_id"]), "' step ",
                    tf.strings.as_string(tf.argmin(tf.cast(good, tf.int32))),
                    f" has a corrupt image (a JPEG or PNG without its start or end marker) in '{key}'; set "
                    "data.on_bad_data=skip to drop and count such frames",
                )  # fmt: skip
                checks.append(tf.debugging.Assert(tf.reduce_all(good), [message]))
            ok = tf.logical_and(ok, good)
        with tf.control_dependencies(checks):
            dropped = tf.reduce_sum(tf.cast(tf.logical_not(ok), tf.int64))
            seen = self._seen.assign_add(1)
            kept = self._kept.assign_add(tf.cast(n, tf.int64) - dropped)
        updates = [self._dropped.assign_add(dropped)]
        if self.episodes_per_pass > 0:
            nothing = tf.logical_and(seen >= self.episodes_per_pass, tf.equal(kept, 0))
            message = bad_data_message(
                "dataset '", first_string(traj["dataset_name"]), "': every frame of ",
                tf.strings.as_string(seen), " episodes has a corrupt image (",
                tf.strings.as_string(self._dropped.read_value() + dropped),
                " frames dropped under data.on_bad_data=skip), so it would give no frames; re-encode or "
                "rebuild the dataset's images",
            )  # fmt: skip
            updates.append(tf.debugging.Assert(tf.logical_not(nothing), [message]))
        with tf.control_dependencies(updates):
            return tf.nest.map_structure(lambda x: tf.boolean_mask(x, ok), traj)

    def counts(self) -> dict[str, int]:
        return {"corrupt_image": int(self._dropped.numpy())}


def memory_plan(spec: StreamSpec, bytes_per_frame: float) -> dict[str, int]:
    """Shuffle block (frames) and prefetch depth (batches) within data.ram_budget_gb: 70% for the
    BLOCKS_IN_MEMORY shuffle blocks of encoded frames (counted at 1.5x their stored size for tensor
    overhead), 20% for decoded batches in flight (prefetch + tf.data's autotuned buffers, capped by
    `autotune_ram_bytes`), the rest for the readers. With no budget the configured shuffle_buffer_size is
    used as is."""
    d = spec.data
    batch_bytes = spec.batch_size * spec.image_size**2 * 3 * (len(d.cameras) + int(d.goal_relabeling))
    if d.ram_budget_gb <= 0:
        return {"shuffle_buffer_size": d.shuffle_buffer_size, "prefetch": 2, "autotune_ram_bytes": 0}
    budget = d.ram_budget_gb * 1024**3
    fit = int(0.7 * budget / max(BLOCKS_IN_MEMORY * 1.5 * bytes_per_frame, 1.0))
    return {
        "shuffle_buffer_size": max(1, min(d.shuffle_buffer_size, fit)),
        "prefetch": int(max(1, min(4, 0.05 * budget // max(batch_bytes, 1)))),
        "autotune_ram_bytes": int(0.2 * budget),
    }


def bytes_per_frame(data_root_dir: str, num_transitions: dict[str, int]) -> float:
    """The largest average stored size of one frame (all its fields) over the datasets read: the bytes
    of every split in each dataset's dataset_info.json (no builder is opened) over its transitions."""
    worst = 0.0
    for name, steps in num_transitions.items():
        info = json.loads((version_dir(data_root_dir, name) / "dataset_info.json").read_text())
        total = sum(int(split.get("numBytes", 0)) for split in info.get("splits", []))
        worst = max(worst, total / max(steps, 1))
    return worst


def _absolute_action_mask(dataset_name: str) -> list[bool] | None:
    """The gripper (last dim of a dataset with one) is absolute: chunk padding repeats it."""
    spec = dataset_spec(dataset_name)
    if not spec.has_gripper:
        return None
    return [not m for m in default_action_mask(spec.action_dim)]


def _transformed(spec: StreamSpec, ds, dataset_name: str, index: int, threads: int):
    """The trajectory transforms of spec.data (chunking, proprio window, subsampling, goal relabeling), each
    episode seeded by (run seed, dataset index, the episode's reader position); none configured leaves `ds`
    as it is."""
    d = spec.data
    if not (
        d.future_action_window_size > 0 or d.window_size > 1 or spec.subsample_length or d.goal_relabeling
    ):
        return ds
    absolute = _absolute_action_mask(dataset_name)

    def transform(traj):
        seed = tf.stack([tf.constant(spec.seed * 1000 + index, tf.int64), traj["episode_key"][0]])
        return apply_trajectory_transforms(
            traj,
            seed,
            future_action_window_size=d.future_action_window_size,
            window_size=d.window_size,
            subsample_length=spec.subsample_length,
            goal_relabeling=d.goal_relabeling,
            absolute_action_mask=absolute,
        )

    return ds.map(transform, num_parallel_calls=threads, deterministic=True)


def _number_frames(traj):
    """Each frame's place in its (transformed, checked) episode: the frame part of its `_cursor`. The
    reader's per-step position fields are folded into it (fewer components per frame downstream)."""
    traj = dict(traj)
    position, _ = traj.pop("episode_position"), traj.pop("episode_key")
    n = tf.shape(traj["action"], out_type=tf.int64)[0]
    frame = tf.range(n, dtype=tf.int64)
    return {**traj, "_cursor": tf.concat([position, frame[:, None]], 1), "_episode_frames": tf.fill([n], n)}


def _dataset_frames(spec: StreamSpec, dataset_name: str, index: int, threads: int, start, parts: dict):
    """Frames (still encoded) of one dataset in reader order, from cursor `start` (epoch, file position,
    record, frame): filtered, transformed, checked, repeated when training. `parts` collects the
    dataset's EpisodeFilter and FrameCheck (under "filters") and its RecordCounter (under "readers")."""
    d = spec.data
    builder = open_builder(d.data_root_dir, dataset_name)
    split = split_for(builder, spec.train)
    epoch, position, record, frame = start
    order = EpisodeOrder(
        train=spec.train,
        seed=spec.seed,
        dataset_index=index,
        num_shards=spec.num_shards,
        shard_index=spec.shard_index,
        start=(epoch, position, record),
    )
    counter = RecordCounter()
    # read_episodes raises a DatasetError for an empty split, a missing key or a wrong action width
    ds = read_episodes(
        builder, split, order, dataset_name=dataset_name, cameras=tuple(d.cameras), counter=counter
    )
    episodes = shard_episodes(builder, split, dataset_name, spec.num_shards, spec.shard_index)
    # Episodes without an instruction carry no supervision for a language-conditioned policy; episodes
    # beyond max_action / max_proprio are dropped too, and episodes with NaN/inf action or proprio raise or
    # are dropped (on_bad_data). episode_filter counts every drop; a training pass that keeps no episode
    # raises with those counts instead of ending the dataset's stream.
    episode_filter = EpisodeFilter(
        max_action=d.max_action,
        max_proprio=d.max_proprio,
        on_bad_data=d.on_bad_data,
        episodes_per_pass=episodes if spec.train else 0,
        split=split,
    )
    frame_check = FrameCheck(list(d.cameras), d.on_bad_data, episodes if spec.train else 0)
    parts["filters"] += [episode_filter, frame_check]
    parts["readers"].append(counter)
    ds = ds.filter(episode_filter)
    ds = _transformed(spec, ds, dataset_name, index, threads)
    # plain TF code: skipping autograph's conversion makes tracing (per dataset of a mixture) faster
    check = tf.autograph.experimental.do_not_convert(frame_check)
    ds = ds.map(check, num_parallel_calls=threads, deterministic=True).map(_number_frames)
    ds = ds.unbatch()  # frames (much cheaper than flat_map(from_tensor_slices))
    return ds.skip(frame) if frame else ds  # a resumed stream: the frames of its episode already read


def _uniform_frames(streams, names: list[str]):
    """Give every dataset's frames the same structure so a mixture can interleave and batch them (the
    cameras already agree, rlds.read_episodes): proprio zero-padded to the widest dataset's. Datasets
    whose actions differ in width cannot share a batch: that raises."""
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


def _mixture_choices(seed: int, weights: list[float], first: int):
    """The dataset index of mixture frames first, first + 1, ...: frame m's from a counter-based draw of
    (seed, m // _CHOICES_PER_DRAW), so any frame's source is known without drawing the ones before."""
    logits = tf.math.log(tf.constant([weights], tf.float32))
    n = _CHOICES_PER_DRAW

    def draw(chunk):
        picks = tf.random.stateless_categorical(
            logits, n, seed=tf.stack([tf.constant(seed, tf.int64), chunk])
        )
        return picks[0]

    return tf.data.Dataset.range(first // n, 2**62).map(draw).unbatch().skip(first % n)


def _mixed_frames(
    spec: StreamSpec, num_transitions: dict[str, int], parts: dict, start: StreamStart, block: int
):
    """Every dataset's frames, interleaved at the (optionally size-balanced) mixture weights, from the
    frame `start` says (its block's first frame in the mixture)."""
    d = spec.data
    mixture = list(spec.datasets)
    weighted = resolve_mixture(mixture, d.balance_weights and len(mixture) > 1, num_transitions)
    if d.num_parallel_calls:
        threads = allocate_threads(max(d.num_parallel_calls, len(weighted)), [w for _, w in weighted])
    else:
        threads = [tf.data.AUTOTUNE] * len(weighted)
    streams = [
        _dataset_frames(spec, name, i, n, start.cursors.get(name, (0, 0, 0, 0)), parts)
        for i, ((name, _), n) in enumerate(zip(weighted, threads, strict=True))
    ]
    streams = _uniform_frames(streams, [n for n, _ in weighted])
    if len(streams) == 1:
        return streams[0]
    choices = _mixture_choices(spec.seed * 1000 + 997, [w for _, w in weighted], start.block * block)
    return tf.data.Dataset.choose_from_datasets(streams, choices, stop_on_empty_dataset=False)


def _shuffled_blocks(ds, spec: StreamSpec, block: int, start: StreamStart):
    """The frames shuffled within consecutive blocks of `block` frames, block j by a permutation drawn
    from (seed, j); each frame gets its `_position` in the shuffled stream. The next block is assembled
    while one is emitted. Starts at block start.block, with its first start.in_block frames dropped."""
    seed = tf.constant(spec.seed * 1000 + 991, tf.int64)

    def shuffle(j, frames):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(block, dtype=tf.int64), seed=tf.stack([seed, j])
        )
        shuffled = tf.nest.map_structure(lambda x: tf.gather(x, order), frames)
        return {**shuffled, "_position": j * block + tf.range(block, dtype=tf.int64)}

    ds = ds.batch(block, drop_remainder=True).enumerate(start=start.block).map(shuffle).prefetch(1)
    ds = ds.unbatch()
    return ds.skip(start.in_block) if start.in_block else ds


def _decoder(spec: StreamSpec):
    """The per-frame map after the shuffle: decoded (not yet resized) cameras with their sizes, the frame's
    augmentation index, and the frame's other fields. FrameStream resizes and augments whole batches
    outside TensorFlow (image_ops)."""
    d = spec.data
    roles = [("image" if r == "primary" else f"image_{r}", f"image_{r}") for r in d.cameras]

    def frame(f):
        out = {k: f[k] for k in ("_cursor", "_episode_frames", "_position") if k in f}
        for key, obs_key in roles:
            out[f"{key}/raw"], out[f"{key}/shape"] = decode_frame(f["observation"][obs_key], key != "image")
            if key != "image":
                out[f"{key}_mask"] = tf.strings.length(f["observation"][obs_key]) > 0
        if spec.augment:
            out["frame_index"] = f["_position"]  # seeds the frame's augmentation (augment.augment_params)
        instruction = f["task"]["language_instruction"]
        if d.ablation == "fixed_instruction":
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

    return tf.autograph.experimental.do_not_convert(frame)


def shuffle_block_size(spec: StreamSpec, num_transitions: dict[str, int]) -> int:
    """Frames per shuffle block of a training stream (data.shuffle_buffer_size within the RAM budget)."""
    return memory_plan(spec, bytes_per_frame(spec.data.data_root_dir, num_transitions))["shuffle_buffer_size"]


def build_tf_dataset(
    spec: StreamSpec,
    num_transitions: dict[str, int],
    parts: dict | None = None,
    start: StreamStart | None = None,
):
    """tf.data.Dataset of batches {image/raw [B,H,W,3] uint8 decoded frames (zero-padded to the batch's
    largest) and image/shape [B,2] (the primary camera; image_<role>/raw, /shape and image_<role>_mask for
    the other data.cameras), frame_index [B] (train with augmentation: the frames' positions in the
    stream, which seed their augmentation), instruction [B] string, action
    [B,A] (or [B,F+1,A] with action_pad_mask), proprio, dataset_name, episode_id (, goal_image/raw), and
    for training streams _cursor [B,4], _episode_frames [B] and _position [B] (see the module docstring)}.
    FrameStream resizes (and augments) the images and normalizes the actions.

    num_transitions: {dataset: count} of every dataset read (its statistics' num_transitions), for
    balance_weights and the memory plan. parts: an optional dict that receives under "filters" each
    dataset's transforms.EpisodeFilter and FrameCheck (their `counts()` are the drops) and under "readers"
    its rlds.RecordCounter. start: where a training stream starts (default: its beginning).
    """
    d = spec.data
    parts = {"filters": [], "readers": []} if parts is None else parts
    start = start or StreamStart()
    plan = memory_plan(spec, bytes_per_frame(d.data_root_dir, num_transitions))
    block = plan["shuffle_buffer_size"]
    ds = _mixed_frames(spec, num_transitions, parts, start, block)
    if spec.train:
        log.info(
            "data: shuffle blocks of %d frames, prefetch %d batches (ram_budget_gb %s)",
            block, plan["prefetch"], d.ram_budget_gb or "no cap",
        )  # fmt: skip
        ds = _shuffled_blocks(ds, spec, block, start)
    parallel = d.num_parallel_calls or tf.data.AUTOTUNE
    ds = ds.map(_decoder(spec), num_parallel_calls=parallel, deterministic=True)
    # frames of datasets stored at different sizes share a batch zero-padded (their sizes are kept)
    ds = ds.padded_batch(spec.batch_size, drop_remainder=spec.train)
    options = tf.data.Options()
    options.deterministic = True
    if spec.num_threads:
        options.threading.private_threadpool_size = spec.num_threads
    if plan["autotune_ram_bytes"]:
        options.autotune.ram_budget = plan["autotune_ram_bytes"]
    return ds.with_options(options).prefetch(plan["prefetch"])

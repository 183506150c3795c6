"""Trajectory transforms (OpenVLA / Octo semantics) on the trajectories of `rlds.read_episodes`:

    {observation: {image_primary: string[T], ..., proprio: float32[T, P]},
     task: {language_instruction: string[T]}, action: float32[T, A], dataset_name: string[T],
     episode_id: string[T]}

Every function here is built from TensorFlow graph ops and can be used in `ds.filter` / `ds.map`;
chunking, subsampling and goal relabeling keep every [T] key, episode_id included.

- Filters (`EpisodeFilter`): drop episodes without a language instruction, and (when a bound is set)
  episodes with any |action| > max_action or |proprio| > max_proprio, as OpenVLA's `max_action` /
  `max_proprio` filters do. The filter counts what it dropped, per reason, in tf.Variables. Given
  `on_bad_data`, it also checks that action and proprio are finite: `raise` fails the pipeline with an
  error naming the dataset, the episode (`episode_id`) and the key, `skip` drops and counts the episode
  (reason `non_finite`). Given `episodes_per_pass`, a pass in which every episode was dropped fails with
  the drop counts instead of ending (or, repeated, spinning) silently.
- `chunk_actions`: `future_action_window_size` F turns each frame's action into [F + 1, A] (the action
  of this step and of the next F steps) and adds `action_pad_mask` [T, F + 1] (False past the end).
  Padding follows OpenVLA's `chunk_act_obs`: indices past the end are clamped to the last step, then
  relative dimensions become 0 (a neutral "do not move" delta) and absolute dimensions (the gripper) keep
  the last value. OpenVLA chunks *normalized* actions, so its padded deltas are normalized zeros; this
  pipeline normalizes in numpy after the tf.data graph, so `FrameStream` re-applies the zeros after
  normalization using `action_pad_mask` (see stream.py) and the result equals OpenVLA's.
  `window_size` W > 1 adds a proprio history: proprio [T, W, P] (the W most recent steps, first step
  repeated before the start) and `proprio_pad_mask` [T, W]. Images stay a single frame (window 1).
  With a goal relabeled by `uniform_goal_relabel`, actions after the goal's step are padded as well
  (OpenVLA uses the goal timestep as the end of the chunk).
- `subsample`: keep at most `length` steps of an episode, a uniform random subset kept in time order
  (OpenVLA keeps a shuffled subset; order does not matter once frames are shuffled, and keeping it makes
  the result easier to reason about). Applied after chunking, so chunks still see the full episode.
- `uniform_goal_relabel`: adds `task/image_primary` (still JPEG-encoded) and `task/goal_timestep`, the
  goal of step t drawn uniformly from steps t+1 .. T-1 of the same episode (the last step gets itself).

Random transforms take a stateless seed ([2] int64) so the stream stays deterministic and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence

from vla_train.data.errors import SKIP_HINT, bad_data_message, first_string
from vla_train.data.tf_setup import tf

DROP_REASONS = ("non_finite", "no_instruction", "max_action", "max_proprio")
ON_BAD_DATA = ("raise", "skip")


def has_instruction(traj) -> object:
    """True when any step of the episode has a non-empty instruction, as OpenVLA decides (it reduces over
    every step); False for an empty episode."""
    return tf.reduce_any(tf.strings.length(traj["task"]["language_instruction"]) > 0)


def within_bound(x, bound: float) -> object:
    """True when every |x| <= bound (an empty tensor is within any bound); bound <= 0 means no bound."""
    if not bound or bound <= 0:
        return tf.constant(True)
    return tf.reduce_all(tf.abs(x) <= bound)


def all_finite(x) -> object:
    """True when x holds no NaN or inf (an empty tensor is finite)."""
    return tf.reduce_all(tf.math.is_finite(tf.cast(x, tf.float32)))


class EpisodeFilter:
    """`ds.filter(EpisodeFilter(...))`: keeps episodes with an instruction and within the bounds, and
    counts the dropped ones per reason (the first failing reason, in DROP_REASONS order).

    on_bad_data: None (default) does not look for NaN/inf; "raise" fails the pipeline on an episode with
    NaN/inf action or proprio (a tf.errors.InvalidArgumentError whose message names the dataset, the
    episode and the key; `errors.diagnose_read_error` turns it into a DatasetError); "skip" drops it and
    counts it under `non_finite`. episodes_per_pass > 0: the number of episodes one pass over the input
    holds; when that many have been seen and none kept, the pipeline fails with the drop counts (a training
    stream repeats its episodes, so it would otherwise read nothing from the dataset); split names the
    split in that message.

    The counts live in tf.Variables updated by the filter as the pipeline runs; read them with
    `counts()` (the reasons this filter checks). With a repeated dataset they keep growing (one count per
    pass).
    """

    def __init__(
        self,
        *,
        require_instruction: bool = True,
        max_action: float = 0.0,
        max_proprio: float = 0.0,
        on_bad_data: str | None = None,
        episodes_per_pass: int = 0,
        split: str = "",
    ):
        self.require_instruction = require_instruction
        self.max_action = float(max_action or 0.0)
        self.max_proprio = float(max_proprio or 0.0)
        self._counters = {r: tf.Variable(0, dtype=tf.int64, trainable=False) for r in DROP_REASONS}
        self._seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._kept = tf.Variable(0, dtype=tf.int64, trainable=False)
        if on_bad_data is not None and on_bad_data not in ON_BAD_DATA:
            raise ValueError(f"on_bad_data must be one of {ON_BAD_DATA} or None, got {on_bad_data!r}")
        self.on_bad_data = on_bad_data
        self.episodes_per_pass = int(episodes_per_pass or 0)
        self.split = split

    @property
    def reasons(self) -> tuple[str, ...]:
        """The drop reasons this filter checks (non_finite only with on_bad_data)."""
        return tuple(r for r in DROP_REASONS if r != "non_finite" or self.on_bad_data is not None)

    def __call__(self, traj):
        dataset = first_string(traj.get("dataset_name"))
        episode = first_string(traj.get("episode_id"))
        action_ok = all_finite(traj["action"])
        finite = tf.logical_and(action_ok, all_finite(traj["observation"]["proprio"]))
        asserts = []
        if self.on_bad_data == "raise":
            key = tf.where(action_ok, tf.constant("observation/proprio"), tf.constant("action"))
            message = bad_data_message(
                "dataset '", dataset, "': episode '", episode, "' has NaN or inf values in '", key,
                f"'; fix the data, or {SKIP_HINT}",
            )  # fmt: skip
            asserts.append(tf.debugging.Assert(finite, [message]))
        checks = {
            "non_finite": finite,
            "no_instruction": has_instruction(traj) if self.require_instruction else tf.constant(True),
            "max_action": within_bound(traj["action"], self.max_action),
            "max_proprio": within_bound(traj["observation"]["proprio"], self.max_proprio),
        }
        with tf.control_dependencies(asserts):
            failed_before = tf.constant(False)
            counts = {}
            for reason in self.reasons:
                ok = checks[reason]
                first_failure = tf.logical_and(tf.logical_not(ok), tf.logical_not(failed_before))
                counts[reason] = self._counters[reason].assign_add(tf.cast(first_failure, tf.int64))
                failed_before = tf.logical_or(failed_before, tf.logical_not(ok))
            keep = tf.logical_not(failed_before)
            seen = self._seen.assign_add(1)
            kept = self._kept.assign_add(tf.cast(keep, tf.int64))
        if self.episodes_per_pass > 0:
            nothing_kept = tf.logical_and(seen >= self.episodes_per_pass, tf.equal(kept, 0))
            detail = ", ".join(f"{r}=" + "{}" for r in self.reasons)
            split = f" of split '{self.split}'" if self.split else ""
            message = bad_data_message(
                "dataset '", dataset, f"': the filters dropped all {self.episodes_per_pass} episodes{split} (",
                tf.strings.format(detail, [counts[r] for r in self.reasons]),
                "), so it would give no frames; check the data, data.max_action / data.max_proprio and "
                "data.on_bad_data",
            )  # fmt: skip
            asserts = [tf.debugging.Assert(tf.logical_not(nothing_kept), [message])]
            with tf.control_dependencies(asserts):
                keep = tf.identity(keep)
        return keep

    def counts(self) -> dict[str, int]:
        return {r: int(self._counters[r].numpy()) for r in self.reasons}


def chunk_actions(
    traj,
    future_action_window_size: int = 0,
    window_size: int = 1,
    absolute_action_mask: Sequence[bool] | None = None,
):
    """Action chunks [T, F + 1, A] with `action_pad_mask`, and a proprio history when window_size > 1
    (see the module docstring). `absolute_action_mask` [A]: dimensions that repeat the last value when
    padded (default: none, i.e. all relative). F = 0 and W = 1 return the trajectory unchanged."""
    if future_action_window_size < 0 or window_size < 1:
        raise ValueError("future_action_window_size must be >= 0 and window_size >= 1")
    traj = dict(traj)
    T = tf.shape(traj["action"])[0]
    steps = tf.range(T)
    if future_action_window_size > 0:
        action_dim = traj["action"].shape[-1]
        idx = steps[:, None] + tf.range(future_action_window_size + 1)[None, :]  # [T, F+1]
        end = traj["task"].get("goal_timestep", tf.fill([T], T - 1))
        end = tf.cast(end, tf.int32)
        past_end = idx > end[:, None]
        chunk = tf.gather(traj["action"], tf.minimum(idx, end[:, None]))  # [T, F+1, A]
        absolute = tf.constant(
            [False] * action_dim if absolute_action_mask is None else [bool(m) for m in absolute_action_mask],
            tf.bool,
        )
        neutral = tf.where(absolute[None, None, :], chunk, tf.zeros_like(chunk))
        traj["action"] = tf.where(past_end[:, :, None], neutral, chunk)
        traj["action_pad_mask"] = tf.logical_not(past_end)
    if window_size > 1:
        observation = dict(traj["observation"])
        hist = steps[:, None] + tf.range(-window_size + 1, 1)[None, :]  # [T, W], oldest first
        observation["proprio"] = tf.gather(observation["proprio"], tf.maximum(hist, 0))
        observation["proprio_pad_mask"] = hist >= 0
        traj["observation"] = observation
    return traj


def _gather_steps(traj, idx):
    return tf.nest.map_structure(lambda x: tf.gather(x, idx), traj)


def subsample(traj, length: int, seed):
    """At most `length` steps: a uniform random subset, in time order (seed: stateless [2] int)."""
    if length <= 0:
        return traj
    T = tf.shape(traj["action"])[0]
    keys = tf.random.stateless_uniform([T], seed=seed)
    keep = tf.sort(tf.math.top_k(keys, k=tf.minimum(T, length)).indices)
    return _gather_steps(traj, keep)


def uniform_goal_relabel(traj, seed):
    """Adds task/image_primary and task/goal_timestep: step t's goal is uniform over t+1 .. T-1 of the
    same episode (the last step's goal is itself), as OpenVLA's `uniform` goal relabeling."""
    T = tf.shape(traj["action"])[0]
    rand = tf.random.stateless_uniform([T], seed=seed)
    low = tf.cast(tf.range(T) + 1, tf.float32)
    high = tf.cast(T, tf.float32)
    goal = tf.minimum(tf.cast(rand * (high - low) + low, tf.int32), T - 1)
    traj = dict(traj)
    task = dict(traj["task"])
    task["image_primary"] = tf.gather(traj["observation"]["image_primary"], goal)
    task["goal_timestep"] = goal
    traj["task"] = task
    return traj


def apply_trajectory_transforms(
    traj,
    seed,
    *,
    future_action_window_size: int = 0,
    window_size: int = 1,
    subsample_length: int = 0,
    goal_relabeling: bool = False,
    absolute_action_mask: Sequence[bool] | None = None,
):
    """OpenVLA's order: goal relabeling, chunking, subsampling. `seed`: stateless [2] int64 per episode."""
    seed = tf.cast(seed, tf.int64)
    if goal_relabeling:
        traj = uniform_goal_relabel(traj, seed)
    traj = chunk_actions(traj, future_action_window_size, window_size, absolute_action_mask)
    if subsample_length > 0:
        traj = subsample(traj, subsample_length, seed + tf.constant([0, 1], tf.int64))
    return traj


__all__ = [
    "DROP_REASONS",
    "EpisodeFilter",
    "ON_BAD_DATA",
    "all_finite",
    "apply_trajectory_transforms",
    "chunk_actions",
    "has_instruction",
    "subsample",
    "uniform_goal_relabel",
    "within_bound",
]

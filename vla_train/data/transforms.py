"""Trajectory transforms (OpenVLA / Octo semantics) on the trajectories of `rlds.read_episodes`:

    {observation: {image_primary: string[T], ..., proprio: float32[T, P]},
     task: {language_instruction: string[T]}, action: float32[T, A], dataset_name: string[T]}

Every function here is built from TensorFlow graph ops and can be used in `ds.filter` / `ds.map`.

- Filters (`EpisodeFilter`): drop episodes without a language instruction, and (when a bound is set)
  episodes with any |action| > max_action or |proprio| > max_proprio, as OpenVLA's `max_action` /
  `max_proprio` filters do. The filter counts what it dropped, per reason, in tf.Variables.
- `chunk_actions`: `future_action_window_size` F turns each frame's action into [F + 1, A] (the action
  of this step and of the next F steps) and adds `action_pad_mask` [T, F + 1] (False past the end).
  Padding follows OpenVLA's `chunk_act_obs`: indices past the end are clamped to the last step, then
  relative dimensions become 0 (a neutral "do not move" delta) and absolute dimensions (the gripper) keep
  the last value. OpenVLA chunks *normalized* actions, so its padded deltas are normalized zeros; this
  pipeline normalizes in numpy after the tf.data graph, so `FrameStream` re-applies the zeros after
  normalization using `action_pad_mask` (see loader.py) and the result equals OpenVLA's.
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

from vla_train.data import tf_setup  # noqa: F401

DROP_REASONS = ("no_instruction", "max_action", "max_proprio")


def _tf():
    import tensorflow as tf

    return tf


def has_instruction(traj) -> object:
    """True when the episode's (first) language instruction is non-empty."""
    tf = _tf()
    return tf.strings.length(traj["task"]["language_instruction"][0]) > 0


def within_bound(x, bound: float) -> object:
    """True when every |x| <= bound (an empty tensor is within any bound); bound <= 0 means no bound."""
    tf = _tf()
    if not bound or bound <= 0:
        return tf.constant(True)
    return tf.reduce_all(tf.abs(x) <= bound)


class EpisodeFilter:
    """`ds.filter(EpisodeFilter(...))`: keeps episodes with an instruction and within the bounds, and
    counts the dropped ones per reason (the first failing reason, in DROP_REASONS order).

    The counts live in tf.Variables updated by the filter as the pipeline runs; read them with
    `counts()`. With a repeated dataset they keep growing (one count per pass).
    """

    def __init__(
        self, *, require_instruction: bool = True, max_action: float = 0.0, max_proprio: float = 0.0
    ):
        tf = _tf()
        self.require_instruction = require_instruction
        self.max_action = float(max_action or 0.0)
        self.max_proprio = float(max_proprio or 0.0)
        self._counters = {r: tf.Variable(0, dtype=tf.int64, trainable=False) for r in DROP_REASONS}

    def __call__(self, traj):
        tf = _tf()
        checks = [
            has_instruction(traj) if self.require_instruction else tf.constant(True),
            within_bound(traj["action"], self.max_action),
            within_bound(traj["observation"]["proprio"], self.max_proprio),
        ]
        failed_before = tf.constant(False)
        for reason, ok in zip(DROP_REASONS, checks, strict=True):
            first_failure = tf.logical_and(tf.logical_not(ok), tf.logical_not(failed_before))
            self._counters[reason].assign_add(tf.cast(first_failure, tf.int64))
            failed_before = tf.logical_or(failed_before, tf.logical_not(ok))
        return tf.logical_not(failed_before)

    def counts(self) -> dict[str, int]:
        return {r: int(v.numpy()) for r, v in self._counters.items()}


def chunk_actions(
    traj,
    future_action_window_size: int = 0,
    window_size: int = 1,
    absolute_action_mask: Sequence[bool] | None = None,
):
    """Action chunks [T, F + 1, A] with `action_pad_mask`, and a proprio history when window_size > 1
    (see the module docstring). `absolute_action_mask` [A]: dimensions that repeat the last value when
    padded (default: none, i.e. all relative). F = 0 and W = 1 return the trajectory unchanged."""
    tf = _tf()
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
    tf = _tf()
    return tf.nest.map_structure(lambda x: tf.gather(x, idx), traj)


def subsample(traj, length: int, seed):
    """At most `length` steps: a uniform random subset, in time order (seed: stateless [2] int)."""
    tf = _tf()
    if length <= 0:
        return traj
    T = tf.shape(traj["action"])[0]
    keys = tf.random.stateless_uniform([T], seed=seed)
    keep = tf.sort(tf.math.top_k(keys, k=tf.minimum(T, length)).indices)
    return _gather_steps(traj, keep)


def uniform_goal_relabel(traj, seed):
    """Adds task/image_primary and task/goal_timestep: step t's goal is uniform over t+1 .. T-1 of the
    same episode (the last step's goal is itself), as OpenVLA's `uniform` goal relabeling."""
    tf = _tf()
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
    tf = _tf()
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
    "apply_trajectory_transforms",
    "chunk_actions",
    "has_instruction",
    "subsample",
    "uniform_goal_relabel",
    "within_bound",
]

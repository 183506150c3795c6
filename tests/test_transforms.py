"""Trajectory transforms: filters with drop counts, action chunking with end padding, proprio history,
subsampling and uniform goal relabeling (all TensorFlow graph ops usable in tf.data)."""

from __future__ import annotations

import numpy as np
import pytest

from vla_train.data import transforms


def traj(T=5, A=3, P=2, instruction="pick", scale=1.0):
    import tensorflow as tf

    action = np.arange(T * A, dtype=np.float32).reshape(T, A) * scale
    action[:, -1] = np.arange(T) % 2  # gripper-like last dim: 0, 1, 0, 1, ...
    return {
        "observation": {
            "image_primary": tf.constant([f"img{t}".encode() for t in range(T)]),
            "proprio": tf.constant(np.arange(T * P, dtype=np.float32).reshape(T, P) * scale),
        },
        "task": {"language_instruction": tf.fill([T], instruction)},
        "action": tf.constant(action),
        "dataset_name": tf.fill([T], "d"),
    }


def test_chunking_pads_past_the_end_with_neutral_actions():
    out = transforms.chunk_actions(traj(T=4), future_action_window_size=2, absolute_action_mask=[0, 0, 1])
    a = out["action"].numpy()
    assert a.shape == (4, 3, 3)
    # raw actions: step t = [3t, 3t + 1, t % 2]
    np.testing.assert_array_equal(a[0], [[0, 1, 0], [3, 4, 1], [6, 7, 0]])
    np.testing.assert_array_equal(a[1], [[3, 4, 1], [6, 7, 0], [9, 10, 1]])
    # past the end: relative dims 0, gripper (absolute) repeats the last step's value (1)
    np.testing.assert_array_equal(a[2], [[6, 7, 0], [9, 10, 1], [0, 0, 1]])
    np.testing.assert_array_equal(a[3], [[9, 10, 1], [0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(
        out["action_pad_mask"].numpy(), [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    )
    # without an absolute mask every padded dimension is 0
    rel = transforms.chunk_actions(traj(T=4), future_action_window_size=1)["action"].numpy()
    np.testing.assert_array_equal(rel[3], [[9, 10, 1], [0, 0, 0]])


def test_chunking_defaults_leave_the_trajectory_unchanged_and_proprio_window():
    t = traj(T=3)
    same = transforms.chunk_actions(t)
    assert same["action"].shape == (3, 3) and "action_pad_mask" not in same
    hist = transforms.chunk_actions(t, window_size=2)
    # proprio step t = [2t, 2t + 1]; before the start the first step repeats and the pad mask is False
    np.testing.assert_array_equal(hist["observation"]["proprio"].numpy()[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(hist["observation"]["proprio"].numpy()[2], [[2, 3], [4, 5]])
    np.testing.assert_array_equal(hist["observation"]["proprio_pad_mask"].numpy(), [[0, 1], [1, 1], [1, 1]])
    assert hist["observation"]["image_primary"].shape == (3,)  # images stay one frame
    with pytest.raises(ValueError):
        transforms.chunk_actions(t, window_size=0)


def test_filters_drop_and_count_inside_tf_data():
    import tensorflow as tf

    episodes = [
        traj(instruction="a"),
        traj(instruction=""),  # no instruction
        traj(instruction="b", scale=100.0),  # |action| and |proprio| up to 1400 / 900
        traj(instruction="c"),
    ]
    big_proprio = traj(instruction="d")
    big_proprio["observation"]["proprio"] = big_proprio["observation"]["proprio"] * 1000.0
    episodes.append(big_proprio)

    ds = tf.data.Dataset.from_tensors(episodes[0])
    for e in episodes[1:]:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(e))
    f = transforms.EpisodeFilter(max_action=100.0, max_proprio=100.0)
    kept = [e["task"]["language_instruction"][0].decode() for e in ds.filter(f).as_numpy_iterator()]
    assert kept == ["a", "c"]
    assert f.counts() == {"no_instruction": 1, "max_action": 1, "max_proprio": 1}
    off = transforms.EpisodeFilter()  # bounds off: only the instruction filter
    assert len(list(ds.filter(off).as_numpy_iterator())) == 4 and off.counts()["no_instruction"] == 1


def test_subsample_bounds_length_keeps_order_and_is_deterministic():
    import tensorflow as tf

    t = traj(T=10)
    seed = tf.constant([1, 2], tf.int64)
    out = transforms.subsample(t, 4, seed)
    a = out["action"].numpy()
    assert a.shape == (4, 3)
    steps = a[:, 0] / 3
    assert np.all(np.diff(steps) > 0) and set(steps) <= set(range(10))
    # every field gathered with the same steps
    assert [s.decode() for s in out["observation"]["image_primary"].numpy()] == [
        f"img{int(s)}" for s in steps
    ]
    np.testing.assert_array_equal(transforms.subsample(t, 4, seed)["action"].numpy(), a)
    assert transforms.subsample(traj(T=3), 4, seed)["action"].shape == (3, 3)  # shorter: unchanged


def test_goal_image_comes_from_the_same_trajectory_future():
    import tensorflow as tf

    T = 8
    for s in range(5):
        out = transforms.uniform_goal_relabel(traj(T=T), tf.constant([s, 7], tf.int64))
        goal = out["task"]["goal_timestep"].numpy()
        assert np.all(goal[:-1] > np.arange(T - 1)) and np.all(goal <= T - 1) and goal[-1] == T - 1
        images = [x.decode() for x in out["task"]["image_primary"].numpy()]
        assert images == [f"img{g}" for g in goal]


def test_apply_trajectory_transforms_in_a_dataset_map():
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(traj(T=6)).enumerate()
    ds = ds.map(
        lambda i, t: transforms.apply_trajectory_transforms(
            t,
            tf.stack([tf.constant(0, tf.int64), i]),
            future_action_window_size=1,
            subsample_length=3,
            goal_relabeling=True,
            absolute_action_mask=[False, False, True],
        )
    )
    out = next(ds.as_numpy_iterator())
    assert out["action"].shape == (3, 2, 3) and out["task"]["image_primary"].shape == (3,)
    # chunks end at the goal: positions after the goal step are padding
    for k in range(3):
        step = int(out["action"][k, 0, 0]) // 3
        goal = out["task"]["goal_timestep"][k]
        assert out["action_pad_mask"][k, 1] == (step + 1 <= goal)

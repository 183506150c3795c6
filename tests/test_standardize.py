"""Standardization of every registered dataset, run through tf.data on synthetic data in its raw layout.

One raw dataset is written per standardize_fn (datasets sharing a function share it) in a session
fixture; every registered dataset is then read with tfds exactly as the reader reads real data.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from raw_synthetic import RAW_LAYOUTS, generate_raw_episode, write_raw_synthetic

from vla_train.data.registry import DatasetSpec, load_registry
from vla_train.data.standardize import (
    STANDARDIZE_FNS,
    StandardizeError,
    binarize_gripper,
    bridge_orig,
    clip_invert_gripper,
    libero,
    make_standardizer,
    proprio_from_state_keys,
    quaternion_to_euler,
    relative_to_absolute_gripper,
    rt1,
)

NUM_EPISODES, NUM_STEPS, IMAGE_SIZE = 3, 6, 32
SPECS: dict[str, DatasetSpec] = load_registry().datasets
SHORTER_BY = {"bridge_orig": 2, "bridge_oxe": 2}  # frames lost by the standardization


# ---------------------------------------------------------------------------------------------------------
# numpy references, written from the documented semantics


def ref_binarize(g: np.ndarray) -> np.ndarray:
    out, carry = np.empty(len(g)), g[-1]
    for i in reversed(range(len(g))):
        if g[i] > 0.95:
            carry = 1.0
        elif g[i] < 0.05:
            carry = 0.0
        out[i] = carry
    return out


def ref_relative_to_absolute(g: np.ndarray) -> np.ndarray:
    commands = [1 if x < -0.1 else -1 if x > 0.1 else 0 for x in g]  # +1 open, -1 close
    first = next((c for c in commands if c), 0)
    state, out = (1 if first == 0 else -first), []
    for c in commands:
        state = c or state
        out.append(state / 2 + 0.5)
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------
# gripper and rotation helpers, hand-computed


def test_binarize_gripper_borrows_the_state_reached_after_intermediate_values():
    out = binarize_gripper(tf.constant([1.0, 0.5, 0.0, 0.3, 1.0, 0.6]))
    # 0.5 -> closed (next decided value 0.0); 0.3 -> open; the trailing 0.6 keeps the raw last value
    np.testing.assert_allclose(out.numpy(), [1.0, 0.0, 0.0, 1.0, 1.0, 0.6])
    assert binarize_gripper(tf.zeros([0])).shape == (0,)


def test_relative_gripper_commands_become_absolute_open_closed():
    # RT-1: +1 = close, -1 = open, 0 = keep; before the first command the gripper was open
    out = relative_to_absolute_gripper(tf.constant([0.0, 1.0, 0.0, 0.0, -1.0, 0.0]))
    np.testing.assert_allclose(out.numpy(), [1, 0, 0, 0, 1, 1])
    # the first command opens, so it was closed before
    np.testing.assert_allclose(
        relative_to_absolute_gripper(tf.constant([0.0, -1.0, 0.0, 1.0])).numpy(), [0, 1, 1, 0]
    )
    np.testing.assert_allclose(relative_to_absolute_gripper(tf.zeros([3])).numpy(), [1, 1, 1])
    assert relative_to_absolute_gripper(tf.zeros([0])).shape == (0,)


def test_clip_invert_gripper_libero_convention():
    # LIBERO: -1 = open, +1 = close -> 1 - clip(g, 0, 1)
    np.testing.assert_allclose(
        clip_invert_gripper(tf.constant([-1.0, 1.0, 0.3, 0.0])).numpy(), [1, 0, 0.7, 1]
    )


def _quaternion_from_euler(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """(x, y, z, w) of Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ]
    )


def test_quaternion_to_euler_round_trips():
    np.testing.assert_allclose(quaternion_to_euler(tf.constant([[0.0, 0.0, 0.0, 1.0]])).numpy(), [[0, 0, 0]])
    # a quarter turn about z: (0, 0, sin 45, cos 45)
    quarter = quaternion_to_euler(tf.constant([0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)])).numpy()
    np.testing.assert_allclose(quarter, [0, 0, np.pi / 2], atol=1e-6)
    rng = np.random.default_rng(0)
    euler = np.stack([rng.uniform(-3, 3, 20), rng.uniform(-1.4, 1.4, 20), rng.uniform(-3, 3, 20)], -1)
    quats = np.stack([_quaternion_from_euler(*e) for e in euler]).astype(np.float32)
    np.testing.assert_allclose(quaternion_to_euler(tf.constant(quats)).numpy(), euler, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------
# the important standardizations on hand-made episodes, in graph mode


def test_bridge_orig_drops_first_and_last_step_and_relabels_from_state():
    T = 5
    t = np.arange(T, dtype=np.float32)[:, None]
    state = np.concatenate([t * [1, 2, 3, 0.1, 0.2, 0.3], np.zeros((T, 1))], axis=1).astype(np.float32)
    action = np.full((T, 7), 9.0, np.float32)  # stored motion is ignored: relabeled from state
    action[:, -1] = [1.0, 1.0, 0.5, 0.0, 0.0]
    steps = {
        "observation": {
            "image_0": tf.constant([f"img{i}".encode() for i in range(T)]),
            "state": tf.constant(state),
        },
        "action": tf.constant(action),
        "language_instruction": tf.constant([b"put the pot in the sink"] * T),
        "is_first": tf.constant([True] + [False] * (T - 1)),
    }
    out = tf.function(bridge_orig)(steps)
    assert out["action"].shape == (T - 2, 7) and out["action"].dtype == tf.float32
    # frames are the stored steps 1, 2, 3; motion = state[t+1] - state[t] = (1, 2, 3, .1, .2, .3)
    np.testing.assert_allclose(
        out["action"][:, :6].numpy(), np.tile([1, 2, 3, 0.1, 0.2, 0.3], (3, 1)), rtol=1e-6
    )
    # gripper of steps 1..4 is [1, 0.5, 0, 0] -> binarized [1, 0, 0, 0] -> frames 1..3
    np.testing.assert_allclose(out["action"][:, 6].numpy(), [1, 0, 0])
    assert out["observation"]["image_0"].numpy().tolist() == [b"img1", b"img2", b"img3"]
    np.testing.assert_allclose(out["observation"]["EEF_state"].numpy(), state[1:4, :6])
    assert out["observation"]["gripper_state"].shape == (3, 1)
    assert out["language_instruction"].shape == (3,)


def test_rt1_fractal_gripper_becomes_absolute():
    T = 6
    steps = {
        "observation": {
            "image": tf.constant([b"x"] * T),
            "natural_language_instruction": tf.constant([b"pick coke can"] * T),
        },
        "action": {
            "world_vector": tf.fill([T, 3], 0.25),
            "rotation_delta": tf.fill([T, 3], -0.5),
            "gripper_closedness_action": tf.constant([[0.0], [1.0], [0.0], [0.0], [-1.0], [0.0]]),
            "terminate_episode": tf.zeros([T, 3], tf.int32),
        },
    }
    out = tf.function(rt1)(steps)
    expected = np.concatenate(
        [np.full((T, 3), 0.25), np.full((T, 3), -0.5), [[1], [0], [0], [0], [1], [1]]], 1
    )
    np.testing.assert_allclose(out["action"].numpy(), expected)
    assert out["language_instruction"].numpy()[0] == b"pick coke can"


def test_libero_gripper_and_state():
    steps = {
        "observation": {
            "image": tf.constant([b"a", b"b", b"c"]),
            "state": tf.reshape(tf.range(24.0), [3, 8]),
        },
        "action": tf.constant([[0.1] * 6 + [-1.0], [0.2] * 6 + [1.0], [0.3] * 6 + [0.4]]),
        "language_instruction": tf.constant([b"open the drawer"] * 3),
    }
    out = tf.function(libero)(steps)
    np.testing.assert_allclose(out["action"][:, 6].numpy(), [1.0, 0.0, 0.6], rtol=1e-6)
    np.testing.assert_allclose(
        out["action"][:, :6].numpy(), np.repeat([[0.1], [0.2], [0.3]], 6, 1), rtol=1e-6
    )
    assert out["observation"]["EEF_state"].shape == (3, 6) and out["observation"]["gripper_state"].shape == (
        3,
        2,
    )
    np.testing.assert_allclose(out["observation"]["gripper_state"][0].numpy(), [6.0, 7.0])


def test_proprio_concatenates_state_keys_and_pads_none():
    obs = {"a": tf.ones([4, 3]), "b": tf.constant([1.0, 0.0, 1.0, 0.0], tf.float64)}
    proprio = proprio_from_state_keys(obs, ["a", None, "b"])
    assert proprio.shape == (4, 5) and proprio.dtype == tf.float32
    np.testing.assert_allclose(proprio[:, 3].numpy(), 0.0)
    np.testing.assert_allclose(proprio[:, 4].numpy(), [1, 0, 1, 0])
    assert proprio_from_state_keys(obs, [None] * 8).shape == (4, 8)


# ---------------------------------------------------------------------------------------------------------
# every registered dataset, from raw synthetic files through tf.data


@pytest.fixture(scope="session")
def raw_paths(tmp_path_factory) -> dict[str, Path]:
    """standardize_fn -> directory of a synthetic dataset in that function's raw layout."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("raw_oxe")
    groups: dict[str, list[DatasetSpec]] = defaultdict(list)
    for spec in SPECS.values():
        groups[spec.standardize_fn].append(spec)
    paths = {}
    for seed, (fn, specs) in enumerate(sorted(groups.items())):
        paths[fn] = write_raw_synthetic(
            root,
            specs[0],
            name=f"raw_{fn}",
            also_for=specs[1:],
            num_episodes=NUM_EPISODES,
            num_steps=NUM_STEPS,
            image_size=IMAGE_SIZE,
            seed=seed,
        )
    return paths


def raw_and_standardized(path: Path, spec: DatasetSpec) -> list[tuple[dict, dict]]:
    """(raw steps, standardized trajectory + proprio) numpy pairs of every episode, via tf.data."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    ds = builder.as_dataset(
        split="train", decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    standardize = make_standardizer(spec)

    @tf.autograph.experimental.do_not_convert  # plain TF: keeps trace-time errors unwrapped
    def both(episode):
        traj = standardize(episode["steps"])
        traj["proprio"] = proprio_from_state_keys(traj["observation"], spec.state_obs_keys)
        return episode["steps"], traj

    return list(ds.map(both, num_parallel_calls=2, deterministic=True).as_numpy_iterator())


def test_every_standardize_fn_has_a_raw_layout():
    assert set(RAW_LAYOUTS) == set(STANDARDIZE_FNS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_registered_dataset_standardizes_through_tf_data(raw_paths, name):
    spec = SPECS[name]
    pairs = raw_and_standardized(raw_paths[spec.standardize_fn], spec)
    assert len(pairs) == NUM_EPISODES
    frames = NUM_STEPS - SHORTER_BY.get(spec.standardize_fn, 0)
    for _, traj in pairs:
        action = traj["action"]
        assert action.dtype == np.float32 and action.shape == (frames, spec.action_dim)
        assert np.isfinite(action).all()
        if spec.has_gripper:
            assert action[:, -1].min() >= 0.0 and action[:, -1].max() <= 1.0, action[:, -1]

        instruction = traj["language_instruction"]
        assert instruction.shape == (frames,)
        text = instruction[0].decode("utf-8")
        assert text and len(text.split()) >= 2 and (instruction == instruction[0]).all()

        obs = traj["observation"]
        for key in (k for k in spec.image_obs_keys.values() if k is not None):
            assert obs[key].shape == (frames,)
            assert tf.io.decode_image(obs[key][0]).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for key in (k for k in spec.depth_obs_keys.values() if k is not None):
            assert obs[key].shape[0] == frames
        proprio = traj["proprio"]
        width = sum(1 if k is None else int(np.prod(obs[k].shape[1:])) for k in spec.state_obs_keys)
        assert proprio.shape == (frames, width) and np.isfinite(proprio).all()


def test_bridge_orig_values_match_the_reference(raw_paths):
    spec = SPECS["bridge_orig"]
    for raw, traj in raw_and_standardized(raw_paths["bridge_orig"], spec):
        state, action = raw["observation"]["state"][1:], raw["action"][1:]  # first step dropped
        expected = np.concatenate(
            [state[1:, :6] - state[:-1, :6], ref_binarize(action[:, -1])[:-1, None]], axis=1
        )
        np.testing.assert_allclose(traj["action"], expected, rtol=1e-5, atol=1e-6)
        assert (traj["observation"]["image_0"] == raw["observation"]["image_0"][1:-1]).all()
        np.testing.assert_allclose(traj["observation"]["EEF_state"], state[:-1, :6])


def test_fractal_values_match_the_reference(raw_paths):
    spec = SPECS["fractal20220817_data"]
    saw_both_states = set()
    for raw, traj in raw_and_standardized(raw_paths["rt1"], spec):
        act = raw["action"]
        gripper = ref_relative_to_absolute(act["gripper_closedness_action"][:, 0])
        expected = np.concatenate([act["world_vector"], act["rotation_delta"], gripper[:, None]], axis=1)
        np.testing.assert_allclose(traj["action"], expected, rtol=1e-6)
        saw_both_states.update(gripper.tolist())
        assert (traj["language_instruction"] == raw["observation"]["natural_language_instruction"]).all()
    assert saw_both_states == {0.0, 1.0}


def test_libero_values_match_the_reference(raw_paths):
    spec = SPECS["libero_10_no_noops"]
    for raw, traj in raw_and_standardized(raw_paths["libero"], spec):
        a = raw["action"]
        expected = np.concatenate([a[:, :6], 1 - np.clip(a[:, -1:], 0, 1)], axis=1)
        np.testing.assert_allclose(traj["action"], expected, rtol=1e-6)
        assert set(np.unique(a[:, -1])) <= {-1.0, 1.0} and set(np.unique(traj["action"][:, -1])) <= {0.0, 1.0}


def test_kuka_state_is_decompressed(raw_paths):
    spec = SPECS["kuka"]
    for raw, traj in raw_and_standardized(raw_paths["kuka"], spec):
        stored = raw["observation"]["clip_function_input/base_pose_tool_reached"]
        decoded = np.stack([np.frombuffer(zlib.decompress(b), np.float32) for b in stored])
        np.testing.assert_array_equal(
            traj["observation"]["clip_function_input/base_pose_tool_reached"], decoded
        )
        assert traj["observation"]["gripper_closed"].shape == (NUM_STEPS, 1)


def test_language_table_instruction_is_decoded_from_code_points(raw_paths):
    spec = SPECS["language_table"]
    for raw, traj in raw_and_standardized(raw_paths["language_table"], spec):
        points = raw["observation"]["instruction"][0]
        expected = "".join(chr(c) for c in points if c).encode()
        assert (traj["language_instruction"] == expected).all()
        np.testing.assert_array_equal(traj["action"][:, 6], 1.0)


def test_droid_action_and_camera_swap(raw_paths):
    spec = SPECS["droid"]
    for raw, traj in raw_and_standardized(raw_paths["droid"], spec):
        act = raw["action_dict"]
        expected = np.concatenate([act["cartesian_velocity"], 1 - act["gripper_position"]], axis=1)
        np.testing.assert_allclose(traj["action"], expected.astype(np.float32), rtol=1e-6)
        first, second = (
            raw["observation"]["exterior_image_1_left"],
            raw["observation"]["exterior_image_2_left"],
        )
        got = (traj["observation"]["exterior_image_1_left"], traj["observation"]["exterior_image_2_left"])
        swapped = (got[0] == second).all() and (got[1] == first).all()
        assert swapped or ((got[0] == first).all() and (got[1] == second).all())
    # the swap is a function of the episode, so a second pass makes the same choice
    again = raw_and_standardized(raw_paths["droid"], spec)
    first_pass = raw_and_standardized(raw_paths["droid"], spec)
    for (_, a), (_, b) in zip(again, first_pass):
        assert (a["observation"]["exterior_image_1_left"] == b["observation"]["exterior_image_1_left"]).all()


def test_missing_registry_key_names_the_dataset(raw_paths):
    spec = dataclasses.replace(
        SPECS["nyu_rot_dataset_converted_externally_to_rlds"], state_obs_keys=("nope",)
    )
    with pytest.raises(StandardizeError, match="nyu_rot_dataset_converted_externally_to_rlds.*'nope'"):
        raw_and_standardized(raw_paths["nyu_rot"], spec)


def test_wrong_action_dim_names_the_dataset(raw_paths):
    spec = dataclasses.replace(SPECS["nyu_rot_dataset_converted_externally_to_rlds"], action_dim=8)
    with pytest.raises(StandardizeError, match="7-dim actions but the registry says action_dim 8"):
        raw_and_standardized(raw_paths["nyu_rot"], spec)


# ---------------------------------------------------------------------------------------------------------
# the raw synthetic writer itself


def test_raw_synthetic_is_deterministic_and_laid_out_like_tfds(tmp_path):
    spec = SPECS["bridge_orig"]
    a = write_raw_synthetic(tmp_path / "a", spec, num_episodes=2, num_steps=4, seed=7)
    b = write_raw_synthetic(tmp_path / "b", spec, num_episodes=2, num_steps=4, seed=7)
    c = write_raw_synthetic(tmp_path / "c", spec, num_episodes=2, num_steps=4, seed=8)
    assert a == tmp_path / "a" / "bridge_orig" / "1.0.0" and (a / "dataset_info.json").is_file()

    def records(path: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(path.glob("*.tfrecord*"))]

    assert records(a) and records(a) == records(b) and records(a) != records(c)

    import tensorflow_datasets as tfds

    features = tfds.builder_from_directory(str(a)).info.features["steps"]
    assert features["observation"]["image_0"].shape == (32, 32, 3)
    assert features["observation"]["image_0"].encoding_format == "jpeg"
    assert features["action"].shape == (7,)


def test_raw_episodes_keep_real_image_sizes_when_asked():
    rng = np.random.default_rng(0)
    episode = generate_raw_episode(RAW_LAYOUTS["rt1"], rng, num_steps=2, image_size=None)
    assert episode["observation"]["image"].shape == (2, 256, 320, 3)
    quat = episode["observation"]["base_pose_tool_reached"][:, 3:]
    np.testing.assert_allclose(np.linalg.norm(quat, axis=-1), 1.0, rtol=1e-5)
    assert set(np.unique(episode["action"]["gripper_closedness_action"])) <= {-1.0, 0.0, 1.0}

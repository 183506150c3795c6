"""Per-dataset standardization: one raw RLDS episode in, one trajectory in the common convention out.

Input: the `steps` of one episode exactly as `rlds.py` reads it (`decoders={"steps": SkipDecoding()}`), a
nest of [T, ...] tensors with images still encoded, e.g.

    {"observation": {<raw keys>}, "action": tensor or dict of tensors,
     "language_instruction": string[T] (most datasets), "is_first": bool[T], ...}

Output (all leaves share the leading length T', which may be shorter than T):

    {"observation": {<every raw observation key> + <derived state keys named in the registry>},
     "action": float32[T', A],  # EEF datasets: xyz delta, rpy delta, gripper (1 = open, 0 = closed)
     "language_instruction": string[T']}

Every function is pure TF and runs inside `tf.data.Dataset.map` (graph mode). The semantics follow the
Open X-Embodiment transforms of OpenVLA (openvla/openvla, prismatic/vla/datasets/rlds/oxe/transforms.py)
so that statistics and action tokens stay compatible; deviations are marked "deviation" below.

`STANDARDIZE_FNS` maps the names used by `datasets_registry/*.yaml` to functions; several names share an
implementation where the source transforms are identical but the raw layouts differ (the synthetic raw
writer in `tests/raw_synthetic.py` keys its layouts by these names). `make_standardizer(spec)` wraps a function
with the registry's key selection and checks, for use by the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vla_train.data.tf_setup import tf

if TYPE_CHECKING:
    from vla_train.data.registry import DatasetSpec

Trajectory = dict[str, Any]
StandardizeFn = Callable[[Trajectory], Trajectory]


class StandardizeError(KeyError):
    """A raw episode lacks a key a standardization needs; the message names the dataset and the keys it has."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------------------
# Gripper conventions. Everything downstream assumes 1 = open, 0 = closed.


def binarize_gripper(actions: tf.Tensor) -> tf.Tensor:
    """Continuous gripper command in [0, 1] (1 = open) -> {0, 1}, for a [T] tensor.

    Values above 0.95 are open, below 0.05 closed; an intermediate value takes the state reached after it
    (the arm is on its way there). A trailing run of intermediate values has no later state to borrow, so it
    keeps the episode's last raw value, as OpenVLA does.
    """
    actions = tf.cast(actions, tf.float32)
    is_open = actions > 0.95
    decided = tf.logical_or(is_open, actions < 0.05)
    # reduce_sum over the (possibly empty) last element avoids indexing an empty episode
    last = tf.reduce_sum(actions[-1:])

    def carry_back(carry: tf.Tensor, elem: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        decided_t, open_t = elem
        return tf.where(decided_t, tf.cast(open_t, tf.float32), carry)

    return tf.scan(carry_back, (decided, is_open), initializer=last, reverse=True)


def invert_gripper(actions: tf.Tensor) -> tf.Tensor:
    """Absolute gripper with 1 = closed -> 1 = open."""
    return 1.0 - tf.cast(actions, tf.float32)


def clip_invert_gripper(actions: tf.Tensor) -> tf.Tensor:
    """Gripper command in [-1 (open), 1 (close)] -> 1 = open, 0 = closed (clip to [0, 1], then invert)."""
    return invert_gripper(tf.clip_by_value(tf.cast(actions, tf.float32), 0.0, 1.0))


def relative_to_absolute_gripper(actions: tf.Tensor) -> tf.Tensor:
    """RT-1 style relative gripper commands (+1 close, -1 open, 0 keep) -> absolute 1 = open, 0 = closed.

    For a [T] tensor. Before the first command the gripper is assumed to be in the state opposite to that
    command (a close command means it was open); with no command at all it is open throughout.
    """
    actions = tf.cast(actions, tf.float32)
    # +1 = open, -1 = closed, 0 = no command
    state = tf.where(actions < -0.1, 1, tf.where(actions > 0.1, -1, 0))
    padded = tf.concat([state, tf.zeros([1], tf.int32)], axis=0)  # keeps argmax valid on empty episodes
    first_command = padded[tf.argmax(tf.cast(padded != 0, tf.int32), output_type=tf.int32)]
    start = tf.where(first_command == 0, 1, -first_command)

    def hold(carry: tf.Tensor, command: tf.Tensor) -> tf.Tensor:
        return tf.where(command == 0, carry, command)

    absolute = tf.scan(hold, state, initializer=start)
    return tf.cast(absolute, tf.float32) / 2.0 + 0.5


# ---------------------------------------------------------------------------------------------------------
# Rotations (tensorflow-graphics is deliberately not a dependency).


def quaternion_to_euler(quaternion: tf.Tensor) -> tf.Tensor:
    """[..., 4] quaternion (x, y, z, w) -> [..., 3] (roll, pitch, yaw) with R = Rz(yaw) Ry(pitch) Rx(roll).

    The same convention as `tensorflow_graphics.geometry.transformation.euler.from_quaternion`, which
    OpenVLA uses for furniture_bench, iamlab and cmu_playing_with_food (outside gimbal lock).
    """
    q = tf.cast(quaternion, tf.float32)
    x, y, z, w = tf.unstack(q, axis=-1)
    roll = tf.atan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = tf.asin(tf.clip_by_value(2.0 * (w * y - x * z), -1.0, 1.0))
    yaw = tf.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return tf.stack([roll, pitch, yaw], axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Small helpers shared by the per-dataset functions.


def _f32(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def _zeros(x: tf.Tensor, dim: int) -> tf.Tensor:
    """float32 zeros [T, dim] with the leading length of x."""
    return tf.zeros([tf.shape(x)[0], dim], tf.float32)


def _concat(*parts: tf.Tensor) -> tf.Tensor:
    return tf.concat([_f32(p) for p in parts], axis=-1)


def _slice_time(nest: Any, start: int | None = None, stop: int | None = None) -> Any:
    return tf.nest.map_structure(lambda x: x[start:stop], nest)


def _need(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise StandardizeError(f"raw episode has no '{where}{key}' (has {sorted(mapping)})")
    return mapping[key]


def _step_instruction(steps: Trajectory) -> tf.Tensor:
    return _need(steps, "language_instruction", "steps/")


def _observation_instruction(steps: Trajectory) -> tf.Tensor:
    return _need(steps["observation"], "natural_language_instruction", "steps/observation/")


def _out(
    steps: Trajectory,
    action: tf.Tensor,
    observation: dict[str, Any] | None = None,
    instruction: tf.Tensor | None = None,
) -> Trajectory:
    return {
        "observation": dict(steps["observation"]) if observation is None else observation,
        "action": _f32(action),
        "language_instruction": _step_instruction(steps) if instruction is None else instruction,
    }


def _relabel_from_state(traj: Trajectory) -> Trajectory:
    """Bridge: the first six action dims become the state reached at t+1 minus the state at t; the last
    step has no next state and is dropped (one frame shorter)."""
    state = _f32(traj["observation"]["state"])
    movement = state[1:, :6] - state[:-1, :6]
    truncated = _slice_time(traj, None, -1)
    truncated["action"] = tf.concat([movement, traj["action"][:-1, -1:]], axis=1)
    return truncated


def _rt1_style_action(act: dict[str, tf.Tensor], gripper: tf.Tensor) -> tf.Tensor:
    return _concat(act["world_vector"], act["rotation_delta"], gripper)


# ---------------------------------------------------------------------------------------------------------
# Bridge V2


def bridge_orig(steps: Trajectory) -> Trajectory:
    """Bridge V2 from the project website (bridge_orig / bridge_dataset): T stored steps -> T - 2 frames.

    The first step carries an all-zero action and is dropped; the gripper is binarized; the six motion dims
    are relabeled from state deltas, which drops the last step.
    """
    steps = _slice_time(steps, 1, None)
    raw = _f32(steps["action"])
    action = tf.concat([raw[:, :6], binarize_gripper(raw[:, -1])[:, None]], axis=1)
    traj = _relabel_from_state(_out(steps, action))
    obs = traj["observation"]
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -1:]
    return traj


def bridge_oxe(steps: Trajectory) -> Trajectory:
    """The Open X-Embodiment copy of Bridge V2 (dict actions, observation instruction): T -> T - 2 frames."""
    steps = _slice_time(steps, 1, None)
    act = steps["action"]
    action = _concat(act["world_vector"], act["rotation_delta"], act["open_gripper"][:, None])
    traj = _relabel_from_state(_out(steps, action, instruction=_observation_instruction(steps)))
    obs = traj["observation"]
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -1:]
    return traj


# ---------------------------------------------------------------------------------------------------------
# Google robots and the other RT-X "dict action" datasets


def rt1(steps: Trajectory) -> Trajectory:
    """RT-1 (fractal20220817_data): relative gripper commands become absolute 1 = open / 0 = closed."""
    act = steps["action"]
    gripper = relative_to_absolute_gripper(act["gripper_closedness_action"][:, 0])
    return _out(steps, _rt1_style_action(act, gripper[:, None]), instruction=_observation_instruction(steps))


def kuka(steps: Trajectory) -> Trajectory:
    """QT-Opt kuka: like RT-1; its two state vectors are stored zlib-compressed and decoded here."""
    act = steps["action"]
    gripper = relative_to_absolute_gripper(act["gripper_closedness_action"][:, 0])
    obs = dict(steps["observation"])
    for key, dim in (("clip_function_input/base_pose_tool_reached", 7), ("gripper_closed", 1)):
        raw = tf.io.decode_compressed(_need(obs, key, "steps/observation/"), compression_type="ZLIB")
        obs[key] = tf.reshape(tf.io.decode_raw(raw, tf.float32), [-1, dim])
    return _out(steps, _rt1_style_action(act, gripper[:, None]), obs, _observation_instruction(steps))


def taco_play(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state_eef"] = obs["robot_obs"][:, :6]
    obs["state_gripper"] = obs["robot_obs"][:, 7:8]
    world = _f32(steps["action"]["rel_actions_world"])
    # gripper is -1 (close) / +1 (open): clipping gives 0 / 1
    action = tf.concat([world[:, :6], tf.clip_by_value(world[:, -1:], 0.0, 1.0)], axis=-1)
    return _out(steps, action, obs, _observation_instruction(steps))


def jaco_play(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state_eef"] = obs["end_effector_cartesian_pos"][:, :6]
    obs["state_gripper"] = obs["end_effector_cartesian_pos"][:, -1:]
    act = steps["action"]
    gripper = relative_to_absolute_gripper(act["gripper_closedness_action"][:, 0])
    # jaco has no rotation commands
    action = _concat(act["world_vector"], tf.zeros_like(_f32(act["world_vector"])), gripper[:, None])
    return _out(steps, action, obs, _observation_instruction(steps))


def berkeley_cable_routing(steps: Trajectory) -> Trajectory:
    """No gripper command (the cable stays grasped): the gripper dim is a constant 0."""
    act = steps["action"]
    action = _concat(act["world_vector"], act["rotation_delta"], _zeros(act["world_vector"], 1))
    return _out(steps, action, instruction=_observation_instruction(steps))


def roboturk(steps: Trajectory) -> Trajectory:
    act = steps["action"]
    gripper = clip_invert_gripper(act["gripper_closedness_action"])
    return _out(steps, _rt1_style_action(act, gripper), instruction=_observation_instruction(steps))


def viola(steps: Trajectory) -> Trajectory:
    act = steps["action"]
    gripper = clip_invert_gripper(act["gripper_closedness_action"][:, None])
    return _out(steps, _rt1_style_action(act, gripper), instruction=_observation_instruction(steps))


def berkeley_autolab_ur5(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state"] = obs["robot_state"][:, 6:14]
    obs["depth"] = obs.pop("image_with_depth")
    act = steps["action"]
    gripper = relative_to_absolute_gripper(act["gripper_closedness_action"])
    return _out(steps, _rt1_style_action(act, gripper[:, None]), obs, _observation_instruction(steps))


def toto(steps: Trajectory) -> Trajectory:
    act = steps["action"]
    action = _rt1_style_action(act, act["open_gripper"][:, None])
    return _out(steps, action, instruction=_observation_instruction(steps))


def language_table(steps: Trajectory) -> Trajectory:
    """2-D end-effector motion; the gripper is always open; the instruction is stored as code points."""
    xy = _f32(steps["action"])
    action = tf.concat([xy, tf.zeros_like(xy), tf.zeros_like(xy), tf.ones_like(xy[:, :1])], axis=-1)
    codepoints = steps["observation"]["instruction"]
    # the code points are zero-padded to a fixed length: strip the padding before encoding
    ragged = tf.RaggedTensor.from_tensor(codepoints, padding=0)
    instruction = tf.strings.unicode_encode(ragged, output_encoding="UTF-8")
    return _out(steps, action, instruction=instruction)


def pusht(steps: Trajectory) -> Trajectory:
    """columbia_cairlab_pusht_real: the gripper value is passed through as stored."""
    act = steps["action"]
    action = _rt1_style_action(act, act["gripper_closedness_action"][:, None])
    return _out(steps, action, instruction=_observation_instruction(steps))


# ---------------------------------------------------------------------------------------------------------
# Datasets converted externally to RLDS (flat action vectors, step-level instruction)


def stanford_kuka_multimodal(steps: Trajectory) -> Trajectory:
    """Position-only actions: rotation dims are zero."""
    obs = dict(steps["observation"])
    obs["depth_image"] = obs["depth_image"][..., 0]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :3], tf.zeros_like(a[:, :3]), a[:, -1:]], axis=-1), obs)


def nyu_rot(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["eef_state"] = obs["state"][..., :6]
    obs["gripper_state"] = obs["state"][..., -1:]
    return _out(steps, _f32(steps["action"])[..., :7], obs)


def stanford_hydra(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["eef_state"] = tf.concat([obs["state"][:, :3], obs["state"][:, 7:10]], axis=-1)
    obs["gripper_state"] = obs["state"][:, -3:-2]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :6], invert_gripper(a[:, -1:])], axis=-1), obs)


def _clip_invert_last(steps: Trajectory) -> tf.Tensor:
    a = _f32(steps["action"])
    return tf.concat([a[:, :6], clip_invert_gripper(a[:, -1:])], axis=-1)


def austin_buds(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state"] = obs["state"][:, :8]
    return _out(steps, _clip_invert_last(steps), obs)


def austin_sailor(steps: Trajectory) -> Trajectory:
    """austin_sailor and austin_sirius: gripper in [-1 (open), 1 (close)]."""
    return _out(steps, _clip_invert_last(steps))


def utaustin_mutex(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state"] = obs["state"][:, :8]
    return _out(steps, _clip_invert_last(steps), obs)


def nyu_franka_play(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["depth"] = _f32(obs["depth"][..., 0])
    obs["depth_additional_view"] = _f32(obs["depth_additional_view"][..., 0])
    obs["eef_state"] = obs["state"][:, -6:]
    a = _f32(steps["action"])
    # the 15-dim action ends with [eef delta (6), gripper (+1 open, -1 close), terminate]
    return _out(steps, tf.concat([a[:, -8:-2], tf.clip_by_value(a[:, -2:-1], 0.0, 1.0)], axis=-1), obs)


def maniskill(steps: Trajectory) -> Trajectory:
    """The action is passed through as stored."""
    obs = dict(steps["observation"])
    obs["gripper_state"] = obs["state"][..., 7:8]
    return _out(steps, steps["action"], obs)


def furniture_bench(steps: Trajectory) -> Trajectory:
    """Rotation stored as a quaternion: converted to roll/pitch/yaw."""
    obs = dict(steps["observation"])
    obs["state"] = tf.concat([obs["state"][:, :7], obs["state"][:, -1:]], axis=-1)
    a = _f32(steps["action"])
    action = tf.concat([a[:, :3], quaternion_to_euler(a[:, 3:7]), clip_invert_gripper(a[:, -1:])], axis=-1)
    return _out(steps, action, obs)


def drop_last_action_dim(steps: Trajectory) -> Trajectory:
    """The stored action ends with a terminate flag after the gripper: drop it.

    Used by cmu_franka_exploration and imperialcollege_sawyer_wrist_cam.
    """
    return _out(steps, _f32(steps["action"])[..., :-1])


def ucsd_kitchen(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["joint_state"] = obs["state"][:, :7]
    return _out(steps, _f32(steps["action"])[..., :-1], obs)


def _eef_and_gripper_from_state(obs: dict[str, Any], key: str = "state") -> None:
    obs["eef_state"] = obs[key][:, :6]
    obs["gripper_state"] = obs[key][:, -1:]


def ucsd_pick_place(steps: Trajectory) -> Trajectory:
    """Position-only actions: rotation dims are zero."""
    obs = dict(steps["observation"])
    _eef_and_gripper_from_state(obs)
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :3], tf.zeros_like(a[:, :3]), a[:, -1:]], axis=-1), obs)


def bc_z(steps: Trajectory) -> Trajectory:
    """Actions are predicted futures: take the first (next-step) xyz / axis-angle residual and close flag."""
    act = steps["action"]
    close = _f32(act["future/target_close"][:, :1])
    action = _concat(
        act["future/xyz_residual"][:, :3], act["future/axis_angle_residual"][:, :3], invert_gripper(close)
    )
    return _out(steps, action, instruction=_observation_instruction(steps))


def utokyo_pr2(steps: Trajectory) -> Trajectory:
    """utokyo_pr2_opening_fridge and utokyo_pr2_tabletop_manipulation (8-dim action, terminate last)."""
    obs = dict(steps["observation"])
    _eef_and_gripper_from_state(obs)
    return _out(steps, _f32(steps["action"])[..., :-1], obs)


def passthrough(steps: Trajectory) -> Trajectory:
    """Stored observation and action already follow the convention (e.g. utokyo_xarm_pick_and_place,
    berkeley_rpt, dlr_sara_pour, and vla_train's own synthetic dataset)."""
    return _out(steps, steps["action"])


def metaworld(steps: Trajectory) -> Trajectory:
    """vla-data metaworld output (already in the convention); without --wrist the gripper camera was not
    rendered, and its key holds empty frames like any camera a dataset does not have."""
    obs = dict(steps["observation"])
    if "wrist_image" not in obs:
        obs["wrist_image"] = tf.fill([tf.shape(steps["action"])[0]], "")
    return _out(steps, steps["action"], obs)


def utokyo_xarm_bimanual(steps: Trajectory) -> Trajectory:
    """14-dim bimanual action: keep the right arm (the last seven dims)."""
    return _out(steps, _f32(steps["action"])[..., -7:])


def robo_net(steps: Trajectory) -> Trajectory:
    """x, y, z, yaw and gripper: pitch and roll are zero in both state and action."""
    obs = dict(steps["observation"])
    state = _f32(obs["state"])
    obs["eef_state"] = tf.concat([state[:, :4], tf.zeros_like(state[:, :2])], axis=-1)
    obs["gripper_state"] = state[:, -1:]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :4], tf.zeros_like(a[:, :2]), a[:, -1:]], axis=-1), obs)


def berkeley_mvp(steps: Trajectory) -> Trajectory:
    """Joint-delta actions passed through.

    Deviation: the boolean gripper observation becomes float32 [T, 1] so that it can be concatenated into
    the proprio vector (OpenVLA leaves it a [T] bool, which its restructure step cannot concatenate).
    """
    obs = dict(steps["observation"])
    obs["gripper"] = tf.reshape(_f32(obs["gripper"]), [-1, 1])
    return _out(steps, steps["action"], obs)


def kaist_nonprehensile(steps: Trajectory) -> Trajectory:
    """Non-prehensile pushing: no gripper, the last dim is a constant 0."""
    obs = dict(steps["observation"])
    obs["state"] = obs["state"][:, -7:]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :6], tf.zeros_like(a[:, :1])], axis=-1), obs)


def stanford_mask_vit(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    pose = _f32(obs["end_effector_pose"])
    obs["eef_state"] = tf.concat([pose[:, :4], tf.zeros_like(pose[:, :2])], axis=-1)
    obs["gripper_state"] = pose[:, -1:]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :4], tf.zeros_like(a[:, :2]), a[:, -1:]], axis=-1), obs)


def eef_and_gripper_from_state(steps: Trajectory) -> Trajectory:
    """eef_state = state[:6], gripper_state = state[-1:], action passed through (tokyo_u_lsmo, robocook)."""
    obs = dict(steps["observation"])
    _eef_and_gripper_from_state(obs)
    return _out(steps, steps["action"], obs)


def dlr_sara_grid_clamp(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["state"] = obs["state"][:, :6]
    return _out(steps, steps["action"], obs)


def dlr_edan_shared_control(steps: Trajectory) -> Trajectory:
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :6], invert_gripper(a[:, -1:])], axis=-1))


def asu_table_top(steps: Trajectory) -> Trajectory:
    """The end-effector pose lives in the step-level `ground_truth_states/EE`."""
    obs = dict(steps["observation"])
    obs["eef_state"] = _need(steps, "ground_truth_states", "steps/")["EE"]
    obs["gripper_state"] = obs["state"][:, -1:]
    return _out(steps, steps["action"], obs)


def iamlab_pick_insert(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["joint_state"] = obs["state"][:, :7]
    obs["gripper_state"] = obs["state"][:, 7:8]
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, 7:8]], axis=-1), obs)


def uiuc_d3field(steps: Trajectory) -> Trajectory:
    """xyz-only actions: rotation and gripper dims are zero."""
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a, tf.zeros_like(a), tf.zeros_like(a[:, :1])], axis=-1))


def berkeley_fanuc(steps: Trajectory) -> Trajectory:
    """No gripper command is stored: the (inverted) gripper state stands in for it."""
    obs = dict(steps["observation"])
    obs["joint_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, 6:7]
    return _out(steps, _concat(steps["action"], invert_gripper(obs["gripper_state"])), obs)


def cmu_playing_with_food(steps: Trajectory) -> Trajectory:
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, -1:]], axis=-1))


def cmu_play_fusion(steps: Trajectory) -> Trajectory:
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :3], a[:, -4:]], axis=-1))


def cmu_stretch(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    state = _f32(obs["state"])
    obs["eef_state"] = tf.concat([state[:, :3], tf.zeros_like(state[:, :3])], axis=-1)
    obs["gripper_state"] = state[:, -1:]
    return _out(steps, _f32(steps["action"])[..., :-1], obs)


def gnm(steps: Trajectory) -> Trajectory:
    """GNM navigation (berkeley_gnm_*): a 2-D base motion padded to 7 dims; no gripper (constant 0)."""
    obs = dict(steps["observation"])
    obs["state"] = _concat(obs["position"], _zeros(obs["state"], 3), obs["yaw"])
    a = _f32(steps["action"])
    return _out(
        steps, tf.concat([a, tf.zeros_like(a), tf.zeros_like(a), tf.zeros_like(a[:, :1])], axis=-1), obs
    )


# ---------------------------------------------------------------------------------------------------------
# DROID and the later additions (fmb, dobbe, roboset, rh20t, T-DROID, LIBERO)


def _droid_common(steps: Trajectory) -> Trajectory:
    act = _need(steps, "action_dict", "steps/")
    # gripper_position is 0 = open, 1 = closed
    action = _concat(act["cartesian_velocity"], invert_gripper(act["gripper_position"]))
    obs = dict(steps["observation"])
    obs["proprio"] = _concat(obs["cartesian_position"], obs["gripper_position"])
    return _out(steps, action, obs)


def droid(steps: Trajectory) -> Trajectory:
    """DROID, actions in the robot base frame; the two exterior cameras are swapped for half the episodes.

    Deviation: OpenVLA swaps with tf.random; here the coin is a hash of the episode's first exterior frame,
    so the choice is the same on every run and every epoch (reproducible) and still 50/50 over episodes.
    """
    traj = _droid_common(steps)
    obs = traj["observation"]
    first, second = obs["exterior_image_1_left"], obs["exterior_image_2_left"]
    coin = tf.strings.to_hash_bucket_fast(tf.strings.reduce_join(first[:1]), 2)
    swap = tf.equal(coin, 1)
    obs["exterior_image_1_left"] = tf.where(swap, second, first)
    obs["exterior_image_2_left"] = tf.where(swap, first, second)
    return traj


def droid_finetuning(steps: Trajectory) -> Trajectory:
    """DROID-format fine-tuning sets (droid_wipe): as `droid`, without the camera swap."""
    return _droid_common(steps)


def fmb(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["proprio"] = _concat(obs["eef_pose"], obs["state_gripper_pose"][..., None])
    return _out(steps, steps["action"], obs)


def dobbe(steps: Trajectory) -> Trajectory:
    obs = dict(steps["observation"])
    obs["proprio"] = _f32(obs["state"])
    return _out(steps, steps["action"], obs)


def roboset(steps: Trajectory) -> Trajectory:
    """Joint-position actions (7 joints + gripper in [-1, 1])."""
    obs = dict(steps["observation"])
    obs["proprio"] = _f32(obs["state"])
    a = _f32(steps["action"])
    return _out(steps, tf.concat([a[:, :7], clip_invert_gripper(a[:, -1:])], axis=-1), obs)


def rh20t(steps: Trajectory) -> Trajectory:
    """TCP pose command plus the gripper command as stored (a width, not 0/1: see the registry notes)."""
    act = steps["action"]
    obs = dict(steps["observation"])
    obs["proprio"] = _concat(obs["tcp_base"], obs["gripper_width"][..., None])
    return _out(steps, _concat(act["tcp_base"], act["gripper"][:, None]), obs)


def tdroid(steps: Trajectory) -> Trajectory:
    """T-DROID tasks: continuous gripper binarized; state from the DROID-style observation keys."""
    a = _f32(steps["action"])
    action = tf.concat([a[:, :6], binarize_gripper(a[:, -1])[:, None]], axis=1)
    obs = dict(steps["observation"])
    obs["EEF_state"] = obs["cartesian_position"][:, :6]
    obs["gripper_state"] = obs["gripper_position"][:, -1:]
    return _out(steps, action, obs)


def expert_demos(steps: Trajectory) -> Trajectory:
    """SERL-style demonstrations: binarized gripper, instruction in `language_text`."""
    a = _f32(steps["action"])
    action = tf.concat([a[:, :6], binarize_gripper(a[:, -1])[:, None]], axis=1)
    obs = dict(steps["observation"])
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -1:]
    return _out(steps, action, obs, _need(steps, "language_text", "steps/"))


def libero(steps: Trajectory) -> Trajectory:
    """LIBERO (modified, no-op-filtered RLDS): gripper -1 (open) .. 1 (close) -> 1 - clip(g, 0, 1)."""
    obs = dict(steps["observation"])
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -2:]  # two finger positions
    return _out(steps, _clip_invert_last(steps), obs)


# ---------------------------------------------------------------------------------------------------------
# Registry of names (the `standardize_fn` values in datasets_registry/*.yaml)

STANDARDIZE_FNS: dict[str, StandardizeFn] = {
    "bridge_orig": bridge_orig,
    "bridge_oxe": bridge_oxe,
    "rt1": rt1,
    "nyu_door_opening": rt1,  # identical transform, different raw observation keys
    "kuka": kuka,
    "taco_play": taco_play,
    "jaco_play": jaco_play,
    "berkeley_cable_routing": berkeley_cable_routing,
    "roboturk": roboturk,
    "viola": viola,
    "berkeley_autolab_ur5": berkeley_autolab_ur5,
    "toto": toto,
    "language_table": language_table,
    "pusht": pusht,
    "stanford_kuka_multimodal": stanford_kuka_multimodal,
    "nyu_rot": nyu_rot,
    "stanford_hydra": stanford_hydra,
    "austin_buds": austin_buds,
    "nyu_franka_play": nyu_franka_play,
    "maniskill": maniskill,
    "furniture_bench": furniture_bench,
    "cmu_franka_exploration": drop_last_action_dim,
    "ucsd_kitchen": ucsd_kitchen,
    "ucsd_pick_place": ucsd_pick_place,
    "austin_sailor": austin_sailor,
    "austin_sirius": austin_sailor,
    "bc_z": bc_z,
    "utokyo_pr2_opening_fridge": utokyo_pr2,
    "utokyo_pr2_tabletop_manipulation": utokyo_pr2,
    "utokyo_xarm_pick_place": passthrough,
    "utokyo_xarm_bimanual": utokyo_xarm_bimanual,
    "robo_net": robo_net,
    "berkeley_mvp": berkeley_mvp,
    "berkeley_rpt": passthrough,
    "kaist_nonprehensile": kaist_nonprehensile,
    "stanford_mask_vit": stanford_mask_vit,
    "tokyo_u_lsmo": eef_and_gripper_from_state,
    "dlr_sara_pour": passthrough,
    "dlr_sara_grid_clamp": dlr_sara_grid_clamp,
    "dlr_edan_shared_control": dlr_edan_shared_control,
    "asu_table_top": asu_table_top,
    "robocook": eef_and_gripper_from_state,
    "imperial_wristcam": drop_last_action_dim,
    "iamlab_pick_insert": iamlab_pick_insert,
    "uiuc_d3field": uiuc_d3field,
    "utaustin_mutex": utaustin_mutex,
    "berkeley_fanuc": berkeley_fanuc,
    "cmu_playing_with_food": cmu_playing_with_food,
    "cmu_play_fusion": cmu_play_fusion,
    "cmu_stretch": cmu_stretch,
    "gnm": gnm,
    "droid": droid,
    "droid_finetuning": droid_finetuning,
    "fmb": fmb,
    "dobbe": dobbe,
    "roboset": roboset,
    "rh20t": rh20t,
    "tdroid": tdroid,
    "expert_demos": expert_demos,
    "libero": libero,
    "identity": passthrough,  # data already in the convention (vla_train's synthetic dataset, converters)
    "metaworld": metaworld,
}


# ---------------------------------------------------------------------------------------------------------
# Integration helpers for the reader


def proprio_from_state_keys(
    observation: dict[str, tf.Tensor], state_obs_keys: Sequence[str | None]
) -> tf.Tensor:
    """float32 [T, P]: the registry's state keys concatenated in order; a None entry is one zero column.

    Scalar-per-step keys ([T]) become one column. With no keys at all the result is [T, 0].
    """
    named = [observation[k] for k in state_obs_keys if k is not None]
    if not named and not observation:
        raise ValueError("cannot infer the episode length: the observation is empty")
    length = tf.shape(next(iter(named)) if named else next(iter(observation.values())))[0]
    columns = []
    for key in state_obs_keys:
        if key is None:
            columns.append(tf.zeros([length, 1], tf.float32))
        else:
            value = _f32(observation[key])
            columns.append(tf.reshape(value, [length, -1]))
    if not columns:
        return tf.zeros([length, 0], tf.float32)
    return tf.concat(columns, axis=-1)


def make_standardizer(spec: DatasetSpec) -> Callable[[Trajectory], Trajectory]:
    """The registry entry's standardization plus key selection, for `ds.map(make_standardizer(spec))`.

    Output: {"observation": {raw image/depth keys named in the spec, state keys named in the spec},
    "action": float32 [T', spec.action_dim], "language_instruction": string [T']}. A missing key raises a
    StandardizeError naming the dataset while the map function is traced, before any data flows (inside an
    autograph-converted caller TF re-raises it as a StagingError with the same message; decorate the
    caller with `tf.autograph.experimental.do_not_convert` to keep the type).
    """
    from vla_train.data.registry import resolve_standardize_fn

    fn = resolve_standardize_fn(spec.standardize_fn)
    if spec.standardize_fn not in STANDARDIZE_FNS:
        # a user function may use Python control flow on tensors; the built-ins are plain TF ops and stay
        # unconverted, which keeps tracing fast and lets our errors surface as they are
        fn = tf.autograph.to_graph(fn)
    wanted = [k for k in (*spec.image_obs_keys.values(), *spec.depth_obs_keys.values()) if k is not None]
    wanted += [k for k in spec.state_obs_keys if k is not None]

    @tf.autograph.experimental.do_not_convert
    def standardize_steps(steps: Trajectory) -> Trajectory:
        try:
            traj = fn(steps)
        except StandardizeError as e:
            raise StandardizeError(
                f"dataset '{spec.name}' (standardize_fn '{spec.standardize_fn}'): {e}"
            ) from None
        obs = traj["observation"]
        missing = [k for k in dict.fromkeys(wanted) if k not in obs]
        if missing:
            raise StandardizeError(
                f"dataset '{spec.name}': the registry names observation keys {missing} that are neither in "
                f"the raw episode nor made by standardize_fn '{spec.standardize_fn}' (available: {sorted(obs)})"
            )
        action = traj["action"]
        width = action.shape[-1]
        if width is not None and width != spec.action_dim:
            raise StandardizeError(
                f"dataset '{spec.name}': standardize_fn '{spec.standardize_fn}' gives {width}-dim actions but "
                f"the registry says action_dim {spec.action_dim}"
            )
        return {
            "observation": {k: obs[k] for k in dict.fromkeys(wanted)},
            "action": tf.ensure_shape(action, [None, spec.action_dim]),
            "language_instruction": traj["language_instruction"],
        }

    return standardize_steps


__all__ = [
    "STANDARDIZE_FNS",
    "StandardizeError",
    "binarize_gripper",
    "clip_invert_gripper",
    "invert_gripper",
    "make_standardizer",
    "proprio_from_state_keys",
    "quaternion_to_euler",
    "relative_to_absolute_gripper",
]

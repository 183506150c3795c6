"""Small synthetic tfds datasets in the RAW on-disk layout of any registered dataset, for tests and demos.

Real Open X-Embodiment datasets cannot be downloaded here, yet every standardization function has to be
exercised on data shaped like the real thing. This module describes, per standardization function name,
the raw step features that function reads (`RAW_LAYOUTS`: observation keys with their shapes and dtypes,
the action structure, where the instruction lives), adds the image/depth keys the registry names, and
writes episodes with a real `tfds.core.GeneratorBasedBuilder` named after the dataset into
`<root>/<name>/<version>/`, so the files are read exactly like a downloaded dataset.

Values are random but structured where the standardization cares: states drift smoothly (so relabeled
deltas are meaningful), gripper channels follow the dataset's own convention (continuous 0..1, binary,
-1/+1, RT-1 relative events), quaternions are unit length, instructions are short sentences. The same
seed writes the same bytes. Images are JPEG everywhere (some real datasets store PNG; the reader decodes
both) and square `image_size` pixels by default (None keeps the real sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vla_train.data.registry import DatasetSpec, get_dataset_spec

VALUE_KINDS = ("float", "quat", "grip01", "binary", "pm1", "rel", "bool")
STANDARD_STEP_KEYS = ("is_first", "is_last", "is_terminal", "reward", "discount")


@dataclass(frozen=True)
class Field:
    """One raw feature.

    kind: "image" (uint8 RGB, JPEG), "depth" (a float/int tensor), "depth_png" (uint16 PNG image),
    "vector" / "scalar" (numbers; `parts` say what the consecutive slices of the last axis hold),
    "text" (the instruction), "codepoints" (the instruction as zero-padded int32 UTF code points).
    """

    kind: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    parts: tuple[tuple[str, int], ...] = ()
    zlib: bool = False  # stored compressed (tfds Tensor encoding ZLIB), as kuka does


@dataclass(frozen=True)
class RawLayout:
    """Raw step features: `observation` and `action` (a Field or a dict of Fields) plus other step keys."""

    observation: dict[str, Field]
    action: Field | dict[str, Field]
    extras: dict[str, Field | dict[str, Field]] = field(default_factory=dict)


def _img(h: int, w: int) -> Field:
    return Field("image", (h, w, 3), "uint8")


def _depth(h: int, w: int, channels: int | None = None, dtype: str = "float32") -> Field:
    return Field("depth", (h, w) if channels is None else (h, w, channels), dtype)


def _depth_png(h: int, w: int) -> Field:
    return Field("depth_png", (h, w, 1), "uint16")


def _vec(*parts: tuple[str, int], dtype: str = "float32", zlib: bool = False) -> Field:
    return Field("vector", (sum(n for _, n in parts),), dtype, tuple(parts), zlib)


def _floats(n: int, dtype: str = "float32") -> Field:
    return _vec(("float", n), dtype=dtype)


def _scalar(kind: str, dtype: str = "float32") -> Field:
    return Field("scalar", (), dtype, ((kind, 1),))


TEXT = Field("text", (), "string")
STEP_TEXT = {"language_instruction": TEXT}


def _eef_action(gripper: str, n_motion: int = 6, tail: Sequence[tuple[str, int]] = ()) -> Field:
    return _vec(("float", n_motion), (gripper, 1), *tail)


def _rtx_action(gripper: Field | None, *, rotation: bool = True, terminate: Field | None = None) -> dict:
    action: dict[str, Field] = {"world_vector": _floats(3)}
    if rotation:
        action["rotation_delta"] = _floats(3)
    if gripper is not None:
        action["gripper_closedness_action"] = gripper
    action["terminate_episode"] = terminate or _scalar("binary")
    return action


def _obs_text(**observation: Field) -> dict[str, Field]:
    return {**observation, "natural_language_instruction": TEXT}


_FRACTAL_ACTION = {
    **_rtx_action(_vec(("rel", 1))),
    "base_displacement_vector": _floats(2),
    "base_displacement_vertical_rotation": _floats(1),
    "terminate_episode": _vec(("binary", 3), dtype="int32"),
}
_DROID_OBS = {
    "exterior_image_1_left": _img(180, 320),
    "exterior_image_2_left": _img(180, 320),
    "wrist_image_left": _img(180, 320),
    "cartesian_position": _floats(6, "float64"),
    "gripper_position": _vec(("grip01", 1), dtype="float64"),
    "joint_position": _floats(7, "float64"),
}
_DROID_EXTRAS: dict[str, Field | dict[str, Field]] = {
    "action_dict": {
        "cartesian_position": _floats(6, "float64"),
        "cartesian_velocity": _floats(6, "float64"),
        "gripper_position": _vec(("grip01", 1), dtype="float64"),
        "gripper_velocity": _floats(1, "float64"),
        "joint_position": _floats(7, "float64"),
        "joint_velocity": _floats(7, "float64"),
    },
    "language_instruction": TEXT,
    "language_instruction_2": TEXT,
    "language_instruction_3": TEXT,
}
_BRIDGE_ORIG = RawLayout(
    {f"image_{i}": _img(256, 256) for i in range(4)} | {"state": _vec(("float", 6), ("grip01", 1))},
    _eef_action("grip01"),
    STEP_TEXT,
)
_LIBERO = RawLayout(
    {"image": _img(256, 256), "wrist_image": _img(256, 256), "state": _floats(8), "joint_state": _floats(7)},
    _eef_action("pm1"),
    STEP_TEXT,
)
_GNM = RawLayout(
    {
        "image": _img(120, 160),
        "position": _floats(2, "float64"),
        "state": _floats(3, "float64"),
        "yaw": _floats(1, "float64"),
    },
    _floats(2, "float64"),
    STEP_TEXT,
)


# Keyed by the standardize_fn names of datasets_registry/*.yaml. Shapes and dtypes follow the datasets'
# tfds features; where those are unknown (a few late additions) the layout says "guess" in a comment.
RAW_LAYOUTS: dict[str, RawLayout] = {
    "bridge_orig": _BRIDGE_ORIG,
    "bridge_oxe": RawLayout(
        _obs_text(image=_img(480, 640), state=_vec(("float", 6), ("grip01", 1))),
        {
            "world_vector": _floats(3),
            "rotation_delta": _floats(3),
            "open_gripper": _scalar("bool", "bool"),
            "terminate_episode": _scalar("binary"),
        },
    ),
    "rt1": RawLayout(
        _obs_text(
            image=_img(256, 320),
            base_pose_tool_reached=_vec(("float", 3), ("quat", 4)),
            gripper_closed=_vec(("binary", 1)),
        ),
        _FRACTAL_ACTION,
    ),
    "nyu_door_opening": RawLayout(_obs_text(image=_img(720, 960)), _rtx_action(_vec(("rel", 1)))),
    "kuka": RawLayout(
        _obs_text(
            image=_img(512, 640),
            **{
                "clip_function_input/base_pose_tool_reached": _vec(("float", 3), ("quat", 4), zlib=True),
                "gripper_closed": _vec(("binary", 1), zlib=True),
            },
        ),
        _FRACTAL_ACTION,
    ),
    "taco_play": RawLayout(
        _obs_text(
            rgb_static=_img(150, 200),
            rgb_gripper=_img(84, 84),
            depth_static=_depth(150, 200),
            depth_gripper=_depth(84, 84),
            robot_obs=_floats(15),
        ),
        {
            "actions": _eef_action("pm1"),
            "rel_actions_world": _eef_action("pm1"),
            "rel_actions_gripper": _eef_action("pm1"),
            "terminate_episode": _scalar("binary"),
        },
    ),
    "jaco_play": RawLayout(
        _obs_text(
            image=_img(224, 224),
            image_wrist=_img(224, 224),
            end_effector_cartesian_pos=_vec(("float", 6), ("binary", 1)),
        ),
        _rtx_action(_vec(("rel", 1)), rotation=False, terminate=_vec(("binary", 3), dtype="int32")),
    ),
    "berkeley_cable_routing": RawLayout(
        _obs_text(
            image=_img(128, 128),
            top_image=_img(128, 128),
            wrist45_image=_img(128, 128),
            robot_state=_floats(7),
        ),
        _rtx_action(None),
    ),
    "roboturk": RawLayout(_obs_text(front_rgb=_img(480, 640)), _rtx_action(_vec(("pm1", 1)))),
    "viola": RawLayout(
        _obs_text(
            agentview_rgb=_img(224, 224),
            eye_in_hand_rgb=_img(224, 224),
            joint_states=_floats(7),
            gripper_states=_floats(2),
        ),
        _rtx_action(_scalar("pm1")),
    ),
    "berkeley_autolab_ur5": RawLayout(
        _obs_text(
            image=_img(480, 640),
            hand_image=_img(480, 640),
            image_with_depth=_depth(480, 640, 1),
            robot_state=_floats(15),
        ),
        _rtx_action(_scalar("rel")),
    ),
    "toto": RawLayout(
        _obs_text(image=_img(480, 640), state=_floats(7)),
        {
            "world_vector": _floats(3),
            "rotation_delta": _floats(3),
            "open_gripper": _scalar("bool", "bool"),
            "terminate_episode": _scalar("binary"),
        },
    ),
    "language_table": RawLayout(
        {
            "rgb": _img(360, 640),
            "effector_translation": _floats(2),
            "effector_target_translation": _floats(2),
            "instruction": Field("codepoints", (512,), "int32"),
        },
        _floats(2),
    ),
    "pusht": RawLayout(
        _obs_text(image=_img(240, 320), wrist_image=_img(240, 320), robot_state=_floats(2)),
        _rtx_action(_scalar("binary")),
    ),
    "stanford_kuka_multimodal": RawLayout(
        {
            "image": _img(128, 128),
            "depth_image": _depth(128, 128, 1),
            "ee_position": _floats(3),
            "ee_orientation": _vec(("quat", 4)),
            "state": _floats(8),
        },
        _vec(("float", 3), ("binary", 1)),
        STEP_TEXT,
    ),
    "nyu_rot": RawLayout(
        {"image": _img(84, 84), "state": _vec(("float", 6), ("binary", 1))}, _eef_action("binary"), STEP_TEXT
    ),
    "stanford_hydra": RawLayout(
        {"image": _img(240, 320), "wrist_image": _img(240, 320), "state": _floats(27)},
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "austin_buds": RawLayout(
        {"image": _img(128, 128), "wrist_image": _img(128, 128), "state": _floats(24)},
        _eef_action("pm1"),
        STEP_TEXT,
    ),
    "nyu_franka_play": RawLayout(
        {
            "image": _img(128, 128),
            "image_additional_view": _img(128, 128),
            "depth": _depth(128, 128, 1, "int32"),
            "depth_additional_view": _depth(128, 128, 1, "int32"),
            "state": _floats(13),
        },
        # [joint deltas (7), eef delta (6), gripper (+1 open / -1 close), terminate]
        _vec(("float", 13), ("pm1", 1), ("binary", 1)),
        STEP_TEXT,
    ),
    "maniskill": RawLayout(
        {
            "image": _img(256, 256),
            "wrist_image": _img(256, 256),
            "depth": _depth_png(256, 256),
            "wrist_depth": _depth_png(256, 256),
            "state": _floats(18),
            "tcp_pose": _vec(("float", 3), ("quat", 4)),
        },
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "furniture_bench": RawLayout(
        {"image": _img(224, 224), "wrist_image": _img(224, 224), "state": _floats(35)},
        _vec(("float", 3), ("quat", 4), ("pm1", 1)),
        STEP_TEXT,
    ),
    "cmu_franka_exploration": RawLayout(
        {"highres_image": _img(480, 640), "image": _img(64, 64)},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "ucsd_kitchen": RawLayout(
        {"image": _img(480, 640), "state": _floats(21)},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "ucsd_pick_place": RawLayout(
        {"image": _img(224, 224), "state": _vec(("float", 6), ("binary", 1))},
        _vec(("float", 3), ("binary", 1)),
        STEP_TEXT,
    ),
    "austin_sailor": RawLayout(
        {"image": _img(128, 128), "wrist_image": _img(128, 128), "state": _floats(8)},
        _eef_action("pm1"),
        STEP_TEXT,
    ),
    "austin_sirius": RawLayout(
        {"image": _img(84, 84), "wrist_image": _img(84, 84), "state": _floats(8)},
        _eef_action("pm1"),
        STEP_TEXT,
    ),
    "bc_z": RawLayout(
        _obs_text(
            image=_img(171, 213),
            **{
                "present/xyz": _floats(3),
                "present/axis_angle": _floats(3),
                "present/sensed_close": _vec(("binary", 1)),
            },
        ),
        {
            "future/xyz_residual": _floats(30),
            "future/axis_angle_residual": _floats(30),
            "future/target_close": _vec(("binary", 10), dtype="int64"),
        },
    ),
    "utokyo_pr2_opening_fridge": RawLayout(
        {"image": _img(128, 128), "state": _vec(("float", 6), ("binary", 1))},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "utokyo_pr2_tabletop_manipulation": RawLayout(
        {"image": _img(128, 128), "state": _vec(("float", 6), ("binary", 1))},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "utokyo_xarm_pick_place": RawLayout(
        {
            "image": _img(224, 224),
            "image2": _img(224, 224),
            "hand_image": _img(224, 224),
            "end_effector_pose": _floats(6),
        },
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "utokyo_xarm_bimanual": RawLayout(
        {"image": _img(256, 256), "pose_r": _floats(6), "pose_l": _floats(6)},
        _vec(("float", 6), ("binary", 1), ("float", 6), ("binary", 1)),
        STEP_TEXT,
    ),
    "robo_net": RawLayout(
        {"image": _img(240, 320), "image1": _img(240, 320), "state": _vec(("float", 4), ("binary", 1))},
        _vec(("float", 4), ("binary", 1)),
        STEP_TEXT,
    ),
    "berkeley_mvp": RawLayout(
        {
            "hand_image": _img(480, 640),
            "pose": _vec(("float", 3), ("quat", 4)),
            "gripper": _scalar("bool", "bool"),  # guess: a per-step flag
            "joint_pos": _floats(7),
        },
        _vec(("float", 7), ("binary", 1)),
        STEP_TEXT,
    ),
    "berkeley_rpt": RawLayout(
        {"hand_image": _img(480, 640), "joint_pos": _floats(7), "gripper": _vec(("binary", 1))},
        _vec(("float", 7), ("binary", 1)),
        STEP_TEXT,
    ),
    "kaist_nonprehensile": RawLayout({"image": _img(480, 640), "state": _floats(21)}, _floats(20), STEP_TEXT),
    "stanford_mask_vit": RawLayout(
        {
            "image": _img(480, 480),
            "end_effector_pose": _vec(("float", 4), ("binary", 1)),
            "state": _floats(15),
        },
        _vec(("float", 4), ("binary", 1)),
        STEP_TEXT,
    ),
    "tokyo_u_lsmo": RawLayout(
        {"image": _img(120, 120), "state": _vec(("float", 12), ("binary", 1))},
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "dlr_sara_pour": RawLayout(
        {"image": _img(480, 640), "state": _floats(6)}, _eef_action("binary"), STEP_TEXT
    ),
    "dlr_sara_grid_clamp": RawLayout(
        {"image": _img(480, 640), "state": _floats(12)}, _eef_action("binary"), STEP_TEXT
    ),
    "dlr_edan_shared_control": RawLayout(
        {"image": _img(360, 640), "state": _floats(20)}, _eef_action("binary"), STEP_TEXT
    ),
    "asu_table_top": RawLayout(
        {"image": _img(224, 224), "state": _vec(("float", 6), ("binary", 1)), "state_vel": _floats(7)},
        _eef_action("binary"),
        {**STEP_TEXT, "ground_truth_states": {"EE": _floats(6), "bottle": _floats(6)}},
    ),
    "robocook": RawLayout(
        {
            "image_1": _img(256, 256),
            "image_2": _img(256, 256),
            "depth_1": _depth(256, 256),
            "depth_2": _depth(256, 256),
            "state": _vec(("float", 6), ("binary", 1)),
        },
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "imperial_wristcam": RawLayout(
        {"image": _img(64, 64), "wrist_image": _img(64, 64), "state": _vec(("binary", 1))},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "iamlab_pick_insert": RawLayout(
        {
            "image": _img(360, 640),
            "wrist_image": _img(240, 320),
            "state": _vec(("float", 7), ("binary", 1), ("float", 12)),
        },
        _vec(("float", 3), ("quat", 4), ("binary", 1)),
        STEP_TEXT,
    ),
    "uiuc_d3field": RawLayout(
        {
            "image_1": _img(360, 640),
            "image_2": _img(360, 640),
            "depth_1": _depth_png(360, 640),
            "depth_2": _depth_png(360, 640),
        },
        _floats(3),
        STEP_TEXT,
    ),
    "utaustin_mutex": RawLayout(
        {"image": _img(128, 128), "wrist_image": _img(128, 128), "state": _floats(24)},
        _eef_action("pm1"),
        STEP_TEXT,
    ),
    "berkeley_fanuc": RawLayout(
        {
            "image": _img(224, 224),
            "wrist_image": _img(224, 224),
            "state": _vec(("float", 6), ("binary", 1), ("float", 6)),
            "end_effector_state": _floats(7),
        },
        _floats(6),
        STEP_TEXT,
    ),
    "cmu_playing_with_food": RawLayout(
        {"image": _img(480, 640), "finger_vision_1": _img(480, 640), "state": _floats(20)},
        _vec(("float", 3), ("quat", 4), ("binary", 1)),
        STEP_TEXT,
    ),
    "cmu_play_fusion": RawLayout(
        {"image": _img(128, 128), "state": _floats(8)}, _vec(("float", 8), ("binary", 1)), STEP_TEXT
    ),
    "cmu_stretch": RawLayout(
        {"image": _img(128, 128), "state": _vec(("float", 3), ("binary", 1))},
        _eef_action("binary", tail=[("binary", 1)]),
        STEP_TEXT,
    ),
    "gnm": _GNM,
    "droid": RawLayout(_DROID_OBS, _floats(7, "float64"), _DROID_EXTRAS),
    "droid_finetuning": RawLayout(_DROID_OBS, _floats(7, "float64"), _DROID_EXTRAS),
    "fmb": RawLayout(
        {
            "image_side_1": _img(256, 256),
            "image_side_2": _img(256, 256),
            "image_wrist_1": _img(256, 256),
            "image_side_1_depth": _depth(256, 256),  # guess: dtype and channels
            "image_side_2_depth": _depth(256, 256),
            "image_wrist_1_depth": _depth(256, 256),
            "eef_pose": _vec(("float", 3), ("quat", 4)),
            "state_gripper_pose": _scalar("binary"),
        },
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "dobbe": RawLayout(
        {"wrist_image": _img(256, 256), "state": _vec(("float", 6), ("binary", 1))},
        _eef_action("binary"),
        STEP_TEXT,
    ),
    "roboset": RawLayout(
        {
            "image_left": _img(240, 424),
            "image_right": _img(240, 424),
            "image_wrist": _img(240, 424),
            "state": _floats(8),
        },
        _vec(("float", 7), ("pm1", 1)),
        STEP_TEXT,
    ),
    "rh20t": RawLayout(
        {
            # guess: camera sizes
            "image_front": _img(360, 640),
            "image_side_right": _img(360, 640),
            "image_wrist": _img(360, 640),
            "tcp_base": _vec(("float", 3), ("quat", 4)),
            "gripper_width": _scalar("binary"),
        },
        {"tcp_base": _vec(("float", 3), ("quat", 4)), "gripper": _scalar("binary")},
        STEP_TEXT,
    ),
    "tdroid": RawLayout(
        {
            "static_image": _img(256, 256),  # guess: camera and depth sizes
            "static_depth_image": _depth(256, 256),
            "cartesian_position": _floats(6),
            "gripper_position": _vec(("grip01", 1)),
        },
        _eef_action("grip01"),
        STEP_TEXT,
    ),
    "expert_demos": RawLayout(
        {"image_primary": _img(128, 128), "state": _vec(("float", 6), ("grip01", 1))},
        _eef_action("grip01"),
        {"language_text": TEXT},
    ),
    "libero": _LIBERO,
    "identity": RawLayout({"image": _img(32, 32), "state": _floats(8)}, _eef_action("binary"), STEP_TEXT),
    # vla-data metaworld (vla_train/sim/demos.py): corner4 frames, xyz + gripper opening, Meta-World's 39-D
    # observation; actions already in the OpenVLA layout (gripper 1 = open) beside the raw 4-D command.
    "metaworld": RawLayout(
        {"image": _img(128, 128), "state": _vec(("float", 3), ("grip01", 1)), "env_state": _floats(39)},
        _eef_action("binary"),
        {**STEP_TEXT, "raw_action": _vec(("float", 3), ("pm1", 1))},
    ),
}


def layout_for(specs: Sequence[DatasetSpec]) -> RawLayout:
    """The raw layout of the specs' standardize_fn plus every image/depth key the specs name.

    All specs must share one standardize_fn (one raw dataset then serves all of them).
    """
    fns = {s.standardize_fn for s in specs}
    if len(fns) != 1:
        raise ValueError(f"layout_for needs specs with one standardize_fn, got {sorted(fns)}")
    fn = fns.pop()
    if fn not in RAW_LAYOUTS:
        raise KeyError(
            f"no raw layout for standardize_fn '{fn}' (datasets {[s.name for s in specs]}); pass layout=... "
            "to write_raw_synthetic for a user function"
        )
    layout = RAW_LAYOUTS[fn]
    observation = dict(layout.observation)
    for spec in specs:
        for key in spec.image_obs_keys.values():
            if key is not None and key not in observation:
                observation[key] = _img(64, 64)
        for key in spec.depth_obs_keys.values():
            if key is not None and key not in observation:
                observation[key] = _depth(64, 64)
    return replace(layout, observation=observation)


# ---------------------------------------------------------------------------------------------------------
# Episode generation (numpy)

_VERBS = ("pick up", "push", "move", "open", "close", "put away")
_OBJECTS = ("the red block", "the blue cup", "the drawer", "the towel", "the green bowl", "the carrot")


def _switch(rng: np.random.Generator, T: int) -> tuple[int, bool]:
    """A time at which a two-state signal flips, and its starting state."""
    return int(rng.integers(1, max(T - 1, 2))), bool(rng.integers(2))


def _part_values(kind: str, n: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """[T, n] float64 values of one slice of a vector feature."""
    if kind == "float":
        start = rng.uniform(-0.5, 0.5, size=(1, n))
        return start + np.cumsum(rng.normal(0.0, 0.05, size=(T, n)), axis=0)
    if kind == "quat":
        q = rng.normal(size=(T, 4))
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        return q * np.sign(q[:, 3:4] + 1e-12)  # w >= 0: one representative per rotation
    columns = []
    for _ in range(n):
        t_switch, start = _switch(rng, T)
        on = np.where(np.arange(T) < t_switch, start, not start).astype(np.float64)
        if kind == "grip01":
            # the arm passes through an intermediate width on the step it switches
            on[t_switch] = rng.uniform(0.2, 0.8)
        elif kind == "pm1":
            on = 2.0 * on - 1.0
        elif kind == "rel":
            # RT-1 style: +1 = close command, -1 = open command, 0 = keep
            on = np.zeros(T)
            on[t_switch] = 1.0 if start else -1.0
            if t_switch + 2 < T:
                on[t_switch + 2] = -on[t_switch]
        elif kind not in ("binary", "bool"):
            raise ValueError(f"unknown value kind '{kind}'; use one of {VALUE_KINDS}")
        columns.append(on)
    return np.stack(columns, axis=-1)


def _image_shape(f: Field, image_size: int | None) -> tuple[int, ...]:
    if image_size is None:
        return f.shape
    return (image_size, image_size, *f.shape[2:])


def _field_values(
    f: Field, T: int, rng: np.random.Generator, instruction: str, image_size: int | None
) -> Any:
    """[T, ...] numpy values of one feature (images as uint8 arrays; encoded later)."""
    if f.kind == "image":
        h, w, _ = _image_shape(f, image_size)
        base = rng.integers(40, 215, size=(1, 1, 1, 3))
        noise = rng.integers(-30, 31, size=(T, h, w, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)
    if f.kind in ("depth", "depth_png"):
        shape = _image_shape(f, image_size)
        if f.kind == "depth_png":
            return rng.integers(0, 4000, size=(T, *shape)).astype(np.uint16)
        return rng.uniform(0.2, 3.0, size=(T, *shape)).astype(f.dtype)
    if f.kind == "text":
        return [instruction] * T
    if f.kind == "codepoints":
        points = np.zeros((T, f.shape[0]), np.int32)
        encoded = [ord(c) for c in instruction][: f.shape[0]]
        points[:, : len(encoded)] = encoded
        return points
    if f.kind in ("vector", "scalar"):
        values = np.concatenate([_part_values(k, n, T, rng) for k, n in f.parts], axis=-1)
        if f.kind == "scalar":
            values = values[:, 0]
        return values.astype(np.bool_ if f.dtype == "bool" else f.dtype)
    raise ValueError(f"unknown field kind '{f.kind}'")


def _tree_values(
    tree: Field | dict[str, Any], T: int, rng: np.random.Generator, instruction: str, image_size: int | None
) -> Any:
    if isinstance(tree, Field):
        return _field_values(tree, T, rng, instruction, image_size)
    return {k: _tree_values(v, T, rng, instruction, image_size) for k, v in tree.items()}


def generate_raw_episode(
    layout: RawLayout, rng: np.random.Generator, num_steps: int, image_size: int | None = 32
) -> dict[str, Any]:
    """One episode as {key: [T, ...] numpy values} in the layout (images not yet encoded)."""
    instruction = f"{_VERBS[rng.integers(len(_VERBS))]} {_OBJECTS[rng.integers(len(_OBJECTS))]}"
    T = num_steps
    episode = {
        "observation": _tree_values(layout.observation, T, rng, instruction, image_size),
        "action": _tree_values(layout.action, T, rng, instruction, image_size),
        **{k: _tree_values(v, T, rng, instruction, image_size) for k, v in layout.extras.items()},
        "is_first": np.arange(T) == 0,
        "is_last": np.arange(T) == T - 1,
        "is_terminal": np.arange(T) == T - 1,
        "reward": (np.arange(T) == T - 1).astype(np.float32),
        "discount": np.ones(T, np.float32),
    }
    return episode


# ---------------------------------------------------------------------------------------------------------
# The tfds builder


def _feature(f: Field, image_size: int | None):
    import tensorflow_datasets as tfds

    F = tfds.features
    if f.kind == "image":
        return F.Image(shape=_image_shape(f, image_size), dtype=np.uint8, encoding_format="jpeg")
    if f.kind == "depth_png":
        return F.Image(shape=_image_shape(f, image_size), dtype=np.uint16, encoding_format="png")
    if f.kind == "depth":
        return F.Tensor(shape=_image_shape(f, image_size), dtype=np.dtype(f.dtype))
    if f.kind == "text":
        return F.Text()
    dtype = np.bool_ if f.dtype == "bool" else np.dtype(f.dtype)
    if f.kind == "scalar":
        return F.Scalar(dtype=dtype)
    encoding = F.Encoding.ZLIB if f.zlib else F.Encoding.NONE
    return F.Tensor(shape=f.shape, dtype=dtype, encoding=encoding)


def _features_dict(tree: dict[str, Any], image_size: int | None):
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            k: _features_dict(v, image_size) if isinstance(v, dict) else _feature(v, image_size)
            for k, v in tree.items()
        }
    )


def _step_features(layout: RawLayout, image_size: int | None):
    import tensorflow_datasets as tfds

    F = tfds.features
    action = layout.action
    return F.Dataset(
        {
            "observation": _features_dict(layout.observation, image_size),
            "action": _features_dict(action, image_size)
            if isinstance(action, dict)
            else _feature(action, image_size),
            **{
                k: _features_dict(v, image_size) if isinstance(v, dict) else _feature(v, image_size)
                for k, v in layout.extras.items()
            },
            "is_first": F.Scalar(dtype=np.bool_),
            "is_last": F.Scalar(dtype=np.bool_),
            "is_terminal": F.Scalar(dtype=np.bool_),
            "reward": F.Scalar(dtype=np.float32),
            "discount": F.Scalar(dtype=np.float32),
        }
    )


def _encode_step_tree(tree: Field | dict[str, Any], values: Any, t: int) -> Any:
    """Step t of a [T, ...] value tree, with images JPEG-encoded and zlib tensors left to tfds."""
    if isinstance(tree, dict):
        return {k: _encode_step_tree(tree[k], values[k], t) for k in tree}
    value = values[t]
    if tree.kind == "image":
        return _jpeg(value)
    return value


def _jpeg(image: np.ndarray) -> bytes:
    # Encoding here (not inside tfds) pins the quality, so a seed always gives the same bytes.
    import tensorflow as tf

    return tf.io.encode_jpeg(image, quality=90).numpy()


def _episodes(
    layout: RawLayout, num_episodes: int, num_steps: int, image_size: int | None, seed: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    trees = {"observation": layout.observation, "action": layout.action, **layout.extras}
    for i in range(num_episodes):
        episode = generate_raw_episode(layout, rng, num_steps, image_size)
        steps = []
        for t in range(num_steps):
            step = {k: _encode_step_tree(tree, episode[k], t) for k, tree in trees.items()}
            step.update({k: episode[k][t] for k in STANDARD_STEP_KEYS})
            steps.append(step)
        yield f"episode_{i}", {"steps": steps, "episode_metadata": {"file_path": f"synthetic/episode_{i}"}}


def _builder_class(
    name: str,
    version: str,
    layout: RawLayout,
    num_episodes: int,
    num_steps: int,
    image_size: int | None,
    seed: int,
) -> type:
    import tensorflow_datasets as tfds

    class RawSyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Synthetic episodes in one dataset's raw layout (see tests/raw_synthetic.py)."""

        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Synthetic raw-layout data written by vla_train."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Synthetic episodes in the raw layout of '{name}' (vla_train raw_synthetic).",
                features=tfds.features.FeaturesDict(
                    {
                        "steps": _step_features(layout, image_size),
                        "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from _episodes(layout, num_episodes, num_steps, image_size, seed)

    # skip_registration keeps tfds' global name registry free, so any number of these can coexist
    RawSyntheticBuilder.name = name
    return RawSyntheticBuilder


def write_raw_synthetic(
    root: str | Path,
    dataset: str | DatasetSpec,
    *,
    name: str | None = None,
    also_for: Iterable[DatasetSpec] = (),
    layout: RawLayout | None = None,
    num_episodes: int = 3,
    num_steps: int = 6,
    image_size: int | None = 32,
    seed: int = 0,
    version: str | None = None,
) -> Path:
    """Write synthetic episodes in `dataset`'s raw layout to `<root>/<name>/<version>/` and return that path.

    name: the tfds name on disk (default the dataset's name). also_for: further specs with the same
    standardize_fn whose image/depth keys the data must also contain (one dataset then serves a group).
    layout: the raw layout, required for user standardize functions. An existing complete build is reused.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset_spec(dataset)
    name = name or spec.name
    version = version or spec.version or "0.1.0"
    out = Path(root) / name / version
    if (out / "dataset_info.json").is_file():
        return out
    if num_steps < 1 or num_episodes < 1:
        raise ValueError("num_steps and num_episodes must be at least 1")
    if layout is None:
        layout = layout_for([spec, *also_for])
    import tensorflow_datasets as tfds

    builder_cls = _builder_class(name, version, layout, num_episodes, num_steps, image_size, seed)
    builder = builder_cls(data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, verify_ssl=False)
    )
    return out


__all__ = [
    "RAW_LAYOUTS",
    "Field",
    "RawLayout",
    "generate_raw_episode",
    "layout_for",
    "write_raw_synthetic",
]

"""Meta-World for demonstrations and closed-loop evaluation: the MT10 tasks and their instructions, seeded
resets with disjoint train / val / eval seed ranges, the action mapping to the OpenVLA layout, headless
rendering of the `corner4` camera (and the gripper camera as `wrist`), and the failure class of a trial.

Facts used here (shared/reference/metaworld.md): build each task in multi-task mode (goal observable,
seeded random layouts), the `corner*` cameras are mounted upside down (rotate 180 degrees), the door-open
expert edits the observation it is given (pass it a copy), and the gripper command is a threshold (<= 0
open, > 0 closed).

`metaworld` and `mujoco` are the optional `sim` extra; they are imported only when an environment is made,
after the rendering backend is chosen (OSMesa unless MUJOCO_GL is already set).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from dataclasses import dataclass

import numpy as np

from vla_train.config import SEEDS_PER_SPLIT

MT10 = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
INSTRUCTIONS = {
    "reach-v3": "move the gripper to the red sphere",
    "push-v3": "push the red puck to the green target",
    "pick-place-v3": "pick up the red puck and place it at the blue target",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASK_SETS = {"mt10": MT10}
SEED_BASE = {"train": 0, "val": 100_000, "eval": 200_000}
SEEDS_PER_TASK = SEEDS_PER_SPLIT  # seeds of task i in a split: base + 1000 i + k, k < 1000
CAMERAS = {"primary": "corner4", "wrist": "gripperPOV"}
ROTATED_CAMERAS = ("corner", "corner2", "corner3", "corner4")  # mounted upside down


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'mt10', or task names (a list, or one comma-separated string; '-v3' may be left off)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name.lower() in TASK_SETS:
            out.extend(TASK_SETS[name.lower()])
            continue
        full = name if name.endswith("-v3") else f"{name}-v3"
        if full not in INSTRUCTIONS:
            raise ValueError(f"unknown Meta-World task '{name}'; use 'mt10' or some of {', '.join(MT10)}")
        out.append(full)
    if not out:
        raise ValueError("no Meta-World tasks given; use 'mt10' or task names such as reach-v3,push-v3")
    return list(dict.fromkeys(out))


def seed_for(split: str, task: str, k: int) -> int:
    """The k-th reset seed of `task` in `split` (train, val or eval): the three ranges never overlap."""
    if split not in SEED_BASE:
        raise ValueError(f"unknown seed split '{split}'; use one of {sorted(SEED_BASE)}")
    if not 0 <= k < SEEDS_PER_TASK:
        raise ValueError(f"seed index {k} is outside 0..{SEEDS_PER_TASK - 1}")
    return SEED_BASE[split] + SEEDS_PER_TASK * MT10.index(task) + k


# ---- actions ---------------------------------------------------------------------------------------
def to_openvla_action(mw_action: np.ndarray) -> np.ndarray:
    """Meta-World [dx, dy, dz, grip] -> OpenVLA [dx, dy, dz, 0, 0, 0, gripper] (1 open, 0 closed).
    Any grip command <= 0 holds the fingers open, so this is a threshold, not (1 - a) / 2."""
    a = np.asarray(mw_action, np.float32)
    xyz = np.clip(a[:3], -1.0, 1.0)
    return np.array([*xyz, 0.0, 0.0, 0.0, 1.0 if a[3] <= 0 else 0.0], np.float32)


def to_metaworld_action(action: np.ndarray) -> np.ndarray:
    """A 7-D (or longer) OpenVLA-layout action -> Meta-World's 4-D command."""
    a = np.asarray(action, np.float32)
    xyz = np.clip(a[:3], -1.0, 1.0)
    return np.array([*xyz, -1.0 if a[6] >= 0.5 else 1.0], np.float32)


@contextlib.contextmanager
def spawn_without_main():
    """Start spawned worker processes inside this block: a spawned child re-imports the caller's
    __main__ script, and if that imports TensorFlow the child crashes once OSMesa starts (both bring
    their own LLVM). Here children see an empty __main__ and import only the worker's own module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# ---- environments ----------------------------------------------------------------------------------
def _headless() -> None:
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def import_metaworld():
    """The metaworld module, with a clear error when the optional extra is missing."""
    _headless()
    try:
        import metaworld  # noqa: F401
        import metaworld.env_dict
        import metaworld.policies
    except ImportError as e:
        raise ImportError(
            f"Meta-World is not installed ({e}); install the simulator extra: pip install -e '.[sim]' "
            "(and Debian's libosmesa6 for headless rendering)"
        ) from e
    return metaworld


@dataclass
class RenderSettings:
    image_size: int = 224  # square frames, pixels
    msaa_samples: int = 4  # multisample anti-aliasing (0 = off: twice as fast, jagged edges)
    shadow_size: int = 1024  # shadow map (Meta-World's own 4096 costs ~2x for the same image)
    wrist: bool = False  # also render the gripper camera


class MetaWorldEnv:
    """One Meta-World task with seeded resets and rendered frames. step() takes the 4-D command."""

    def __init__(self, task: str, render: RenderSettings, max_path_length: int = 500):
        mw = import_metaworld()

        self.task = task
        self.instruction = INSTRUCTIONS[task]
        env = mw.env_dict.ALL_V3_ENVIRONMENTS[task]()
        env._partially_observable = False  # the experts read the goal from the observation
        # The observation space (the bounds every observation is clipped to) was cached while the goal
        # was hidden, with the goal's bounds at zero: drop it so that the goal is observed.
        env.__dict__.pop("sawyer_observation_space", None)
        env.seeded_rand_vec = True
        env._freeze_rand_vec = False
        env._set_task_called = True
        env.max_path_length = max_path_length
        self.env = env
        self.settings = render
        model = env.model
        model.vis.quality.shadowsize = render.shadow_size
        model.vis.quality.offsamples = render.msaa_samples
        self._renderer = None  # made at the first render(): physics alone needs no GL context
        self._expert = _expert_class(task)()
        self.obs: np.ndarray | None = None

    def reset(self, seed: int) -> np.ndarray:
        self.env.seed(seed)
        self.obs, _ = self.env.reset()
        return self.obs

    def expert_action(self) -> np.ndarray:
        return np.asarray(self._expert.get_action(self.obs.copy()), np.float32)  # it edits its input

    def step(self, mw_action: np.ndarray) -> dict:
        self.obs, reward, _, truncated, info = self.env.step(np.asarray(mw_action, np.float32))
        return {k: float(v) for k, v in info.items()} | {"reward": float(reward), "truncated": truncated}

    def render(self, camera: str = "primary") -> np.ndarray:
        """A frame of `camera`. OSMesa cannot start in a process that has imported TensorFlow (both bring
        their own LLVM, and the process crashes): render in worker processes (runner.SimWorkers)."""
        if self._renderer is None:
            import mujoco

            size = self.settings.image_size
            self._renderer = mujoco.Renderer(self.env.model, size, size)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0  # same look, ~10% faster
        name = CAMERAS[camera]
        self._renderer.update_scene(self.env.data, camera=name)
        img = self._renderer.render()
        return np.ascontiguousarray(img[::-1, ::-1] if name in ROTATED_CAMERAS else img)

    def frames(self) -> dict[str, np.ndarray]:
        out = {"image": self.render("primary")}
        if self.settings.wrist:
            out["wrist_image"] = self.render("wrist")
        return out

    def state(self) -> np.ndarray:
        """Proprio: end-effector xyz and the gripper opening (the first four observation values)."""
        return np.asarray(self.obs[:4], np.float32)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self.env.close()


def _expert_class(task: str):
    policies = import_metaworld().policies
    # reach-v3 -> SawyerReachV3Policy; peg-insert-side -> SawyerPegInsertionSideV3Policy
    words = task.removesuffix("-v3").replace("peg-insert", "peg-insertion").split("-")
    name = "Sawyer" + "".join(w.capitalize() for w in words) + "V3Policy"
    return getattr(policies, name)


# ---- failure classes -------------------------------------------------------------------------------
# What each task's info dict says (Meta-World's evaluate_state): whether `near_object` is a flag that the
# gripper reached the object, whether `grasp_success` is a real grasp flag (several tasks report a
# constant 1.0), and the success distance of `obj_to_target` (None where it is not a distance).
@dataclass(frozen=True)
class TaskSignals:
    reach_flag: bool
    grasp_flag: bool
    success_distance: float | None


TASK_SIGNALS = {
    "reach-v3": TaskSignals(False, False, 0.05),
    "push-v3": TaskSignals(True, False, 0.05),
    "pick-place-v3": TaskSignals(True, True, 0.07),
    "door-open-v3": TaskSignals(False, True, None),
    "drawer-open-v3": TaskSignals(True, False, 0.03),
    "drawer-close-v3": TaskSignals(True, False, 0.055),
    "button-press-topdown-v3": TaskSignals(True, False, 0.024),
    "peg-insert-side-v3": TaskSignals(True, True, 0.07),
    "window-open-v3": TaskSignals(True, False, 0.05),
    "window-close-v3": TaskSignals(True, False, 0.05),
}
FAILURE_CLASSES = (
    "never_reached_object",  # the gripper never came near the object
    "reached_never_grasped",  # came near, never held it (grasping tasks)
    "grasped_not_placed",  # held it, never brought it to the goal (grasping tasks)
    "timed_out_near_goal",  # ended within twice the success distance of the goal
    "reached_not_completed",  # came near the object, did not finish (non-grasping tasks)
    "did_not_complete",  # the task gives no reach/grasp signal and the trial ended away from the goal
)


def supported_failure_classes(task: str) -> list[str]:
    """The failure classes TrialSignals.failure_class can give for `task` (the order it tests them in)."""
    s = TASK_SIGNALS[task]
    out = ["never_reached_object"] if s.reach_flag else []
    out += ["reached_never_grasped"] if s.grasp_flag else []
    out += ["timed_out_near_goal"] if s.success_distance is not None else []
    if s.grasp_flag:
        out.append("grasped_not_placed")
    else:
        out.append("reached_not_completed" if s.reach_flag else "did_not_complete")
    return out


class TrialSignals:
    """Accumulates a trial's info dicts; failure_class() names why it did not succeed (None if it did)."""

    def __init__(self, task: str):
        self.signals = TASK_SIGNALS[task]
        self.reached = False
        self.grasped = False
        self.last_distance = float("inf")
        self.success_step: int | None = None
        self.num_steps = 0

    def update(self, info: dict) -> None:
        self.num_steps += 1
        if info.get("success", 0.0) >= 1.0 and self.success_step is None:
            self.success_step = self.num_steps
        self.reached |= bool(info.get("near_object", 0.0) >= 1.0)
        self.grasped |= bool(info.get("grasp_success", 0.0) >= 1.0)
        self.last_distance = float(info.get("obj_to_target", float("inf")))

    def failure_class(self) -> str | None:
        s = self.signals
        if self.success_step is not None:
            return None
        if s.reach_flag and not self.reached:
            return "never_reached_object"
        if s.grasp_flag and not self.grasped:
            return "reached_never_grasped"
        if s.success_distance is not None and self.last_distance <= 2 * s.success_distance:
            return "timed_out_near_goal"
        if s.grasp_flag:
            return "grasped_not_placed"
        return "reached_not_completed" if s.reach_flag else "did_not_complete"

"""The safety layer between a policy and the actuators: every action passes through `SafetyLayer.apply`
before it leaves the server (and can in-process: `SafetyLayer(settings, stats).apply(action)`).

In order, for one action in physical units:
1. e-stop: while engaged, the action is zero motion (the gripper keeps its last command) and nothing else
   runs.
2. bounds: each normalized dimension is clamped to the dataset's [min, max] (or [q01, q99]) widened by
   `margin` x the range on each side. Pass-through dimensions (the gripper) are left to rule 5.
3. translation / rotation: for the 7-D end-effector layout (xyz, roll-pitch-yaw, gripper), the xyz and the
   rotation vectors are scaled down to at most `max_translation` / `max_rotation` (L2 norm; 0 = the norm
   of the dataset's largest per-dimension magnitudes).
4. workspace: when the request carries the end-effector position and a box is configured, the
   translation is cut so that position + `workspace_action_scale` x translation stays inside the box.
5. gripper: the decoded value (OpenVLA's raw bin centre in [-1, 1]; trained targets are 1 = open,
   0 = closed) becomes a binary command with hysteresis: open above `gripper_open_above`, closed below
   `gripper_close_below`, unchanged in between (the first value in the band is compared with the band's
   middle). The command replaces the gripper dimension; the raw value is reported beside it.

With `enabled` False (`vla-serve --safety off`) rules 2-4 are skipped and the gripper dimension stays raw;
the e-stop and the reported gripper command still work.

Every change is reported as an intervention ({"rule", "dims", ...}) and counted. The hysteresis state is
kept per session (a client-chosen name, "default" when none), so that several robots on one server do not
share a gripper.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from vla_train.config import SafetyConfig

EEF_DIM = 7  # xyz, roll-pitch-yaw, gripper: the layout rules 3-5 apply to
TRANSLATION, ROTATION, GRIPPER = slice(0, 3), slice(3, 6), 6
MAX_SESSIONS = 1024


@dataclass
class SafeAction:
    action: np.ndarray  # float32 [action_dim], what may be sent to the robot
    raw_action: np.ndarray  # the policy's action before the layer
    gripper_raw: float | None  # the decoded gripper value (None without a gripper dimension)
    gripper_command: float | None  # 1.0 open, 0.0 closed
    interventions: list[dict]

    def to_dict(self) -> dict:
        return {
            "action": self.action.tolist(),
            "raw_action": self.raw_action.tolist(),
            "gripper_raw": self.gripper_raw,
            "gripper_command": self.gripper_command,
            "interventions": self.interventions,
        }


class SafetyLayer:
    """Thread-safe: the server applies it from its batching thread, e-stop comes from request threads."""

    def __init__(self, settings: SafetyConfig, action_stats: dict):
        """action_stats: the dataset's action statistics (min, max, q01, q99, mask)."""
        self.settings = settings
        low_key, high_key = ("q01", "q99") if settings.bounds == "q01_q99" else ("min", "max")
        low = np.asarray(action_stats[low_key], np.float64)
        high = np.asarray(action_stats[high_key], np.float64)
        pad = settings.margin * (high - low)
        self.low, self.high = low - pad, high + pad
        self.action_dim = len(low)
        self.clamped_dims = np.asarray(action_stats.get("mask", [True] * self.action_dim), bool)
        self.eef_layout = self.action_dim == EEF_DIM and not self.clamped_dims[GRIPPER]
        largest = np.maximum(np.abs(self.low), np.abs(self.high))
        self.max_translation = settings.max_translation or float(np.linalg.norm(largest[TRANSLATION]))
        self.max_rotation = settings.max_rotation or float(np.linalg.norm(largest[ROTATION]))
        self._lock = threading.Lock()
        self._estop = False
        self._gripper: OrderedDict[str, float] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.num_actions = 0

    # ---- e-stop ---------------------------------------------------------------------------------
    def engage_estop(self) -> None:
        with self._lock:
            self._estop = True
            self.counts["estop_engaged"] += 1

    def reset_estop(self) -> None:
        with self._lock:
            self._estop = False

    @property
    def estopped(self) -> bool:
        return self._estop

    # ---- the rules ------------------------------------------------------------------------------
    def apply(
        self, action: np.ndarray, eef_position: np.ndarray | None = None, session: str = "default"
    ) -> SafeAction:
        raw = np.asarray(action, np.float32).reshape(-1)
        if raw.shape[0] != self.action_dim:
            raise ValueError(f"action has {raw.shape[0]} dimensions, the safety bounds {self.action_dim}")
        out = raw.astype(np.float64)
        notes: list[dict] = []
        with self._lock:
            self.num_actions += 1
            gripper_raw = float(raw[GRIPPER]) if self.eef_layout else None
            if self._estop:
                out = np.zeros_like(out)
                notes.append({"rule": "estop"})
                command = self._gripper.get(session) if self.eef_layout else None
                if self.eef_layout:
                    out[GRIPPER] = 1.0 if command is None else command
                    command = float(out[GRIPPER])
            else:
                if self.settings.enabled:
                    self._bounds(out, notes)
                    if self.eef_layout:
                        self._limit(out, TRANSLATION, self.max_translation, "max_translation", notes)
                        self._limit(out, ROTATION, self.max_rotation, "max_rotation", notes)
                        if eef_position is not None and self.settings.workspace_min:
                            self._workspace(out, np.asarray(eef_position, np.float64), notes)
                command = None
                if self.eef_layout:
                    command = self._gripper_command(float(out[GRIPPER]), session, notes)
                    if self.settings.enabled:
                        out[GRIPPER] = command
            for note in notes:
                self.counts[note["rule"]] += 1
        return SafeAction(out.astype(np.float32), raw, gripper_raw, command, notes)

    def _bounds(self, out: np.ndarray, notes: list[dict]) -> None:
        clipped = np.where(self.clamped_dims, np.clip(out, self.low, self.high), out)
        dims = np.flatnonzero(clipped != out)
        if len(dims):
            notes.append(
                {
                    "rule": "bounds",
                    "dims": dims.tolist(),
                    "before": out[dims].tolist(),
                    "after": clipped[dims].tolist(),
                }
            )
            out[:] = clipped

    @staticmethod
    def _limit(out: np.ndarray, part: slice, limit: float, rule: str, notes: list[dict]) -> None:
        norm = float(np.linalg.norm(out[part]))
        if norm > limit:
            out[part] *= limit / norm
            notes.append(
                {"rule": rule, "dims": list(range(part.start, part.stop)), "norm": norm, "limit": limit}
            )

    def _workspace(self, out: np.ndarray, position: np.ndarray, notes: list[dict]) -> None:
        s = self.settings
        low, high = np.asarray(s.workspace_min, np.float64), np.asarray(s.workspace_max, np.float64)
        if position.shape != (3,):
            raise ValueError(f"eef_position must hold 3 values (x, y, z), got shape {position.shape}")
        # the translation that keeps position + scale * translation in [low, high]; outward motion from a
        # position already outside the box is stopped, inward motion allowed
        lo = np.minimum((low - position) / s.workspace_action_scale, 0.0)
        hi = np.maximum((high - position) / s.workspace_action_scale, 0.0)
        cut = np.clip(out[TRANSLATION], lo, hi)
        dims = np.flatnonzero(cut != out[TRANSLATION])
        if len(dims):
            notes.append({"rule": "workspace", "dims": dims.tolist(), "position": position.tolist()})
            out[TRANSLATION] = cut

    def _gripper_command(self, value: float, session: str, notes: list[dict]) -> float:
        s = self.settings
        previous = self._gripper.get(session)
        if value > s.gripper_open_above:
            command = 1.0
        elif value < s.gripper_close_below:
            command = 0.0
        elif previous is not None:
            command = previous
            if (value > 0.5 * (s.gripper_open_above + s.gripper_close_below)) != (previous == 1.0):
                notes.append(
                    {"rule": "gripper_hysteresis", "dims": [GRIPPER], "value": value, "kept": previous}
                )
        else:
            command = 1.0 if value >= 0.5 * (s.gripper_open_above + s.gripper_close_below) else 0.0
        self._gripper[session] = command
        self._gripper.move_to_end(session)
        while len(self._gripper) > MAX_SESSIONS:
            self._gripper.popitem(last=False)
        return command

    def info(self) -> dict:
        with self._lock:
            return {
                "settings": asdict(self.settings),
                "enabled": self.settings.enabled,
                "estop": self._estop,
                "bounds_low": self.low.tolist(),
                "bounds_high": self.high.tolist(),
                "clamped_dims": np.flatnonzero(self.clamped_dims).tolist(),
                "eef_rules": self.eef_layout,
                "max_translation": self.max_translation if self.eef_layout else None,
                "max_rotation": self.max_rotation if self.eef_layout else None,
                "num_actions": self.num_actions,
                "interventions": dict(self.counts),
            }

"""Runs trials of a policy in Meta-World: the simulator in worker processes (one per core, one llvmpipe
thread each), the policy in this process on the frames of every worker that is ready, batched.

The loop does not wait for all workers: it takes the frames of whichever workers have answered, so that
rendering (in the workers) and the policy's forward pass (here) overlap. A trial ends at its first
success or after max_steps; its failure class comes from the simulator's info (metaworld_env.TrialSignals).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait

import numpy as np

from vla_train.sim.metaworld_env import (
    INSTRUCTIONS,
    MetaWorldEnv,
    RenderSettings,
    TrialSignals,
    spawn_without_main,
    to_metaworld_action,
)


@dataclass(frozen=True)
class Trial:
    task: str
    seed: int
    max_steps: int
    index: int  # trial number within its task (videos are kept for the first ones)


@dataclass
class TrialResult:
    task: str
    seed: int
    index: int
    success: bool
    num_steps: int
    success_step: int | None
    failure_class: str | None
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # primary camera, if recorded

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "frames"}


def _worker(conn, settings: dict, max_path_length: int) -> None:
    from vla_train.sim.demos import _worker_init

    _worker_init()
    render = RenderSettings(**settings)
    envs: dict[str, MetaWorldEnv] = {}
    env = None
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            break
        if msg[0] == "reset":
            _, task, seed = msg
            env = envs.get(task) or envs.setdefault(task, MetaWorldEnv(task, render, max_path_length))
            env.reset(seed)
            conn.send({"frames": env.frames(), "state": env.state()})
        elif msg[0] == "replay":  # recorded 4-D commands, open loop: observations and infos
            _, task, seed, raw_actions = msg
            env = envs.get(task) or envs.setdefault(task, MetaWorldEnv(task, render, max_path_length))
            env.reset(seed)
            observations, infos = [], []
            for a in raw_actions:
                observations.append(np.asarray(env.obs, np.float32))
                infos.append(env.step(a))
            conn.send({"observations": np.stack(observations), "infos": infos})
        elif msg[0] == "step":
            _, action7, render_next = msg
            mw_action = env.expert_action() if action7 is None else to_metaworld_action(action7)
            info = env.step(mw_action)
            frames = env.frames() if render_next else None
            conn.send({"info": info, "frames": frames, "state": env.state()})
    for e in envs.values():
        e.close()


class SimWorkers:
    """Worker processes that each hold Meta-World environments (one per task, built on first use)."""

    def __init__(self, render: RenderSettings, num_workers: int, max_path_length: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        with spawn_without_main():
            for _ in range(num_workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, asdict(render), max_path_length), daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)

    def receive(self, w: int):
        """The next reply of worker w; a clear error if it died."""
        try:
            return self.conns[w].recv()
        except (EOFError, ConnectionResetError):
            self.procs[w].join(timeout=5)
            raise RuntimeError(
                f"simulator worker {w} died (exit code {self.procs[w].exitcode}); its error, if any, is above"
            ) from None

    def replay(self, task: str, seed: int, raw_actions: np.ndarray, w: int = 0) -> dict:
        """Replay recorded 4-D commands from `seed` in worker w: its observations before each step and
        the info of each step (the physics is deterministic: a recording replays bit for bit)."""
        self.conns[w].send(("replay", task, seed, np.asarray(raw_actions, np.float32)))
        return self.receive(w)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        deadline = (
            time.monotonic() + 20
        )  # one deadline for all: a worker blocked on an unread reply is killed
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> SimWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Active:
    def __init__(self, trial: Trial, record: bool):
        self.trial = trial
        self.signals = TrialSignals(trial.task)
        self.record = record
        self.frames: list[np.ndarray] = []
        self.obs: dict | None = None

    def result(self) -> TrialResult:
        s = self.signals
        return TrialResult(
            self.trial.task,
            self.trial.seed,
            self.trial.index,
            s.success_step is not None,
            s.num_steps,
            s.success_step,
            s.failure_class(),
            self.frames,
        )


def run_trials(
    policy,
    trials: list[Trial],
    workers: SimWorkers,
    video_trials: int = 0,
    progress=None,
) -> tuple[list[TrialResult], list[dict]]:
    """Every trial, in any order of completion; returns (results in the order of `trials`, one record
    per policy call: batch size and seconds). Frames of the first `video_trials` trials of each task are
    kept in their results. `policy.act(observations, instructions, trials, steps)` returns one 7-D
    action per observation, or None to let the worker's scripted expert act."""
    pending = list(reversed(trials))
    active: dict[int, _Active] = {}  # worker index -> its trial; every active worker owes one reply
    results: dict[tuple[str, int, int], TrialResult] = {}
    calls: list[dict] = []
    conns = workers.conns
    index_of = {id(c): w for w, c in enumerate(conns)}

    def start(w: int) -> None:
        t = pending.pop()
        active[w] = _Active(t, record=t.index < video_trials)
        conns[w].send(("reset", t.task, t.seed))

    for w in range(min(len(conns), len(pending))):
        start(w)
    while active:
        batch = []
        for conn in wait([conns[w] for w in active]):  # whichever workers have answered
            w = index_of[id(conn)]
            reply, a = workers.receive(w), active[w]
            if a.record and reply["frames"] is not None:
                a.frames.append(reply["frames"]["image"])
            if "info" in reply:
                a.signals.update(reply["info"])
                if a.signals.success_step is not None or a.signals.num_steps >= a.trial.max_steps:
                    r = a.result()
                    results[(r.task, r.seed, r.index)] = r
                    del active[w]
                    if progress is not None:
                        progress(r)
                    if pending:
                        start(w)
                    continue
            a.obs = reply
            batch.append(w)
        if not batch:
            continue
        started = time.perf_counter()
        actions = policy.act(
            [active[w].obs for w in batch],
            [INSTRUCTIONS[active[w].trial.task] for w in batch],
            [active[w].trial for w in batch],
            [active[w].signals.num_steps for w in batch],
        )
        # a chunk policy asks the model only when a trial's chunk is used up: count those frames
        asked = getattr(policy, "last_query_size", len(batch))
        if policy.needs_frames and asked:
            calls.append({"batch": asked, "seconds": time.perf_counter() - started})
        for w, action in zip(batch, actions):
            # the next frame is rendered only when someone looks at it
            conns[w].send(("step", action, policy.needs_frames or active[w].record))
    return [results[(t.task, t.seed, t.index)] for t in trials], calls

"""What a run does when something goes wrong on some rank, and the exit codes that say what happened.

- **Preemption** (`PreemptionWatcher`): SIGTERM (what SLURM, Kubernetes and torchrun send first) and
  SIGUSR1 (SLURM's `--signal=USR1@<seconds>` warning) only set a flag. The flag rides on the step's first
  all-reduce, so every rank learns of it at the same step; that step still completes, then every rank
  writes the checkpoint (its data position is exactly the batches of the completed steps) and stops.
- **Non-finite losses or gradients** (`nonfinite_report`): found through the step's global gradient norm,
  which every strategy already reduces over ranks (so all ranks agree without a further collective);
  the step is not applied. training.on_nonfinite says whether the run halts or skips the step.
- **Hung ranks** (`StepWatchdog`): a thread per rank ends the process when a step (or a checkpoint, or
  a validation pass) has not finished within training.step_timeout_s, naming the step and the rank.

Exit codes of `vla-train` (each rank's; torchrun reports the first failing one), the constants below:
0 finished, or preempted under a SLURM batch job, checkpointed and requeued; 2 a bad config field, bad
data, or a configuration the memory preflight refused (nothing trained); 3 a non-finite loss or gradient
(the newest checkpoint holds the last good step); 4 a rank stalled (step watchdog; the newest committed
checkpoint is intact); 75 preempted and checkpointed outside SLURM: relaunch the same command to resume.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time
from typing import Any

EXIT_CONFIG = 2  # a bad config field, bad data, or a configuration the memory preflight refused
EXIT_NONFINITE = 3  # non-finite loss/gradient (on_nonfinite halt, or too many consecutive skips)
EXIT_STALLED = 4  # the step watchdog ended a rank that made no progress within training.step_timeout_s
EXIT_PREEMPTED = 75  # preempted and checkpointed, not requeued: relaunch the same command to resume


class PreemptionWatcher:
    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient halted the run (training.on_nonfinite)."""


def nonfinite_report(step: int, rank_losses: list[tuple[int, list[float], list[str]]]) -> str:
    """What went non-finite at `step`: the ranks whose micro-batch losses were non-finite and the datasets
    of those micro-batches. rank_losses: (rank, its micro-batch losses, their datasets) of every rank."""
    bad = []
    for rank, losses, datasets in rank_losses:
        names = sorted({d for loss, d in zip(losses, datasets, strict=True) if not math.isfinite(loss)})
        if names:
            bad.append(f"rank {rank} (loss {[round(x, 4) for x in losses]}, dataset {', '.join(names)})")
    where = "; ".join(bad) if bad else "no rank's loss (a gradient overflowed: every loss was finite)"
    return f"step {step + 1}: non-finite gradient norm; non-finite loss on {where}"


class StepWatchdog:
    """Ends this process (exit EXIT_STALLED) when the phase armed last (a training step, a checkpoint, a
    validation pass) has not finished within `timeout_s`: a rank stuck in a reader, in a collective whose
    peer died, or on a dead node. Before exiting it prints which phase of which step on which rank
    stalled, and every thread's Python stack. Committed checkpoints are untouched: a write in progress
    leaves only its temporary directory, which the next start removes. timeout_s 0: off."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._phase, self._deadline = "", math.inf
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="vla-step-watchdog", daemon=True)
            self._thread.start()

    def arm(self, phase: str) -> None:
        """Start the clock for `phase` (e.g. "step 12"); the next arm or `disarm` ends it."""
        with self._lock:
            self._phase, self._deadline = phase, time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        with self._lock:
            self._phase, self._deadline = "", math.inf

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 10)):
            with self._lock:
                phase, late = self._phase, time.monotonic() > self._deadline
            if late:
                print(
                    f"watchdog: rank {self.rank} stalled in {phase}: not finished after "
                    f"{self.timeout_s:g} s (training.step_timeout_s). This rank is stuck or waits on a "
                    f"stuck rank; exiting with code {EXIT_STALLED}. The newest committed checkpoint is "
                    "intact; relaunch to resume from it. Python stacks of this rank:",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_STALLED)

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

"""Graceful stop on preemption: SIGTERM (what SLURM, Kubernetes and torchrun send first) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` warning) only set a flag. The trainer checks the flag at every step
boundary, agreed over ranks, writes a checkpoint and returns; the next launch resumes from it."""

from __future__ import annotations

import signal
import threading
from typing import Any


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
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

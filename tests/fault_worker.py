"""`vla-train` with one fault injected, for tests/test_faults.py: `torchrun ... tests/fault_worker.py
KIND RANK STEPS [vla-train args]` runs the real entry point (vla_train.cli.train_main) after wrapping the
trainer's step so that on rank RANK, when a step of STEPS (comma-separated) begins, it:

- `signal`: sends itself SIGUSR1 (what SLURM's --signal / scancel --signal=USR1 deliver);
- `nan`: makes that step's loss NaN on this rank (a forward hook on the model), so its gradients are
  non-finite;
- `hang`: sleeps forever (a stuck reader, a dead node).

Every rank writes `params_rank<R>.sha256` (a hash of its full parameters) into the run directory at
the end of each step, so a test can compare the ranks' weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import time

import torch

from vla_train import cli
from vla_train.training import trainer

KIND, RANK, STEPS = sys.argv[1], int(sys.argv[2]), {int(s) for s in sys.argv[3].split(",")}
_step = trainer.train_step


def _nan_loss(module, args, out):
    out.loss = out.loss * math.nan
    return out


def _params_hash(run) -> str:
    h = hashlib.sha256()
    for name, p in sorted(run.vla.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()


def faulty_step(run, micro_batches):
    step = run.step + 1
    hook = None
    if run.ctx.rank == RANK and step in STEPS:
        if KIND == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif KIND == "hang":
            print(f"fault_worker: rank {RANK} hangs at step {step}", flush=True)
            while True:
                time.sleep(3600)
        elif KIND == "nan":
            hook = run.vla.register_forward_hook(_nan_loss)
    try:
        result = _step(run, micro_batches)
    finally:
        if hook is not None:
            hook.remove()
    (run.run_dir / f"params_rank{run.ctx.rank}.sha256").write_text(f"{step} {_params_hash(run)}\n")
    return result


trainer.train_step = faulty_step
cli.train_main(sys.argv[4:])

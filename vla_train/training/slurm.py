"""What the trainer does under a SLURM batch job: after a preemption checkpoint, rank 0 puts the job
back in the queue (`scontrol requeue`), once per signal, so the requeued job resumes from that checkpoint.
A job exiting by itself is never requeued by SLURM (`--requeue` applies to node failures and
preemption by the scheduler only), hence the explicit call."""

from __future__ import annotations

import os
import shutil
import subprocess


def job_to_requeue() -> str | None:
    """The id `scontrol requeue` takes for this process's batch job ("<array job>_<task>" for a task of a
    job array), or None outside a SLURM batch job (an interactive `srun` alone has no batch script to
    rerun)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") == "interactive":
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return job


def requeue(job: str, timeout_s: float = 60.0) -> str:
    """Run `scontrol requeue <job>`; returns what to print. Raises RuntimeError naming the command and its
    output when it fails (the checkpoint is committed either way: resubmitting the job resumes it)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RuntimeError(f"SLURM job {job}: scontrol is not on PATH, so the job cannot be requeued")
    cmd = [scontrol, "requeue", job]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(
            f"'{' '.join(cmd)}' failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}; "
            "the checkpoint is committed: resubmit the job to resume"
        )
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it runs again"

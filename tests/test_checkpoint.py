"""Checkpoint commits survive kills: a SIGKILL during a checkpoint write leaves the previous checkpoint as
the one resumed from (and the resumed run repeats the lost steps exactly); SIGTERM (preemption) lets the step
under way finish, checkpoints it and exits with the preempted code (75, outside SLURM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_trainer import tiny_args

from vla_test_utils import REPO, run_cli, wandb_history
from vla_train.training.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from vla_train.training.faults import EXIT_PREEMPTED
from vla_train.training.logging import read_metrics

CODE = "import sys; from vla_train.cli import train_main; train_main(sys.argv[1:])"
# The trainer with its checkpoint commit stalled at one step (the step directory name is the first
# argument): every file of that checkpoint is written, then the commit (the rename) waits, so the test
# can kill the run in the middle of a checkpoint write.
STALLED_COMMIT = """
import sys, time
from vla_train.cli import train_main
from vla_train.training import checkpoint

stalled_at, commit = sys.argv[1], checkpoint.commit
def stalled_commit(tmp, final):
    if final.name == stalled_at:
        time.sleep(600)
    commit(tmp, final)
checkpoint.commit = stalled_commit
train_main(sys.argv[2:])
"""


def start(args: list[str], code: str = CODE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def test_kill_during_checkpoint_write_resumes_from_the_previous_checkpoint(small_synthetic, tmp_path):
    root, _ = small_synthetic
    args = tiny_args(
        root,
        tmp_path,
        "run",
        "--lora.enabled",
        "false",
        "--training.max_steps",
        "6",
        "--training.checkpoint_every",
        "2",
        "--logging.wandb_mode",
        "offline",
    )
    run_dir = tmp_path / "run"
    tmp_write = run_dir / "checkpoints" / ".tmp_step_00000004"
    proc = start(["step_00000004", *args], code=STALLED_COMMIT)
    try:
        # the commit of step 4 waits after every file is written, before the rename
        wait_for(lambda: (tmp_write / "state.json").is_file(), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(run_dir).name == "step_00000002" and tmp_write.is_dir()
    lost = {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}
    assert sorted(lost) == [1, 2, 3, 4]  # steps 3 and 4 ran, but their checkpoint never committed

    resumed = run_cli("train_main", *args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed the uncommitted checkpoint write .tmp_step_00000004" in resumed.stdout
    assert "from step_00000002" in resumed.stdout
    redone = [m for m in read_metrics(run_dir) if "train/loss" in m][4:]
    assert [m["step"] for m in redone] == [3, 4, 5, 6]
    assert [m["train/loss"] for m in redone[:2]] == [lost[3], lost[4]]  # the lost steps, bitwise
    # wandb continues the same run id with its own monotone step; the training step is trainer/step
    *before, after = wandb_history(run_dir)
    rows = [r for r in after if "train/loss" in r]
    assert [r["trainer/step"] for r in rows] == [3, 4, 5, 6]
    assert [r["train/loss"] for r in rows] == [m["train/loss"] for m in redone]  # nothing dropped
    steps = [r["_step"] for rows in [*before, after] for r in rows]
    assert steps == sorted(set(steps)) and after[0]["_step"] >= 4, steps
    # keep_last_checkpoints 2: only the newest two remain, no temporary directory
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000004", "step_00000006"]
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    state = load_checkpoint(run_dir / "checkpoints" / "step_00000006")
    assert state["state"]["step"] == 6 and state["trainable"]
    data = json.loads((run_dir / "checkpoints" / "step_00000006" / "data_rank0.json").read_text())
    assert data["stream"]["shards"]["0"]["num_batches_yielded"] == 6


def test_sigterm_checkpoints_that_step_and_exits_with_the_preempted_code(small_synthetic, tmp_path):
    root, _ = small_synthetic
    args = tiny_args(root, tmp_path, "pre", "--lora.enabled", "false", "--training.max_steps", "100000")
    run_dir = tmp_path / "pre"
    proc = start(args)
    metrics = Path(run_dir / "metrics.jsonl")
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]  # checkpointed, not under SLURM: relaunch
    assert "stopped by SIGTERM" in out and "relaunch the same command to resume" in out
    step = max(m["step"] for m in read_metrics(run_dir))
    assert latest_checkpoint(run_dir).name == f"step_{step:08d}"

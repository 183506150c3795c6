"""Faults under real `torchrun --nproc_per_node 2` (gloo), each injected into the real entry point by
tests/fault_worker.py on rank 1 only:

- preemption (SIGUSR1 on rank 1 at step 3): both ranks finish step 3, checkpoint it and exit 75; the
  relaunch resumes and its per-step losses equal an uninterrupted run's (that run is launched through
  scripts/launch_torchrun.sh);
- a NaN loss on rank 1 at step 5: halt (exit 3) naming the step, the rank and the dataset, the newest
  checkpoint holding step 4; skip: the step is dropped on both ranks (identical weights), counted in the
  metrics, and two NaN steps in a row with max_consecutive_skips 1 halt (one run);
- rank 1 sleeping forever at step 6: every process exits non-zero within training.step_timeout_s + 30 s,
  the log names the stalled step and rank, and no checkpoint is half-written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from test_trainer import tiny_args, train_losses

from vla_test_utils import REPO
from vla_test_utils import torchrun as launch
from vla_train.training.checkpoint import checkpoint_dirs, latest_checkpoint
from vla_train.training.faults import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_STALLED
from vla_train.training.logging import read_metrics

pytestmark = pytest.mark.slow

WORKER = str(REPO / "tests" / "fault_worker.py")
COMMON = [
    "--lora.enabled",
    "false",
    "--distributed.strategy",
    "ddp",
    "--training.max_steps",
    "8",
    "--training.lr_schedule",
    "linear-warmup+cosine",
    "--training.warmup_steps",
    "2",
    "--training.checkpoint_every",
    "4",
]


def fault_run(kind: str, steps: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """tests/fault_worker.py under torchrun (2 ranks): fault `kind` on rank 1 at `steps` ("5" or "5,7")."""
    return launch(WORKER, kind, "1", steps, *args, timeout=timeout)


def exit_codes(proc: subprocess.CompletedProcess) -> set[int]:
    """The exit codes of the ranks as torchrun reports them (it exits 1 itself when any rank fails)."""
    assert proc.returncode != 0
    return {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)}


def says(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def uninterrupted(small_synthetic, tmp_path_factory):
    """The 8-step run, uninterrupted, launched as a user would: scripts/launch_torchrun.sh."""
    root, _ = small_synthetic
    out = tmp_path_factory.mktemp("fault_runs")
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "scripts/launch_torchrun.sh", *tiny_args(root, out, "whole", *COMMON)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, says(proc)
    assert "ddp on 2 process(es)" in proc.stdout
    return root, out


def test_preemption_on_one_rank_checkpoints_that_step_and_resumes_exactly(uninterrupted, tmp_path):
    root, out = uninterrupted
    args = tiny_args(root, tmp_path, "pre", *COMMON)
    stopped = fault_run("signal", "3", *args)
    assert exit_codes(stopped) == {EXIT_PREEMPTED}, says(stopped)
    assert "stopped by a signal on another rank at step 3" in stopped.stdout  # rank 0 did not get it
    run_dir = tmp_path / "pre"
    assert latest_checkpoint(run_dir).name == "step_00000003"
    for rank in (0, 1):  # the checkpoint counts exactly the batches of the 3 completed steps
        data = json.loads((run_dir / "checkpoints" / "step_00000003" / f"data_rank{rank}.json").read_text())
        assert data["stream"]["shards"][str(rank)]["num_batches_yielded"] == 3
    resumed = launch("-m", "vla_train.cli", *args, timeout=300)
    assert resumed.returncode == 0, says(resumed)
    assert "from step_00000003" in resumed.stdout and "data position restored" in resumed.stdout
    whole, pre = train_losses(out / "whole"), train_losses(run_dir)
    assert sorted(pre) == sorted(whole) == list(range(1, 9))
    assert [pre[s] for s in whole] == [whole[s] for s in whole]  # bitwise


def test_nan_on_one_rank_halts_naming_step_rank_and_dataset(small_synthetic, tmp_path):
    root, _ = small_synthetic
    proc = fault_run("nan", "5", *tiny_args(root, tmp_path, "halt", *COMMON))
    assert exit_codes(proc) == {EXIT_NONFINITE}, says(proc)
    err = proc.stderr
    assert "step 5: non-finite gradient norm; non-finite loss on rank 1" in err, err[-3000:]
    assert "dataset vla_synthetic" in err and "training.on_nonfinite is halt" in err
    run_dir = tmp_path / "halt"
    assert latest_checkpoint(run_dir).name == "step_00000004"  # the last good step, already saved
    assert max(train_losses(run_dir)) == 4


SKIP = [*COMMON, "--training.on_nonfinite", "skip", "--training.max_consecutive_skips", "1"]


def test_nan_skip_drops_the_step_on_every_rank_counts_it_and_halts_when_repeated(small_synthetic, tmp_path):
    """NaN on rank 1 at steps 5, 7 and 8 with max_consecutive_skips 1: 5 and 7 are skipped on both ranks
    (their weights stay identical, the skips are counted), 8 is the second in a row and halts."""
    root, _ = small_synthetic
    proc = fault_run("nan", "5,7,8", *tiny_args(root, tmp_path, "skip", *SKIP))
    assert exit_codes(proc) == {EXIT_NONFINITE}, says(proc)
    for step in (5, 7):
        assert f"skipped step {step}: non-finite gradient norm; non-finite loss on rank 1" in proc.stdout
    assert "step 8: non-finite" in proc.stderr and "2 consecutive steps were non-finite" in proc.stderr
    run_dir = tmp_path / "skip"
    hashes = [(run_dir / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1] and hashes[0].startswith("8 "), hashes  # identical weights at the end
    metrics: dict[int, dict] = {}
    for m in read_metrics(run_dir):
        metrics.setdefault(m["step"], {}).update(m)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6, 7]  # step 8 halted before its metrics line
    assert "train/loss" not in metrics[5] and metrics[5]["train/nonfinite_skipped"] == 1
    assert "train/loss" in metrics[6] and metrics[7]["train/nonfinite_skipped"] == 2
    assert latest_checkpoint(run_dir).name == "step_00000007"  # the halt saved the last good weights


@pytest.mark.exclusive  # a time bound: run alone (make test)
def test_a_hung_rank_ends_every_process_within_the_bound(small_synthetic, tmp_path):
    root, _ = small_synthetic
    bound = 20
    args = tiny_args(root, tmp_path, "hang", *COMMON, "--training.step_timeout_s", str(bound))
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
         "hang", "1", "6", *args],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    hung_at = None
    lines = []
    for line in proc.stdout:  # the worker prints when rank 1 starts hanging
        lines.append(line)
        if "rank 1 hangs at step 6" in line:
            hung_at = time.monotonic()
        if time.monotonic() - start > 300:
            break
    try:
        proc.wait(timeout=bound + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = "".join(lines)
    assert hung_at is not None, log[-4000:]
    took = time.monotonic() - hung_at
    print(f"hung at step 6: every process ended {took:.1f} s later (bound {bound} s)")
    assert proc.returncode not in (0, None), log[-4000:]
    assert took <= bound + 30, log[-4000:]
    assert f"watchdog: rank 1 stalled in step 6: not finished after {bound} s" in log, log[-4000:]
    assert re.search(rf"exitcode\s*:\s*{EXIT_STALLED}", log), log[-4000:]  # torchrun's report of rank 1
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"processes left running: {leftover}"
    run_dir = tmp_path / "hang"  # the step-4 checkpoint stands committed, nothing half-written
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000004"]
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))

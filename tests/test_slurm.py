"""scripts/slurm/train.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py: Debian's slurmctld,
slurmd and munge, installed when missing), 2 CPU processes per node on gloo:

- a job runs to completion: metrics of every step, the final checkpoint;
- `scancel --signal=USR1` in the middle of the same job: the trainer checkpoints at the next step, rank 0
  requeues the job, the requeued job resumes from that checkpoint and finishes, and the losses of its
  steps equal the uninterrupted job's.

The script's own logic (processes per node, the exit of a requeued run) is also checked without a cluster,
with stand-ins for srun and scontrol (fast tests, not marked slow).

The GPU directive of the script is overridden, not edited: `sbatch --gpus-per-node=0` (what Slurm 22.05
accepts over `#SBATCH --gpus-per-node=8`; `--gres=none` alone does not clear it) with
`--export=ALL,NPROC_PER_NODE=2`. A cluster that cannot be installed or started fails these tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from slurm_cluster import ClusterError, SlurmCluster
from test_trainer import tiny_args, train_losses

from vla_test_utils import REPO
from vla_train.training.checkpoint import latest_checkpoint

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
STEPS = 60  # ~0.1 s each here, after ~35 s of start-up; a signal at step 3 stops the run near step 10
SIGNAL_AFTER_STEP = 3
JOB_TIMEOUT_S = 300  # one run of the job (measured: under a minute)
# requeue: the first run ends, cred_expire + 1 s of eligibility wait, a second run
REQUEUED_TIMEOUT_S = 2 * JOB_TIMEOUT_S + slurm_cluster.CRED_EXPIRE_S
LOSS_ATOL = 1e-6
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
RUN = [
    "--lora.enabled",
    "false",
    "--training.max_steps",
    str(STEPS),
    "--training.checkpoint_every",
    "0",  # the only mid-run checkpoint is the preemption's
    "--training.lr_schedule",
    "linear-warmup+cosine",
    "--training.warmup_steps",
    "3",
    "--training.weight_decay",
    "0.01",
    "--distributed.strategy",
    "ddp",
    "--training.data_sharding",
    "batch_slice",
    "--distributed.timeout_s",
    "120",
]


# ---- the script's logic, with stand-ins for srun and scontrol -------------------------------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG"
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$*" in
  "show hostnames "*) echo node-a; echo node-b ;;
  "show job -o "*) echo "JobId=$SLURM_JOB_ID JobName=vla-train JobState=RUNNING Restarts=$FAKE_RESTARTS" ;;
  *) exit 1 ;;
esac
"""


def fake_batch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run train.sbatch as SLURM's batch step would, with srun and scontrol replaced; returns the result
    and the arguments srun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun_args"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    job_env = {
        **base,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_RESTARTS": "0",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), "--logging.run_id", "x"],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, log.read_text().splitlines() if log.is_file() else []


def test_sbatch_runs_one_process_per_gpu_unless_told(tmp_path):
    proc, args = fake_batch(tmp_path, SLURM_GPUS_ON_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert args[args.index("--nproc_per_node") + 1] == "8" and args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--rdzv_endpoint") + 1] == "node-a:20042"
    assert args[-3:] == ["vla_train.cli", "--logging.run_id", "x"]
    proc, args = fake_batch(tmp_path, SLURM_GPUS_PER_NODE="h100:4")
    assert args[args.index("--nproc_per_node") + 1] == "4"
    # a CPU node: no GPUs, NPROC_PER_NODE says how many processes
    proc, args = fake_batch(tmp_path, SLURM_GPUS_PER_NODE="0", NPROC_PER_NODE="2", MASTER_PORT="1234")
    assert proc.returncode == 0, proc.stderr
    assert args[args.index("--nproc_per_node") + 1] == "2"
    assert args[args.index("--rdzv_endpoint") + 1] == "node-a:1234"
    (tmp_path / "srun_args").unlink()
    proc, args = fake_batch(tmp_path, SLURM_GPUS_PER_NODE="0")
    assert proc.returncode == 2 and "set NPROC_PER_NODE" in proc.stderr and not args


def test_sbatch_exit_of_a_requeued_run_is_0_and_other_failures_keep_theirs(tmp_path):
    # torchrun exits 1 after a signal it handled; the job is already back in the queue (Restarts went up)
    proc, _ = fake_batch(tmp_path, SLURM_GPUS_ON_NODE="8", FAKE_SRUN_EXIT="1", FAKE_RESTARTS="1")
    assert proc.returncode == 0 and "job 42 was requeued (srun exit 1)" in proc.stdout, proc.stdout
    # a requeued job's next run: SLURM_RESTART_COUNT=1, failing without another requeue
    restarted = {"SLURM_RESTART_COUNT": "1", "FAKE_RESTARTS": "1"}
    proc, _ = fake_batch(tmp_path, SLURM_GPUS_ON_NODE="8", FAKE_SRUN_EXIT="3", **restarted)
    assert proc.returncode == 3 and "srun exited 3" in proc.stderr
    assert "(restart 1)" in proc.stdout
    proc, _ = fake_batch(tmp_path, SLURM_GPUS_ON_NODE="8", FAKE_SRUN_EXIT="1")
    assert proc.returncode == 1


# ---- a real cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except ClusterError as e:
        pytest.fail(f"the SLURM test cluster could not be set up: {e}", pytrace=False)
    print(f"slurm: install {cluster.install_s:.1f}s, daemons up in {cluster.start_s:.1f}s ({cluster.root})")
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, data_root: Path, out: Path, run_id: str) -> tuple[str, Path]:
    """sbatch train.sbatch for a tiny 2-process CPU run `run_id` under `out`; returns (job id, output)."""
    output = out / f"{run_id}.out"
    env = [
        "ALL",
        "NPROC_PER_NODE=2",
        f"MASTER_PORT={slurm_cluster.free_port()}",
        f"PYTHON={sys.executable}",
        "OMP_NUM_THREADS=1",
        "PYTHONUNBUFFERED=1",
    ]
    job = slurm.sbatch(
        "--gpus-per-node=0",
        f"--cpus-per-task={slurm.cpus}",
        f"--job-name={run_id}",
        f"--output={output}",
        f"--export={','.join(env)}",
        str(SBATCH),
        *tiny_args(data_root, out, run_id, *RUN),
        cwd=REPO,
    )
    return job, output


def wait_until_ended(slurm: SlurmCluster, job: str, output: Path, timeout_s: float) -> dict[str, str]:
    try:
        return slurm.wait_for_job(job, lambda r: r.get("JobState") in ENDED, timeout_s, "ended", output)
    except ClusterError as e:
        pytest.fail(str(e), pytrace=False)


def assert_completed(slurm: SlurmCluster, job: str, record: dict[str, str], output: Path) -> None:
    if record.get("JobState") != "COMPLETED" or record.get("ExitCode") != "0:0":
        pytest.fail(
            f"job {job} ended {record.get('JobState')} with exit code {record.get('ExitCode')}\n"
            f"{slurm.describe(job, output)}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def uninterrupted(slurm, small_synthetic, tmp_path_factory):
    """The job run to its end once: (job id, its record, output file, run directory, seconds)."""
    root, _ = small_synthetic
    out = tmp_path_factory.mktemp("slurm_runs")
    start = time.monotonic()
    job, output = submit(slurm, root, out, "full")
    record = wait_until_ended(slurm, job, output, JOB_TIMEOUT_S)
    seconds = time.monotonic() - start
    print(f"uninterrupted job {job}: {record.get('JobState')} in {seconds:.1f}s")
    return job, record, output, out / "full", seconds


@pytest.mark.slow
def test_sbatch_two_cpu_processes_run_to_completion(slurm, uninterrupted):
    job, record, output, run_dir, _ = uninterrupted
    assert_completed(slurm, job, record, output)
    text = output.read_text()
    assert "1 node(s) x 2 process(es)" in text, text[-3000:]
    assert "ddp on 2 process(es)" in text, text[-3000:]
    assert f"done: step {STEPS}" in text, text[-3000:]
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    final = latest_checkpoint(run_dir)
    assert final is not None and final.name == f"step_{STEPS:08d}", final
    assert {p.name for p in final.glob("data_rank*.json")} == {"data_rank0.json", "data_rank1.json"}


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_job_finishes_with_the_same_losses(
    slurm, uninterrupted, small_synthetic
):
    root, _ = small_synthetic
    _, full_record, _, full_dir, _ = uninterrupted
    assert full_record.get("JobState") == "COMPLETED", "the uninterrupted job failed (see the test before)"
    out = full_dir.parent
    start = time.monotonic()
    job, output = submit(slurm, root, out, "preempted")
    run_dir = out / "preempted"

    # signal the job's steps (torchrun and the ranks; not the batch shell) in the middle of the run
    def far_enough(record: dict[str, str]) -> bool:
        if record.get("JobState") in ENDED:
            return True
        return (run_dir / "metrics.jsonl").is_file() and max(train_losses(run_dir), default=0) >= (
            SIGNAL_AFTER_STEP
        )

    try:
        record = slurm.wait_for_job(job, far_enough, JOB_TIMEOUT_S, f"at step {SIGNAL_AFTER_STEP}", output)
    except ClusterError as e:
        pytest.fail(str(e), pytrace=False)
    if record.get("JobState") in ENDED:
        pytest.fail(f"job {job} ended before the signal\n{slurm.describe(job, output)}", pytrace=False)
    slurm.run("scancel", "--signal=USR1", job)
    signalled = time.monotonic()
    try:
        slurm.wait_for_job(job, lambda r: int(r.get("Restarts", 0)) >= 1 or r.get("JobState") in ENDED,
                           JOB_TIMEOUT_S, "requeued", output)  # fmt: skip
    except ClusterError as e:
        pytest.fail(str(e), pytrace=False)
    record = wait_until_ended(slurm, job, output, REQUEUED_TIMEOUT_S)
    seconds = time.monotonic() - start
    print(
        f"preempted job {job}: {record.get('JobState')} after {record.get('Restarts')} restart(s) in "
        f"{seconds:.1f}s ({time.monotonic() - signalled:.1f}s after the signal)"
    )
    if record.get("Restarts") != "1":
        pytest.fail(
            f"job {job} ended {record.get('JobState')} (exit code {record.get('ExitCode')}) with "
            f"Restarts={record.get('Restarts')}, not requeued once after SIGUSR1\n{slurm.describe(job, output)}",
            pytrace=False,
        )
    assert_completed(slurm, job, record, output)

    # two runs of the job in one (appended) output file; the first one stopped at a checkpoint and was
    # requeued by the trainer, not counted as a failure
    text = output.read_text()
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text, text[-4000:]
    assert "stopped by SIGUSR1 at step" in text, text[-4000:]
    assert f"requeued SLURM job {job}" in text, text[-4000:]
    runs = [r.get("JobState") for r in slurm.jobcomp(job)]
    assert len(runs) == 2 and runs[-1] == "COMPLETED" and runs[0] not in ("FAILED", "CANCELLED"), (
        runs,
        slurm.describe(job, output),
    )
    stopped = int(text.split("stopped by SIGUSR1 at step", 1)[1].split(";", 1)[0])
    assert SIGNAL_AFTER_STEP <= stopped < STEPS, stopped
    assert f"from step_{stopped:08d}" in text, text[-4000:]

    # every step's loss (the last record of a step logged twice) equals the uninterrupted job's
    full, resumed = train_losses(full_dir), train_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = [abs(resumed[s] - full[s]) for s in full]
    print(f"stopped at step {stopped}; max |loss - uninterrupted loss| = {max(diffs):.3g}")
    assert max(diffs) <= LOSS_ATOL, [(s, resumed[s], full[s]) for s in full if resumed[s] != full[s]][:10]

"""A throwaway one-node SLURM cluster for the tests: Debian's slurmctld, slurmd and munge (installed with
apt-get when missing, as root), with their own munge key and socket, slurm.conf, state, spool, logs and
pid files all under one temporary directory, on ports picked free. Nothing under /etc is used: clients and
daemons find the configuration through SLURM_CONF, which only `SlurmCluster.env` carries (never the test
process's own environment).

Every process the cluster starts (daemons, slurmstepd, the jobs' processes) inherits SLURM_CONF=<this
cluster's slurm.conf>; `stop()` and the next `start()` (after a run that could not tear down, e.g. a killed
pytest) end exactly those processes, by pid.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vla_test_utils import AptError, apt_install

PACKAGES = ("slurmctld", "slurmd", "munge")  # slurm-client comes with them
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
# The slurm.conf of the last cluster started on this machine, so that a run that could not tear down is
# cleaned up by the next one.
LAST_CLUSTER = Path(tempfile.gettempdir()) / "vla-train-slurm-test.last"
# A requeued job becomes eligible cred_expire + 1 s after the requeue (slurm.conf(5): "This also controls
# how long a requeued job must wait before starting again"; default 120 s, minimum 5 s).
CRED_EXPIRE_S = 10


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message says what failed and shows its logs."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if _which(c) is None]


def ensure_installed(timeout_s: float = 900) -> float:
    """Install PACKAGES with apt-get (update once, then install without recommends) when any of COMMANDS
    is missing; returns the seconds it took (0 when nothing was missing). Raises ClusterError saying why
    it could not."""
    missing = missing_commands()
    if not missing:
        return 0.0
    start = time.monotonic()
    try:
        apt_install(PACKAGES, f"SLURM commands {missing} are", timeout_s)
    except AptError as e:
        raise ClusterError(str(e)) from None
    still = missing_commands()
    if still:
        raise ClusterError(
            f"`apt-get install {' '.join(PACKAGES)}` succeeded but {still} are still not found on {SEARCH_PATH}"
        )
    return time.monotonic() - start


def free_port(low: int = 15000, high: int = 19999) -> int:
    """A TCP port in [low, high] (below Linux's ephemeral range and the sbatch's default MASTER_PORTs)
    that nothing listens on now."""
    for port in random.sample(range(low, high + 1), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free TCP port in {low}-{high}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(text[-lines:])


def _processes_of(conf: Path) -> list[int]:
    """Pids of the processes that carry SLURM_CONF=<conf> (what a cluster started), but not this one."""
    needle = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _end_processes_of(conf: Path, grace_s: float = 5.0) -> None:
    """SIGTERM then (after grace_s) SIGKILL every process that carries SLURM_CONF=<conf>."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_of(conf)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def parse_record(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` (scontrol -o, jobcomp/filetxt) as a dict; values hold no spaces except
    the last key's (Command=, Comment=, ... may)."""
    fields: dict[str, str] = {}
    for match in re.finditer(r"(\w[\w:/]*)=(\S*)", line):
        fields.setdefault(match.group(1), match.group(2))
    return fields


@dataclass
class SlurmCluster:
    root: Path
    node: str
    conf: Path
    env: dict[str, str]
    cpus: int = 1
    install_s: float = 0.0
    start_s: float = 0.0
    _daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def logs(self) -> dict[str, Path]:
        return {name: self.root / "log" / f"{name}.log" for name in ("munged", "slurmctld", "slurmd")}

    def log_tails(self, lines: int = 30, first: str = "") -> str:
        """The end of each daemon's log (`first`'s first): its log file, or what it wrote to its stdout and
        stderr when it has none (munged in the foreground, a daemon that died before opening its log)."""
        parts = []
        for name in sorted(self.logs, key=lambda n: n != first):
            path = self.logs[name]
            if not path.is_file() or not path.stat().st_size:
                path = path.with_suffix(".stdio")
            parts.append(f"---- {name}: {path} (last {lines} lines) ----\n{tail(path, lines)}")
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: Path | None = None):
        """Run a SLURM client command against this cluster."""
        try:
            proc = subprocess.run(
                [_which(cmd[0]) or cmd[0], *cmd[1:]],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"`{' '.join(cmd)}` hung for {timeout}s\n{self.log_tails()}") from e
        if check and proc.returncode != 0:
            raise ClusterError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}\n"
                f"{self.log_tails()}"
            )
        return proc

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o <id>` as a dict ({} once SLURM forgot the job: MinJobAge is an hour)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_record(proc.stdout) if proc.returncode == 0 else {}

    def jobcomp(self, job_id: str) -> list[dict[str, str]]:
        """The job's records in the completion log (jobcomp/filetxt): one per run of it, requeues
        included, in order."""
        path = self.root / "log" / "jobcomp.log"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [r for r in map(parse_record, lines) if r.get("JobId") == job_id]

    def wait_for_job(self, job_id: str, done, timeout_s: float, what: str, output: Path | None = None):
        """Poll `scontrol show job` until done(record) is true; returns the record. On timeout raises
        ClusterError with the job's record, its output and the daemons' logs."""
        deadline = time.monotonic() + timeout_s
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record and done(record):
                return record
            time.sleep(0.5)
        raise ClusterError(
            f"job {job_id}: not {what} within {timeout_s:.0f}s; last state "
            f"{record.get('JobState')} ({record.get('Reason')}), Restarts={record.get('Restarts')}, "
            f"ExitCode={record.get('ExitCode')}\n{self.describe(job_id, output)}"
        )

    def describe(self, job_id: str, output: Path | None = None) -> str:
        """The job's record, completion-log records and output tail, and the daemons' logs."""
        parts = [
            f"---- scontrol show job {job_id} ----\n{self.run('scontrol', 'show', 'job', job_id, check=False).stdout}",
            f"---- jobcomp records ----\n{self.jobcomp(job_id)}",
        ]
        if output is not None:
            parts.append(f"---- {output} (last 60 lines) ----\n{tail(output, 60)}")
        return "\n".join([*parts, self.log_tails()])

    def stop(self) -> None:
        """Cancel every job, give them a few seconds to end, then end every process of this cluster."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=20)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split():
                        break
                    time.sleep(0.5)
        # slurmd and slurmctld first (they may still want munge to log off), then the rest
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _end_processes_of(self.conf)
        if LAST_CLUSTER.is_file() and LAST_CLUSTER.read_text().strip() == str(self.conf):
            LAST_CLUSTER.unlink()


def _slurm_conf(root: Path, node_line: str, node: str, ctld_port: int, slurmd_port: int) -> str:
    munge_socket = root / "munge" / "munge.socket"
    return f"""# written by tests/slurm_cluster.py: a one-node cluster for the tests
ClusterName=vlatest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=300
Waittime=0
MailProg=/bin/true
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _start_daemon(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    stdio = open(cluster.logs[name].with_suffix(".stdio"), "ab")  # noqa: SIM115 (the daemon owns it)
    cluster._daemons[name] = subprocess.Popen(
        cmd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio, start_new_session=True
    )
    stdio.close()


def _wait(cluster: SlurmCluster, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for name, proc in cluster._daemons.items():
            if proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode} while waiting for {what}\n"
                    f"{cluster.log_tails(first=name)}"
                )
        if condition():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{cluster.log_tails()}")
        time.sleep(0.3)


def start(root: Path, timeout_s: float = 90) -> SlurmCluster:
    """Install the packages if needed, then start munged, slurmctld and slurmd under `root` and wait until
    the node is idle. Raises ClusterError (with the daemons' logs) when any of it fails; the caller must
    call stop() on the returned cluster (it also ends a previous, never stopped cluster's processes)."""
    install_s = ensure_installed()
    begin = time.monotonic()
    if LAST_CLUSTER.is_file():  # a previous run that could not tear down: end its processes
        _end_processes_of(Path(LAST_CLUSTER.read_text().strip()))
    root = root.resolve()
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o711)  # clients (root here) reach the socket; the key is 0600
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)

    probe = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30)
    node_line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("NodeName=")), "")
    if probe.returncode != 0 or not node_line:
        raise ClusterError(f"`slurmd -C` did not describe this node: {probe.stdout}{probe.stderr}")
    node = node_line.split()[0].split("=", 1)[1]
    # RealMemory is left at its default (memory is not a scheduled resource here: CR_CPU)
    node_line = " ".join(f for f in node_line.split() if not f.startswith("RealMemory="))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node_line, node, free_port(), free_port()))
    LAST_CLUSTER.write_text(str(conf))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
        if var != "SLURM_CONF":  # e.g. when the tests themselves run inside a SLURM job
            del env[var]
    cpus = int(re.search(r"\bCPUs=(\d+)", node_line).group(1)) if "CPUs=" in node_line else 1
    cluster = SlurmCluster(root=root, node=node, conf=conf, env=env, cpus=cpus, install_s=install_s)
    try:
        sock = root / "munge" / "munge.socket"
        # fmt: off
        _start_daemon(cluster, "munged", [
            _which("munged") or "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={root}/run/munged.pid", f"--log-file={cluster.logs['munged']}",
            f"--seed-file={root}/munge/munged.seed",
        ])
        # fmt: on
        _wait(cluster, sock.exists, timeout_s, f"munged's socket {sock}")
        _start_daemon(cluster, "slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c", "-f", str(conf)])
        _wait(
            cluster,
            lambda: cluster.run("scontrol", "ping", check=False, timeout=20).stdout.count("UP") > 0,
            timeout_s,
            "slurmctld to answer `scontrol ping`",
        )
        _start_daemon(cluster, "slurmd", [_which("slurmd") or "slurmd", "-D", "-f", str(conf)])

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20).stdout.split()
            return out[:2] == [node, "idle"]

        _wait(cluster, idle, timeout_s, f"`sinfo` to show node {node} idle")
    except BaseException:
        cluster.stop()
        raise
    cluster.start_s = time.monotonic() - begin
    return cluster

"""Helpers shared by the tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class AptError(RuntimeError):
    """A Debian package a test needs could not be installed."""


def apt_install(packages: tuple[str, ...], what: str, timeout_s: float = 900) -> float:
    """`apt-get update` then `apt-get install -y --no-install-recommends PACKAGES` (as root); returns the
    seconds it took. `what` names what is missing, for the error when this cannot be done."""
    import time

    want = f"apt-get install {' '.join(packages)}"
    if os.geteuid() != 0:
        raise AptError(f"{what} missing and this is not root: run `{want}`")
    if shutil.which("apt-get") is None:
        raise AptError(f"{what} missing and there is no apt-get to `{want}`")
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            raise AptError(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f}s") from e
        if proc.returncode != 0:
            raise AptError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
    return time.monotonic() - start


def ensure_osmesa() -> None:
    """Headless MuJoCo rendering: Debian's libosmesa6, installed when missing (as the SLURM fixture does)."""
    import ctypes.util

    if ctypes.util.find_library("OSMesa") is None:
        apt_install(("libosmesa6",), "the OSMesa library (headless rendering for Meta-World) is")
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


def run_cli(
    entry: str, *args: str, cwd: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a console entry point (vla_train.cli:<entry>) in a fresh interpreter, as a user would."""
    code = f"import sys; from vla_train.cli import {entry}; {entry}(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def torchrun(*cmd: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N CMD` (one torch thread per rank); the whole process group
    is killed and the test fails when it outlives `timeout` seconds."""
    import pytest

    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        full,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(full, proc.returncode, out, err)


def frame_spec(root, **overrides):
    """A small training StreamSpec over the synthetic dataset under `root` (16 px frames, batch 8).

    `overrides` may set StreamSpec's run-time fields (image_size, batch_size, seed, train, num_shards,
    shard_index), `datasets` ([(name, weight)]; default: data.dataset_name alone) and any DataConfig field.
    """
    import dataclasses

    from vla_train.config import DataConfig
    from vla_train.data.stream import StreamSpec
    from vla_train.data.synthetic import DATASET_NAME

    runtime = {f.name for f in dataclasses.fields(StreamSpec)} - {"data", "datasets"}
    spec_fields = {"image_size": 16, "batch_size": 8, "seed": 1, "train": True}
    spec_fields.update({k: v for k, v in overrides.items() if k in runtime})
    data_fields = {"data_root_dir": str(root), "dataset_name": DATASET_NAME, "shuffle_buffer_size": 50}
    data_fields.update({k: v for k, v in overrides.items() if k not in runtime and k != "datasets"})
    data = DataConfig(**data_fields)
    datasets = tuple(overrides.get("datasets") or [(data.dataset_name, 1.0)])
    return StreamSpec(data=data, datasets=tuple((d, float(w)) for d, w in datasets), **spec_fields)


def registry_yaml(
    datasets: dict[str, str | dict],
    mixtures: dict[str, list[tuple[str, float]]] | None = None,
    wrist: bool = False,
) -> str:
    """A registry YAML text that registers copies of the synthetic dataset: {name: standardize_fn} or
    {name: {standardize_fn, state (the state key, default 'state'), action_dim (optional)}}, in the
    synthetic layout (primary camera `image`, and the same image as the wrist camera with wrist=True),
    plus {mixture: [(dataset, weight)]}."""
    lines = ["datasets:"]
    for name, entry in datasets.items():
        entry = {"standardize_fn": entry} if isinstance(entry, str) else entry
        lines += [
            f"  {name}:",
            f"    image_obs_keys: {{primary: image, secondary: null, wrist: {'image' if wrist else 'null'}}}",
            f"    state_obs_keys: [{entry.get('state', 'state')}]",
            "    state_encoding: POS_EULER",
            "    action_encoding: EEF_POS",
            f"    standardize_fn: {entry['standardize_fn']}",
        ]
        if "action_dim" in entry:
            lines.append(f"    action_dim: {entry['action_dim']}")
    if mixtures:
        lines.append("mixtures:")
        lines += [
            f"  {m}: {[[d, float(w)] for d, w in pairs]}".replace("'", "") for m, pairs in mixtures.items()
        ]
    return "\n".join(lines) + "\n"


def synthetic_copies(
    src_root: Path,
    root: Path,
    names: list[str],
    datasets: dict[str, str | dict],
    mixtures: dict[str, list[tuple[str, float]]] | None = None,
) -> Path:
    """Copies of the synthetic dataset under `src_root` into `root` under each of `names`, and
    root/registry.yaml with registry_yaml(datasets, mixtures); returns the registry file."""
    from vla_train.data.synthetic import DATASET_NAME

    for name in names:
        shutil.copytree(src_root / DATASET_NAME, root / name)
    registry = root / "registry.yaml"
    registry.write_text(registry_yaml(datasets, mixtures))
    return registry


def multi_file_mixture(root: Path, work: Path, files: int = 4) -> Path:
    """Under `root`: a 48-episode synthetic dataset in `files` TFRecord files per split, under its own name
    and as 'syn_files_b', and a 1-file one 'syn_one_file'; root/registry.yaml registers both copies and the
    mixture 'syn_files' (1:1). `work` holds the builds. Returns the registry file."""
    from vla_train.config import SyntheticDataConfig
    from vla_train.data.synthetic import DATASET_NAME, build_synthetic_dataset

    cfg = SyntheticDataConfig(
        num_train_episodes=48, num_val_episodes=4, steps_per_episode=4, image_size=32, seed=5, num_files=files
    )
    build_synthetic_dataset(work / "files", cfg)
    one = SyntheticDataConfig(
        num_train_episodes=12, num_val_episodes=2, steps_per_episode=4, image_size=32, seed=6
    )
    build_synthetic_dataset(work / "one", one)
    registry = synthetic_copies(
        work / "files",
        root,
        [DATASET_NAME, "syn_files_b"],
        {"syn_files_b": "identity", "syn_one_file": "identity"},
        {"syn_files": [(DATASET_NAME, 1.0), ("syn_files_b", 1.0)]},
    )
    shutil.copytree(work / "one" / DATASET_NAME, root / "syn_one_file")
    return registry


def wandb_history(run_dir: Path) -> list[list[dict]]:
    """The history rows (`_step` and every logged key, JSON-decoded) of each offline wandb run file under
    run_dir/wandb, oldest file first. The files are LevelDB-style logs (32 KiB blocks of checksummed
    chunks) of wandb's protobuf `Record`s, read here without wandb's reader."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def chunks(data: bytes):
        pos, block, record = 7, 32768, b""  # after the ":W&B" header
        while pos + 7 <= len(data):
            left = block - pos % block
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):  # block padding
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            record = chunk if kind in (1, 2) else record + chunk  # full / first, or middle / last
            if kind in (1, 4):
                yield record

    runs = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a wandb run file"
        rows = []
        for raw in chunks(data):
            r = pb.Record()
            r.ParseFromString(raw)
            if r.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                )
        runs.append(rows)
    return runs

"""No pickle runs when a checkpoint is loaded: the scheduler and RNG states of a tiny run's checkpoint are
JSON and safetensors and resume it exactly, and a checkpoint whose scheduler, RNG or DCP files carry a
malicious pickled object (one that would touch a marker file when unpickled) is refused with a clear
error before anything is unpickled."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import run_in_process, tiny_args, train_losses

from vla_train.training import checkpoint as ck
from vla_train.training.distributed import DistContext

# 4 steps, checkpoint at 2; warmup + cosine so that the scheduler state matters
ARGS = ["--lora.enabled", "false", "--training.max_steps", "4", "--training.checkpoint_every", "2"]
ARGS += ["--training.lr_schedule", "linear-warmup+cosine", "--training.warmup_steps", "1"]
ONE_PROCESS = DistContext(0, 1, 0, torch.device("cpu"), "single", "fp32", None, False)


class Malicious:
    """Unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def run(small_synthetic, tmp_path_factory):
    """(data root, output dir) of a 4-step tiny run with checkpoints at steps 2 and 4."""
    root, _ = small_synthetic
    out = tmp_path_factory.mktemp("safety")
    run_in_process(tiny_args(root, out, "run", *ARGS))
    return root, out


def step_2(run, dst: Path) -> Path:
    """A copy of the run's step-2 checkpoint under `dst` (a run directory as if it had stopped there)."""
    src = run[1] / "run"
    shutil.copytree(src / "base_model", dst / "base_model")
    ckpt = dst / "checkpoints" / "step_00000002"
    shutil.copytree(src / "checkpoints" / ckpt.name, ckpt)
    return ckpt


def test_checkpoint_holds_no_pickle_and_resumes_exactly(run, tmp_path):
    root, out = run
    ckpt = step_2(run, tmp_path / "resumed")
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert "scheduler.json" in files and "rng_rank0.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".pickle"))], files
    for f in files:  # besides DCP's own files, nothing holds a pickle
        if not f.startswith("dcp/"):
            assert not ck._is_pickle((ckpt / f).read_bytes()), f
    assert json.loads((ckpt / "scheduler.json").read_text())["last_epoch"] == 2
    run_in_process(tiny_args(root, tmp_path, "resumed", *ARGS))
    full, resumed = train_losses(out / "run"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]  # bitwise


def test_rng_states_round_trip_bitwise(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # numpy then holds a cached gaussian
    random.gauss(0, 1)  # and Python one too
    path = tmp_path / "rng.safetensors"
    path.write_bytes(ck._rng_bytes())

    def draws():
        return (
            torch.rand(4).tolist(),
            np.random.standard_normal(3).tolist(),
            random.gauss(0, 1),
            random.random(),
        )

    first = draws()
    ck._set_rng_state(*ck._read_rng(path))
    assert draws() == first


def malicious_pickle(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps(Malicious(marker), protocol=protocol)


def malicious_torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": Malicious(marker)}, buf)
    return buf.getvalue()


def test_the_malicious_object_would_run(tmp_path):
    """The control: unpickled without the checks, the payload of the tests below does run."""
    marker = tmp_path / "ran"
    pickle.loads(malicious_pickle(marker))
    assert marker.is_file()


def tamper_dcp_metadata(ckpt: Path, marker: Path, protocol: int) -> Path:
    """The real metadata carrying the object (STACK_GLOBAL), or with protocol 0 the object alone (GLOBAL)."""
    meta_file = ckpt / "dcp" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    meta.planner_data = {"extra": Malicious(marker)}
    meta_file.write_bytes(pickle.dumps(meta) if protocol else malicious_pickle(marker, protocol=0))
    return meta_file


def tamper_dcp_entry(ckpt: Path, marker: Path) -> Path:
    """Point an optimizer hyperparameter (a non-tensor DCP entry) at a torch.save of the object."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_file = ckpt / "dcp" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    fqn = next(k for k, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == fqn)
    info = meta.storage_data[index]
    data_file = ckpt / "dcp" / info.relative_path
    blob = malicious_torch_save(marker)
    meta.storage_data[index] = dataclasses.replace(info, offset=data_file.stat().st_size, length=len(blob))
    with open(data_file, "ab") as f:
        f.write(blob)
    meta_file.write_bytes(pickle.dumps(meta))
    return data_file


@pytest.mark.parametrize(
    "target", ["scheduler", "rng", "dcp_metadata", "dcp_metadata_protocol0", "dcp_entry"]
)
def test_a_malicious_pickle_is_refused_and_never_runs(target, run, tmp_path):
    ckpt = step_2(run, tmp_path / "run")
    marker = tmp_path / "ran"
    if target == "scheduler":
        bad = ckpt / "scheduler.json"
        bad.write_bytes(malicious_pickle(marker))
    elif target == "rng":
        bad = ckpt / "rng_rank0.safetensors"
        bad.write_bytes(malicious_torch_save(marker))
    elif target == "dcp_entry":
        bad = tamper_dcp_entry(ckpt, marker)
    else:
        bad = tamper_dcp_metadata(
            ckpt, marker, 0 if target.endswith("protocol0") else pickle.DEFAULT_PROTOCOL
        )
    loads = [lambda: ck.restore_checkpoint(ckpt, None, None, None, ONE_PROCESS)]
    if target.startswith("dcp"):  # what export reads
        loads += [lambda: ck.load_checkpoint(ckpt), lambda: ck.read_trainable(ckpt)]
    for load in loads:
        with pytest.raises(ck.PickledCheckpointError) as e:
            load()
        msg = str(e.value)
        assert str(bad) in msg and "checkpoint refused: it holds pickled Python objects" in msg, msg
        assert "could run arbitrary code" in msg and "new logging.run_id" in msg, msg
        if target.startswith("dcp_metadata"):
            assert "posix.system" in msg, msg
    assert isinstance(e.value, ValueError)
    assert not marker.exists()


def test_a_checkpoint_of_an_older_vla_train_is_refused_for_resuming(run, tmp_path):
    ckpt = step_2(run, tmp_path / "run")
    (ckpt / "scheduler.json").unlink()
    torch.save({"last_epoch": 2}, ckpt / "scheduler.pt")
    with pytest.raises(ck.PickledCheckpointError, match="written by an older vla_train: its scheduler.pt"):
        ck.restore_checkpoint(ckpt, None, None, None, ONE_PROCESS)
    assert ck.load_checkpoint(ckpt)["trainable"]  # export reads only dcp/ and state.json

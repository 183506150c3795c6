"""Scripted-expert demonstrations from Meta-World, written as an RLDS dataset (`metaworld_mt10`) with our
tfds builder, so that they train through the same pipeline as any Open X-Embodiment dataset.

Generation is two stages. (1) Worker processes (one per core) roll out each task's expert from seeded
resets (train and val seed ranges, see metaworld_env.seed_for), render the frames and keep an episode only
if it is successful at its last step (it ends `steps_after_success` steps after the first success). Each
attempt is one file under `<out>/_metaworld_episodes/<settings>/<task>/`, written atomically, so an
interrupted run resumes where it stopped and a failed seed is not tried again. (2) The tfds builder writes
the first `episodes_per_task` successful seeds of each task (in seed order, so the dataset does not depend
on the order the workers finished in) as train and val splits.

Step layout: observation/image (JPEG, corner4 camera), observation/wrist_image (gripper camera, when
asked for), observation/state (end-effector xyz, gripper opening), observation/env_state (Meta-World's
39-D observation), action (7-D OpenVLA layout), raw_action (Meta-World's 4-D command), language_instruction,
is_first, is_last, is_terminal, reward, discount; episode_metadata: task, seed, success_step.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from vla_train.config import MetaWorldDataConfig
from vla_train.data.rlds_steps import step_flag_features, step_flags
from vla_train.sim.metaworld_env import (
    INSTRUCTIONS,
    MetaWorldEnv,
    RenderSettings,
    resolve_tasks,
    seed_for,
    spawn_without_main,
    to_openvla_action,
)

DATASET_NAME = "metaworld_mt10"
VERSION = "1.0.0"
ENV_STATE_DIM = 39
GENERATION_FILE = "generation.json"


def render_settings(cfg: MetaWorldDataConfig) -> RenderSettings:
    return RenderSettings(image_size=cfg.image_size, msaa_samples=cfg.msaa_samples, wrist=cfg.wrist)


def _settings_key(cfg: MetaWorldDataConfig) -> str:
    # Episodes are reusable across runs only when everything that shapes them is the same.
    return (
        f"s{cfg.image_size}_msaa{cfg.msaa_samples}_q{cfg.jpeg_quality}_w{int(cfg.wrist)}"
        f"_max{cfg.max_episode_steps}_after{cfg.steps_after_success}"
    )


def episodes_dir(cfg: MetaWorldDataConfig) -> Path:
    return Path(cfg.out) / "_metaworld_episodes" / _settings_key(cfg)


def dataset_dir(out: str | Path) -> Path:
    return Path(out) / DATASET_NAME / VERSION


def recorded_render_settings(data_root_dir: str | Path) -> RenderSettings | None:
    """How the dataset under data_root_dir was rendered (None if it has no generation.json)."""
    path = dataset_dir(data_root_dir) / GENERATION_FILE
    if not path.is_file():
        return None
    render = json.loads(path.read_text()).get("render")
    return RenderSettings(**render) if render else None


# ---- stage 1: expert rollouts in worker processes -------------------------------------------------
_ENVS: dict[str, MetaWorldEnv] = {}


def _worker_init() -> None:
    os.environ["LP_NUM_THREADS"] = "1"  # one llvmpipe thread per worker: workers = cores
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import warnings

    # every expert warns that its gains "may be too high" (the env clips the action): said once here
    warnings.filterwarnings("ignore", message="Constant.*may be too high")


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rollout_expert(env: MetaWorldEnv, seed: int, max_steps: int, steps_after_success: int, render: bool):
    """The expert from `seed`: per-step frames (if render), state, env_state, raw 4-D actions, and the
    info of each step; stops `steps_after_success` steps after the first success."""
    env.reset(seed)
    out = {"frames": [], "state": [], "env_state": [], "raw_action": [], "info": []}
    first_success = None
    for t in range(max_steps):
        if render:
            out["frames"].append(env.frames())  # the observation the action is taken from
        out["state"].append(env.state())
        out["env_state"].append(np.asarray(env.obs, np.float32))
        action = env.expert_action()
        out["raw_action"].append(action)
        info = env.step(action)
        out["info"].append(info)
        if info["success"] >= 1.0 and first_success is None:
            first_success = t + 1
        if first_success is not None and t + 1 >= first_success + steps_after_success:
            break
    out["first_success"] = first_success
    return out


def _record(job: tuple[dict, str, str, int]) -> tuple[str, str, int, bool, int]:
    cfg_dict, task, split, k = job
    cfg = MetaWorldDataConfig(**cfg_dict)
    env = _ENVS.get(task)
    if env is None:
        env = _ENVS[task] = MetaWorldEnv(
            task, render_settings(cfg), max_path_length=cfg.max_episode_steps + 1
        )
    seed = seed_for(split, task, k)
    ep = rollout_expert(env, seed, cfg.max_episode_steps, cfg.steps_after_success, render=True)
    ok = ep["first_success"] is not None and ep["info"][-1]["success"] >= 1.0
    target = episodes_dir(cfg) / task / f"{split}_{k:03d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not ok:
        _atomic_write(
            target.with_suffix(".failed"), json.dumps({"seed": seed, "steps": len(ep["info"])}).encode()
        )
        return task, split, k, False, len(ep["info"])
    arrays = {
        "seed": np.int64(seed),
        "first_success": np.int64(ep["first_success"]),
        "state": np.stack(ep["state"]),
        "env_state": np.stack(ep["env_state"]),
        "raw_action": np.stack(ep["raw_action"]),
    }
    for key in ep["frames"][0]:
        encoded = [_jpeg(f[key], cfg.jpeg_quality) for f in ep["frames"]]
        arrays[f"{key}_bytes"] = np.frombuffer(b"".join(encoded), np.uint8)
        arrays[f"{key}_offsets"] = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write(target.with_suffix(".npz"), buf.getvalue())
    return task, split, k, True, len(ep["info"])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _attempts(cfg: MetaWorldDataConfig, task: str, split: str) -> tuple[list[int], list[int]]:
    d = episodes_dir(cfg) / task
    ok = sorted(int(p.stem.split("_")[1]) for p in d.glob(f"{split}_*.npz")) if d.is_dir() else []
    bad = sorted(int(p.stem.split("_")[1]) for p in d.glob(f"{split}_*.failed")) if d.is_dir() else []
    return ok, bad


def _split_counts(cfg: MetaWorldDataConfig) -> dict[str, int]:
    return {"train": cfg.episodes_per_task, "val": cfg.val_episodes_per_task}


def record_episodes(cfg: MetaWorldDataConfig, tasks: list[str]) -> dict:
    """Stage 1: roll out until each task has its successful episodes (or max_seeds_per_task were tried).
    Returns per task and split: seeds tried, kept, and the seed indices that failed."""
    from tqdm import tqdm

    counts = _split_counts(cfg)
    max_tries = cfg.max_seeds_per_task or 3 * max(counts.values()) + 5
    num_workers = cfg.num_workers or os.cpu_count() or 1
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch/TF thread pools
    pool = None
    started = time.perf_counter()
    try:
        while True:
            jobs = []
            for task in tasks:
                for split, need in counts.items():
                    ok, bad = _attempts(cfg, task, split)
                    tried = set(ok) | set(bad)
                    missing = need - len(ok)
                    candidates = [k for k in range(max_tries) if k not in tried][: max(0, missing)]
                    jobs += [(vars(cfg), task, split, k) for k in candidates]
            if not jobs:
                break
            if pool is None:  # a worker that dies makes the pool raise BrokenProcessPool (no hang)
                with spawn_without_main():
                    pool = ProcessPoolExecutor(min(num_workers, len(jobs)), ctx, initializer=_worker_init)
            bar = tqdm(total=len(jobs), desc="expert episodes", unit="ep", disable=not cfg.progress_bar)
            for future in as_completed([pool.submit(_record, job) for job in jobs]):
                task, split, k, ok, steps = future.result()
                bar.update(1)
                bar.set_postfix_str(f"{task} {split} {k}: {'ok' if ok else 'failed'} ({steps} steps)")
            bar.close()
    finally:
        if pool is not None:  # on an error: the queued episodes are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
    summary = {}
    for task in tasks:
        for split, need in counts.items():
            ok, bad = _attempts(cfg, task, split)
            summary[f"{task}/{split}"] = {
                "kept": min(need, len(ok)),
                "tried": len(ok) + len(bad),
                "failed": bad,
            }
            if len(ok) < need:
                print(
                    f"warning: {task} {split}: only {len(ok)} of {need} expert episodes succeeded in "
                    f"{len(ok) + len(bad)} seeds (raise --max_seeds_per_task)",
                    file=sys.stderr,
                )
    summary["_seconds"] = round(time.perf_counter() - started, 1)
    return summary


# ---- stage 2: the tfds builder --------------------------------------------------------------------
def _episode_files(cfg: MetaWorldDataConfig, tasks: list[str], split: str) -> list[tuple[str, Path]]:
    need = _split_counts(cfg)[split]
    out = []
    for task in tasks:
        ok, _ = _attempts(cfg, task, split)
        out += [(task, episodes_dir(cfg) / task / f"{split}_{k:03d}.npz") for k in ok[:need]]
    return out


def read_episode(path: Path) -> dict:
    """One recorded episode: arrays, and the JPEG bytes of each frame per camera key."""
    with np.load(path) as z:
        ep = {k: z[k] for k in z.files}
    for key in [k.removesuffix("_bytes") for k in ep if k.endswith("_bytes")]:
        data, offsets = ep.pop(f"{key}_bytes").tobytes(), ep.pop(f"{key}_offsets")
        ep[key] = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return ep


@functools.cache
def _builder_class():
    from vla_train.data.tf_setup import tfds

    class MetaworldMt10(tfds.core.GeneratorBasedBuilder):
        """Meta-World MT10 scripted-expert demonstrations (see vla_train/sim/demos.py)."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Scripted-expert demonstrations, corner4 camera, seeded resets."}

        def __init__(self, *, generation: MetaWorldDataConfig, tasks: list[str], **kwargs):
            self._gen, self._tasks = generation, tasks
            super().__init__(**kwargs)

        def _info(self):
            s = self._gen.image_size
            image = functools.partial(
                tfds.features.Image, shape=(s, s, 3), dtype=np.uint8, encoding_format="jpeg"
            )
            observation = {
                "image": image(),
                "state": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "env_state": tfds.features.Tensor(shape=(ENV_STATE_DIM,), dtype=np.float32),
            }
            if self._gen.wrist:
                observation["wrist_image"] = image()
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "steps": tfds.features.Dataset(
                            {
                                "observation": tfds.features.FeaturesDict(observation),
                                "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                                "raw_action": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                                "language_instruction": tfds.features.Text(),
                                **step_flag_features(tfds),
                            }
                        ),
                        "episode_metadata": tfds.features.FeaturesDict(
                            {
                                "task": tfds.features.Text(),
                                "seed": tfds.features.Scalar(dtype=np.int64),
                                "success_step": tfds.features.Scalar(dtype=np.int32),
                            }
                        ),
                    }
                ),
                supervised_keys=None,
            )

        def _split_generators(self, dl_manager):
            return {
                split: self._generate_examples(_episode_files(self._gen, self._tasks, split))
                for split in ("train", "val")
            }

        def _generate_examples(self, files):
            for task, path in files:
                ep = read_episode(path)
                T = len(ep["raw_action"])
                steps = []
                for t in range(T):
                    obs = {"image": ep["image"][t], "state": ep["state"][t], "env_state": ep["env_state"][t]}
                    if "wrist_image" in ep:
                        obs["wrist_image"] = ep["wrist_image"][t]
                    steps.append(
                        {
                            "observation": obs,
                            "action": to_openvla_action(ep["raw_action"][t]),
                            "raw_action": ep["raw_action"][t].astype(np.float32),
                            "language_instruction": INSTRUCTIONS[task],
                            **step_flags(t, T),
                        }
                    )
                meta = {"task": task, "seed": int(ep["seed"]), "success_step": int(ep["first_success"])}
                yield f"{task}_{path.stem}", {"steps": steps, "episode_metadata": meta}

    MetaworldMt10.name = DATASET_NAME
    return MetaworldMt10


def build_metaworld_dataset(cfg: MetaWorldDataConfig) -> dict:
    """Both stages; an existing dataset built from the same settings and episodes is kept. Returns a
    summary (episodes, frames, bytes, seconds) that is also written to <dataset dir>/generation.json."""
    tasks = resolve_tasks(cfg.tasks)
    started = time.perf_counter()
    summary = record_episodes(cfg, tasks)
    record_s = summary.pop("_seconds")
    files = {split: _episode_files(cfg, tasks, split) for split in ("train", "val")}
    identity = {
        "settings": _settings_key(cfg),
        "tasks": tasks,
        "episodes": {split: [f"{t}/{p.stem}" for t, p in fs] for split, fs in files.items()},
    }
    out = dataset_dir(cfg.out)
    gen_file = out / GENERATION_FILE
    previous = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    if previous.get("identity") == identity:
        return previous
    if out.exists():
        shutil.rmtree(out)  # built from other episodes or settings: rebuild (the episodes are kept)
    from vla_train.data.tf_setup import tfds

    build_started = time.perf_counter()
    builder = _builder_class()(generation=cfg, tasks=tasks, data_dir=str(cfg.out))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, verify_ssl=False, num_shards=cfg.num_files or None
        )
    )
    num_frames = {
        split: int(sum(len(np.load(p)["raw_action"]) for _, p in fs)) for split, fs in files.items()
    }
    result = {
        "identity": identity,
        "render": dataclasses.asdict(render_settings(cfg)),
        "dataset_dir": str(out),
        "num_episodes": {split: len(fs) for split, fs in files.items()},
        "num_frames": num_frames,
        "dataset_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "record_seconds": record_s,
        "build_seconds": round(time.perf_counter() - build_started, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "attempts": summary,
    }
    gen_file.write_text(json.dumps(result, indent=2))
    return result

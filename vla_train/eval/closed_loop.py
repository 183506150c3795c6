"""One closed-loop evaluation: resolve the seeds and the rendering, run the trials in simulator workers,
write the folder (report.py). Used by vla-eval and by the trainer's rollouts every N steps."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from vla_train.config import RolloutConfig
from vla_train.eval.report import write_outputs
from vla_train.eval.runner import SimWorkers, Trial, run_trials
from vla_train.sim.demos import recorded_render_settings
from vla_train.sim.metaworld_env import RenderSettings, resolve_tasks, seed_for


@contextlib.contextmanager
def policy_threads(num_workers: int):
    """torch's threads while simulator workers render: the cores the workers leave (at least one). With
    every core rendering, a second torch thread only waits for its turn at each op's barrier: on 2 cores
    the policy took 84.3 ms per call with 2 threads and 60.6 ms with 1 (scripts/bench_rollout_threads.py,
    BENCHMARKS.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render_for(cfg: RolloutConfig, data_root_dir: str = "", cameras=()) -> RenderSettings:
    """The rendering of the training data (when known), overridden by cfg's non-default fields; the wrist
    camera too when the policy reads it (`cameras`)."""
    recorded = recorded_render_settings(data_root_dir) if data_root_dir else None
    base = recorded or RenderSettings()
    return RenderSettings(
        image_size=cfg.image_size or base.image_size,
        msaa_samples=base.msaa_samples if cfg.msaa_samples < 0 else cfg.msaa_samples,
        wrist=base.wrist or "wrist" in cameras,
    )


def make_trials(cfg: RolloutConfig, seed_split: str = "eval", first_seed: int = 0, seeds=None) -> list[Trial]:
    """cfg.trials trials per task on `seed_split`'s range, or the given {task: [seed, ...]}."""
    trials = []
    for task in resolve_tasks(cfg.tasks):
        task_seeds = (
            seeds[task][: cfg.trials]
            if seeds is not None
            else [seed_for(seed_split, task, first_seed + k) for k in range(cfg.trials)]
        )
        trials += [Trial(task, s, cfg.max_steps, i) for i, s in enumerate(task_seeds)]
    return trials


def evaluate_closed_loop(
    policy,
    cfg: RolloutConfig,
    out_dir: str | Path,
    render: RenderSettings,
    trials: list[Trial],
    meta: dict,
    progress_bar: bool = False,
    workers: SimWorkers | None = None,
) -> dict:
    """Run `trials` and write out_dir; returns the summary (results.json's content)."""
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(trials), desc="trials", unit="trial")

    def progress(r):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{r.task} seed {r.seed}: {'success' if r.success else r.failure_class}")

    num_workers = min(cfg.num_workers or os.cpu_count() or 1, len(trials))
    own = workers is None
    started = time.perf_counter()
    workers = workers or SimWorkers(render, num_workers, max_path_length=cfg.max_steps + 1)
    try:
        with policy_threads(len(workers.conns)):
            results, calls = run_trials(policy, trials, workers, cfg.video_trials, progress)
    finally:
        if own:
            workers.close()
        if bar is not None:
            bar.close()
    meta = {
        **meta,
        "render": vars(render),
        "max_steps": cfg.max_steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return write_outputs(Path(out_dir), results, calls, meta)


class TrainingRollouts:
    """The trainer's rollouts every eval.rollouts_every steps: the same trials each round (the val seed
    range, so that the eval range stays held out), simulator workers started once and kept."""

    def __init__(self, cfg, data_root_dir: str, cameras=()):
        self.cfg = cfg
        self.render = render_for(cfg, data_root_dir, cameras)
        self.trials = make_trials(cfg, "val")
        self.workers: SimWorkers | None = None

    def evaluate(self, vla, processor, out_dir: Path) -> dict:
        """Success metrics (rollout/...) of the model as it is now; the round's folder goes to out_dir."""
        from vla_train.eval.policies import ModelPolicy
        from vla_train.models.policy import VLAPolicy

        if self.workers is None:
            n = min(self.cfg.num_workers or os.cpu_count() or 1, len(self.trials))
            self.workers = SimWorkers(self.render, n, max_path_length=self.cfg.max_steps + 1)
        was_training = vla.training
        try:
            policy = ModelPolicy(VLAPolicy(vla, processor), execute_steps=self.cfg.execute_steps)
            summary = evaluate_closed_loop(
                policy,
                self.cfg,
                out_dir,
                self.render,
                self.trials,
                {"seed_split": "val"},
                workers=self.workers,
            )
        finally:
            vla.train(was_training)
        metrics = {
            "rollout/success_rate": summary["success_rate"],
            "rollout/num_trials": summary["num_trials"],
            "rollout/seconds": summary["seconds"],
            "rollout/policy_ms_p50": summary["policy_latency"]["call_ms_p50"],
        }
        for task, t in summary["tasks"].items():
            metrics[f"rollout/{task}/success_rate"] = t["success_rate"]
        return metrics

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None

"""Policy latency during closed-loop rollouts in the training process: the configs/metaworld_cpu.yaml
model (random weights) alone, then in rollouts run while the run's training stream is open and the
simulator workers render, without and with what the trainer does around its rollouts (the stream's
producer paused, torch on the cores the workers leave). `--markdown` adds the rows to BENCHMARKS.md.

    .venv/bin/python scripts/bench_rollout_threads.py --markdown BENCHMARKS.md

Needs the Meta-World dataset of the recipe (scripts/bench_metaworld.py writes it).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from markdown_table import add_table_row, report

from vla_train.config import RolloutConfig, TrainConfig
from vla_train.config_cli import parse_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--markdown", help="add the result rows to this markdown file")
    ap.add_argument("--calls", type=int, default=30, help="policy calls timed alone")
    args = ap.parse_args()

    from vla_train.data.mixture import run_datasets
    from vla_train.data.rlds import get_statistics
    from vla_train.data.stream import FrameStream
    from vla_train.eval.closed_loop import evaluate_closed_loop, make_trials, render_for
    from vla_train.eval.policies import ModelPolicy
    from vla_train.eval.runner import SimWorkers, run_trials
    from vla_train.models.load import build_from_config
    from vla_train.models.policy import VLAPolicy
    from vla_train.runs import stream_spec
    from vla_train.sim.metaworld_env import INSTRUCTIONS

    cfg = parse_config(TrainConfig, ["--config_path", "configs/metaworld_cpu.yaml"])
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)  # what the trainer sets for one process
    stats = get_statistics(cfg.data.data_root_dir, cfg.data.dataset_name, cfg.data.stats_cache_dir, "raise")
    model, processor = build_from_config(cfg.model, list(INSTRUCTIONS.values()), seed=0)
    model.config.norm_stats = {cfg.data.dataset_name: stats}
    vla = VLAPolicy(model.eval(), processor)
    policy = ModelPolicy(vla)

    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    obs = [{"frames": {"image": image}}]
    policy.act(obs, ["open the door"], None, None)
    start = time.perf_counter()
    for _ in range(args.calls):
        policy.act(obs, ["open the door"], None, None)
    alone_ms = 1000 * (time.perf_counter() - start) / args.calls

    rollout = RolloutConfig(tasks="reach,push", trials=2, max_steps=40, video_trials=0)
    render = render_for(rollout, cfg.data.data_root_dir)
    trials = make_trials(rollout, "val")
    spec = stream_spec(
        cfg, run_datasets(cfg.data), cfg.model.image_size, True, cfg.training.batch_size, cores
    )
    stream = FrameStream(spec, {cfg.data.dataset_name: stats})
    batches = iter(stream)
    next(batches)  # the training stream is open and filling its shuffle blocks, as during training
    rows = {"alone": {"policy_ms_p50": round(alone_ms, 1), "torch_threads": cores}}
    with (
        SimWorkers(render, min(cores, len(trials)), rollout.max_steps + 1) as workers,
        tempfile.TemporaryDirectory() as tmp,
    ):
        started = time.perf_counter()
        _, calls = run_trials(policy, trials, workers)  # no pause, torch keeps every core
        rows["stream open, workers rendering, as before"] = {
            "policy_ms_p50": round(1000 * float(np.median([c["seconds"] for c in calls])), 1),
            "rollout_s": round(time.perf_counter() - started, 1),
            "torch_threads": cores,
        }
        with stream.paused():
            summary = evaluate_closed_loop(policy, rollout, tmp, render, trials, {}, workers=workers)
        rows["stream paused, torch on the cores the workers leave"] = {
            "policy_ms_p50": summary["policy_latency"]["call_ms_p50"],
            "rollout_s": summary["seconds"],
            "torch_threads": max(1, cores - len(workers.conns)),
        }
    report(rows, None, None, "", "")
    if args.markdown:
        machine = f"{platform.processor() or platform.machine()}, {cores} cores"
        for name, r in rows.items():
            add_table_row(
                Path(args.markdown),
                "| date | machine | policy in",
                f"| {time.strftime('%Y-%m-%d')} | {machine} | {name} | {r['torch_threads']} | "
                f"{r['policy_ms_p50']} | {r.get('rollout_s', '-')} |",
            )


if __name__ == "__main__":
    main()

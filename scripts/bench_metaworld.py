"""The Meta-World CPU recipe end to end: generate (or reuse) the MT10 demonstrations, train
configs/metaworld_cpu.yaml, evaluate closed loop (every MT10 task, --trials per task on the eval seed
range) at several training lengths, and report data size and generation time, training time, validation
accuracy and success per task; `--markdown` adds the rows to BENCHMARKS.md.

    .venv/bin/python scripts/bench_metaworld.py --markdown BENCHMARKS.md

Each training length is a kept checkpoint (training.checkpoint_every), exported with vla-export and
evaluated with vla-eval; with --eval-best also <run_dir>/best when it is not the last. The data is reused
when it exists; with --reuse-run the run too (the training time is then its span: from its base model's
creation to its last metrics line, imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from markdown_table import report

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/metaworld_cpu.yaml"
DATA_ARGS = [
    "--tasks", "mt10", "--episodes-per-task", "25", "--val-episodes-per-task", "3", "--out", "data_cache",
    "--image-size", "128", "--msaa-samples", "0", "--jpeg-quality", "90", "--progress-bar", "false",
]  # fmt: skip
RUN_DIR = REPO / "runs" / "metaworld_cpu"


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - start


def evaluate(bin_dir: Path, checkpoint: Path, name: str, trials: int) -> dict:
    export_dir = RUN_DIR / "bench_exports" / name
    run([str(bin_dir / "vla-export"), "--run_dir", str(RUN_DIR), "--checkpoint", str(checkpoint),
         "--output_dir", str(export_dir)])  # fmt: skip
    out = RUN_DIR / "bench_eval" / name
    seconds = run([str(bin_dir / "vla-eval"), "--policy", str(export_dir), "--tasks", "mt10", "--trials",
                   str(trials), "--out", str(out), "--data_root_dir", "data_cache", "--progress_bar", "false"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    return {
        "name": name,
        "step": step,
        "eval_s": round(seconds, 1),
        "success_rate": results["success_rate"],
        "success_95ci": results["success_rate_95ci"],
        "per_task": {t: r["success_rate"] for t, r in results["tasks"].items()},
        "policy_ms_p50": results["policy_latency"]["call_ms_p50"],
        "out": str(out.relative_to(REPO)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--markdown", help="add the result rows to this markdown file")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--trials", type=int, default=20, help="trials per task (final model)")
    ap.add_argument("--early-trials", type=int, default=5, help="trials per task at the shorter lengths")
    ap.add_argument("--lengths", default="1000,2000", help="earlier checkpoints (steps) to evaluate too")
    ap.add_argument(
        "--reuse-run", action="store_true", help="keep an existing run (resumed, or reused if finished)"
    )
    ap.add_argument(
        "--eval-best", action="store_true", help="also evaluate <run_dir>/best when it is not the last"
    )
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent

    run([str(bin_dir / "vla-data"), "metaworld", *DATA_ARGS])
    generation = json.loads((REPO / "data_cache/metaworld_mt10/1.0.0/generation.json").read_text())

    if not args.reuse_run:
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    train_s = run([str(bin_dir / "vla-train"), "--config_path", CONFIG, "--logging.progress_bar", "false"])
    metrics = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    if args.reuse_run:  # the run may have trained in an earlier launch: from its base model to its last line
        train_s = metrics[-1]["time"] - (RUN_DIR / "base_model" / "config.json").stat().st_mtime
    vals = [m for m in metrics if "val/loss" in m]
    final_val = vals[-1]
    train_lines = [m for m in metrics if "train/samples_per_s" in m]
    key = "val/generated_action_token_accuracy_varying_dims"
    curve = [
        {"step": m["step"], "val_generated_acc_varying": round(m[key], 4),
         "val_acc": round(m["val/action_token_accuracy"], 4), "val_loss": round(m["val/loss"], 4)}
        for m in vals
    ]  # fmt: skip

    evals = []
    ckpts = {int(p.name.split("_")[1]): p for p in (RUN_DIR / "checkpoints").glob("step_*")}
    for length in [int(x) for x in args.lengths.split(",") if x]:
        if length in ckpts:
            evals.append(evaluate(bin_dir, ckpts[length], f"step_{length}", args.early_trials))
    last = max(ckpts)
    evals.append(evaluate(bin_dir, ckpts[last], f"step_{last}", args.trials))
    best = json.loads((RUN_DIR / "best" / "best.json").read_text()) if (RUN_DIR / "best").is_dir() else None
    if args.eval_best and best and best["step"] != last:
        evals.append(evaluate(bin_dir, RUN_DIR / "best", f"best_step_{best['step']}", args.trials))

    val_at = {m["step"]: m for m in vals}
    for e in evals:  # each row's validation is its own checkpoint's (the final one when not logged)
        v = val_at.get(e["step"], final_val)
        e["val"] = [
            round(v["val/action_token_accuracy"], 4),
            round(v["val/action_token_accuracy_varying_dims"], 4),
            round(v[key], 4),
        ]
    result = {
        "data": {
            "episodes": generation["num_episodes"],
            "frames": generation["num_frames"],
            "dataset_mb": round(generation["dataset_bytes"] / 2**20, 1),
            "generation_s": generation["record_seconds"] + generation["build_seconds"],
        },
        "train_s": round(train_s, 1),
        "run_reused": args.reuse_run,
        "steps": final_val["step"],
        "train_samples_per_s": round(
            sum(m["train/samples_per_s"] for m in train_lines) / len(train_lines), 1
        ),
        "val_action_token_accuracy": round(final_val["val/action_token_accuracy"], 4),
        "val_action_token_accuracy_varying_dims": round(
            final_val["val/action_token_accuracy_varying_dims"], 4
        ),
        "val_generated_acc_varying_dims": round(final_val[key], 4),
        "learning_curve": curve,
        "best": best,
        "evals": evals,
        "cpus": os.cpu_count(),
    }
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    d = result["data"]
    rows = []
    for e in evals:
        tasks = " / ".join(f"{100 * r:.0f}" for r in e["per_task"].values())
        low, high = e["success_95ci"]
        rows.append(
            f"| {time.strftime('%Y-%m-%d')} | {machine} | {sum(d['episodes'].values())} episodes, "
            f"{sum(d['frames'].values())} frames, {d['dataset_mb']} MB, {d['generation_s']:.0f} s | "
            f"{result['steps']} steps, {result['train_s']:.0f} s, {result['train_samples_per_s']} samples/s | "
            f"{e['name']} | {e['val'][0]} / {e['val'][1]} / {e['val'][2]} | {tasks} | **{100 * e['success_rate']:.1f}%** "
            f"({100 * low:.0f}-{100 * high:.0f}) x {sum(1 for _ in e['per_task'])} tasks |"
        )
    report(result, args.json, None, "", "")
    if args.markdown:
        from markdown_table import add_table_row

        for row in rows:
            add_table_row(Path(args.markdown), "| date | machine | MT10 data", row)


if __name__ == "__main__":
    main()

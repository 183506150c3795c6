"""Time `make demo`'s two commands (train on configs/demo.yaml, then export + predict) from a clean run
directory and report wall time and final validation accuracy; `--markdown` adds a row to BENCHMARKS.md's table.

    .venv/bin/python scripts/bench_demo.py --markdown BENCHMARKS.md
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


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--markdown", help="append a result row to this markdown file")
    ap.add_argument("--fresh-data", action="store_true", help="also rebuild the synthetic dataset")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    run_dir = REPO / "runs" / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.fresh_data:
        shutil.rmtree(REPO / "data_cache", ignore_errors=True)
    t_train = run(
        [str(bin_dir / "vla-train"), "--config_path", "configs/demo.yaml", "--logging.progress_bar", "false"]
    )
    t_export = run([str(bin_dir / "vla-export"), "--run_dir", "runs/demo", "--predict_samples", "3"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val/action_token_accuracy" in m][-1]
    train_lines = [m for m in metrics if "train/samples_per_s" in m]
    result = {
        "train_s": round(t_train, 1),
        "export_s": round(t_export, 1),
        "total_s": round(t_train + t_export, 1),
        "val_action_token_accuracy": round(val["val/action_token_accuracy"], 4),
        "val_generated_action_token_accuracy": round(
            val.get("val/generated_action_token_accuracy", float("nan")), 4
        ),
        "val_action_l1": round(val["val/action_l1"], 4),
        "steps": val["step"],
        "train_samples_per_s": round(
            sum(m["train/samples_per_s"] for m in train_lines) / len(train_lines), 1
        ),
        "cpus": os.cpu_count(),
        "fresh_data": args.fresh_data,
    }
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
        f"{result['total_s']} s (train {result['train_s']} s incl. data{' build' if args.fresh_data else ''}, "
        f"export {result['export_s']} s) | {result['steps']} | {result['train_samples_per_s']} | "
        f"{result['val_action_token_accuracy']} | {result['val_generated_action_token_accuracy']} | "
        f"{result['val_action_l1']} |"
    )
    report(result, None, args.markdown, "| date | machine | wall time", row)


if __name__ == "__main__":
    main()

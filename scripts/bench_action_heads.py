"""Issue 14's comparison on Meta-World MT10 (configs/metaworld_cpu.yaml: same data, steps, model size and
seed for each variant), and the inference speed of the heads on this CPU.

    .venv/bin/python scripts/bench_action_heads.py --variants a,b,c --markdown BENCHMARKS.md

Variants:
  a  the token head, one action per query (OpenVLA; the run of scripts/bench_metaworld.py, runs/metaworld_cpu)
  b  the token head with chunks of 8 (data.future_action_window_size 7), executed open loop
  c  model.action_head l1_parallel with chunks of 8, executed open loop (OpenVLA-OFT's parallel decoding)
  c4 variant c's model, 4 of each chunk's 8 actions executed before the next query (vla-eval
     --execute_steps 4): a shorter open-loop horizon, twice the queries

Each variant trains its run (reused when it has finished; resumed when it has not), exports its last
checkpoint and evaluates it with vla-eval on the eval seed range (--trials per task; a variant's existing
evaluation with the same trials is reused with --reuse-eval). The success per task and on average goes
to one table.

--speed: actions per second of each variant's exported model on batches of one frame (the closed-loop
case), this process alone on the machine's cores: a chunk model returns K actions per forward pass, the
token head one action per action_dim (x K) decoding steps. The weights do not matter for the time, so the
models are the variants' base models when they have not been exported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown_table import add_table_row, report

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/metaworld_cpu.yaml"
VARIANTS = {
    "a": ("metaworld_cpu", "token head, 1 action per query", []),
    "b": ("metaworld_tokens_chunk8", "token head, chunks of 8", ["--data.future_action_window_size", "7"]),
    "c": (
        "metaworld_l1_parallel_chunk8",
        "l1_parallel, chunks of 8",
        ["--model.action_head", "l1_parallel", "--data.future_action_window_size", "7"],
    ),
}
VARIANTS["c4"] = (VARIANTS["c"][0], "l1_parallel, chunks of 8, 4 executed per query", VARIANTS["c"][2])
EXECUTE_STEPS = {"c4": 4}  # actions of each chunk executed before the next query (default: all)
TASK_ORDER = "reach / push / pick-place / door-open / drawer-open / drawer-close / button-press-topdown / peg-insert-side / window-open / window-close"


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - start


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train(bin_dir: Path, run_id: str, overrides: list[str]) -> dict:
    """Train (or finish) the variant's run, or reuse it when its last checkpoint is the recipe's last step;
    its training time is the span from its base model to its last metrics line (imports excluded, as
    scripts/bench_metaworld.py reports a reused run)."""
    import yaml

    run_dir = REPO / "runs" / run_id
    max_steps = yaml.safe_load((REPO / CONFIG).read_text())["training"]["max_steps"]
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    finished = bool(ckpts) and json.loads((ckpts[-1] / "state.json").read_text())["step"] == max_steps
    if not finished:
        run([str(bin_dir / "vla-train"), "--config_path", CONFIG, "--logging.run_id", run_id,
             "--logging.progress_bar", "false", *overrides])  # fmt: skip
    lines = metrics(run_dir)
    speed = [m["train/samples_per_s"] for m in lines if "train/samples_per_s" in m]
    vals = [m for m in lines if "val/loss" in m]
    return {
        "run_dir": str(run_dir.relative_to(REPO)),
        "steps": vals[-1]["step"],
        "train_s": round(lines[-1]["time"] - (run_dir / "base_model" / "config.json").stat().st_mtime, 1),
        "samples_per_s": round(sum(speed) / len(speed), 1),
        "val_generated_acc_varying_dims": round(
            vals[-1]["val/generated_action_token_accuracy_varying_dims"], 4
        ),
        "val_generated_action_l1": round(vals[-1]["val/generated_action_l1"], 4),
    }


def evaluate(bin_dir: Path, run_id: str, trials: int, reuse: bool, execute_steps: int = 0) -> dict:
    run_dir = REPO / "runs" / run_id
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    last = ckpts[-1]
    step = json.loads((last / "state.json").read_text())["step"]
    export_dir = run_dir / "bench_exports" / f"step_{step}"
    out = run_dir / "bench_eval" / (f"step_{step}_exec{execute_steps}" if execute_steps else f"step_{step}")
    results_file = out / "results.json"
    reused = (
        reuse and results_file.is_file() and json.loads(results_file.read_text())["num_trials"] == 10 * trials
    )
    if not reused:
        if not (export_dir / "config.json").is_file():
            run([str(bin_dir / "vla-export"), "--run_dir", str(run_dir), "--checkpoint", str(last),
                 "--output_dir", str(export_dir)])  # fmt: skip
        run([str(bin_dir / "vla-eval"), "--policy", str(export_dir), "--tasks", "mt10", "--trials", str(trials),
             "--out", str(out), "--data_root_dir", "data_cache", "--progress_bar", "false",
             "--execute_steps", str(execute_steps)])  # fmt: skip
    r = json.loads(results_file.read_text())
    return {
        "step": step,
        "export_dir": str(export_dir.relative_to(REPO)),
        "eval_s": round(r["seconds"], 1),
        "reused": reused,
        "trials": r["num_trials"],
        "success_rate": r["success_rate"],
        "success_95ci": r["success_rate_95ci"],
        "per_task": {t: v["success_rate"] for t, v in r["tasks"].items()},
        "out": str(out.relative_to(REPO)),
    }


def variant_policy(v: str):
    """(VLAPolicy, where its model comes from) of a variant: its newest export, else its base model, else
    variant (a)'s base model given the variant's layout (the time does not depend on the weights)."""
    from vla_train.models.load import load_with_layout
    from vla_train.models.policy import VLAPolicy

    run_id, _, overrides = VARIANTS[v]
    run_dir = REPO / "runs" / run_id
    exports = sorted((run_dir / "bench_exports").glob("step_*"))
    for d in [*exports[-1:], run_dir / "base_model"]:
        if (d / "config.json").is_file():
            return VLAPolicy.from_dir(d), str(d.relative_to(REPO))
    flags = dict(zip(overrides[::2], overrides[1::2]))
    layout = {
        "action_head": flags.get("--model.action_head", "tokens"),
        "head_hidden_size": 0,
        "chunk_size": int(flags.get("--data.future_action_window_size", 0)) + 1,
        "cameras": ["primary"],
        "proprio_dim": 0,
    }
    base = REPO / "runs" / VARIANTS["a"][0] / "base_model"
    model, processor, _ = load_with_layout(base, layout, seed=0)
    model.config.norm_stats = json.loads((base / "config.json").read_text())["norm_stats"]
    return VLAPolicy(
        model.eval(), processor
    ), f"{base.relative_to(REPO)} with chunks of {layout['chunk_size']}"


def speed(v: str, calls: int) -> dict:
    """Actions per second of a variant's model on batches of one frame at the model's size (median of
    `calls` calls after 3 warm-up calls), all cores."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    policy, source = variant_policy(v)
    s = policy.processor.settings.image_size
    frame = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    c = policy.model.config
    unnorm = next(iter(c.norm_stats))
    seconds = []
    for i in range(3 + calls):
        start = time.perf_counter()
        policy.predict_action_batch(frame, ["push the puck to the goal"], unnorm)
        if i >= 3:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "model": source,
        "action_head": c.action_head,
        "chunk_size": c.chunk_size,
        "call_ms_p50": round(1000 * median, 2),
        "actions_per_s": round((EXECUTE_STEPS.get(v) or c.chunk_size) / median, 1),
        "queries_per_s": round(1 / median, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="a,b,c")
    ap.add_argument("--trials", type=int, default=20, help="trials per task")
    ap.add_argument(
        "--reuse-eval", action="store_true", help="keep a variant's evaluation with the same trials"
    )
    ap.add_argument(
        "--train", default="", help="the variants to train and evaluate (default: all of --variants; 'none')"
    )
    ap.add_argument("--speed", action="store_true", help="also measure the inference speed")
    ap.add_argument("--speed-calls", type=int, default=30)
    ap.add_argument("--markdown", help="add the result rows to this markdown file")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    date = time.strftime("%Y-%m-%d")
    result: dict = {"machine": machine, "variants": {}}
    rows, speed_rows = [], []
    for v in args.variants.split(","):
        run_id, label, overrides = VARIANTS[v]
        entry: dict = {"label": label, "overrides": overrides}
        if v in (args.train.split(",") if args.train else [v]):
            entry["train"] = train(bin_dir, run_id, overrides)
            entry["eval"] = e = evaluate(
                bin_dir, run_id, args.trials, args.reuse_eval, EXECUTE_STEPS.get(v, 0)
            )
            t = entry["train"]
            tasks = " / ".join(f"{100 * r:.0f}" for r in e["per_task"].values())
            low, high = e["success_95ci"]
            rows.append(
                f"| {date} | {machine} | ({v}) {label} | {t['steps']} steps, {t['train_s']:.0f} s, "
                f"{t['samples_per_s']} samples/s | {t['val_generated_acc_varying_dims']} / "
                f"{t['val_generated_action_l1']} | {tasks} | **{100 * e['success_rate']:.1f}%** "
                f"({100 * low:.0f}-{100 * high:.0f}), {e['trials']} trials | {e['eval_s']:.0f} s |"
            )
        if args.speed:
            entry["speed"] = s = speed(v, args.speed_calls)
            speed_rows.append((v, label, s))
        result["variants"][v] = entry
    if speed_rows:
        base = next((s["actions_per_s"] for v, _, s in speed_rows if v == "a"), None)
        for _, _, s in speed_rows:
            s["vs_a"] = f"{s['actions_per_s'] / base:.1f}x" if base else "-"
    report(result, args.json, None, "", "")
    if args.markdown:
        for row in rows:
            add_table_row(Path(args.markdown), "| date | machine | variant | training", row)
        for v, label, s in speed_rows:
            add_table_row(
                Path(args.markdown),
                "| date | machine | variant | model | forward",
                f"| {date} | {machine} | ({v}) {label} | {s['model']} | {s['call_ms_p50']} ms per query, "
                f"{s['chunk_size']} action(s) | **{s['actions_per_s']} actions/s** | {s['vs_a']} |",
            )


if __name__ == "__main__":
    main()

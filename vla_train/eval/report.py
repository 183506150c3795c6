"""What an evaluation writes to its folder: results.json (per task: successes, success rate with a 95%
Wilson interval, steps to success, failure classes, the exact seeds; policy latency), results.md (the
same as a table), videos/<task>.gif (the first trials, instruction and outcome drawn on the frames) and
success.png (success per task with its interval)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from vla_train.eval.runner import TrialResult
from vla_train.sim.metaworld_env import INSTRUCTIONS, supported_failure_classes


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a success rate (Wilson score: sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[TrialResult], calls: list[dict], meta: dict) -> dict:
    tasks = list(dict.fromkeys(r.task for r in results))
    per_task = {}
    for task in tasks:
        rs = [r for r in results if r.task == task]
        wins = [r for r in rs if r.success]
        low, high = wilson_interval(len(wins), len(rs))
        steps = [r.success_step for r in wins]
        per_task[task] = {
            "instruction": INSTRUCTIONS[task],
            "num_trials": len(rs),
            "num_successes": len(wins),
            "success_rate": len(wins) / len(rs),
            "success_rate_95ci": [round(low, 4), round(high, 4)],
            "steps_to_success_mean": float(np.mean(steps)) if steps else None,
            "steps_to_success_median": float(np.median(steps)) if steps else None,
            "failure_classes": dict(Counter(r.failure_class for r in rs if not r.success)),
            "failure_classes_supported": supported_failure_classes(task),
            "seeds": [r.seed for r in rs],
            "trials": [r.summary() for r in rs],
        }
    n = len(results)
    wins = sum(r.success for r in results)
    per_frame = [c["seconds"] / c["batch"] for c in calls]
    latency = {
        "num_calls": len(calls),
        "mean_batch_size": float(np.mean([c["batch"] for c in calls])) if calls else None,
        "call_ms_p50": _ms(_percentile([c["seconds"] for c in calls], 50)),
        "call_ms_p99": _ms(_percentile([c["seconds"] for c in calls], 99)),
        "per_frame_ms_p50": _ms(_percentile(per_frame, 50)),
        "per_frame_ms_p99": _ms(_percentile(per_frame, 99)),
    }
    return {
        **meta,
        "num_trials": n,
        "num_successes": wins,
        "success_rate": wins / n if n else 0.0,
        "success_rate_95ci": [round(x, 4) for x in wilson_interval(wins, n)],
        # the mean of the per-task rates (what MT10 papers report; equal to the above with equal trials)
        "task_mean_success_rate": float(np.mean([t["success_rate"] for t in per_task.values()]))
        if per_task
        else 0.0,
        "policy_latency": latency,
        "tasks": per_task,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def markdown_table(summary: dict) -> str:
    lines = [
        "| task | success | 95% interval | steps to success (median) | failures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task, t in summary["tasks"].items():
        low, high = t["success_rate_95ci"]
        steps = "-" if t["steps_to_success_median"] is None else f"{t['steps_to_success_median']:.0f}"
        fails = ", ".join(f"{k} {v}" for k, v in sorted(t["failure_classes"].items())) or "-"
        lines.append(
            f"| {task} | {t['num_successes']}/{t['num_trials']} ({t['success_rate']:.0%}) | "
            f"{low:.0%}-{high:.0%} | {steps} | {fails} |"
        )
    low, high = summary["success_rate_95ci"]
    lines.append(
        f"| **all** | {summary['num_successes']}/{summary['num_trials']} ({summary['success_rate']:.0%}) | "
        f"{low:.0%}-{high:.0%} | | |"
    )
    lat = summary["policy_latency"]
    if lat["num_calls"]:
        lines.append("")
        lines.append(
            f"Policy latency per call: p50 {lat['call_ms_p50']} ms, p99 {lat['call_ms_p99']} ms "
            f"(mean batch {lat['mean_batch_size']:.2f} frames; per frame p50 {lat['per_frame_ms_p50']} ms)."
        )
    return "\n".join(lines) + "\n"


def _annotate(frame: np.ndarray, lines: list[str], status: str | None, side: int = 256):
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    if img.width != side:  # one size for every video; small model-size frames become readable
        img = img.resize((side, side), Image.NEAREST if img.width < side else Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, img.width, 12 * len(lines) + 2], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((3, 1 + 12 * i), line, fill=(255, 255, 255))
    if status is not None:
        color = (40, 200, 60) if status == "success" else (220, 50, 40)
        draw.rectangle([0, img.height - 16, img.width, img.height], fill=color)
        draw.text((3, img.height - 14), status, fill=(255, 255, 255))
    return img


def write_video(path: Path, trials: list[TrialResult], every: int = 2, fps: int = 10) -> None:
    """One GIF of the given trials one after the other (every `every`-th step, one palette for all
    frames, which keeps the file small); each trial's last frame is held for a second with its outcome
    (success, or the failure class)."""
    from PIL import Image

    images = []
    for r in trials:
        if not r.frames:
            continue
        lines = [f"{r.task}  seed {r.seed}", INSTRUCTIONS[r.task]]
        shown = list(range(0, len(r.frames), every))
        if shown[-1] != len(r.frames) - 1:
            shown.append(len(r.frames) - 1)
        for i in shown:
            last = i == len(r.frames) - 1
            status = ("success" if r.success else (r.failure_class or "failure")) if last else None
            images.append(_annotate(r.frames[i], lines + [f"step {i}"], status))
        images += [images[-1]] * fps
    if not images:
        return
    palette = images[len(images) // 2].quantize(colors=255, dither=Image.Dither.NONE)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0, optimize=False
    )


def write_bar_chart(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    rates = [summary["tasks"][t]["success_rate"] for t in tasks]
    ci = np.array([summary["tasks"][t]["success_rate_95ci"] for t in tasks]).reshape(-1, 2)
    err = np.stack([np.array(rates) - ci[:, 0], ci[:, 1] - np.array(rates)])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(tasks) + 2), 3.6), dpi=110)
    ax.bar(range(len(tasks)), rates, yerr=err, capsize=3, color="#3b7dd8")
    ax.axhline(summary["task_mean_success_rate"], color="#d83b3b", lw=1, ls="--", label="mean")
    ax.set_xticks(range(len(tasks)), [t.removesuffix("-v3") for t in tasks], rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% interval)")
    ax.set_title(f"{summary['num_trials'] // max(1, len(tasks))} trials per task")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out_dir: Path, results: list[TrialResult], calls: list[dict], meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, calls, meta)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "results.md").write_text(markdown_table(summary))
    for task in summary["tasks"]:
        recorded = [r for r in results if r.task == task and r.frames]
        if recorded:
            write_video(out_dir / "videos" / f"{task}.gif", recorded)
    write_bar_chart(out_dir / "success.png", summary)
    return summary

"""PNG plots of a run's curves (<run_dir>/curves.png), drawn from metrics.jsonl: loss, action-token
accuracy (all dimensions, the varying ones, greedy decoding) and action L1, for training and validation,
and closed-loop success when the run evaluates rollouts. Redrawn after every validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_train.training.logging import read_metrics

CURVES_FILE = "curves.png"
PANELS = (
    ("loss", ("train/loss", "val/loss")),
    (
        "action-token accuracy",
        (
            "train/action_token_accuracy",
            "val/action_token_accuracy",
            "val/action_token_accuracy_varying_dims",
            "val/generated_action_token_accuracy",
            "val/generated_action_token_accuracy_varying_dims",
        ),
    ),
    ("action L1 (normalized)", ("train/action_l1", "val/action_l1", "val/generated_action_l1")),
    ("closed-loop success", ("rollout/success_rate",)),
)


def last_validation(run_dir: str | Path) -> dict[str, Any]:
    """The newest validation record of metrics.jsonl (without step and time), or {}."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    vals = [m for m in read_metrics(run_dir) if "val/loss" in m]
    return {k: v for k, v in vals[-1].items() if k not in ("step", "time")} if vals else {}


def write_curves(run_dir: str | Path) -> Path | None:
    """Draw curves.png; None when there is nothing to draw yet."""
    records = read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = {r["step"]: r[key] for r in records if key in r}  # a re-logged step: the later value
            steps = sorted(points)
            ax.plot(
                steps, [points[s] for s in steps], marker="o" if len(steps) < 30 else None, ms=3, label=key
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    fig.savefig(out)
    plt.close(fig)
    return out

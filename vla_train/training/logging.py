"""Where metrics go: `metrics.jsonl` in the run directory always, Weights & Biases when enabled
(offline mode writes its files under the run directory), a progress bar on the console. Only rank 0
logs; the other ranks get a `NullLogger`.

A resumed run appends to both. A run resumed from a checkpoint older than its last logged step (a crash
between checkpoints) logs those steps again: metrics.jsonl then holds them twice (the later record is
the one that continued), and wandb, which drops any record whose step is not above the last one, gets
its own monotone step (the count of records ever logged to the run, in metrics.jsonl) while every chart
is drawn over `trainer/step`, the training step, so nothing is dropped on a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vla_train.config import LoggingConfig


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        run_config: dict[str, Any],
        total_steps: int,
        initial_step: int = 0,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._records = len(self.path.read_text().splitlines()) if self.path.is_file() else 0
        self._file = open(self.path, "a", buffering=1)
        self._wandb = None
        if cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                name=Path(run_dir).name,
                id=Path(run_dir).name,
                dir=str(run_dir),
                mode=cfg.wandb_mode,
                config=run_config,
                resume="allow",
            )
            self._wandb.define_metric("trainer/step")
            self._wandb.define_metric("*", step_metric="trainer/step")
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({"trainer/step": step, **metrics}, step=self._records)
        self._records += 1

    def progress(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()


class NullLogger:
    """The logger of ranks other than 0: metrics are summed over ranks and written by rank 0 alone."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def progress(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""The training loop: `setup` (run directory, data statistics, model + LoRA or a freeze mode,
parallelism, optimizer, resume, the frame stream) -> `train_step` (micro-batches, forward/backward,
clipping, the optimizer step) -> the loop, with its once-in-a-while blocks (logs, validation,
checkpoints) and its faults (training/faults.py: preemption, non-finite steps, the step watchdog; under
SLURM a preempted job requeues itself, training/slurm.py).

Every run writes to <output_dir>/<run_id>/ (runs.py); only rank 0 writes logs and prints. Every
torch.distributed call lives in training/distributed.py, and the checkpoint format in
training/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import draccus
import torch

from vla_train.config import ConfigError, DataConfig, TrainConfig, TrainingConfig
from vla_train.config_cli import to_yaml
from vla_train.data.mixture import mixture_statistics, resolve_mixture, run_datasets
from vla_train.data.pipeline import FIXED_INSTRUCTION
from vla_train.data.rlds import collect_instructions, open_builder, split_for, statistics_cached
from vla_train.data.stream import ShardedStream
from vla_train.data.synthetic import build_synthetic_dataset
from vla_train.models.load import (
    WEIGHTS_FILE,
    build_from_config,
    build_on_meta,
    load_with_layout,
    placeholder_weights,
    run_layout,
    save_model_dir,
    stored_layout,
)
from vla_train.models.openvla_format import is_openvla_dir
from vla_train.models.peft import apply_lora, set_finetune_mode
from vla_train.runs import (
    CONFIG_FILE,
    STATS_FILE,
    base_model_dir,
    model_inputs,
    run_dir_of,
    stream_spec,
    use_run_preprocessing,
)
from vla_train.training.checkpoint import (
    Restored,
    best_record,
    keep_best,
    latest_checkpoint,
    remove_uncommitted,
    restore_checkpoint,
    save_checkpoint,
    seed_everything,
)
from vla_train.training.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    cores_per_rank,
    init_distributed,
    local_world_size,
    long_barrier,
    shard_from_file,
    shutdown,
    sum_over_ranks,
    wrap_model,
)
from vla_train.training.evaluate import validate
from vla_train.training.faults import NonFiniteError, PreemptionWatcher, StepWatchdog, nonfinite_report
from vla_train.training.logging import MetricsLogger, NullLogger
from vla_train.training.metrics import accumulate, finalize
from vla_train.training.optim import optimizer_for, pin_implementation, schedule_for
from vla_train.training.plots import last_validation, write_curves
from vla_train.training.preflight import check_before_loading
from vla_train.training.slurm import job_to_requeue, requeue
from vla_train.training.step import StepParts, StepResult, optimizer_step


@dataclass
class DataPlan:
    """How this rank reads its micro-batches (training.data_sharding, data.read_shards)."""

    micro_batch: int  # frames per rank per micro-batch
    num_shards: int  # read shards of the job (1 for batch_slice: one global stream)
    shards: list[int]  # the read shards this rank reads
    shard_batch: int  # frames per batch of each of this rank's shard streams
    rows: slice  # the rows of each (shard-concatenated) batch this rank keeps


def data_plan(t: TrainingConfig, d: DataConfig, ctx: DistContext) -> DataPlan:
    micro = t.batch_size // (ctx.world_size * t.grad_accum_steps)
    if t.data_sharding == "batch_slice":
        rows = slice(ctx.rank * micro, (ctx.rank + 1) * micro)
        return DataPlan(micro, 1, [0], micro * ctx.world_size, rows)
    num_shards = d.read_shards or ctx.world_size
    shards = list(range(ctx.rank, num_shards, ctx.world_size))
    return DataPlan(micro, num_shards, shards, micro // len(shards), slice(None))


def resume_data_position(
    restored: Restored, plan: DataPlan, t: TrainingConfig, ctx: DistContext
) -> tuple[int, dict | None, str]:
    """(stream seed, the saved position of this rank's read shards or None, what was done) for a resumed
    run. A position carries over when the run reads the same read shards: at the same world size, or at
    another one with the same data.read_shards (or batch_slice's one global stream)."""
    saved = [s for s in restored.data_states if s is not None]
    old_world = restored.saved_world_size
    same_layout = bool(saved) and all(
        s.get("sharding") == t.data_sharding and s.get("num_shards") == plan.num_shards for s in saved
    )
    if same_layout:
        shards = {k: v for s in saved for k, v in s["stream"]["shards"].items()}
        mine = {str(i): shards[str(i)] for i in plan.shards if str(i) in shards}
        if len(mine) == len(plan.shards):
            state = {"shards": mine}
            if old_world == ctx.world_size:
                return int(saved[0]["seed"]), state, f"data position restored (read shards {plan.shards})"
            return (
                int(saved[0]["seed"]),
                state,
                f"data position kept: read shards {plan.shards} of {plan.num_shards} continue where they were "
                f"(world size {old_world} -> {ctx.world_size})",
            )
    seed = t.seed + restored.step
    why = (
        f"world size changed {old_world} -> {ctx.world_size}"
        if old_world != ctx.world_size
        else "the data layout changed (data_sharding or data.read_shards)"
    )
    return (
        seed,
        None,
        f"data position restarted from the beginning of a reshuffled stream (seed {seed}) since {why}",
    )


@dataclass(kw_only=True)
class Run(StepParts):
    """Everything a run's loop works with, made by `setup`: an optimizer step's parts (ctx, vla, model,
    processor, params, optimizer, scheduler, max_grad_norm) and the rest."""

    cfg: TrainConfig
    run_dir: Path
    config_yaml: str
    datasets: tuple[tuple[str, float], ...]  # (dataset, raw weight) the run reads
    norm_stats: dict[str, Any]  # {dataset: statistics + normalization} (OpenVLA's norm_stats)
    plan: DataPlan
    stream: ShardedStream
    data_seed: int
    logger: MetricsLogger | NullLogger
    watcher: PreemptionWatcher
    watchdog: StepWatchdog
    step: int = 0
    nonfinite_skipped: int = 0  # steps dropped for a non-finite loss or gradient (on_nonfinite skip)
    consecutive_skips: int = 0
    last_saved: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
    checkpoint: Path | None = None
    start_step: int = 0  # the step this launch started (or resumed) at
    best: dict[str, Any] | None = None  # training.best_metric's best value so far and its step
    rollouts: Any = None  # eval.TrainingRollouts on rank 0, made at the first round

    def say(self, msg: str) -> None:
        if self.ctx.is_main:
            print(msg, flush=True)


@dataclass
class Window:
    """The steps since the last metrics line."""

    sums: dict[str, Any] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def add(self, result: StepResult) -> None:
        accumulate(self.sums, result.sums)
        self.steps += 1


# ---- setup --------------------------------------------------------------------------------------


def run_statistics(cfg: TrainConfig, datasets) -> dict[str, dict[str, Any]]:
    """{dataset_name: statistics} of every dataset of the run (each computed once and cached under
    data.stats_cache_dir), plus the normalization mode: OpenVLA's `norm_stats` layout, which FrameStream
    also accepts as per-dataset statistics."""
    names = [name for name, _ in datasets]
    stats = mixture_statistics(cfg.data.data_root_dir, names, cfg.data.stats_cache_dir, cfg.data.on_bad_data)
    return {name: {**s, "normalization": cfg.data.normalization} for name, s in stats.items()}


def run_instructions(cfg: TrainConfig, datasets) -> list[str]:
    """The distinct instructions of the training splits of every dataset of the run (for the tokenizer)."""
    instructions: set[str] = set()
    for name, _ in datasets:
        builder = open_builder(cfg.data.data_root_dir, name)
        instructions.update(collect_instructions(builder, split_for(builder, train=True)))
    out = sorted(instructions)
    if cfg.data.ablation == "fixed_instruction":
        out.append(FIXED_INSTRUCTION)
    return out


def _prepare_run_dir(cfg: TrainConfig, ctx: DistContext) -> tuple[Path, str]:
    """The run directory (named on rank 0), with the config written and uncommitted checkpoint writes of
    a stopped run removed. Call on every rank."""
    run_dir = Path(broadcast_object(str(run_dir_of(cfg)), ctx))
    config_yaml = to_yaml(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config_yaml)
        for stale in remove_uncommitted(run_dir):
            print(f"removed the uncommitted checkpoint write {stale.name} (the run was stopped during it)")
    return run_dir, config_yaml


def _prepare_data(cfg: TrainConfig, ctx: DistContext, run_dir: Path, datasets) -> dict[str, Any]:
    """Statistics per dataset ({dataset_name: stats + normalization}, OpenVLA's norm_stats), one entry for
    each dataset of a mixture: every frame is normalized (and unnormalized) with its own dataset's.

    Rank 0 builds the synthetic set; then each rank computes (or reads from the cache) the statistics of
    its share of the datasets (dataset i on rank i % world size) and the ranks exchange them. The waits
    have their own timeout (data.stats_timeout_s), not the collective watchdog's, since a first pass over
    a large uncached mixture takes hours. Call on every rank."""
    d, start = cfg.data, time.perf_counter()
    if ctx.is_main and d.build_synthetic:
        build_synthetic_dataset(d.data_root_dir, d.synthetic)
    long_barrier(ctx, d.stats_timeout_s)
    mine = list(datasets)[ctx.rank :: ctx.world_size]
    computed = [
        n for n, _ in mine if not statistics_cached(d.data_root_dir, n, d.stats_cache_dir, d.on_bad_data)
    ]
    own = run_statistics(cfg, mine)
    seconds = time.perf_counter() - start
    long_barrier(ctx, d.stats_timeout_s)
    parts = all_gather_objects((own, computed, seconds), ctx)
    norm_stats = {name: s for part, _, _ in parts for name, s in part.items()}
    norm_stats = {name: norm_stats[name] for name, _ in datasets}  # the run's order
    if ctx.is_main:
        (run_dir / STATS_FILE).write_text(json.dumps(norm_stats, indent=2))
        done = [
            f"rank {r} computed {', '.join(names)} in {t:.1f} s"
            for r, (_, names, t) in enumerate(parts)
            if names
        ]
        cached = len(datasets) - sum(len(names) for _, names, _ in parts)
        print(
            f"statistics of {len(datasets)} dataset(s) ready after {time.perf_counter() - start:.1f} s: "
            + "; ".join(
                [*done, f"{cached} from the cache ({d.stats_cache_dir or 'data_root_dir/vla_train_stats'})"]
            ),
            flush=True,
        )
    return norm_stats


def _load_model(cfg: TrainConfig, ctx: DistContext, run_dir: Path, datasets, norm_stats) -> tuple:
    """(vla with its trainable weights chosen, the module to train (wrap_model's), processor, mode
    description). The base model is a pretrained directory, or built once from config and saved as the
    run's base model: every rank then loads the same directory, so all ranks (and a resumed run) start
    from identical weights. Under FSDP the model is built on the meta device and sharded, and each rank
    reads only its shard of the weights file; the other strategies (and OpenVLA-format directories,
    converted on load) load it whole. Call on every rank."""
    t = cfg.training
    base_dir = base_model_dir(run_dir, cfg)
    layout = run_layout(cfg.data, cfg.model, norm_stats)
    if ctx.is_main and not cfg.model.pretrained_dir and not (base_dir / "config.json").is_file():
        instructions = run_instructions(cfg, datasets)
        built, built_processor = build_from_config(cfg.model, instructions, seed=t.seed, layout=layout)
        save_model_dir(base_dir, built, built_processor, norm_stats)
        del built, built_processor
    long_barrier(ctx, cfg.data.stats_timeout_s)  # building from config first reads every instruction
    # A base model without the run's layout (e.g. openvla-7b fine-tuned with l1_parallel) gets its new
    # modules on every rank from the same seed; it is then loaded whole.
    same_layout = stored_layout(base_dir) == layout
    on_meta = ctx.strategy == "fsdp" and not is_openvla_dir(base_dir) and same_layout
    if ctx.strategy == "fsdp" and not on_meta and ctx.is_main:
        why = "an OpenVLA-format checkpoint" if is_openvla_dir(base_dir) else "a model of another layout"
        print(f"{base_dir} is {why}: every rank loads it whole, then shards it")
    if on_meta:
        model, processor = build_on_meta(base_dir, cfg.model.attn_implementation)
    else:
        model, processor, added = load_with_layout(
            base_dir, layout, t.seed, attn_implementation=cfg.model.attn_implementation
        )
        if added and ctx.is_main:
            print(f"{base_dir}: new modules {', '.join(added)} for the run's layout {layout}")
    model.config.norm_stats = norm_stats
    use_run_preprocessing(processor, cfg.data)
    torch.manual_seed(t.seed)  # the same adapter init on every rank
    if cfg.lora.enabled:
        with placeholder_weights(model):  # adapters initialized as on a loaded model (a no-op then)
            vla = apply_lora(model, cfg.lora, ctx.device).get_base_model()
        mode = f"LoRA r={cfg.lora.rank}" + (
            f" over {cfg.lora.quantization} base weights" if cfg.lora.quantization != "none" else ""
        )
    else:
        set_finetune_mode(model, t.finetune_mode)
        # fp32 master weights even from a bf16 checkpoint (openvla-7b); mixed precision casts for compute.
        # On meta only the dtype changes: each rank's shard is read in it.
        vla = model.to(dtype=torch.float32) if on_meta else model.to(ctx.device, dtype=torch.float32)
        mode = f"{t.finetune_mode} fine-tune"
    vla.train()
    if on_meta:
        return vla, shard_from_file(vla, ctx, cfg.distributed, base_dir / WEIGHTS_FILE), processor, mode
    return vla, wrap_model(vla, ctx, cfg.distributed), processor, mode


def _describe(run: Run, mode: str) -> None:
    t, ctx, vla = run.cfg.training, run.ctx, run.vla
    num_trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in vla.parameters())
    run.say(
        f"run {run.run_dir}: {num_trainable / 1e6:.3f}M trainable of {num_total / 1e6:.3f}M parameters, {mode}, "
        f"{ctx.strategy} on {ctx.world_size} process(es), {ctx.precision}, device {ctx.device}; global batch "
        f"{t.batch_size} = {ctx.world_size} x {t.grad_accum_steps} x {run.plan.micro_batch}"
    )
    if run.cfg.data.mixture:
        counts = {name: s["num_transitions"] for name, s in run.norm_stats.items()}
        weights = resolve_mixture(run.datasets, run.cfg.data.balance_weights, counts)
        run.say(
            f"data: mixture '{run.cfg.data.mixture}' of {len(weights)} datasets, sampling weights "
            + ", ".join(f"{name} {w:.3f}" for name, w in weights)
        )


def _training_stream(cfg: TrainConfig, datasets, image_size: int, plan: DataPlan, seed: int, norm_stats):
    """This rank's training stream: its read shards' streams, joined."""
    specs = [
        stream_spec(
            cfg, datasets, image_size, True, plan.shard_batch, seed, plan.num_shards, shard, cores_per_rank()
        )
        for shard in plan.shards
    ]
    return ShardedStream(specs, norm_stats)


def setup(cfg: TrainConfig, ctx: DistContext) -> Run:
    """Everything a run needs, resumed from its newest committed checkpoint if it has one. Call on every
    rank."""
    t = cfg.training
    run_dir, config_yaml = _prepare_run_dir(cfg, ctx)
    torch.set_num_threads(t.num_threads or cores_per_rank())
    seed_everything(t.seed)
    datasets = run_datasets(cfg.data)
    norm_stats = _prepare_data(cfg, ctx, run_dir, datasets)
    vla, model, processor, mode = _load_model(cfg, ctx, run_dir, datasets, norm_stats)
    optimizer = optimizer_for(model, t)
    scheduler = schedule_for(optimizer, t)
    torch.manual_seed(t.seed + 1 + ctx.rank)  # per-rank randomness from here on (e.g. LoRA dropout)

    plan = data_plan(t, cfg.data, ctx)
    data_seed, saved_position, ckpt = t.seed, None, broadcast_object(latest_checkpoint(run_dir), ctx)
    step, notes = 0, []
    if ckpt is not None:
        restored = restore_checkpoint(ckpt, model, optimizer, scheduler, ctx)
        pin_implementation(optimizer)
        step = restored.step
        data_seed, saved_position, data_note = resume_data_position(restored, plan, t, ctx)
        notes = [
            f"resuming {run_dir} from {ckpt.name} (step {step}, saved by {restored.saved_world_size} rank(s))",
            *[f"  {note}" for note in [*restored.notes, data_note]],
        ]
    stream = _training_stream(cfg, datasets, vla.config.image_size, plan, data_seed, norm_stats)
    if saved_position is not None:
        try:
            stream.load_state_dict(saved_position)
        except ValueError as e:  # e.g. another shuffle block size (data.ram_budget_gb changed)
            data_seed = t.seed + step
            stream = _training_stream(cfg, datasets, vla.config.image_size, plan, data_seed, norm_stats)
            notes.append(f"  {e}: data position restarted from a reshuffled stream (seed {data_seed})")
    logger = (
        MetricsLogger(run_dir, cfg.logging, draccus.encode(cfg), t.max_steps, step)
        if ctx.is_main
        else NullLogger()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(
        cfg=cfg, ctx=ctx, run_dir=run_dir, config_yaml=config_yaml, datasets=datasets, norm_stats=norm_stats,
        vla=vla, model=model, processor=processor, params=params, optimizer=optimizer, scheduler=scheduler,
        max_grad_norm=t.max_grad_norm,
        plan=plan, stream=stream, data_seed=data_seed, logger=logger, watcher=PreemptionWatcher(),
        watchdog=StepWatchdog(t.step_timeout_s, ctx.rank), step=step, last_saved=step if ckpt else None, checkpoint=ckpt,
        start_step=step, best=broadcast_object(_best_so_far(run_dir, t) if ctx.is_main else None, ctx),
    )  # fmt: skip
    for line in notes:
        run.say(line)
    _describe(run, mode)
    return run


# ---- one step -----------------------------------------------------------------------------------


def train_step(run: Run, micro_batches: list[dict[str, Any]]) -> StepResult:
    """One optimizer step over this rank's micro-batches of the stream (step.optimizer_step on their model
    inputs; per-dataset sums only when the run reads several datasets). Call on every rank."""
    inputs = [model_inputs(run.processor, b) for b in micro_batches]
    names = [b["dataset_name"] for b in micro_batches] if len(run.norm_stats) > 1 else None
    result = optimizer_step(run, inputs, names, stop_requested=run.watcher.requested)
    if result.nonfinite:
        result.datasets = [", ".join(sorted(set(b["dataset_name"]))) for b in micro_batches]
    return result


def _on_nonfinite(run: Run, result: StepResult) -> None:
    """A step that was not applied (non-finite loss or gradient): name it, then halt (on_nonfinite halt,
    or max_consecutive_skips reached) with the last good step committed, or count it as skipped. Every
    rank comes here at the same step (the norm is global). Call on every rank."""
    t = run.cfg.training
    report = nonfinite_report(
        run.step, all_gather_objects((run.ctx.rank, result.losses, result.datasets), run.ctx)
    )
    run.consecutive_skips += 1
    if t.on_nonfinite == "skip" and run.consecutive_skips <= t.max_consecutive_skips:
        run.nonfinite_skipped += 1
        run.scheduler.step()  # the schedule follows the step count
        run.say(f"skipped {report} ({run.nonfinite_skipped} skipped so far)")
        return
    why = (
        f"{t.max_consecutive_skips + 1} consecutive steps were non-finite (training.max_consecutive_skips)"
        if t.on_nonfinite == "skip"
        else "training.on_nonfinite is halt"
    )
    ckpt = _save(run) if run.last_saved != run.step else run.checkpoint
    raise NonFiniteError(
        f"{report}. Halted: {why}. The step was not applied; the newest checkpoint "
        f"({ckpt or 'none: no step completed'}) holds the weights of step {run.step}, the last good one "
        "(its data position is after this step's batches). Lower the learning rate or training.max_grad_norm, "
        "check the named dataset, or set training.on_nonfinite skip"
    )


# ---- the loop and its once-in-a-while blocks ----------------------------------------------------


def _log_window(run: Run, window: Window, last: StepResult) -> None:
    """The metrics line of the steps since the last one, summed over ranks. Call on every rank."""
    # what the data pipeline dropped so far (all ranks), by reason: nothing is dropped silently
    drops = sum_over_ranks({k: float(v) for k, v in run.stream.drop_counts().items()}, run.ctx)
    metrics: dict[str, Any] = {f"data/dropped_{reason}": int(n) for reason, n in drops.items()}
    if run.cfg.training.on_nonfinite == "skip":
        metrics["train/nonfinite_skipped"] = run.nonfinite_skipped
    if window.steps:  # every rank applied the same steps (a skipped one is skipped on all)
        total = sum_over_ranks(window.sums, run.ctx)
        elapsed = time.perf_counter() - window.start
        metrics = {
            **finalize(total, "train"),
            "train/lr": last.lr,
            "train/grad_norm": last.grad_norm,
            "train/step_time_s": elapsed / window.steps,
            "train/samples_per_s": total["frames"] / elapsed,
            "train/tokens_per_s": total["tokens"] / elapsed,
            **metrics,
        }
    run.logger.log(run.step, metrics)


def _validate(run: Run) -> dict:
    """Validation metrics of the run's model now. Call on every rank."""
    run.watchdog.arm(f"validation at step {run.step}")
    spec = stream_spec(
        run.cfg,
        run.datasets,
        run.vla.config.image_size,
        False,
        run.plan.micro_batch,
        num_threads=cores_per_rank(),
    )
    return validate(run.vla, run.processor, spec, run.norm_stats, run.cfg.training.num_val_frames, run.ctx)


def _save(run: Run) -> Path:
    """Commit a checkpoint of the current step. Call on every rank."""
    t = run.cfg.training
    run.watchdog.arm(f"the checkpoint of step {run.step}")
    data_state = {
        "stream": run.stream.state_dict(),
        "seed": run.data_seed,
        "sharding": t.data_sharding,
        "num_shards": run.plan.num_shards,
        "shard_batch": run.plan.shard_batch,
        "records_read": run.stream.records_read(),  # episode records this rank read from the files
    }
    run.checkpoint = save_checkpoint(
        run.run_dir,
        run.step,
        run.model,
        run.optimizer,
        run.scheduler,
        run.ctx,
        data_state=data_state,
        state={"lora": run.cfg.lora.enabled, "data_sharding": t.data_sharding},
        config_yaml=run.config_yaml,
        keep_last=t.keep_last_checkpoints,
    )
    run.last_saved = run.step
    return run.checkpoint


def _loop(run: Run) -> str:
    """Train until max_steps or a stop signal; returns the signal's name ("" when max_steps was reached).
    A signal's step still completes, so the checkpoint after it holds exactly the batches consumed."""
    t, every = run.cfg.training, run.cfg.logging.log_every
    window = Window()
    batches = iter(run.stream) if run.step < t.max_steps else iter(())
    while run.step < t.max_steps:
        run.watchdog.arm(f"step {run.step + 1}")
        micro = [{k: v[run.plan.rows] for k, v in next(batches).items()} for _ in range(t.grad_accum_steps)]
        result = train_step(run, micro)
        if result.nonfinite:
            _on_nonfinite(run, result)  # raises NonFiniteError unless the step is skipped
        else:
            run.consecutive_skips = 0
            window.add(result)
        run.step += 1
        run.logger.progress(1, loss=result.loss)
        if run.step % every == 0 or run.step == t.max_steps:
            _log_window(run, window, result)
            window = Window()
        if result.stop and run.step < t.max_steps:
            return run.watcher.signal_name or "a signal on another rank"
        if t.val_every and run.step % t.val_every == 0 and run.step < t.max_steps:
            _after_validation(run, _validate(run))
        due = t.checkpoint_every and run.step % t.checkpoint_every == 0 and run.step < t.max_steps
        if due and run.last_saved != run.step:  # not when the best checkpoint just saved this step
            _save(run)
        rollouts_every = run.cfg.eval.rollouts_every
        if rollouts_every and run.step % rollouts_every == 0 and run.step < t.max_steps:
            _rollouts(run)
    return ""


def _rollouts(run: Run) -> None:
    """Closed-loop rollouts of the model now (eval.*), on rank 0 with the unwrapped model; the other ranks
    wait. Logged as rollout/... and written to <run_dir>/rollouts/step_N. Call on every rank."""
    e = run.cfg.eval
    run.watchdog.arm(f"the rollouts at step {run.step}")
    if run.ctx.is_main:
        from vla_train.eval.closed_loop import TrainingRollouts

        if run.rollouts is None:
            run.rollouts = TrainingRollouts(e, run.cfg.data.data_root_dir, run.cfg.data.cameras)
        with run.stream.paused():  # the data pipeline's threads would starve the policy's (see stream.py)
            metrics = run.rollouts.evaluate(
                run.vla, run.processor, run.run_dir / "rollouts" / f"step_{run.step:08d}"
            )
        run.logger.log(run.step, metrics)
        run.say(
            f"step {run.step}: closed-loop success {metrics['rollout/success_rate']:.0%} over "
            f"{metrics['rollout/num_trials']} trials ({metrics['rollout/seconds']:.0f} s)"
        )
        write_curves(run.run_dir)
    long_barrier(run.ctx, run.cfg.training.step_timeout_s or 86400)


def _best_so_far(run_dir: Path, t: TrainingConfig) -> dict[str, Any] | None:
    """The kept best of a resumed run, if it was kept for this run's best_metric and best_mode."""
    record = best_record(run_dir) if t.best_metric else None
    if record and (record.get("metric"), record.get("mode")) != (t.best_metric, t.best_mode):
        print(f"training.best_metric/best_mode changed: the kept best ({record['metric']}) will be replaced")
        return None
    return record


def _after_validation(run: Run, val: dict) -> None:
    """Log a validation result, keep the best checkpoint (training.best_metric), redraw the curves. Call on
    every rank."""
    if not val:
        return
    run.logger.log(run.step, val)
    t = run.cfg.training
    if t.best_metric:
        if t.best_metric not in val:
            options = ", ".join(sorted(k for k in val if "/task/" not in k and "/dim" not in k))
            raise ConfigError(f"training.best_metric: validation has no '{t.best_metric}'; it has {options}")
        value, best = float(val[t.best_metric]), run.best
        better = best is None or (value > best["value"] if t.best_mode == "max" else value < best["value"])
        if better and math.isfinite(value):
            ckpt = _save(run) if run.last_saved != run.step else run.checkpoint
            run.best = {"metric": t.best_metric, "mode": t.best_mode, "value": value, "step": run.step}
            if run.ctx.is_main:
                keep_best(run.run_dir, ckpt, run.best)
                print(
                    f"best {t.best_metric} so far: {value:.4f} at step {run.step} (kept in {run.run_dir / 'best'})"
                )
            barrier(run.ctx)
    if run.ctx.is_main:
        write_curves(run.run_dir)


def _finish(run: Run, preempted: str) -> dict[str, Any]:
    """The run's end: a checkpoint of the last step (unless it has one), and final validation unless the
    run was stopped. Call on every rank."""
    if preempted:
        ckpt = _save(run) if run.last_saved != run.step else run.checkpoint
        run.say(f"stopped by {preempted} at step {run.step}; checkpoint {ckpt}")
        return {
            "step": run.step,
            "run_dir": str(run.run_dir),
            "checkpoint": str(ckpt),
            "preempted": preempted,
        }
    if run.step == run.start_step and run.last_saved == run.step:
        # a finished run launched again: nothing trained, so nothing new to validate or log
        val = last_validation(run.run_dir) if run.ctx.is_main else {}
        run.say(f"the run is already at step {run.step} (training.max_steps): nothing to train")
        return {"step": run.step, "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), **val}
    val = _validate(run)
    if run.cfg.eval.rollouts_every:
        _rollouts(run)
    _after_validation(run, val)  # logged (and the best kept) before the last checkpoint marks the run done
    if val and math.isnan(val["val/loss"]):
        raise RuntimeError("validation loss is NaN: the run diverged")
    ckpt = _save(run) if run.last_saved != run.step else run.checkpoint
    if val:
        run.say(
            f"done: step {run.step}, val/action_token_accuracy {val['val/action_token_accuracy']:.3f}, "
            f"val/action_l1 {val['val/action_l1']:.4f}, val/loss {val['val/loss']:.4f}; checkpoint {ckpt}"
        )
    else:
        run.say(f"done: step {run.step}; checkpoint {ckpt}")
    return {"step": run.step, "run_dir": str(run.run_dir), "checkpoint": str(ckpt), **val}


def _requeue(run: Run) -> bool:
    """After a preemption checkpoint under a SLURM batch job: rank 0 requeues the job (once), and every
    rank learns whether it worked. False outside SLURM (the caller exits EXIT_PREEMPTED). Call on every
    rank."""
    job = job_to_requeue()
    ok = job is not None
    if job is None:
        run.say("relaunch the same command to resume")
    elif run.ctx.is_main:
        try:
            print(requeue(job), flush=True)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            ok = False
    return bool(broadcast_object(ok, run.ctx))  # also: no rank exits before every rank is done


def train(cfg: TrainConfig, return_model: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run on this process's rank; returns the final metrics (on every rank),
    with "preempted" (the signal) and "requeued" when a signal stopped it.

    Raises NonFiniteError when a non-finite step halts it. `return_model` adds the trained module (the
    VLA; sharded under FSDP) under "model", for tests.
    """
    ctx = init_distributed(cfg.distributed, cfg.training.step_timeout_s)
    try:
        # before any weight is read: refuses (training.preflight strict) what cannot fit this rank's device
        check_before_loading(cfg, ctx.world_size, local_world_size(), is_main=ctx.is_main)
        run = setup(cfg, ctx)
        try:
            result = _finish(run, _loop(run))
        finally:
            if run.rollouts is not None:
                run.rollouts.close()
            run.watchdog.close()
            run.logger.close()
        if not result.get("preempted"):  # a stopping rank (preempted, or raising) absorbs further signals
            run.watcher.close()  # (torchrun's SIGTERM once a first rank exits) until it exits with its code
        if result.get("preempted"):
            result["requeued"] = _requeue(run)
        return {**result, "model": run.vla} if return_model else result
    finally:
        shutdown(ctx)


__all__ = ["Run", "StepResult", "data_plan", "setup", "train", "train_step"]

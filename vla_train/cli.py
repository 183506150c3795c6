"""Console entry points. Each parses and validates its config first (naming any bad field) and only then
imports torch/TensorFlow and starts work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vla_train.config import ConfigError, EvalConfig, ExportConfig, ServeConfig, StatsConfig, TrainConfig
from vla_train.config_cli import parse_config
from vla_train.training.faults import EXIT_CONFIG  # standard library only: nothing heavy before validation


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _parsed(config_cls, argv):
    """The validated config, or exit with the problems (EXIT_CONFIG)."""
    try:
        return parse_config(config_cls, argv)
    except ConfigError as e:
        _fail(e)


def train_main(argv: list[str] | None = None) -> None:
    """vla-train --config_path configs/demo.yaml [--training.max_steps 20 ...]

    The same command trains under torchrun (`torchrun --nproc_per_node 2 -m vla_train.cli ...` or
    `torchrun ... $(which vla-train) ...`): the config is validated for the launch's world size before any
    process group starts.

    `--preflight-only` prints the memory preflight's table (training/preflight.py) and exits, before any
    weight is read or TensorFlow is imported: status 0 when the estimate fits (or training.preflight is
    warn/off), 2 with the changes that would fit when it does not under strict.

    Exit codes of a training run: training/faults.py (0 done or requeued, 2 bad config/data, 3 non-finite
    step, 4 stalled rank, 75 preempted and checkpointed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    preflight_only = "--preflight-only" in argv
    argv = [a for a in argv if a != "--preflight-only"]
    cfg = _parsed(TrainConfig, argv)
    if preflight_only:
        from vla_train.config import launch_world_size
        from vla_train.training.distributed import local_world_size
        from vla_train.training.preflight import check_before_loading

        mode = "strict" if cfg.training.preflight == "strict" else "warn"  # asked for: print it even if off
        try:
            check_before_loading(cfg, launch_world_size(), local_world_size(), mode=mode)
        except ConfigError as e:
            _fail(e)
        return
    from vla_train.data.errors import DatasetError
    from vla_train.training.faults import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError
    from vla_train.training.trainer import train

    try:
        result = train(cfg)
    except (DatasetError, ConfigError) as e:  # bad data, or a configuration the preflight refused
        _fail(e)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit_now(EXIT_NONFINITE)
    if result.get("preempted") and not result.get("requeued"):
        _exit_now(EXIT_PREEMPTED)  # checkpointed: the same command resumes


def _exit_now(code: int) -> None:
    """Exit with `code` without the interpreter's teardown: a signal arriving during that (slow) teardown,
    where Python's handlers are gone, would end the process with the signal instead of its code, and
    torchrun sends SIGTERM to the other ranks as soon as one exits. Checkpoints and logs are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def export_main(argv: list[str] | None = None) -> None:
    """vla-export --run_dir runs/demo [--output_dir DIR] [--predict_samples 3] [--dtype fp32|bf16]"""
    cfg = _parsed(ExportConfig, argv)
    from vla_train.export import export_run

    export_run(cfg)


def stats_main(argv: list[str] | None = None) -> None:
    """vla-stats --data.data_root_dir DIR --data.dataset_name NAME: compute (or show cached) statistics.

    With --data.mixture NAME: the statistics of every dataset of the mixture, one line per dataset.
    """
    cfg = _parsed(StatsConfig, argv)
    import json

    from vla_train.data.errors import DatasetError
    from vla_train.data.mixture import run_datasets
    from vla_train.data.rlds import get_statistics

    d = cfg.data
    datasets = run_datasets(d)
    if not d.mixture:
        try:
            stats = get_statistics(d.data_root_dir, d.dataset_name, d.stats_cache_dir, d.on_bad_data)
        except DatasetError as e:
            _fail(e)
        print(json.dumps({d.dataset_name: stats}, indent=2))
        return
    print(f"mixture '{d.mixture}': {len(datasets)} dataset(s)", flush=True)
    for name, weight in datasets:
        try:
            stats = get_statistics(d.data_root_dir, name, d.stats_cache_dir, d.on_bad_data)
        except DatasetError as e:
            _fail(e)
        print(
            f"{name}: weight {weight:g}, {stats['num_trajectories']} trajectories, "
            f"{stats['num_transitions']} transitions, action dim {len(stats['action']['q01'])}",
            flush=True,
        )


def data_main(argv: list[str] | None = None) -> None:
    """vla-data --data.data_root_dir DIR [--data.synthetic.num_train_episodes N]: build the synthetic dataset.

    vla-data metaworld --tasks mt10 --episodes-per-task N --out DIR [--wrist true ...]: scripted-expert
    demonstrations from Meta-World as the RLDS dataset metaworld_mt10 (vla_train/sim/demos.py).

    vla-data inspect NAME --data.data_root_dir DIR [--out DIR]: the dataset's counts, statistics and
    pictures (vla_train/data/inspect.py).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["metaworld"]:
        return _metaworld_data(argv[1:])
    if argv[:1] == ["inspect"]:
        return _inspect_data(argv[1:])
    cfg = _parsed(StatsConfig, argv + ["--data.build_synthetic", "true"])
    from vla_train.data.synthetic import build_synthetic_dataset

    print(build_synthetic_dataset(cfg.data.data_root_dir, cfg.data.synthetic))


def _inspect_data(argv: list[str]) -> None:
    """vla-data inspect NAME --data.data_root_dir DIR [--out DIR] [--episodes 4] [--frames 6]"""
    import json

    from vla_train.config import InspectConfig

    if argv and not argv[0].startswith("--"):
        argv = ["--data.dataset_name", argv[0], *argv[1:]]
    cfg = _parsed(InspectConfig, _underscored(argv))
    from vla_train.data.errors import DatasetError
    from vla_train.data.inspect import inspect_dataset

    try:
        summary = inspect_dataset(cfg)
    except DatasetError as e:
        _fail(e)
    shown = {k: summary[k] for k in ("dataset", "splits", "num_transitions", "num_instructions", "pictures")}
    print(json.dumps(shown, indent=2))
    print(f"wrote {Path(summary['pictures'][0]).parent} (summary.md, summary.json, the pictures)")


def _underscored(argv: list[str]) -> list[str]:
    """--episodes-per-task 4 -> --episodes_per_task 4 (both spellings are accepted)."""
    out = []
    for a in argv:
        name, sep, value = a.partition("=")
        out.append("--" + name[2:].replace("-", "_") + sep + value if a.startswith("--") else a)
    return out


def _metaworld_data(argv: list[str]) -> None:
    import json

    from vla_train.config import MetaWorldDataConfig

    cfg = _parsed(MetaWorldDataConfig, _underscored(argv))
    from vla_train.sim.demos import build_metaworld_dataset

    try:
        result = build_metaworld_dataset(cfg)
    except ImportError as e:
        _fail(e)
    shown = {k: v for k, v in result.items() if k not in ("identity", "attempts")}
    print(json.dumps(shown, indent=2))


def eval_main(argv: list[str] | None = None) -> None:
    """vla-eval --policy DIR|expert|replay:DATA_ROOT [--tasks mt10] [--trials 20] [--max_steps 200] [--out DIR]

    Closed-loop evaluation in Meta-World (vla_train/eval/): results.json, results.md, videos/<task>.gif
    and success.png in the output folder.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _parsed(EvalConfig, _underscored(argv))
    import json
    from pathlib import Path

    from vla_train.eval.closed_loop import evaluate_closed_loop, make_trials, render_for
    from vla_train.eval.policies import load_policy
    from vla_train.sim.metaworld_env import resolve_tasks

    try:
        policy, meta = load_policy(cfg.policy, cfg.unnorm_key, cfg.device, cfg.execute_steps)
    except (ImportError, FileNotFoundError, ValueError) as e:
        _fail(e)
    data_root = cfg.data_root_dir or meta.get("data_root_dir", "")
    if not data_root and meta.get("kind") == "run":
        from vla_train.export import load_run_config

        data_root = load_run_config(Path(cfg.policy)).data.data_root_dir
    if cfg.out:
        out = Path(cfg.out)
    elif meta["kind"] in ("expert", "replay"):
        out = Path("runs") / f"eval_{meta['kind']}"
    else:
        out = Path(cfg.policy) / "eval"
    seeds = policy.seeds(resolve_tasks(cfg.tasks)) if cfg.seed_split == "dataset" else None
    trials = make_trials(cfg, cfg.seed_split, cfg.first_seed, seeds)
    meta = {"policy": meta, "seed_split": cfg.seed_split, "tasks_spec": cfg.tasks}
    summary = evaluate_closed_loop(
        policy,
        cfg,
        out,
        render_for(cfg, data_root, getattr(policy, "cameras", ())),
        trials,
        meta,
        progress_bar=cfg.progress_bar,
    )
    print((out / "results.md").read_text(), end="")
    print(json.dumps({"out": str(out), "success_rate": summary["success_rate"]}))


def _safety_switch(argv: list[str]) -> list[str]:
    """--safety off|on -> --safety.enabled false|true (the other safety fields keep --safety.<name>)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        value = a.partition("=")[2] if a.startswith("--safety=") else None
        if a == "--safety" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        if value is None:
            out.append(a)
        elif value in ("on", "off"):
            out.append(f"--safety.enabled={'true' if value == 'on' else 'false'}")
        else:
            _fail(ValueError(f"--safety: use on or off, got '{value}'"))
        i += 1
    return out


def serve_main(argv: list[str] | None = None) -> None:
    """vla-serve --policy DIR [--host 127.0.0.1] [--port 8000] [--quantization int8|nf4] [--safety off]

    Serves an exported model directory (vla_train/serving/server.py): OpenVLA's POST /act, the msgpack
    POST /v1/act of vla_train.serving.PolicyClient, GET /health and /info, POST /estop and /estop/reset.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _parsed(ServeConfig, _safety_switch(_underscored(argv)))
    from vla_train.serving.server import serve

    try:
        serve(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)


def convert_main(argv: list[str] | None = None) -> None:
    """vla-convert raw SRC DST [--name NAME] [--val_fraction 0.1] [--image_format jpeg|png]
    vla-convert lerobot SRC DST [--name NAME] [--primary_camera auto] [--wrist_camera auto] [--state_key auto]
    vla-convert rlds-to-lerobot NAME DST --data.data_root_dir DIR [--data.registry_files [...]] [--fps N]

    raw: a folder of per-episode .npz / .hdf5 files (vla_train/data/convert/raw.py has the layout); every
    problem of every file is reported at once, and nothing is written then. lerobot: a local LeRobot v3.0
    dataset (vla_train/data/convert/lerobot.py). Both write an RLDS dataset with our tfds builder and its
    registry entry. rlds-to-lerobot: a registered RLDS dataset -> a LeRobot v3.0 dataset
    (vla_train/data/convert/to_lerobot.py).
    """
    from vla_train.config import ConvertLerobotConfig, ConvertRawConfig, RldsToLerobotConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = {
        "raw": (ConvertRawConfig, ("src", "dst")),
        "lerobot": (ConvertLerobotConfig, ("src", "dst")),
        "rlds-to-lerobot": (RldsToLerobotConfig, ("data.dataset_name", "dst")),
    }
    if not argv or argv[0] not in kinds:
        _fail(ValueError(f"vla-convert: name the kind first, one of {list(kinds)} (vla-convert raw SRC DST)"))
    config_cls, names = kinds[argv[0]]
    rest = _underscored(argv[1:])
    positional = []
    while rest and not rest[0].startswith("--") and len(positional) < 2:
        positional.append(rest.pop(0))
    rest = [*(f"--{k}={v}" for k, v in zip(names, positional)), *rest]
    cfg = _parsed(config_cls, rest)
    import json

    from vla_train.data.errors import DatasetError

    if argv[0] == "raw":
        from vla_train.data.convert.raw import convert_raw as convert
    elif argv[0] == "lerobot":
        from vla_train.data.convert.lerobot import convert_lerobot as convert
    else:
        from vla_train.data.convert.to_lerobot import rlds_to_lerobot as convert
    try:
        result = convert(cfg)
    except DatasetError as e:
        _fail(e)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    # `python -m vla_train.cli ...` and `torchrun --nproc_per_node N -m vla_train.cli ...` train.
    train_main()

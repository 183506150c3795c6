"""Scale benchmark: what a rank reads, what a resume costs, what loading a sharded model holds in memory,
and how close the memory preflight is to the measured peak.

    .venv/bin/python scripts/bench_scale.py --json bench_scale.json --markdown BENCHMARKS.md

- records_read_fraction_per_rank: 2 read shards of a 2-dataset mixture (4 TFRecord files each), each
  consuming the rows of its rank for --batches global batches, against one stream reading everything:
  the episode records each shard read from the files over those the single stream read (read-ahead
  included).
- resume_first_batch_s_{early,late}: seconds from restoring a stream position to its first batch, after
  --early and --late batches of the tiny reference recipe's data (the faster of two restores).
- load_peak_rss_fraction_per_rank: a 2-rank FSDP2 load (torchrun, gloo) of a >= 100M-parameter model:
  each rank's peak RSS growth while loading over the full model's bytes (the largest of the ranks).
- preflight_error_pct: |estimate - measured| / measured peak memory of a training step on CPU, for a full
  fine-tune, LoRA and 4-bit LoRA of a >= 100M-parameter model (the largest of the three);
  preflight_openvla_7b_lora_r32_b16_bf16_gib: the preflight's estimate for OpenVLA's LoRA recipe on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from markdown_table import report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the datasets the tests write (vla_test_utils)


def records_read_fraction(work: Path, batches: int) -> list[float]:
    from vla_test_utils import frame_spec, multi_file_mixture
    from vla_train.data import rlds
    from vla_train.data.registry import add_registry_files
    from vla_train.data.stream import FrameStream

    root = work / "files"
    root.mkdir()
    add_registry_files([multi_file_mixture(root, work / "builds")])
    names = ["vla_synthetic", "syn_files_b"]
    stats = {n: rlds.get_statistics(str(root), n, str(root / "stats")) for n in names}
    base = {"datasets": [(n, 1.0) for n in names], "shuffle_buffer_size": 16, "ram_budget_gb": 0.0}

    def read(batch_size: int, **shard) -> int:
        stream = FrameStream(
            frame_spec(root, batch_size=batch_size, num_parallel_calls=1, **base, **shard), stats
        )
        it = iter(stream)
        for _ in range(batches):
            next(it)
        return stream.records_read()

    whole = read(16)
    return [read(8, num_shards=2, shard_index=s) / whole for s in (0, 1)]


def resume_first_batch_s(work: Path, positions: tuple[int, int]) -> dict[int, float]:
    from vla_test_utils import frame_spec
    from vla_train.config import SyntheticDataConfig
    from vla_train.data import rlds
    from vla_train.data.stream import FrameStream
    from vla_train.data.synthetic import DATASET_NAME, build_synthetic_dataset

    root = work / "recipe"
    cfg = SyntheticDataConfig(
        num_train_episodes=24, num_val_episodes=6, steps_per_episode=4, image_size=32, seed=3
    )
    build_synthetic_dataset(root, cfg)
    stats = rlds.get_statistics(str(root), DATASET_NAME)
    spec = frame_spec(
        root, image_size=32, shuffle_buffer_size=64, num_parallel_calls=1, image_augmentation=True,
        future_action_window_size=1,
    )  # fmt: skip
    out = {}
    for position in positions:
        stream = FrameStream(spec, stats)
        it = iter(stream)
        for _ in range(position):
            next(it)
        state = stream.state_dict()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            restored = FrameStream(spec, stats)
            restored.load_state_dict(state)
            next(iter(restored))
            times.append(time.perf_counter() - start)
        out[position] = min(times)
    return out


def load_peak_rss_fraction(work: Path) -> list[float]:
    """Each rank's peak RSS growth while a 2-rank FSDP2 load reads its shard of a >= 100M-parameter fp32
    model, over the model's bytes (the worker of tests/test_sharded_load.py, under torchrun)."""
    import subprocess

    import test_sharded_load as sharded
    import torch

    from vla_train.models.load import build_from_config, save_model_dir

    model, processor = build_from_config(sharded.big_model_config(), sharded.INSTRUCTIONS, seed=0)
    save_model_dir(work / "big", model, processor)
    model, processor = build_from_config(sharded.tied_model_config(), sharded.INSTRUCTIONS, seed=0)
    save_model_dir(work / "tied_bf16", model.to(torch.bfloat16), processor)
    del model
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, sharded.__file__, str(work)], check=True, cwd=REPO, env=env, timeout=600)
    results = [json.loads((work / f"result_rank{r}.json").read_text()) for r in range(2)]
    print(f"model of {results[0]['num_params'] / 1e6:.1f} M parameters", flush=True)
    return [r["rss_growth_fraction"] for r in results]


def preflight_errors() -> dict[str, float]:
    """Signed % error of the preflight's estimate against the measured peak RSS growth of two CPU training
    steps (fresh processes), for the 120 M-parameter model of tests/test_preflight.py."""
    from test_preflight import _measured_config

    from vla_train.training.preflight import estimate
    from vla_train.training.preflight_measure import measured_peak_bytes, measurement_prompt_tokens

    errors = {}
    for mode in ("full", "lora", "nf4"):
        cfg = _measured_config(mode)
        measured = measured_peak_bytes(cfg)
        est = estimate(cfg, 1, "cpu", prompt_tokens=measurement_prompt_tokens(cfg)).peak_bytes
        errors[mode] = 100 * (est - measured) / measured
        print(
            f"preflight {mode}: estimated {est / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB",
            flush=True,
        )
    return errors


def preflight_7b_lora_gib() -> float:
    """The preflight's peak per GPU for configs/finetune_lora.yaml (openvla-7b, LoRA r32, global batch 16,
    bf16) on one GPU, from a bf16 checkpoint as released (OpenVLA's paper: 59.7 GB)."""
    from vla_train.config import TrainConfig
    from vla_train.config_cli import parse_config
    from vla_train.training.preflight import estimate, format_table

    cfg = parse_config(
        TrainConfig, ["--config_path", str(REPO / "configs/finetune_lora.yaml")], validate=False
    )
    est = estimate(cfg, 1, "cuda", checkpoint_dtype_bytes=2)
    print(format_table(est), flush=True)
    return est.peak_bytes / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200, help="global batches consumed for the read fraction")
    ap.add_argument("--early", type=int, default=200)
    ap.add_argument("--late", type=int, default=2000)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fractions = records_read_fraction(work, args.batches)
        print(f"records read per rank / one rank alone: {fractions}", flush=True)
        resume = resume_first_batch_s(work, (args.early, args.late))
        print(f"first batch after a resume: {resume}", flush=True)
        load = load_peak_rss_fraction(work)
        print(f"peak RSS growth while loading, per rank: {load}", flush=True)
    errors = preflight_errors()
    seven_b = preflight_7b_lora_gib()
    result = {
        "records_read_fraction_per_rank": [round(f, 3) for f in fractions],
        "resume_first_batch_s_early": round(resume[args.early], 3),
        "resume_first_batch_s_late": round(resume[args.late], 3),
        "resume_positions": [args.early, args.late],
        "load_peak_rss_fraction_per_rank": [round(f, 3) for f in load],
        "preflight_error_pct": round(max(abs(e) for e in errors.values()), 2),
        "preflight_error_pct_by_mode": {k: round(v, 2) for k, v in errors.items()},
        "preflight_openvla_7b_lora_r32_b16_bf16_gib": round(seven_b, 2),
        "cores": os.cpu_count(),
    }
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {result['cores']} cores | "
        f"{' / '.join(str(f) for f in result['records_read_fraction_per_rank'])} | "
        f"{result['resume_first_batch_s_early']} s ({args.early}) / {result['resume_first_batch_s_late']} s "
        f"({args.late}) | {' / '.join(str(f) for f in result['load_peak_rss_fraction_per_rank'])} | "
        + " / ".join(f"{k} {v:+.1f}%" for k, v in result["preflight_error_pct_by_mode"].items())
        + f" | {result['preflight_openvla_7b_lora_r32_b16_bf16_gib']} GiB |"
    )
    report(result, args.json, args.markdown, "| date | machine | records read per rank", row)


if __name__ == "__main__":
    main()

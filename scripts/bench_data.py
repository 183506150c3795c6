"""Data-pipeline benchmark: decode-only vs full pipeline throughput, host RSS over a long stream, and a
25-dataset mixture's time to first batch with cached statistics.

    .venv/bin/python scripts/bench_data.py --json bench_data.json --markdown BENCHMARKS.md

(a) decode-only: a bare tf.data loop over the same RLDS files (read episodes, flatten, JPEG decode, batch);
(b) full pipeline: vla_train's FrameStream (standardize, normalize, shuffle on encoded frames, decode,
    resize to 224 px, OpenVLA augmentation, batch); its RSS is sampled every second for --seconds.
Throughput is reported in frames per second per core (frames/s divided by the machine's cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from markdown_table import report

from vla_train.config import DataConfig, SyntheticDataConfig


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def decode_only_fps(root: Path, name: str, seconds: float, batch: int) -> float:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from vla_train.data.rlds import open_builder

    builder = open_builder(root, name)
    ds = builder.as_dataset("train", decoders={"steps": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ep: ep["steps"]["observation"]["image"]).unbatch().repeat()
    ds = ds.map(lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch).prefetch(2)
    return _rate(ds.as_numpy_iterator(), seconds, batch)


def frame_transform_ms(root: Path, name: str, frames: int = 200, passes: int = 5) -> tuple[float, float]:
    """CPU milliseconds per frame (all threads): vla_train's resize + augmentation kernel (image_ops) and
    the same transform as TensorFlow ops (tf.image.resize lanczos3 + crop_and_resize + the four colour
    ops), on decoded frames of the benchmark dataset; the fastest of `passes` passes over the frames
    (the machine's other load only ever slows a pass down)."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from vla_train.data import image_ops
    from vla_train.data.augment import augment_params, tf_reference
    from vla_train.data.rlds import open_builder

    ds = open_builder(root, name).as_dataset("train", decoders={"steps": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ep: ep["steps"]["observation"]["image"]).unbatch().take(frames)
    images = [tf.io.decode_jpeg(b, channels=3).numpy() for b in ds.as_numpy_iterator()]
    params = augment_params(0, np.arange(len(images)))
    out = np.empty((224, 224, 3), np.uint8)
    tf_transform = tf.function(lambda img, p: tf_reference(img, 224, p))
    tf_images = [tf.constant(i) for i in images]

    def best_ms(transform, inputs) -> float:
        transform(inputs[0], params[0])  # compiled / loaded from numba's cache, or traced
        best = float("inf")
        for _ in range(passes):
            start = time.process_time()
            for img, p in zip(inputs, params, strict=True):
                transform(img, p)
            best = min(best, (time.process_time() - start) / len(inputs) * 1000)
        return best

    return (
        best_ms(lambda img, p: image_ops._into(img, out, p), images),
        best_ms(tf_transform, tf_images),
    )


def _rate(iterator, seconds: float, batch: int, on_batch=None) -> float:
    next(iterator)  # warm-up: the first batch pays for opening files and filling buffers
    start, frames = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(iterator)
        frames += batch
        if on_batch:
            on_batch()
    return frames / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="bench_data_cache", help="where the benchmark datasets are written")
    ap.add_argument("--episodes", type=int, default=400, help="episodes of 50 frames (256x256 JPEG)")
    ap.add_argument("--decode-seconds", type=float, default=60)
    ap.add_argument("--seconds", type=float, default=300, help="length of the full-pipeline stream")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ram-budget-gb", type=float, default=8.0, help="data.ram_budget_gb of the stream")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    cores = os.cpu_count() or 1

    from vla_train.data.registry import add_registry_files
    from vla_train.data.rlds import get_statistics
    from vla_train.data.stream import FrameStream, StreamSpec
    from vla_train.data.synthetic import DATASET_NAME, build_synthetic_dataset

    work = Path(args.workdir)
    big = work / "big"
    t0 = time.perf_counter()
    build_synthetic_dataset(
        big,
        SyntheticDataConfig(
            num_train_episodes=args.episodes, num_val_episodes=4, steps_per_episode=50, image_size=256
        ),
    )
    print(
        f"dataset ready ({args.episodes * 50} train frames) in {time.perf_counter() - t0:.1f} s", flush=True
    )
    stats = get_statistics(str(big), DATASET_NAME)

    kernel_ms, tf_ms = frame_transform_ms(big, DATASET_NAME)
    print(
        f"frame transform, CPU per frame: vla_train kernel {kernel_ms:.3f} ms, TF ops {tf_ms:.3f} ms",
        flush=True,
    )

    decode = decode_only_fps(big, DATASET_NAME, args.decode_seconds, args.batch)
    print(f"decode-only: {decode:.1f} frames/s ({decode / cores:.1f} per core)", flush=True)

    data = DataConfig(
        data_root_dir=str(big), dataset_name=DATASET_NAME, shuffle_buffer_size=10000, image_augmentation=True,
        ram_budget_gb=args.ram_budget_gb,
    )  # fmt: skip
    spec = StreamSpec(data, ((DATASET_NAME, 1.0),), image_size=224, batch_size=args.batch, seed=0, train=True)
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, rss_mb()))
            stop.wait(1.0)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    pipeline = _rate(iter(FrameStream(spec, stats)), args.seconds, args.batch)
    stop.set()
    thread.join()
    first = [r for t, r in samples if t <= 60]
    last = [r for t, r in samples if t >= samples[-1][0] - 60]
    print(f"full pipeline: {pipeline:.1f} frames/s ({pipeline / cores:.1f} per core)", flush=True)

    # 25 datasets, each a registered copy of a small synthetic dataset, statistics cached beforehand.
    small = work / "small"
    build_synthetic_dataset(
        small,
        SyntheticDataConfig(num_train_episodes=20, num_val_episodes=2, steps_per_episode=10, image_size=256),
    )
    mix_root = work / "mix"
    names = [f"bench_ds_{i:02d}" for i in range(25)]
    lines = ["datasets:"]
    for n in names:
        if not (mix_root / n).exists():
            shutil.copytree(small / DATASET_NAME, mix_root / n)
        lines += [
            f"  {n}:",
            "    image_obs_keys: {primary: image, secondary: null, wrist: null}",
            "    state_obs_keys: [state]",
            "    state_encoding: POS_EULER",
            "    action_encoding: EEF_POS",
            "    standardize_fn: identity",
        ]
    (mix_root / "registry.yaml").write_text("\n".join(lines) + "\n")
    add_registry_files([mix_root / "registry.yaml"])
    mix_stats = {n: get_statistics(str(mix_root), n) for n in names}  # cached from here on
    t0 = time.perf_counter()
    mix_data = DataConfig(data_root_dir=str(mix_root), dataset_name=names[0], shuffle_buffer_size=10000)
    mix_spec = StreamSpec(
        mix_data, tuple((n, 1.0) for n in names), image_size=224, batch_size=args.batch, seed=0, train=True
    )
    next(iter(FrameStream(mix_spec, mix_stats)))
    first_batch = time.perf_counter() - t0
    print(f"25-dataset mixture: first batch after {first_batch:.1f} s", flush=True)

    result = {
        "decode_only_fps_per_core": round(decode / cores, 2),
        "pipeline_fps_per_core": round(pipeline / cores, 2),
        "ratio": round(pipeline / decode, 3),
        "rss_mb_first_minute": round(statistics.mean(first), 1),
        "rss_mb_last_minute": round(statistics.mean(last), 1),
        "rss_mb_peak": round(max(r for _, r in samples), 1),
        "mixture_first_batch_s": round(first_batch, 2),
        "frame_transform_ms_kernel": round(kernel_ms, 3),
        "frame_transform_ms_tf_ops": round(tf_ms, 3),
        "stream_seconds": args.seconds,
        "cores": cores,
    }
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {cores} cores | {result['decode_only_fps_per_core']} | "
        f"{result['pipeline_fps_per_core']} | {result['ratio']} | {result['rss_mb_first_minute']} | "
        f"{result['rss_mb_last_minute']} | {result['mixture_first_batch_s']} | {args.seconds:.0f} s | "
        f"{result['frame_transform_ms_kernel']} / {result['frame_transform_ms_tf_ops']} |"
    )
    report(result, args.json, args.markdown, "| date | machine | decode-only fps/core", row)


if __name__ == "__main__":
    main()

"""vla-serve under load on loopback, and quantized inference.

1. In-process: `predict_action_batch` time for batch 1 and for `--max_batch` frames (the server's floor).
2. Load: a real `vla-serve` process, `--clients` concurrent PolicyClient threads for `--seconds`, once
   with dynamic batching (max_batch `--max_batch`) and once serving batch 1: errors, throughput, latency
   p50/p99, mean batch, and the server's RSS (sampled each second; the last 10 s against the first 10 s).
3. Quantized: the export's weights in fp32, bf16, int8 and nf4 on held-out validation frames of its run:
   weight memory and action-token agreement with the fp32 and the bf16 model.

    .venv/bin/python scripts/bench_serve.py --markdown BENCHMARKS.md      # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from markdown_table import add_table_row, report

HEADER_LOAD = "| date | machine | policy | clients | serving |"
HEADER_QUANT = "| date | machine | policy | weights |"


def start_server(policy: str, port: int, *args: str) -> subprocess.Popen:
    import httpx

    code = "from vla_train.cli import serve_main; serve_main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--policy", policy, "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vla-serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    raise TimeoutError("vla-serve did not come up")


def load_test(
    policy: str,
    port: int,
    frames,
    texts,
    clients: int,
    seconds: float,
    max_batch: int,
    wait_ms: float,
    solo_requests: int = 100,
):
    import psutil

    from vla_train.serving import PolicyClient

    proc = start_server(policy, port, "--max_batch", str(max_batch), "--max_wait_ms", str(wait_ms))
    url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def run(c: int) -> None:
        with PolicyClient(url, timeout_s=30, retries=0) as client:
            i = c
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    client.act(frames[i % len(frames)], texts[i % len(texts)])
                except Exception as e:  # counted, and the first few shown
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                i += clients

    solo = []  # one client alone, one request at a time: the server's own cost over the model's
    with PolicyClient(url) as client:
        for i in range(solo_requests):
            start = time.perf_counter()
            client.act(frames[i % len(frames)], texts[i % len(texts)])
            solo.append(time.perf_counter() - start)
    server = psutil.Process(proc.pid)
    rss = []
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    while time.perf_counter() - began < seconds:
        time.sleep(1.0)
        rss.append(server.memory_info().rss)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    with PolicyClient(url) as client:
        info = client.info()
    proc.terminate()
    proc.wait(timeout=30)
    first, last = statistics.mean(rss[:10]), statistics.mean(rss[-10:])
    ms = np.asarray(latencies) * 1000
    return {
        "max_batch": max_batch,
        "max_wait_ms": wait_ms,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "throughput_rps": len(latencies) / elapsed,
        "latency_p50_ms": float(np.percentile(ms, 50)),
        "latency_p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": info["batching"]["mean_batch_size"],
        "solo_p50_ms": statistics.median(solo) * 1000 if solo else None,
        "rss_first10_mb": first / 2**20,
        "rss_last10_mb": last / 2**20,
        "rss_change": last / first - 1,
    }


def in_process_ms(policy, frames, texts, batch: int, calls: int = 30) -> float:
    images, instructions = np.stack(frames[:batch]), list(texts[:batch])
    policy.predict_action_batch(images, instructions, preprocessed=True)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        policy.predict_action_batch(images, instructions, preprocessed=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def weight_bytes(model) -> int:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for p in model.parameters():  # bitsandbytes keeps NF4 block scales beside the packed weight
        state = getattr(p, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def quantized(policy_dir: str, run_dir: str, num_frames: int) -> list[dict]:
    import torch

    from vla_train.export import load_run_config, sample_frames
    from vla_train.models.load import cast_parameters
    from vla_train.models.policy import VLAPolicy

    cfg = load_run_config(Path(run_dir))
    stats = json.loads((Path(policy_dir) / "dataset_statistics.json").read_text())
    base = VLAPolicy.from_dir(policy_dir)
    frames = sample_frames(cfg, stats, base.processor.settings.image_size, num_frames)
    tokens = {"fp32": base.predict_tokens(frames["image"], frames["instruction"])}
    memory = {"fp32": weight_bytes(base.model)}
    bf16 = VLAPolicy.from_dir(policy_dir)
    cast_parameters(bf16.model, torch.bfloat16)  # what vla-export --dtype bf16 writes
    tokens["bf16"], memory["bf16"] = (
        bf16.predict_tokens(frames["image"], frames["instruction"]),
        weight_bytes(bf16.model),
    )
    for q in ("int8", "nf4"):
        policy = VLAPolicy.from_dir(policy_dir, quantization=q)
        tokens[q], memory[q] = (
            policy.predict_tokens(frames["image"], frames["instruction"]),
            weight_bytes(policy.model),
        )
    rows = []
    for name, t in tokens.items():
        rows.append(
            {
                "weights": name,
                "weight_mb": memory[name] / 2**20,
                "agreement_fp32": float((t == tokens["fp32"]).float().mean()),
                "agreement_bf16": float((t == tokens["bf16"]).float().mean()),
                "frames": len(t),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", default="runs/demo/export", help="exported model directory")
    ap.add_argument("--run_dir", default="runs/demo", help="its training run (held-out frames)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--max_wait_ms", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--quant_frames", type=int, default=256)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--markdown", help="add the rows to this markdown file")
    args = ap.parse_args()

    import torch

    from vla_train.models.policy import VLAPolicy

    policy = VLAPolicy.from_dir(args.policy)
    size = policy.processor.settings.image_size
    rng = np.random.default_rng(0)
    camera = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(64)]
    texts = ["pick up the red block", "open the drawer", "push the blue cube to the left"]
    floor = {b: in_process_ms(policy, camera, texts * 32, b) for b in (1, args.max_batch)}
    del policy
    runs = [
        load_test(args.policy, args.port, camera, texts, args.clients, args.seconds, mb, args.max_wait_ms)
        for mb in (args.max_batch, 1)
    ]
    quant = quantized(args.policy, args.run_dir, args.quant_frames)
    batched, single = runs
    result = {
        "policy": args.policy,
        "torch_threads": torch.get_num_threads(),
        "in_process_ms": {str(k): v for k, v in floor.items()},
        "load": runs,
        "batching_speedup": batched["throughput_rps"] / single["throughput_rps"],
        "server_overhead_ms": single["solo_p50_ms"] - floor[1],
        "quantization": quant,
    }
    date = time.strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    rows = []
    for r in runs:
        serving = (
            f"max_batch {r['max_batch']}, wait {r['max_wait_ms']:g} ms" if r["max_batch"] > 1 else "batch 1"
        )
        rows.append(
            f"| {date} | {machine} | {args.policy} | {args.clients} x {args.seconds:g} s | {serving} | "
            f"{r['requests']} | {r['errors']} | {r['throughput_rps']:.1f} | {r['latency_p50_ms']:.1f} | "
            f"{r['latency_p99_ms']:.1f} | {r['mean_batch']:.2f} | {r['rss_first10_mb']:.0f} -> "
            f"{r['rss_last10_mb']:.0f} ({r['rss_change']:+.1%}) | {r['solo_p50_ms']:.1f} / {floor[1]:.1f} |"
        )
    qrows = [
        f"| {date} | {machine} | {args.policy} | {q['weights']} | {q['weight_mb']:.1f} | "
        f"{q['agreement_fp32']:.4f} | {q['agreement_bf16']:.4f} | {q['frames']} |"
        for q in quant
    ]
    report(result, args.json, None, "", "")
    if args.markdown:
        for row in rows:
            add_table_row(Path(args.markdown), HEADER_LOAD, row)
        for row in qrows:
            add_table_row(Path(args.markdown), HEADER_QUANT, row)


if __name__ == "__main__":
    main()

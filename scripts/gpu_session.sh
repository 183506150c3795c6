#!/usr/bin/env bash
# Issue 17's device check, prepared so that a session lent a GPU runs it at once (one call, ~5 minutes of
# the 8 it may take on one H100/H200): openvla-7b LoRA r32 batch 16 and QLoRA nf4 batch 8 (each with and
# without activation checkpointing), minivla full fine-tune and frozen vision, each with its step time,
# MFU, peak memory and the preflight's estimate, as rows of BENCHMARKS.md and JSON under $OUT.
#
#   here, once:  bash scripts/gpu_session.sh prepare
#                (.carry/site: the bitsandbytes this venv has, with its CPU and CUDA 13 kernels only: the
#                device image has torch, transformers, peft, PyYAML and numpy but no bitsandbytes)
#   there:       the device tool's run, carry [".carry"], timeout_s 540, command:
#                bash scripts/gpu_session.sh run
#   here, after: copy the returned BENCHMARKS.md's new rows (files_at/BENCHMARKS.md) into BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
prepare)
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >>"$exclude"
  site=$(.venv/bin/python -c 'import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))')
  rm -rf .carry/site && mkdir -p .carry/site
  cp -r "$site"/bitsandbytes "$site"/bitsandbytes-*.dist-info .carry/site/
  find .carry/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  find .carry -name __pycache__ -prune -exec rm -rf {} +
  du -sh .carry
  ;;
run)
  export PYTHONPATH="$PWD/.carry/site:$PWD" PYTHONUNBUFFERED=1
  out=${OUT:-/tmp/gpu_session}
  mkdir -p "$out"
  nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true
  python3 -c 'import torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", b.__version__)' 2>&1 | tee "$out/versions.txt" || true  # a broken carried bitsandbytes fails qlora only
  bench() {  # name, timeout (s), bench_gpu.py arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 scripts/bench_gpu.py "$@" --json "$out/$name.json" --markdown BENCHMARKS.md \
      >/dev/null 2>"$out/$name.log" && echo "$name: ok" || echo "$name: failed ($?), see $name.log"
  }
  bench openvla_7b 190 --preset openvla_7b --modes lora,qlora --warmup 3 --steps 10
  bench openvla_7b_ckpt 150 --preset openvla_7b --modes lora,qlora --warmup 2 --steps 6 --activation-checkpointing
  bench minivla 120 --preset minivla --modes full,frozen_vision --warmup 3 --steps 10
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  ;;
*)
  echo "usage: bash scripts/gpu_session.sh prepare|run" >&2
  exit 2
  ;;
esac

#!/usr/bin/env bash
# Launch vla-train with torchrun: every process runs the unchanged `vla-train` entry point, which reads
# RANK / WORLD_SIZE / LOCAL_RANK, validates the config for that world size and then joins the group.
#
# One machine:   scripts/launch_torchrun.sh --config_path configs/finetune_lora.yaml --logging.run_id x
#                NPROC_PER_NODE=2 scripts/launch_torchrun.sh ...        (default: one per GPU, else 1)
# Several:       NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<host of node 0> [MASTER_PORT=29500] \
#                    scripts/launch_torchrun.sh ...                     (run on every node)
# Choose the parallelism in the config or on the command line: --distributed.strategy ddp|fsdp.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=gpu
  else
    NPROC_PER_NODE=1
  fi
fi
NNODES="${NNODES:-1}"

# SIGUSR1 is forwarded too (SLURM's --signal warning): the trainer checkpoints at the next step boundary
# and exits; workers get SHUTDOWN_TIMEOUT seconds for that before torchrun kills them.
COMMON=(--nproc_per_node "$NPROC_PER_NODE"
        --signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
        --shutdown_timeout "${SHUTDOWN_TIMEOUT:-300}")
if [[ "$NNODES" == "1" ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone "${COMMON[@]}" -m vla_train.cli "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 for a multi-node launch}"
exec "$PYTHON" -m torch.distributed.run "${COMMON[@]}" \
  --nnodes "$NNODES" \
  --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}" \
  --rdzv_backend c10d \
  --rdzv_id "${RDZV_ID:-vla_train}" \
  --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  -m vla_train.cli "$@"

#!/usr/bin/env bash
# All GPUs of one machine (or N CPU processes with gloo): examples/distributed/single_node.sh --config configs/medium.yaml
set -euo pipefail
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
exec torchrun --standalone --nproc-per-node="${NPROC}" --max-restarts="${MAX_RESTARTS:-2}" -m harken.cli train "$@"

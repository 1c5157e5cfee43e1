#!/usr/bin/env bash
# Multi-node harken training with torchrun and c10d rendezvous. Run the SAME command on every node.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_HOST=node0.cluster RDZV_ID=conformer-ls100 \
#       examples/distributed/torchrun_multinode.sh --config configs/medium.yaml train.exp_dir=/shared/exp/ls100
#
# - c10d rendezvous: the first node to reach RDZV_HOST:RDZV_PORT hosts the store; the others join.
#   Any node can be RDZV_HOST (it must be reachable from all nodes on RDZV_PORT).
# - --max-restarts: when a worker dies (OOM, ECC error, kill -9), torchrun stops the group, restarts
#   every worker, and `harken train` resumes from the newest checkpoint in train.exp_dir (which must
#   be on shared storage: NFS, Lustre, CephFS). Use NNODES=MIN:MAX for elastic membership.
# - train.exp_dir and the data manifests must be at the same path on every node.
set -euo pipefail
NNODES=${NNODES:-2}
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST to a host name all nodes can reach}
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-harken-$(date +%Y%m%d)}
MAX_RESTARTS=${MAX_RESTARTS:-3}

# NCCL over InfiniBand; see docs/distributed.md for the meaning of each setting
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

exec torchrun \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" \
  -m harken.cli train "$@" train.dist_timeout_s=1800

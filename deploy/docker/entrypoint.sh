#!/bin/sh
# harken container entrypoint: size the thread pools to the CPU quota of the container, then run the
# command (CMD: harken serve ...; or harken train ..., torchrun ...).
#
# The quota is cgroup v2 cpu.max ("QUOTA PERIOD" or "max PERIOD"), else cgroup v1 cfs_quota/cfs_period,
# floored (1.5 CPUs -> 1 thread, never 0) and capped by the CPUs this process may run on (nproc).
# HARKEN_THREADS overrides it. Exported: HARKEN_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS,
# OPENBLAS_NUM_THREADS, ORT_INTRA_OP_NUM_THREADS (each kept when already set). torch reads OMP_NUM_THREADS;
# harken serve sizes onnxruntime's intra-op pool from the same quota (num_threads: 0).
set -eu

cpu_max=${HARKEN_CPU_MAX_FILE:-/sys/fs/cgroup/cpu.max}
cfs_quota=${HARKEN_CFS_QUOTA_FILE:-/sys/fs/cgroup/cpu/cpu.cfs_quota_us}
cfs_period=${HARKEN_CFS_PERIOD_FILE:-/sys/fs/cgroup/cpu/cpu.cfs_period_us}

quota_cpus() {
  if [ -r "$cpu_max" ]; then
    read -r q p < "$cpu_max" || true
  elif [ -r "$cfs_quota" ] && [ -r "$cfs_period" ]; then
    q=$(cat "$cfs_quota"); p=$(cat "$cfs_period")
    [ "$q" -lt 0 ] 2>/dev/null && q=max
  else
    q=max; p=100000
  fi
  case "${q:-max}" in
    max|"") echo 0 ;;
    *[!0-9]*) echo 0 ;;
    *) n=$((q / ${p:-100000})); [ "$n" -lt 1 ] && n=1; echo "$n" ;;
  esac
}

if [ -z "${HARKEN_THREADS:-}" ]; then
  cpus=$(nproc 2>/dev/null || echo 1)
  quota=$(quota_cpus)
  if [ "$quota" -gt 0 ] && [ "$quota" -lt "$cpus" ]; then cpus=$quota; fi
  HARKEN_THREADS=$cpus
fi
export HARKEN_THREADS
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$HARKEN_THREADS}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$HARKEN_THREADS}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$HARKEN_THREADS}"
export ORT_INTRA_OP_NUM_THREADS="${ORT_INTRA_OP_NUM_THREADS:-$HARKEN_THREADS}"

if [ $# -eq 0 ]; then
  set -- harken serve --model /models/model.onnx --config /etc/harken/serve.yaml
fi
exec "$@"

"""Helpers shared by the benchmarks: SGEMM probe, medians, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def sgemm_gflops(n: int = 2048, reps: int = 3) -> float:
    """fp32 GEMM rate of this machine at the current thread count (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sgemm_gflops_median(n: int = 2048, bursts: int = 5) -> float:
    """fp32 GEMM rate as the median of ``bursts`` timed GEMMs (not best-of: on a shared host the
    best burst overstates the rate the timed work actually had)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = []
    for _ in range(bursts):
        t = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def median(xs):
    return statistics.median(xs)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def emit(name: str, result: dict) -> None:
    print("RESULT " + json.dumps({"bench": name, **machine(), **result}))

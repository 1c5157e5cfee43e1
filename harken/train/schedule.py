"""Learning-rate schedules as multipliers of the peak rate (for ``LambdaLR``)."""

from __future__ import annotations

import math


def lr_factor(step: int, schedule: str, warmup: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (step 0 is the first update).

    noam:     linear warmup to 1 at ``warmup``, then decays as sqrt(warmup / step)
    cosine:   linear warmup, then half a cosine from 1 down to ``min_ratio`` at ``max_steps``
    constant: linear warmup, then 1
    """
    s = step + 1
    warm = min(1.0, s / warmup) if warmup > 0 else 1.0
    if s <= warmup or schedule == "constant":
        return warm
    if schedule == "noam":
        return math.sqrt(warmup / s) if warmup > 0 else 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup)
        t = min(1.0, (s - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule '{schedule}' (noam, cosine, constant)")

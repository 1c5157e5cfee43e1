"""Learning-rate schedules as multipliers of the peak rate (for ``LambdaLR``), and the clock that
says how far through its budget a run is.

The schedule's position is a *progress fraction* in [0, 1], not a step count, so a run whose end is
set by a wall-clock budget (``train.max_minutes``) still anneals fully: with
``optim.schedule_clock=progress`` the position is ``max(step / max_steps, minutes / max_minutes)``,
so a slow host that reaches the time cap before ``max_steps`` ends the cosine at its floor all the
same, and a fast host that reaches ``max_steps`` first is scheduled by steps exactly as before.
Warmup stays in steps (it protects the first updates of a fresh model, whatever the host's speed).
"""

from __future__ import annotations

import math

CLOCKS = ("steps", "progress")


def run_progress(step: int, max_steps: int, minutes: float = 0.0, max_minutes: float | None = None,
                 clock: str = "progress") -> tuple[float, str]:
    """(position in [0, 1], which clock sets it: ``"steps"`` or ``"time"``) after ``step`` optimizer
    steps and ``minutes`` of the run's wall-clock budget. ``clock="steps"`` ignores the time."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown schedule clock '{clock}' ({', '.join(CLOCKS)})")
    by_steps = min(1.0, max(0.0, step / max(1, max_steps)))
    if clock == "steps" or not max_minutes:
        return by_steps, "steps"
    by_time = min(1.0, max(0.0, minutes / max_minutes))
    return (by_time, "time") if by_time > by_steps else (by_steps, "steps")


def lr_factor(step: int, schedule: str, warmup: int, max_steps: int, min_ratio: float = 0.0,
              progress: float | None = None) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (step 0 is the first update).

    ``progress``: the run's position in [0, 1] (see :func:`run_progress`); None means by steps,
    ``(step + 1) / max_steps``, which is the plain step schedule.

    noam:     linear warmup to 1 at ``warmup`` steps, then decays as sqrt(warmup / step) (it has no
              end, so it ignores ``progress``)
    cosine:   linear warmup, then half a cosine from 1 down to ``min_ratio`` at progress 1; the
              cosine starts at progress ``warmup / max_steps``. When the time clock runs ahead of
              the steps during warmup (a very slow host), the factor is warmup x cosine: continuous,
              and still ``min_ratio`` at the end
    constant: linear warmup, then 1
    """
    s = step + 1
    warm = min(1.0, s / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "noam":
        if s <= warmup:
            return warm
        return math.sqrt(warmup / s) if warmup > 0 else 1.0
    if schedule == "cosine":
        if progress is None:  # by steps: exactly the plain step schedule
            t = (s - warmup) / max(1, max_steps - warmup)
        else:
            p0 = warmup / max(1, max_steps)  # the progress at which the cosine starts
            t = (float(progress) - p0) / (1.0 - p0) if p0 < 1 else float(progress >= 1 or s > warmup)
        t = min(1.0, max(0.0, t))
        return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"unknown lr schedule '{schedule}' (noam, cosine, constant)")

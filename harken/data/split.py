"""Deterministic train/dev/test splits of a manifest (``harken split``).

``by="speaker"`` puts all of a speaker's utterances in one split, so dev and test measure voices
the model never heard; ``by="random"`` splits utterances, keeping those cut from one audio file
(segments) together so no recording leaks across splits. The result depends only on the records,
the fractions and the seed: units are sorted before a seeded shuffle, so the order of the
manifest's lines does not matter, and each split is written sorted by id.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from harken.data.manifest import ManifestError, Record

SPLITS = ("train", "dev", "test")


def _check_fractions(dev: float, test: float) -> None:
    for name, f in (("--dev", dev), ("--test", test)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {f}")
    if dev + test >= 1.0:
        raise ValueError(f"--dev {dev} + --test {test} leaves nothing to train on; their sum must be below 1")


def split_records(records: Sequence[Record], dev: float = 0.1, test: float = 0.1, by: str = "speaker",
                  seed: int = 0) -> dict[str, list[Record]]:
    """``{"train": [...], "dev": [...], "test": [...]}``. ``dev`` and ``test`` are fractions of
    the utterances (0 leaves that split empty); units (speakers, or audio files for ``random``)
    are taken in a seeded random order, each added to test, then dev, while that brings the split
    closer to its share, so a split with a non-zero fraction gets at least one unit and train
    keeps at least one. Too few units for the splits asked for, or records without a speaker for
    ``by="speaker"``, raise :class:`ManifestError` saying what to do instead."""
    _check_fractions(dev, test)
    if by not in ("speaker", "random"):
        raise ValueError(f"--by must be 'speaker' or 'random', got {by!r}")
    if not records:
        raise ManifestError("the manifest has no records to split")
    if by == "speaker":
        missing = [r.id for r in records if not r.speaker]
        if missing:
            raise ManifestError(f"--by speaker: {len(missing)} of {len(records)} records have no speaker "
                                f"(e.g. '{missing[0]}'); give every record one, or split with --by random")
    units: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        units[r.speaker if by == "speaker" else r.audio].append(r)
    keys = sorted(units)
    random.Random(seed).shuffle(keys)
    wanted = [(name, f) for name, f in (("test", test), ("dev", dev)) if f > 0]
    if len(keys) < len(wanted) + 1:
        names = ["train"] + [n for n, _ in reversed(wanted)]
        if by == "speaker":
            shown = ", ".join(sorted(units)[:5]) + (", ..." if len(units) > 5 else "")
            raise ManifestError(f"--by speaker: {len(keys)} speaker(s) ({shown}) cannot fill {len(names)} splits "
                                f"({'/'.join(names)}), each needs speakers of its own; split with --by random, "
                                f"or ask for fewer splits (--dev 0 or --test 0)")
        raise ManifestError(f"--by random: {len(keys)} audio file(s) cannot fill {len(names)} splits "
                            f"({'/'.join(names)}); ask for fewer splits (--dev 0 or --test 0)")
    n = len(records)
    remaining = list(keys)
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for i, (name, frac) in enumerate(wanted):
        target = frac * n
        later = len(wanted) - i  # splits still to fill after this one, train included
        chosen: list[str] = []
        count = 0
        for k in remaining:
            if len(remaining) - len(chosen) <= later:
                break
            size = len(units[k])
            if not chosen or abs(count + size - target) < abs(count - target):
                chosen.append(k)
                count += size
        taken = set(chosen)
        remaining = [k for k in remaining if k not in taken]
        out[name] = [r for k in chosen for r in units[k]]
    out["train"] = [r for k in remaining for r in units[k]]
    for name in SPLITS:
        out[name].sort(key=lambda r: r.id)
    return out


def split_table(parts: dict[str, list[Record]]) -> str:
    """Counts, speakers and hours per split, as a small text table."""
    lines = [f"{'split':<6} {'utts':>7} {'speakers':>9} {'hours':>8} {'minutes':>8}"]
    for name in SPLITS:
        recs = parts.get(name, [])
        secs = sum(r.duration for r in recs)
        spk = len({r.speaker for r in recs if r.speaker})
        lines.append(f"{name:<6} {len(recs):>7} {spk:>9} {secs / 3600:>8.3f} {secs / 60:>8.1f}")
    return "\n".join(lines)

"""Checkpoints: written to a temporary name, flushed, then renamed, so a crash never leaves a half
file under a real name; found again by step number."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


def atomic_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX filesystems, NFS and Lustre included
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (temporary files never match the name pattern)."""
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        try:
            torch.load(p, map_location="cpu", weights_only=False, mmap=True)
            return p
        except Exception:  # a file damaged after the rename (disk full, bit rot): skip it, loudly
            import logging

            logging.getLogger("harken").warning("skipping unreadable checkpoint %s", p)
    return None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last: int, protect: set[int] = frozenset()) -> None:
    cks = list_checkpoints(ckpt_dir)
    for step, p in cks[: max(0, len(cks) - keep_last)]:
        if step not in protect:
            p.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable harken checkpoint ({e})") from None


def average_checkpoints(paths: list[Path]) -> dict:
    """Element-wise mean of the float tensors of several checkpoints' models (integer buffers such
    as BatchNorm counters are taken from the last)."""
    avg: dict | None = None
    for p in paths:
        sd = load_checkpoint(p)["model"]
        if avg is None:
            avg = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                if v.is_floating_point():
                    avg[k] += v.double()
                else:
                    avg[k] = v.clone()
    assert avg is not None
    ref = load_checkpoint(paths[-1])["model"]
    return {k: (v / len(paths)).to(ref[k].dtype) if v.is_floating_point() else v for k, v in avg.items()}

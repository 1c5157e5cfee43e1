"""Checkpoints: written to a temporary name, flushed, then renamed, so a crash never leaves a half
file under a real name; found again by step number.

Why this is safe on shared storage (NFS, Lustre, CephFS) too:

- the temporary file lives in the *same directory* as the final name, so ``os.replace`` is a rename
  within one directory of one file system: a single metadata operation that POSIX, NFSv3/v4 (the
  server performs RENAME atomically) and Lustre (one MDS operation) make atomic. Readers see either
  the old file or the complete new one, never a mix; a temp file in /tmp would make the rename a
  cross-device copy, which is not atomic;
- the data is ``fsync``-ed before the rename. On NFS, close/fsync flushes the client's dirty pages to
  the server (close-to-open consistency), so a reader on another node that opens the new name after
  the rename sees the whole content; without it a rename could reach the server before the data;
- the directory is ``fsync``-ed after the rename, so the new name survives a crash of the writer's
  node (on NFS the rename is already synchronous on the server; the fsync is cheap);
- the temporary name carries host name and pid: two writers (two nodes, or a restarted job and a
  zombie) never write into the same temporary file, and temp names never match ``CKPT_RE``, so a
  save killed halfway leaves only a ``.step-*.tmp*`` file that readers ignore and
  ``remove_stale_temps`` deletes at the next start.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import torch

from harken.fsutil import TMP_RE, atomic_open  # noqa: F401 (TMP_RE: re-exported)
from harken.fsutil import remove_stale_temps as _remove_stale_temps

CKPT_RE = re.compile(r"^step-(\d+)\.pt$")
log = logging.getLogger("harken")


def atomic_save(obj, path: str | os.PathLike, *, _kill_before_rename: bool = False) -> None:
    """``torch.save`` to ``path`` atomically (:func:`harken.fsutil.atomic_open`: temp file in the
    same directory, fsync, rename, fsync dir).

    ``_kill_before_rename`` is a testing hook: the process SIGKILLs itself after the temporary file
    is complete and before the rename (a crash at the worst moment)."""
    hook = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if _kill_before_rename else None
    with atomic_open(path, "wb", _before_rename=hook) as f:
        torch.save(obj, f)


def remove_stale_temps(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by saves that were killed (call only while nobody is saving)."""
    return _remove_stale_temps(ckpt_dir)


def wait_for_file(path: str | os.PathLike, timeout_s: float = 30.0) -> Path:
    """``path`` once it is visible. Another node's fresh file can be hidden for a few seconds by
    NFS attribute/negative-lookup caches; after ``timeout_s`` the error says what is wrong."""
    path = Path(path)
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout_s:
            raise FileNotFoundError(
                f"{path} (chosen by rank 0) is not visible on {socket.gethostname()} after {timeout_s:.0f} s: "
                "train.exp_dir must be on storage shared by all nodes (NFS, Lustre, CephFS)")
        time.sleep(0.5)
        try:  # re-listing the directory refreshes NFS's cached view of it
            os.listdir(path.parent)
        except OSError:
            pass
    return path


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
            log.warning("skipping unreadable checkpoint %s", p)
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

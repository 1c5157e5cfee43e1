"""Atomic file writes: the one helper every writer in harken uses.

    with atomic_open("out/manifest.jsonl", "w") as f:   # text or binary
        f.write(...)
    atomic_write_text(path, text); atomic_write_bytes(path, data)

The data goes to a temporary file in the *same directory* (``.<name>.tmp-<host>-<pid>``; hidden,
never matching the final name), is flushed and ``fsync``-ed, then renamed over the final name with
``os.replace`` (one atomic metadata operation on a local file system, NFS and Lustre), and the
directory is ``fsync``-ed so the rename survives a crash. Readers see the old file or the whole
new one, never a part. An exception leaves no temporary file behind; a SIGKILL can, and
:func:`remove_stale_temps` clears those (``TMP_RE`` matches them).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_bytes", "temp_name", "TMP_RE", "remove_stale_temps",
           "fsync_dir"]

TMP_RE = re.compile(r"^\..+\.tmp-[-.\w]*$")


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary name a write to ``path`` uses (same directory; host and pid in it, so two
    writers never share one)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_dir(d: str | os.PathLike) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", fsync: bool = True,
                _before_rename=None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w" or "wb"); on a clean exit
    it replaces ``path`` atomically. ``_before_rename``: a testing hook called between the
    complete temporary file and the rename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(p)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if _before_rename is not None:
            _before_rename()
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(p.parent)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def remove_stale_temps(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Delete temporary files that killed writes left in ``folder`` (call only while nobody writes)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    gone = [p for p in d.glob(pattern) if TMP_RE.match(p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone

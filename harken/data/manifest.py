"""JSONL manifests: one utterance per line.

A record names an audio file (optionally a segment of it by offset and duration), its transcript, its
speaker and a free-form ``group`` (accent, dialect, voice family) used for balanced sampling.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator

from harken.fsutil import atomic_open


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file, the line and the field."""


@dataclass
class Record:
    id: str
    audio: str  # path to the audio file; relative paths are resolved against the manifest's folder
    duration: float  # seconds of the segment
    text: str = ""
    offset: float = 0.0  # seconds into the file where the segment starts
    speaker: str = ""
    group: str = ""
    extra: dict = field(default_factory=dict)  # anything else an importer wants to keep

    def to_json(self) -> str:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return json.dumps(d, ensure_ascii=False)


_FIELDS = {f.name for f in fields(Record)}
_REQUIRED = ("id", "audio", "duration")


def _parse(line: str, path: str, lineno: int, base: Path | None) -> Record:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(d).__name__}")
    for k in _REQUIRED:
        if k not in d:
            raise ManifestError(f"{path}:{lineno}: missing required field '{k}'")
    extra = dict(d.pop("extra", {}) or {})
    for k in list(d):
        if k not in _FIELDS:
            extra[k] = d.pop(k)
    try:
        d["duration"] = float(d["duration"])
        d["offset"] = float(d.get("offset", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}:{lineno}: 'duration' and 'offset' must be numbers") from None
    if d["duration"] <= 0:
        raise ManifestError(f"{path}:{lineno}: 'duration' must be > 0, got {d['duration']}")
    d["id"] = str(d["id"])
    d["text"] = str(d.get("text", "") or "")
    audio = str(d["audio"])
    if base is not None and not os.path.isabs(audio) and "://" not in audio:
        audio = str(base / audio)
    d["audio"] = audio
    return Record(extra=extra, **d)


def iter_manifest(path: str | os.PathLike, resolve: bool = True) -> Iterator[Record]:
    """Yield records of a JSONL manifest; blank lines are skipped."""
    path = str(path)
    base = Path(path).resolve().parent if resolve else None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield _parse(line, path, lineno, base)


def read_manifest(path: str | os.PathLike, resolve: bool = True) -> list[Record]:
    if not os.path.exists(path):
        raise ManifestError(f"manifest not found: {path}")
    records = list(iter_manifest(path, resolve=resolve))
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ManifestError(f"{path}: duplicate id '{r.id}'")
        seen.add(r.id)
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[Record], relative_to: str | None = None) -> int:
    """Write records atomically (temp file + rename). With ``relative_to`` audio paths are made
    relative to that folder, so a corpus folder can be moved as a whole."""
    path = Path(path)
    n = 0
    with atomic_open(path, "w", fsync=False) as f:
        for r in records:
            if relative_to is not None and os.path.isabs(r.audio):
                r = Record(**{**asdict(r), "audio": os.path.relpath(r.audio, relative_to)})
            f.write(r.to_json() + "\n")
            n += 1
    return n

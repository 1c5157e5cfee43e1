"""Transcript output formats: plain text, JSON, SRT and WebVTT subtitles.

Subtitle cues are built from word times: words are added to a cue until it would exceed
``max_chars`` per line on ``max_lines`` lines (lines broken at word boundaries), last longer than
``max_duration`` seconds, or follow a pause of more than ``max_gap`` seconds; cues never cross a
segment boundary. A transcript without word times falls back to its segments (or the whole file),
with words spread evenly over them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Sequence

from harken.recognizer import Transcript, Word

FORMATS = ("text", "json", "srt", "vtt")
EXTENSIONS = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}

__all__ = ["FORMATS", "Cue", "make_cues", "wrap_lines", "format_timestamp", "to_text", "to_json",
           "to_srt", "to_vtt", "render", "write_transcripts"]


@dataclass
class Cue:
    start: float
    end: float
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def format_timestamp(seconds: float, sep: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT, ``sep=","``) or ``HH:MM:SS.mmm`` (WebVTT, ``sep="."``)."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def wrap_lines(words: Sequence[str], max_chars: int = 42, max_lines: int = 2) -> list[str] | None:
    """Break ``words`` into at most ``max_lines`` lines of at most ``max_chars`` characters, as
    balanced as possible; None when they do not fit (a single word longer than ``max_chars`` is
    allowed on a line of its own)."""
    if not words:
        return []
    text = " ".join(words)
    if len(text) <= max_chars or len(words) == 1:
        return [text]
    if max_lines < 2:
        return None
    best = None
    for k in range(1, len(words)):  # two lines, split before word k
        a, b = " ".join(words[:k]), " ".join(words[k:])
        if len(a) <= max_chars and len(b) <= max_chars:
            score = abs(len(a) - len(b))
            if best is None or score < best[0]:
                best = (score, [a, b])
    if best is not None:
        return best[1]
    if max_lines > 2:
        for k in range(1, len(words)):
            a = " ".join(words[:k])
            if len(a) <= max_chars:
                rest = wrap_lines(words[k:], max_chars, max_lines - 1)
                if rest is not None:
                    return [a] + rest
    return None


def _spread(text: str, start: float, end: float) -> list[Word]:
    ws = text.split()
    if not ws:
        return []
    step = max(0.0, end - start) / len(ws)
    return [Word(w, start + i * step, start + (i + 1) * step, 0.0) for i, w in enumerate(ws)]


def _word_groups(t: Transcript) -> list[list[Word]]:
    """Words per segment (segments never share a cue)."""
    if t.segments:
        out = []
        for g in t.segments:
            out.append(list(g.words) if g.words or not g.text else _spread(g.text, g.start, g.end))
        return out
    if t.words:
        return [list(t.words)]
    return [_spread(t.text, 0.0, t.duration)]


def make_cues(t: Transcript, max_chars: int = 42, max_lines: int = 2, max_duration: float = 7.0,
              max_gap: float = 1.5) -> list[Cue]:
    cues: list[Cue] = []
    for words in _word_groups(t):
        cur: list[Word] = []
        for w in words:
            if cur:
                cand = [x.word for x in cur] + [w.word]
                fits = wrap_lines(cand, max_chars, max_lines) is not None
                if (not fits or w.end - cur[0].start > max_duration or w.start - cur[-1].end > max_gap):
                    cues.append(_cue(cur, max_chars, max_lines))
                    cur = []
            cur.append(w)
        if cur:
            cues.append(_cue(cur, max_chars, max_lines))
    # no overlaps, strictly increasing
    for a, b in zip(cues, cues[1:]):
        if a.end > b.start:
            a.end = b.start
    return [c for c in cues if c.end > c.start or c.lines]


def _cue(words: list[Word], max_chars: int, max_lines: int) -> Cue:
    lines = wrap_lines([w.word for w in words], max_chars, max_lines) or [" ".join(w.word for w in words)]
    end = max(words[-1].end, words[0].start + 0.001)
    return Cue(words[0].start, end, lines)


def to_text(t: Transcript) -> str:
    return t.text + "\n"


def to_json(t: Transcript, indent: int | None = None) -> str:
    return json.dumps(t.as_dict(), ensure_ascii=False, indent=indent) + "\n"


def to_srt(t: Transcript, **kw) -> str:
    parts = []
    for i, c in enumerate(make_cues(t, **kw), 1):
        span = f"{format_timestamp(c.start, ',')} --> {format_timestamp(c.end, ',')}"
        parts.append(f"{i}\n{span}\n{c.text}\n")
    return "\n".join(parts)


def to_vtt(t: Transcript, **kw) -> str:
    parts = ["WEBVTT\n"]
    for c in make_cues(t, **kw):
        parts.append(f"{format_timestamp(c.start, '.')} --> {format_timestamp(c.end, '.')}\n{c.text}\n")
    return "\n".join(parts)


def render(t: Transcript, fmt: str, **kw) -> str:
    if fmt == "text":
        return to_text(t)
    if fmt == "json":
        return to_json(t)
    if fmt == "srt":
        return to_srt(t, **kw)
    if fmt == "vtt":
        return to_vtt(t, **kw)
    raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")


def write_transcripts(results: Iterable[Transcript], fmt: str = "text",
                      out: str | os.PathLike | IO[str] | None = None) -> list[str]:
    """Write transcripts in ``fmt`` (text | json | srt | vtt).

    ``out``: None or "-" for stdout, an open text stream, or a directory, which gets one file per
    transcript named after its source (``a.wav`` -> ``a.srt``; sources without a name get
    ``transcript-<n>``; clashing names get a numeric suffix). On a stream, "text" writes
    ``source<TAB>text`` lines and "json" one JSON object per line (JSON Lines); SRT/VTT documents
    are just separated by a blank line (so a stream is valid SRT/VTT only for one transcript).
    Returns the paths written (empty for a stream)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    if out is None or out == "-" or hasattr(out, "write"):
        stream = sys.stdout if out is None or out == "-" else out
        for i, t in enumerate(results):
            if fmt == "text":
                stream.write(f"{t.source}\t{t.text}\n" if t.source else f"{t.text}\n")
            elif fmt == "json":
                stream.write(to_json(t))
            else:
                if i:
                    stream.write("\n")
                stream.write(render(t, fmt))
            stream.flush()
        return []
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    used: set[str] = set()
    for i, t in enumerate(results):
        stem = Path(t.source).stem if t.source and not t.source.startswith("<") else f"transcript-{i}"
        name, k = stem, 1
        while name in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        p = d / (name + EXTENSIONS[fmt])
        p.write_text(render(t, fmt), encoding="utf-8")
        written.append(str(p))
    return written

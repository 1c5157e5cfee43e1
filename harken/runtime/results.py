"""Result types of the inference API: words, segments and transcripts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aac", ".webm")


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float
    confidence: float


def _word_dict(w: Word) -> dict:
    return {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
            "confidence": round(w.confidence, 4)}


@dataclass
class Segment:
    """A piece of a long recording (times in seconds from the start of the file)."""

    id: int
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0  # mean of per-token posteriors on the greedy path

    def as_dict(self, words: bool = True) -> dict:
        d = {"id": self.id, "start": round(self.start, 3), "end": round(self.end, 3), "text": self.text,
             "confidence": round(self.confidence, 4)}
        if words:
            d["words"] = [_word_dict(w) for w in self.words]
        return d


@dataclass
class Transcript:
    text: str
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0  # mean of per-token posteriors on the greedy path
    duration: float = 0.0
    source: str = ""
    segments: list[Segment] = field(default_factory=list)  # long files; empty = one segment
    # seconds spent on this input by stage: audio_decode, frontend_encoder (its share of the batch
    # forward), decoder, alignment; plus batch_size and padding of the batch it rode in
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        segs = self.segments or [Segment(0, 0.0, self.duration, self.text, self.words, self.confidence)]
        return {"source": self.source, "text": self.text, "duration": round(self.duration, 3),
                "confidence": round(self.confidence, 4),
                "segments": [g.as_dict(words=False) for g in segs],
                "words": [_word_dict(w) for w in self.words]}

    @classmethod
    def from_segments(cls, segments: Iterable[Segment], source: str = "",
                      duration: float | None = None) -> "Transcript":
        """Join the segments of a long file into one transcript (words keep their file times)."""
        segs = list(segments)
        words = [w for g in segs for w in g.words]
        n = sum(max(1, len(g.words)) for g in segs)
        conf = sum(g.confidence * max(1, len(g.words)) for g in segs) / n if segs else 0.0
        dur = duration if duration is not None else (segs[-1].end if segs else 0.0)
        return cls(text=" ".join(g.text for g in segs if g.text), words=words, confidence=conf,
                   duration=dur, source=source, segments=segs)


def find_audio(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders (recursively) into the audio files they hold; keep files as given."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTS))
        else:
            out.append(str(p))
    return out



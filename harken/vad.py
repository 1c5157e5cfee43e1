"""Voice activity detection and segmentation of long audio into pieces of at most ``max_segment``
seconds, cut at pauses, in a streaming fashion (bounded memory, any file length).

Detectors (10 ms frames at 16 kHz, one bool per frame):

* :class:`EnergyVad` - frame log-energy against an adaptive noise floor (the minimum of the
  frame energies over the last ``floor_window`` seconds, i.e. minimum statistics) plus
  ``margin_db``, and above an absolute ``min_level_db`` (the floor starts at
  ``initial_floor_db``); a frame is speech after ``hangover``
  seconds of any speech frame (so short dips inside words do not split them).
* :class:`WebRtcVad` - Google's WebRTC VAD from the optional ``webrtcvad`` module (PyPI:
  ``webrtcvad-wheels``), with the same hangover. Not required.

:class:`Segmenter` turns frame decisions into segments: a segment starts ``pad`` seconds before
the first speech frame, ends ``pad`` after the last speech frame before a pause of at least
``min_silence`` seconds, and is cut before it grows past ``max_segment`` - at the longest pause
inside it if it has one of at least ``min_split_silence``, else at its quietest frame in the
second half (a forced split). Segments with less than ``min_speech`` seconds of speech frames
(before the hangover) are dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

SAMPLE_RATE = 16000
FRAME = 160  # 10 ms

__all__ = ["EnergyVad", "WebRtcVad", "make_vad", "Segmenter", "segment_stream", "webrtcvad_available",
           "frame_energy_db"]


def frame_energy_db(samples: np.ndarray) -> np.ndarray:
    """dBFS RMS of consecutive 10 ms frames (a trailing partial frame is ignored)."""
    n = len(samples) // FRAME
    fr = np.asarray(samples[: n * FRAME], dtype=np.float64).reshape(n, FRAME)
    return 10.0 * np.log10(np.mean(fr * fr, axis=1) + 1e-10)


class _Hangover:
    def __init__(self, frames: int):
        self.frames = max(0, int(frames))
        self.left = 0

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        out = np.empty(len(raw), dtype=bool)
        left = self.left
        for i, r in enumerate(raw):
            if r:
                left = self.frames
                out[i] = True
            elif left > 0:
                left -= 1
                out[i] = True
            else:
                out[i] = False
        self.left = left
        return out


class EnergyVad:
    """Streaming energy VAD; call :meth:`__call__` with consecutive blocks of 16 kHz samples (any
    length); returns the decisions of the frames completed by that block."""

    def __init__(self, margin_db: float = 12.0, min_level_db: float = -55.0, floor_window: float = 3.0,
                 hangover: float = 0.15, initial_floor_db: float = -60.0):
        self.margin_db = float(margin_db)
        self.min_level_db = float(min_level_db)
        self.hang = _Hangover(round(hangover * 100))
        self._chunk = 25  # frames per minimum-statistics chunk (0.25 s)
        self._mins: deque[float] = deque(maxlen=max(1, round(floor_window * 100 / self._chunk)))
        # a prior for the floor until the first window has been seen, so that a file starting with
        # speech is not taken for noise; it ages out of the window like any other chunk
        self._mins.append(float(initial_floor_db))
        self._cur_min = np.inf
        self._cur_n = 0
        self._rest = np.zeros(0, np.float32)
        self.last_energy = np.zeros(0)  # energies of the frames returned by the last call
        self.last_raw = np.zeros(0, bool)  # their decisions before the hangover

    def _floor(self) -> float:
        vals = list(self._mins) + ([self._cur_min] if self._cur_n else [])
        return min(vals) if vals else -np.inf

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = np.concatenate([self._rest, np.asarray(block, np.float32)]) if len(self._rest) else \
            np.asarray(block, np.float32)
        n = len(x) // FRAME
        self._rest = x[n * FRAME:].copy()
        db = frame_energy_db(x[: n * FRAME])
        raw = np.empty(n, dtype=bool)
        for i, e in enumerate(db):
            self._cur_min = min(self._cur_min, e)
            self._cur_n += 1
            if self._cur_n == self._chunk:
                self._mins.append(self._cur_min)
                self._cur_min, self._cur_n = np.inf, 0
            raw[i] = e > self._floor() + self.margin_db and e > self.min_level_db
        self.last_energy, self.last_raw = db, raw
        return self.hang(raw)


def webrtcvad_available() -> bool:
    try:
        import webrtcvad  # noqa: F401

        return True
    except ImportError:
        return False


class WebRtcVad:
    """The WebRTC VAD (optional ``webrtcvad`` module) on 10 ms frames, with hangover."""

    def __init__(self, aggressiveness: int = 2, hangover: float = 0.15):
        import webrtcvad

        self.vad = webrtcvad.Vad(int(aggressiveness))
        self.hang = _Hangover(round(hangover * 100))
        self._rest = np.zeros(0, np.float32)
        self.last_energy = np.zeros(0)
        self.last_raw = np.zeros(0, bool)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = np.concatenate([self._rest, np.asarray(block, np.float32)])
        n = len(x) // FRAME
        self._rest = x[n * FRAME:].copy()
        pcm = (np.clip(x[: n * FRAME], -1, 1) * 32767).astype("<i2")
        raw = np.array([self.vad.is_speech(pcm[i * FRAME:(i + 1) * FRAME].tobytes(), SAMPLE_RATE)
                        for i in range(n)], dtype=bool)
        self.last_energy, self.last_raw = frame_energy_db(x[: n * FRAME]), raw
        return self.hang(raw)


def make_vad(kind: str = "energy", **kw):
    """``kind``: "energy", "webrtc" (needs ``webrtcvad``) or "auto" (webrtc when installed)."""
    if kind == "auto":
        kind = "webrtc" if webrtcvad_available() else "energy"
    if kind == "energy":
        return EnergyVad(**kw)
    if kind == "webrtc":
        if not webrtcvad_available():
            raise ImportError("the webrtc VAD needs the webrtcvad module: pip install webrtcvad-wheels")
        return WebRtcVad(**{k: v for k, v in kw.items() if k in ("aggressiveness", "hangover")})
    raise ValueError(f"unknown VAD kind {kind!r} (energy | webrtc | auto)")


@dataclass
class Segmenter:
    """Streaming segmentation. Feed blocks with :meth:`push` (yields finished segments as
    ``(start_sample, samples)``), then call :meth:`flush` at the end of the stream."""

    vad: object = None
    max_segment: float = 20.0
    min_silence: float = 0.5
    min_split_silence: float = 0.1
    min_speech: float = 0.1
    pad: float = 0.2

    def __post_init__(self):
        if self.vad is None:
            self.vad = EnergyVad()
        if self.max_segment < 1.0:
            raise ValueError("max_segment must be at least 1 second")
        self._buf = np.zeros(0, np.float32)  # samples from self._start (always a frame multiple + rest)
        self._start = 0  # absolute sample index of self._buf[0]
        self._speech = np.zeros(0, bool)  # per frame of self._buf (with hangover)
        self._raw = np.zeros(0, bool)  # the same before the hangover
        self._energy = np.zeros(0)
        self._max_f = int(round(self.max_segment * 100))
        self._pad_f = int(round(self.pad * 100))
        self._sil_f = max(1, int(round(self.min_silence * 100)))

    # ------------------------------------------------------------------------------------------
    def push(self, block: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        block = np.asarray(block, np.float32)
        dec = self.vad(block)
        self._buf = np.concatenate([self._buf, block])
        self._speech = np.concatenate([self._speech, dec])
        self._raw = np.concatenate([self._raw, getattr(self.vad, "last_raw", dec)])
        self._energy = np.concatenate([self._energy, self.vad.last_energy])
        yield from self._emit(final=False)

    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._emit(final=True)
        self._buf, self._speech, self._energy = np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0)
        self._raw = np.zeros(0, bool)

    def _drop(self, frames: int) -> None:
        frames = max(0, min(frames, len(self._speech)))
        self._buf = self._buf[frames * FRAME:]
        self._speech = self._speech[frames:]
        self._raw = self._raw[frames:]
        self._energy = self._energy[frames:]
        self._start += frames * FRAME

    def _cut(self, a: int, b: int) -> tuple[int, np.ndarray] | None:
        """Segment of frames [a, b) of the buffer (copied), or None when it has too little speech."""
        if self._raw[a:b].sum() < self.min_speech * 100:
            return None
        end = len(self._buf) if b >= len(self._speech) else b * FRAME
        return self._start + a * FRAME, self._buf[a * FRAME: end].copy()

    def _emit(self, final: bool) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            sp = self._speech
            n = len(sp)
            on = np.flatnonzero(sp)
            if on.size == 0:  # nothing but silence: keep only the padding's worth
                if final:
                    return
                self._drop(n - self._pad_f)
                return
            first = int(on[0])
            if first > self._pad_f:
                self._drop(first - self._pad_f)
                continue
            # look for the end of speech: a silence run of >= min_silence frames after `first`
            seg_end = None
            k = first
            limit = min(n, self._max_f)
            while k < limit:
                if not sp[k]:
                    j = k
                    while j < n and not sp[j]:
                        j += 1
                    if j - k >= self._sil_f or (j == n and final):
                        seg_end = k
                        break
                    if j == n:  # a pause still open at the end of the buffer: wait for more
                        break
                    k = j
                else:
                    k += 1
            if seg_end is not None and seg_end + self._pad_f <= self._max_f:
                b = min(n, seg_end + self._pad_f)
                if b < n or final or n - seg_end >= self._pad_f:
                    yield from self._take(b)
                    continue
                return
            if n >= self._max_f or (final and n > 0):
                if n <= self._max_f:  # final, fits
                    yield from self._take(n)
                    return
                yield from self._take(self._split_point())
                continue
            return

    def _take(self, b: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield the buffer's first ``b`` frames as a segment (if it holds speech), then drop them."""
        seg = self._cut(0, b)
        if seg:
            yield seg
        self._drop(b)

    def _split_point(self) -> int:
        """Where to cut a buffer that holds more than max_segment: inside the longest pause (of at
        least min_split_silence) that ends within max_segment, else at the quietest frame of the
        second half."""
        lo, hi = self._max_f // 2, self._max_f
        sp = self._speech[:hi]
        best, best_len = None, 0
        k = lo
        while k < hi:
            if not sp[k]:
                j = k
                while j < hi and not sp[j]:
                    j += 1
                if j - k > best_len:
                    best, best_len = (k + j) // 2, j - k
                k = j
            else:
                k += 1
        if best is not None and best_len >= self.min_split_silence * 100:
            return best
        e = self._energy[lo:hi]
        # smooth over 50 ms so the cut lands in a dip, not on one quiet frame inside a vowel
        if len(e) >= 5:
            e = np.convolve(e, np.ones(5) / 5, mode="same")
        return lo + int(np.argmin(e))


def segment_stream(blocks: Iterable[np.ndarray], **kw) -> Iterator[tuple[int, np.ndarray]]:
    """Segments ``(start_sample, samples)`` of a stream of 16 kHz float32 blocks; ``kw`` go to
    :class:`Segmenter` (``vad`` may be an instance or a kind for :func:`make_vad`)."""
    vad = kw.pop("vad", None)
    if isinstance(vad, str):
        vad = make_vad(vad)
    seg = Segmenter(vad=vad, **kw)
    for b in blocks:
        yield from seg.push(b)
    yield from seg.flush()

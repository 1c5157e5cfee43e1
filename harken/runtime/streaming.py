"""Streaming (chunk-by-chunk) CTC recognition, WeNet style: one shared model, many sessions.

    sm = StreamingModel.from_torch(model, tokenizer)        # or .from_onnx("stream.onnx") / .from_engine(engine)
    a = sm.new_session(endpoint=EndpointConfig(), word_timestamps=True)
    b = sm.new_session()
    a.accept_waveform(piece_a); b.accept_waveform(piece_b)  # float32 pieces of any size, at sm.sample_rate
    #  (or accept_waveform(piece, sample_rate=48000): another rate, resampled per session)
    for s, results in zip([a, b], sm.step([a, b])):         # ONE batched forward for every ready session
        for r in results:
            send(s.id, r.as_dict())                         # partials, and finals at endpoints
    a.input_finished()                                      # then keep stepping until a.done

:class:`StreamingModel` holds the model (a torch :class:`~harken.models.ctc.CtcModel` in eval mode,
or one onnxruntime session over the graph of :func:`harken.runtime.streaming_onnx.export_streaming_onnx`)
and is shared by all connections; :meth:`StreamingModel.step` is thread-safe (a session is locked
while it is stepped or fed).  :class:`StreamSession` is one connection's state: incremental fbank
(:class:`StreamingFeatures`), attention and convolution caches, its own output-frame offset, the
decoded tokens of the current segment and the segment id.

Geometry: a chunk is ``C`` output frames; it reads ``(C-1)*S + R + 1`` feature frames (``S`` the
subsampling factor, ``R`` its right context: 4 and 6 for conv2d subsampling, so ``4C+3``) and the
next chunk starts ``S*C`` frames later.  The last chunk may be shorter (at least ``R+1`` frames).
Sessions started at different times have caches filled to different depths; in a batch the caches
are left-padded to a common length and the padded slots masked, so a session's log-probs are the
same (up to float rounding) whether it is stepped alone or with others, and equal the offline
forward under the same chunk mask (``encoder(feats, lens, chunk_size=C, left_chunks=L)``).

Endpointing (:class:`EndpointConfig`): after each chunk, a segment that decoded something closes
when its trailing silence (CTC blank frames, and/or low-energy frames) reaches
``trailing_silence_ms``, or when it is ``max_segment_ms`` long; a final result (text, start and end
in seconds from the stream start, words by forced alignment over the segment's log-probs when
asked) is emitted and a new segment (``segment_id + 1``) begins.  The encoder caches are kept across
segments (the audio is continuous).  :meth:`StreamSession.input_finished` flushes the last segment.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from harken.features import Fbank, FbankConfig
from harken.runtime.results import Word

__all__ = ["StreamingFeatures", "StreamingDecoder", "PartialResult", "StreamResult", "StreamingModel",
           "StreamSession", "EndpointConfig", "ChunkGeometry", "TorchChunker", "offline_chunked_log_probs"]


# ------------------------------------------------------------------------------------------ results
@dataclass
class StreamResult:
    """A partial (``is_final=False``) or final result of one session's current segment.

    ``text``/``tokens``: the segment's text so far; ``frames``: output frames decoded in the whole
    stream so far; ``start``/``end``: seconds from the stream start (the segment's first frame, and
    the end of what it covers); ``words``: forced-aligned words (finals, when asked); ``stream_end``:
    the last result of the stream (after :meth:`StreamSession.input_finished`)."""

    text: str
    tokens: list[int] = field(default_factory=list)
    frames: int = 0
    is_final: bool = False
    latency: float = 0.0  # seconds of the step that produced this result
    segment_id: int = 0
    start: float = 0.0
    end: float = 0.0
    words: list[Word] = field(default_factory=list)
    session_id: str = ""
    stream_end: bool = False

    @property
    def type(self) -> str:
        return "final" if self.is_final else "partial"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "session_id": self.session_id, "segment_id": self.segment_id,
                             "text": self.text, "start": round(self.start, 3), "end": round(self.end, 3),
                             "is_final": self.is_final}
        if self.is_final:
            d["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                           "confidence": round(w.confidence, 4)} for w in self.words]
            d["stream_end"] = self.stream_end
        return d


PartialResult = StreamResult  # the name StreamingDecoder used before sessions existed


@dataclass(frozen=True)
class EndpointConfig:
    """When a segment ends.  ``trailing_silence_ms``: silence after decoded speech that closes a
    segment (0: never); ``max_segment_ms``: longest segment (0: unbounded); ``silence``: which
    output frames count as silent: ``"blank"`` (CTC blank is the best symbol), ``"energy"`` (the
    frame's 40 ms of audio is below ``energy_threshold_db`` dBFS), ``"both"`` or ``"either"``.
    A segment that has decoded nothing yet is not emitted: its start moves forward instead."""

    trailing_silence_ms: float = 800.0
    max_segment_ms: float = 20000.0
    silence: str = "blank"
    energy_threshold_db: float = -45.0

    def __post_init__(self):
        if self.silence not in ("blank", "energy", "both", "either"):
            raise ValueError(f"endpoint silence must be blank, energy, both or either, not {self.silence!r}")
        if self.trailing_silence_ms < 0 or self.max_segment_ms < 0:
            raise ValueError("endpoint trailing_silence_ms and max_segment_ms must be >= 0")


@dataclass(frozen=True)
class ChunkGeometry:
    """Chunk sizes of a streaming model (feature frames unless said otherwise)."""

    chunk_size: int  # output frames per chunk
    left_chunks: int  # chunks of left context (-1: all)
    subsampling: int  # feature frames per output frame
    right_context: int  # feature frames an output frame sees after its first

    @property
    def window(self) -> int:
        return (self.chunk_size - 1) * self.subsampling + self.right_context + 1

    @property
    def stride(self) -> int:
        return self.chunk_size * self.subsampling

    @property
    def min_window(self) -> int:
        return self.right_context + 1

    @property
    def cache_frames(self) -> int:
        """Attention cache length kept (-1: unbounded)."""
        return self.left_chunks * self.chunk_size if self.left_chunks >= 0 else -1


# ------------------------------------------------------------------------------------------ features
class StreamingFeatures:
    """Incremental fbank (+ CMVN): :meth:`accept` returns the frames completed by new samples,
    :meth:`finish` the rest; together exactly the frames of the full-utterance
    :class:`harken.features.Fbank` (up to float rounding).

    Audio is buffered raw; fbank frames are computed as soon as their window is complete, with the
    exact sample alignment of the full-utterance fbank (``snip_edges=True``: frame f covers samples
    [f*hop, f*hop+win); ``snip_edges=False``: Kaldi's reflection at the start is applied as soon as
    the first samples arrive, and the reflection at the end once the input is finished).
    ``fbanks``: a ``(full, snip_edges)`` pair of :class:`Fbank` modules to share between sessions."""

    KEEP_ALL = 4  # while fewer than KEEP_ALL windows of audio arrived, keep all of it (tiny inputs)

    def __init__(self, cfg: FbankConfig, cmvn: torch.nn.Module | None = None,
                 fbanks: tuple[Fbank, Fbank] | None = None):
        self.cfg = cfg
        if fbanks is None:
            fbanks = self.make_fbanks(cfg)
        self.full, self.fb = fbanks
        self.cmvn = cmvn
        self.win, self.hop = self.fb.win, self.fb.hop
        self.left = 0 if cfg.snip_edges else self.full.left
        self.reset()

    @staticmethod
    def make_fbanks(cfg: FbankConfig) -> tuple[Fbank, Fbank]:
        return Fbank(cfg).eval(), Fbank(dataclasses.replace(cfg, snip_edges=True)).eval()  # same per-frame maths

    def reset(self) -> None:
        self.ext = np.zeros(0, np.float32)  # extended signal from ext index frames_done * hop
        self.started = self.left == 0
        self.raw_head: list[np.ndarray] | None = []  # all raw audio while it is short
        self.received = 0
        self.frames_done = 0
        self.finished = False

    def _norm(self, feats: torch.Tensor) -> torch.Tensor:
        if self.cmvn is None:
            return feats
        with torch.inference_mode():
            return self.cmvn(feats)

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


# ------------------------------------------------------------------------------------------ backends
def _right_context(encoder) -> int:
    """Feature frames an output frame sees after its first one, from the encoder's own length rule."""
    for t in range(1, 256):
        if int(encoder.output_lengths(torch.tensor([t]))[0]) >= 1:
            return t - 1
    raise ValueError(f"encoder {type(encoder).__name__} gives no output frame for 255 input frames")


class _TorchState:
    __slots__ = ("att", "cnn", "offset")

    def __init__(self, att: torch.Tensor, cnn: torch.Tensor):
        self.att, self.cnn, self.offset = att, cnn, 0


class _TorchStep:
    """Batched chunk step of a torch CtcModel: per-session caches of their own length, left-padded
    and masked in a batch."""

    name = "torch"
    max_batch = 0  # unlimited

    def __init__(self, model, geom: ChunkGeometry):
        self.model = model.eval()
        self.enc = model.encoder
        if not hasattr(self.enc, "forward_chunk"):
            raise ValueError(f"encoder {type(self.enc).__name__} does not support streaming")
        self.geom = geom
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def init_state(self) -> _TorchState:
        att, cnn = self.enc.init_cache(1, self.device, self.dtype)
        return _TorchState(att, cnn)

    @torch.inference_mode()
    def __call__(self, windows: list[torch.Tensor], states: list[_TorchState]) -> list[torch.Tensor]:
        """Normalised feature windows (T_i, F) -> log-probs (C_i, V) each; updates ``states``."""
        b = len(windows)
        geom = self.geom
        tmax = max(w.shape[0] for w in windows)
        x = torch.zeros(b, tmax, windows[0].shape[1], dtype=self.dtype)
        for i, w in enumerate(windows):
            x[i, : w.shape[0]] = w
        outs = [int(n) for n in self.enc.output_lengths(torch.tensor([w.shape[0] for w in windows]))]
        cmax = int(self.enc.output_lengths(torch.tensor([tmax]))[0])
        lens = [s.att.size(3) for s in states]
        lmax = max(lens)
        if b == 1:
            att, cnn = states[0].att, states[0].cnn
        else:
            n, _, h, _, dk2 = states[0].att.shape
            att = states[0].att.new_zeros(n, b, h, lmax, dk2)
            for i, s in enumerate(states):
                if lens[i]:
                    att[:, i, :, lmax - lens[i]:] = s.att[:, 0]
            cnn = torch.cat([s.cnn for s in states], dim=1)
        mask = None
        if any(n_ != lmax for n_ in lens) or any(c != cmax for c in outs):
            ar = torch.arange(lmax + cmax)
            lo = torch.tensor([lmax - n_ for n_ in lens])[:, None]
            hi = torch.tensor([lmax + c for c in outs])[:, None]
            mask = (ar[None, :] >= lo) & (ar[None, :] < hi)
        offset = torch.tensor([s.offset for s in states], device=self.device)[:, None]
        h, kv, cc = self.enc.forward_chunk(x.to(self.device), offset, att, cnn, att_mask=None if mask is None
                                           else mask.to(self.device), required_cache_size=-1)
        lp = torch.log_softmax(self.model.output(h).float(), dim=-1).cpu()
        keep = geom.cache_frames
        res = []
        for i, s in enumerate(states):
            c = outs[i]
            a = kv[:, i: i + 1, :, lmax - lens[i]: lmax + c]
            if keep >= 0:
                a = a[:, :, :, a.size(3) - min(keep, a.size(3)):]
            s.att = a.contiguous() if b > 1 else a
            s.cnn = cc[:, i: i + 1].contiguous() if b > 1 else cc
            s.offset += c
            res.append(lp[i, :c])
        return res


class _OnnxState:
    __slots__ = ("att", "cnn", "offset")

    def __init__(self, att: np.ndarray, cnn: np.ndarray):
        self.att, self.cnn, self.offset = att, cnn, 0


class _OnnxStep:
    """Batched chunk step on one onnxruntime session over a streaming graph (fixed-size caches,
    per-row offsets; CMVN inside the graph)."""

    name = "onnx"

    def __init__(self, path, num_threads: int | None = None):
        import json

        from harken.runtime.ort import make_session

        self.path = str(path)
        self.session = make_session(self.path, num_threads=num_threads)
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.meta.get("model_type") != "ctc_streaming":
            raise ValueError(f"{path}: not a harken streaming ONNX (model_type "
                             f"{self.meta.get('model_type')!r}); export one with export_streaming_onnx")
        self.chunk = int(self.meta["streaming_chunk"])
        self.left_chunks = int(self.meta["left_chunks"])
        shapes = json.loads(self.meta["cache_shapes"])
        self.att_shape = [int(v) for v in shapes["att_cache"]]
        self.cnn_shape = [int(v) for v in shapes["cnn_cache"]]
        self.att_shape[1] = self.cnn_shape[1] = 1
        feats_in = self.session.get_inputs()[0]
        self.window = int(feats_in.shape[1])
        b0 = feats_in.shape[0]
        self.max_batch = 1 if isinstance(b0, int) and b0 == 1 else 0  # old static-batch files: one at a time

    def init_state(self) -> _OnnxState:
        return _OnnxState(np.zeros(self.att_shape, np.float32), np.zeros(self.cnn_shape, np.float32))

    def __call__(self, windows: list[torch.Tensor], states: list[_OnnxState]) -> list[torch.Tensor]:
        """Raw fbank windows (T_i <= window, F) -> log-probs (C_i, V) each; updates ``states``."""
        if self.max_batch == 1 and len(windows) > 1:
            return [self([w], [s])[0] for w, s in zip(windows, states)]
        b = len(windows)
        x = np.zeros((b, self.window, windows[0].shape[1]), np.float32)
        for i, w in enumerate(windows):
            x[i, : w.shape[0]] = w.numpy()
        feeds = {"feats": x, "feat_len": np.array([w.shape[0] for w in windows], np.int64),
                 "offset": np.array([s.offset for s in states], np.int64),
                 "att_cache": states[0].att if b == 1 else np.concatenate([s.att for s in states], axis=1),
                 "cnn_cache": states[0].cnn if b == 1 else np.concatenate([s.cnn for s in states], axis=1)}
        lp, n, att, cnn = self.session.run(None, feeds)
        n = np.asarray(n).reshape(-1)
        res = []
        for i, s in enumerate(states):
            c = int(n[i])
            s.att = np.ascontiguousarray(att[:, i: i + 1])
            s.cnn = np.ascontiguousarray(cnn[:, i: i + 1])
            s.offset += c
            res.append(torch.from_numpy(np.array(lp[i, :c], np.float32)))
        return res


# ------------------------------------------------------------------------------------------ model
_SEQ = itertools.count()


class StreamingModel:
    """One streaming model shared by all sessions (see the module docstring).

    Use the constructors :meth:`from_torch`, :meth:`from_onnx` or :meth:`from_engine`.
    ``decode_cfg``/``decoder`` (a :class:`harken.decode.DecodeConfig` and its built decoder):
    finals are decoded with them (beam, LM, hotwords) over the segment's log-probs; partials are
    always greedy."""

    def __init__(self, backend, tokenizer, geometry: ChunkGeometry, fbank_cfg: FbankConfig,
                 cmvn: torch.nn.Module | None, frame_shift: float, frame_length: float,
                 time_offset: float | None = None, decode_cfg=None, decoder=None):
        from harken.decode.align import frame_offset

        self.backend = backend
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.fbank_cfg = fbank_cfg
        self.cmvn = cmvn
        self.fbanks = StreamingFeatures.make_fbanks(fbank_cfg)
        self.sample_rate = int(fbank_cfg.sample_rate)
        self.frame_shift = float(frame_shift)
        self.frame_length = float(frame_length)
        self.frame_seconds = self.frame_shift * geometry.subsampling  # seconds per output frame
        self.time_offset = (float(time_offset) if time_offset is not None
                            else frame_offset(self.frame_shift, geometry.subsampling, self.frame_length))
        self.blank = int(getattr(tokenizer, "blank_id", 0))
        self.decode_cfg = decode_cfg
        self.decoder = decoder
        self.max_batch = 0  # most sessions per forward in step() (0: all ready ones; set freely)

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_torch(cls, model, tokenizer, chunk_size: int | None = None, left_chunks: int | None = None,
                   decode_cfg=None, decoder=None) -> "StreamingModel":
        """Over a torch :class:`CtcModel` with an fbank frontend and a causal, chunk-capable encoder.
        ``chunk_size`` (output frames; default the encoder's ``chunk_size``, else 16) and
        ``left_chunks`` (default the encoder's; -1 unlimited)."""
        enc = getattr(model, "encoder", None)
        if enc is None or not hasattr(enc, "forward_chunk"):
            raise ValueError(f"encoder {type(enc).__name__} does not support streaming (no forward_chunk)")
        frontend = getattr(model, "frontend", None)
        if frontend is None or not hasattr(frontend, "fbank"):
            raise ValueError("streaming needs a model with an fbank frontend")
        ecfg = enc.cfg
        if ecfg.type == "conformer" and not getattr(ecfg, "causal", False):
            raise ValueError("streaming needs a causal convolution module (model.encoder.causal=true)")
        chunk_size = int(chunk_size or getattr(ecfg, "chunk_size", 0) or 16)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        left_chunks = int(getattr(ecfg, "left_chunks", -1) if left_chunks is None else left_chunks)
        sub = int(model.subsampling_factor)
        geom = ChunkGeometry(chunk_size, left_chunks, sub, _right_context(enc))
        fb = frontend.fbank.cfg
        model = model.eval()
        return cls(_TorchStep(model, geom), tokenizer, geom, fb, frontend.cmvn, fb.frame_shift_ms / 1000.0,
                   fb.frame_length_ms / 1000.0, decode_cfg=decode_cfg, decoder=decoder)

    @classmethod
    def from_onnx(cls, path, num_threads: int | None = None, tokenizer=None, decode_cfg=None,
                  decoder=None) -> "StreamingModel":
        """Over ONE onnxruntime session on a graph written by
        :func:`harken.runtime.streaming_onnx.export_streaming_onnx`; geometry, fbank settings and
        vocabulary come from its metadata."""
        import json

        be = _OnnxStep(path, num_threads)
        meta = be.meta
        fb = FbankConfig(**json.loads(meta["feature_config"]))
        if tokenizer is None:
            from harken.runtime.engine import VocabTokenizer
            from harken.text.tokenizer import tokenizer_from_dict

            tokenizer = (tokenizer_from_dict(json.loads(meta["tokenizer"])) if meta.get("tokenizer")
                         else VocabTokenizer(json.loads(meta["vocabulary"])))
        sub = int(meta["subsampling_factor"])
        right = int(meta["right_context"]) if meta.get("right_context") else be.window - 1 - (be.chunk - 1) * sub
        geom = ChunkGeometry(be.chunk, be.left_chunks, sub, right)
        if geom.window != be.window:
            raise ValueError(f"{path}: feats input has {be.window} frames but the metadata geometry gives "
                             f"{geom.window}")
        shift = float(meta["frame_shift"]) if meta.get("frame_shift") else fb.frame_shift_ms / 1000.0
        offset = float(meta["time_offset_ms"]) / 1000.0 if meta.get("time_offset_ms") else None
        # CMVN is inside the graph: the session features are raw fbank
        return cls(be, tokenizer, geom, fb, None, shift, fb.frame_length_ms / 1000.0, time_offset=offset,
                   decode_cfg=decode_cfg, decoder=decoder)

    @classmethod
    def from_engine(cls, engine, chunk_size: int | None = None, left_chunks: int | None = None,
                    onnx_path=None, num_threads: int | None = None, options=None) -> "StreamingModel":
        """Over an :class:`harken.runtime.Engine`: its torch model (``engine.model``) or, for an ONNX
        engine, the streaming graph ``onnx_path`` (default ``engine.streaming_path`` if the engine has
        one); the engine's tokenizer is reused, and its decoder for ``options`` (a ``DecodeOptions``;
        default the engine's) decodes the finals."""
        options = options if options is not None else getattr(engine, "options", None)
        dcfg = dec = None
        if options is not None and getattr(options, "method", "greedy") != "greedy":
            dcfg, dec = options.decode_config(), engine._decoder(options)
        model = getattr(engine, "model", None)
        if model is not None:
            return cls.from_torch(model, engine.tokenizer, chunk_size, left_chunks, decode_cfg=dcfg, decoder=dec)
        path = onnx_path or getattr(engine, "streaming_path", None)
        if not path:
            raise ValueError("streaming on the onnx backend needs a streaming ONNX graph "
                             "(export_streaming_onnx); this engine has none")
        sm = cls.from_onnx(path, num_threads=num_threads, tokenizer=engine.tokenizer, decode_cfg=dcfg, decoder=dec)
        if chunk_size and chunk_size != sm.chunk_size or left_chunks is not None and left_chunks != sm.left_chunks:
            raise ValueError(f"{path}: the streaming graph was exported for chunk_size={sm.chunk_size}, "
                             f"left_chunks={sm.left_chunks}; re-export it for other values")
        return sm

    # ------------------------------------------------------------------------------ properties
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def chunk_size(self) -> int:
        return self.geometry.chunk_size

    @property
    def left_chunks(self) -> int:
        return self.geometry.left_chunks

    @property
    def chunk_seconds(self) -> float:
        return self.geometry.chunk_size * self.frame_seconds

    @property
    def chunk_samples(self) -> int:
        """Samples of audio per chunk (a good piece size for a live source)."""
        return int(round(self.chunk_seconds * self.sample_rate))

    def info(self) -> dict[str, Any]:
        g = self.geometry
        return {"backend": self.backend_name, "sample_rate": self.sample_rate, "chunk_size": g.chunk_size,
                "left_chunks": g.left_chunks, "chunk_ms": round(1000 * self.chunk_seconds, 3),
                "subsampling": g.subsampling, "right_context": g.right_context,
                "frame_seconds": self.frame_seconds}

    # ------------------------------------------------------------------------------ sessions
    def new_session(self, endpoint: EndpointConfig | None = None, word_timestamps: bool = False,
                    keep_log_probs: bool = False, session_id: str | None = None) -> "StreamSession":
        """A new connection's state.  ``endpoint``: segment rules (None: one segment for the whole
        stream); ``word_timestamps``: finals carry aligned words; ``keep_log_probs``: keep every
        chunk's log-probs (:meth:`StreamSession.all_log_probs`; memory grows with the stream)."""
        return StreamSession(self, endpoint, word_timestamps, keep_log_probs, session_id)

    def step(self, sessions: Sequence["StreamSession"]) -> list[list[StreamResult]]:
        """Advance every session that has a chunk ready by one chunk, all in one batched forward.
        Returns, per given session (same order), its results of this step: a partial per chunk
        decoded, and a final when a segment closed (endpoint, or end of input).  Sessions with
        nothing ready get ``[]``."""
        for s in sessions:
            if s.model is not self:
                raise ValueError(f"session {s.id} belongs to another StreamingModel")
        out: list[list[StreamResult]] = [[] for _ in sessions]
        work, flush = [], []
        claimed: set[int] = set()
        for i, s in enumerate(sessions):  # claim: take each ready session's next window
            if s._seq in claimed:
                continue
            with s._lock:
                if s.done or s._busy:
                    continue
                win = s._take_window()
                if win is not None:
                    work.append((i, s, win))
                elif s._input_done and s.feats.shape[0] < self.geometry.min_window:
                    flush.append((i, s))
                else:
                    continue
                s._busy = True
                claimed.add(s._seq)
        try:
            lps: list[torch.Tensor] = []
            dt = 0.0
            if work:  # the forward runs without the session locks: feeding audio never waits for it
                t0 = time.perf_counter()
                caps = [c for c in (self.max_batch, getattr(self.backend, "max_batch", 0)) if c > 0]
                mb = min(caps) if caps else len(work)
                for k in range(0, len(work), mb):
                    part = work[k: k + mb]
                    lps += self.backend([w for *_, w in part], [s._state for _, s, _ in part])
                dt = time.perf_counter() - t0
        except BaseException:
            for _, s, *_ in work + flush:
                s._busy = False
            raise
        for (i, s, _), lp in zip(work, lps):
            with s._lock:
                try:
                    out[i] += s._consume(lp, dt)
                    if s._input_done and s._take_window(peek=True) is None:
                        out[i].append(s._close_segment(stream_end=True))
                finally:
                    s._busy = False
        for i, s in flush:
            with s._lock:
                try:
                    out[i].append(s._close_segment(stream_end=True))
                finally:
                    s._busy = False
        return out

    def run(self, sessions: Sequence["StreamSession"], max_steps: int | None = None) -> list[list[StreamResult]]:
        """:meth:`step` until no session has a chunk ready (or ``max_steps``); results per session."""
        out: list[list[StreamResult]] = [[] for _ in sessions]
        n = 0
        while any(s.ready for s in sessions) and (max_steps is None or n < max_steps):
            for acc, res in zip(out, self.step(sessions)):
                acc += res
            n += 1
        return out

    def __repr__(self) -> str:
        g = self.geometry
        return (f"StreamingModel(backend={self.backend_name}, chunk={g.chunk_size}, left_chunks={g.left_chunks}, "
                f"sample_rate={self.sample_rate})")


class StreamSession:
    """One stream's state (create with :meth:`StreamingModel.new_session`).  Feed audio with
    :meth:`accept_waveform` (any thread), end it with :meth:`input_finished`; results come from
    :meth:`StreamingModel.step`.  ``done`` once the last final has been returned."""

    def __init__(self, model: StreamingModel, endpoint: EndpointConfig | None, word_timestamps: bool,
                 keep_log_probs: bool, session_id: str | None):
        self.model = model
        self.endpoint = endpoint
        self.word_timestamps = bool(word_timestamps)
        self.keep_log_probs = bool(keep_log_probs)
        self.id = session_id or uuid.uuid4().hex[:16]
        self._seq = next(_SEQ)
        self._lock = threading.RLock()
        self.features = StreamingFeatures(model.fbank_cfg, model.cmvn, model.fbanks)
        g = model.geometry
        self._block = int(round(model.frame_seconds * model.sample_rate))  # samples per output frame
        self._win, self._stride, self._min = g.window, g.stride, g.min_window
        self._reset_state()

    def _reset_state(self) -> None:
        self.features.reset()
        self._state = self.model.backend.init_state()
        self.feats = torch.zeros(0, self.model.fbank_cfg.num_mel_bins)
        self._input_done = False
        self._busy = False  # claimed by a step that is running its forward
        self.done = False
        self.received = 0  # samples
        self.frames = 0  # output frames decoded in the stream
        self.segment_id = 0
        self.ids: list[int] = []  # tokens of the current segment
        self.prev = self.model.blank
        self.seg_start = 0  # first output frame of the current segment
        self.seg_lp: list[torch.Tensor] = []
        self.silent_run = 0  # trailing silent output frames
        self.latencies: list[float] = []
        self._all_lp: list[torch.Tensor] = []
        self._energy: list[float] = []  # dBFS per output frame's block of samples
        self._acc = np.zeros(0, np.float32)
        self._resampler = None  # soxr.ResampleStream from the client's rate, when it is not the model's
        self._in_rate: int | None = None

    def reset(self) -> None:
        """Start over as a new stream (same id)."""
        with self._lock:
            if self._busy:
                raise RuntimeError(f"session {self.id}: reset() while a step is running it")
            self._reset_state()

    # ------------------------------------------------------------------------------ input
    def accept_waveform(self, samples, sample_rate: int | None = None) -> None:
        """Add float32 mono samples in [-1, 1] (any number, any thread) at ``sample_rate`` (None:
        the model's ``model.sample_rate``). Other rates are resampled on the fly, the resampler
        carrying its state from piece to piece, so one stream keeps one input rate. Raises
        ValueError for multi-channel or non-finite input, a bad rate, or a rate that changes."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim > 1 and x.size != max(x.shape):
            raise ValueError(f"session {self.id}: expected mono samples, got an array of shape {x.shape}")
        x = x.reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError(f"session {self.id}: samples contain NaN or infinity")
        with self._lock:
            if self._input_done:
                raise RuntimeError(f"session {self.id}: accept_waveform() after input_finished()")
            if sample_rate is not None:
                x = self._from_rate(x, sample_rate)
            elif self._in_rate is not None and self._in_rate != self.model.sample_rate:
                raise ValueError(f"session {self.id}: samples without a sample_rate after samples at "
                                 f"{self._in_rate} Hz; one stream keeps one input rate")
            self._feed(x)

    def _from_rate(self, x: np.ndarray, sample_rate) -> np.ndarray:
        """``x`` at ``sample_rate`` -> samples at the model's rate (streamed through soxr)."""
        ok = isinstance(sample_rate, (int, np.integer)) or (isinstance(sample_rate, float) and sample_rate.is_integer())
        rate = int(sample_rate) if ok else 0
        if not 1000 <= rate <= 384000:
            raise ValueError(f"session {self.id}: sample_rate must be an integer in 1000..384000 Hz, "
                             f"not {sample_rate!r}")
        if self._in_rate is None:
            self._in_rate = rate
        elif rate != self._in_rate:
            raise ValueError(f"session {self.id}: sample_rate changed from {self._in_rate} to {rate} Hz "
                             "within one stream")
        if rate == self.model.sample_rate:
            return x
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(rate, self.model.sample_rate, 1, dtype="float32", quality="HQ")
        return np.asarray(self._resampler.resample_chunk(x, last=False), dtype=np.float32).reshape(-1)

    def _feed(self, x: np.ndarray) -> None:
        """Samples at the model's rate into the features (the lock is held)."""
        if not len(x):
            return
        self.received += len(x)
        if self.endpoint is not None and self.endpoint.silence != "blank":
            self._add_energy(x)
        f = self.features.accept(x)
        if f.shape[0]:
            self.feats = torch.cat([self.feats, f])

    def input_finished(self) -> None:
        """No more audio: the rest is decoded and the last segment flushed by the next steps."""
        with self._lock:
            if self._input_done:
                return
            if self._resampler is not None:  # the resampler's delayed tail
                tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                self._feed(np.asarray(tail, dtype=np.float32).reshape(-1))
                self._resampler = None
            self._input_done = True
            f = self.features.finish()
            if f.shape[0]:
                self.feats = torch.cat([self.feats, f])

    @property
    def ready(self) -> bool:
        """True when a step would do something for this session (a chunk, or the final flush)."""
        return not self.done and not self._busy and (self.feats.shape[0] >= self._win or self._input_done)

    @property
    def input_done(self) -> bool:
        return self._input_done

    @property
    def seconds_received(self) -> float:
        return self.received / self.model.sample_rate

    @property
    def text(self) -> str:
        """The current segment's text so far (greedy)."""
        return self.model.tokenizer.decode(self.ids)

    def all_log_probs(self) -> torch.Tensor:
        """Every chunk's log-probs (T', V) (needs ``keep_log_probs=True``)."""
        return torch.cat(self._all_lp) if self._all_lp else torch.zeros(0, 0)

    # ------------------------------------------------------------------------------ stepping
    def _add_energy(self, x: np.ndarray) -> None:
        acc = np.concatenate([self._acc, x])
        n = len(acc) // self._block
        if n:
            blocks = acc[: n * self._block].reshape(n, self._block).astype(np.float64)
            self._energy += (10.0 * np.log10(np.mean(blocks * blocks, axis=1) + 1e-12)).tolist()
        self._acc = acc[n * self._block:]

    def _frame_energy(self, t: int) -> float:
        if t < len(self._energy):
            return self._energy[t]
        if len(self._acc):
            return float(10.0 * math.log10(float(np.mean(self._acc.astype(np.float64) ** 2)) + 1e-12))
        return -120.0

    def _take_window(self, peek: bool = False) -> torch.Tensor | None:
        n = self.feats.shape[0]
        if n >= self._win:
            w = self.feats[: self._win]
            if not peek:
                self.feats = self.feats[self._stride:]
            return w
        if self._input_done and n >= self._min:  # the last, shorter chunk
            w = self.feats
            if not peek:
                self.feats = self.feats[:0]
            return w
        return None

    def _result(self, final: bool, latency: float, stream_end: bool = False, text: str | None = None,
                words: list[Word] | None = None) -> StreamResult:
        m = self.model
        end = self.frames * m.frame_seconds
        if stream_end:  # the last segment covers the audio to its end
            end = self.received / m.sample_rate
        elif self._input_done:
            end = min(end, self.received / m.sample_rate)
        return StreamResult(text=m.tokenizer.decode(self.ids) if text is None else text, tokens=list(self.ids),
                            frames=self.frames, is_final=final, latency=latency, segment_id=self.segment_id,
                            start=self.seg_start * m.frame_seconds, end=end, words=words or [],
                            session_id=self.id, stream_end=stream_end)

    def _consume(self, lp: torch.Tensor, latency: float) -> list[StreamResult]:
        """One chunk's log-probs: greedy tokens, endpoint rules, results."""
        ep = self.endpoint
        blank = self.model.blank
        mode = ep.silence if ep is not None else "blank"
        for t, a in enumerate(lp.argmax(-1).tolist()):
            if a != blank and a != self.prev:
                self.ids.append(a)
            self.prev = a
            if ep is not None:
                is_blank = a == blank
                if mode != "blank":
                    quiet = self._frame_energy(self.frames + t) < ep.energy_threshold_db
                    silent = {"energy": quiet, "both": quiet and is_blank, "either": quiet or is_blank}[mode]
                else:
                    silent = is_blank
                self.silent_run = self.silent_run + 1 if silent else 0
        self.frames += lp.shape[0]
        if self.word_timestamps or self.model.decoder is not None:  # needed by the final
            self.seg_lp.append(lp)
        if self.keep_log_probs:
            self._all_lp.append(lp)
        self.latencies.append(latency)
        out = [self._result(False, latency)]
        last = self._input_done and self._take_window(peek=True) is None  # the stream's final follows
        if ep is not None and not last:
            fs_ms = 1000.0 * self.model.frame_seconds
            seg_ms = (self.frames - self.seg_start) * fs_ms
            silence_hit = ep.trailing_silence_ms > 0 and self.silent_run * fs_ms >= ep.trailing_silence_ms
            long_hit = ep.max_segment_ms > 0 and seg_ms >= ep.max_segment_ms
            if self.ids and (silence_hit or long_hit):
                out.append(self._close_segment())
            elif not self.ids and (silence_hit or long_hit):
                self.seg_start, self.seg_lp = self.frames, []  # nothing said: slide the segment start
        return out

    def _close_segment(self, stream_end: bool = False) -> StreamResult:
        """The final result of the current segment; a new segment begins."""
        m = self.model
        lp = torch.cat(self.seg_lp) if self.seg_lp else None
        text = m.tokenizer.decode(self.ids)
        if m.decoder is not None and lp is not None and lp.shape[0]:
            from harken.decode import decode_texts

            text = decode_texts(lp[None], torch.tensor([lp.shape[0]]), m.tokenizer, m.decode_cfg, m.decoder)[0]
        words: list[Word] = []
        if self.word_timestamps and lp is not None and text.strip():
            from harken.decode.align import AlignmentError, align_text

            base = self.seg_start * m.frame_seconds
            try:
                spans = align_text(lp, text, m.tokenizer, m.frame_shift, m.geometry.subsampling, m.time_offset)
                words = [Word(s.word, base + s.start, base + s.end, s.confidence) for s in spans]
            except AlignmentError:
                words = []
        res = self._result(True, 0.0, stream_end=stream_end, text=text, words=words)
        self.segment_id += 1
        self.ids = []
        self.seg_start = self.frames
        self.seg_lp = []
        self.silent_run = 0
        if stream_end:
            self.done = True
        return res


# ------------------------------------------------------------------------------------------ compat
class TorchChunker:
    """Runs a torch :class:`CtcModel`'s encoder chunk by chunk with its caches (one stream;
    kept for callers of the pre-session API)."""

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
    """One stream over a :class:`StreamingModel` (a thin wrapper over one :class:`StreamSession`).
    Feed audio with :meth:`accept_waveform` (pieces of any size), end with :meth:`finish`.

    ``chunk_size``: output frames per chunk (default the model's ``encoder.chunk_size``, else 16);
    ``left_chunks``: chunks of left context (default the model's; -1 unlimited).  Partial results
    are greedy; the final one uses ``decode_cfg`` / ``decoder`` (beam, LM, hotwords) over the whole
    utterance when given.  ``streaming_model``: use this shared model instead of building one;
    ``endpoint``: segment rules (default none: one segment)."""

    def __init__(self, model=None, tokenizer=None, chunk_size: int | None = None, left_chunks: int | None = None,
                 decode_cfg=None, decoder=None, streaming_model: StreamingModel | None = None,
                 endpoint: EndpointConfig | None = None, word_timestamps: bool = False):
        if streaming_model is None:
            streaming_model = StreamingModel.from_torch(model, tokenizer, chunk_size, left_chunks,
                                                        decode_cfg=decode_cfg, decoder=decoder)
        self.model = streaming_model
        self.tokenizer = streaming_model.tokenizer
        self.chunk_size = streaming_model.chunk_size
        self.left_chunks = streaming_model.left_chunks
        self.endpoint = endpoint
        self.word_timestamps = word_timestamps
        self.reset()

    def reset(self) -> None:
        self.session = self.model.new_session(endpoint=self.endpoint, word_timestamps=self.word_timestamps,
                                              keep_log_probs=True)
        self._final: StreamResult | None = None

    def accept_waveform(self, samples, sample_rate: int | None = None) -> list[StreamResult]:
        """Add float32 samples at ``sample_rate`` (None: the model's; others are resampled);
        returns one partial result per chunk completed (and a final per segment closed, with an
        endpoint)."""
        if self.session.input_done:
            raise RuntimeError("accept_waveform() after finish(); call reset() first")
        self.session.accept_waveform(samples, sample_rate)
        return self.model.run([self.session])[0]

    def finish(self) -> StreamResult:
        """End of input: decode what is left; the final result."""
        if self._final is None:
            self.session.input_finished()
            res = self.model.run([self.session])[0]
            self._final = [r for r in res if r.is_final][-1]
        return self._final

    @property
    def done(self) -> bool:
        return self.session.done

    @property
    def frames(self) -> int:
        return self.session.frames

    @property
    def latencies(self) -> list[float]:
        return self.session.latencies

    @property
    def ids(self) -> list[int]:
        return list(self._final.tokens) if self._final is not None else self.session.ids

    @property
    def text(self) -> str:
        return self._final.text if self._final is not None else self.session.text

    def all_log_probs(self) -> torch.Tensor:
        return self.session.all_log_probs()


@torch.inference_mode()
def offline_chunked_log_probs(model, wave: np.ndarray, chunk_size: int, left_chunks: int = -1) -> torch.Tensor:
    """Offline reference: the full-utterance forward under the chunk mask (T', V)."""
    w = torch.from_numpy(np.asarray(wave, np.float32))[None]
    feats, n = model.frontend(w, torch.tensor([w.shape[1]]))
    h, lens = model.encoder(feats, n, chunk_size=chunk_size, left_chunks=left_chunks)
    return torch.log_softmax(model.output(h).float(), dim=-1)[0, : int(lens[0])]

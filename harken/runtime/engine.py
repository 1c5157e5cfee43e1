"""The one inference engine behind the CLI, the Python API and the server.

    engine = Engine.load("exp/demo/best.pt")            # torch backend
    engine = Engine.load("model.onnx", num_threads=1)   # onnxruntime backend (harken "wave" ONNX)
    engine.transcribe("a.wav").text
    engine.transcribe_batch(["a.wav", "b.wav"])
    for seg in engine.transcribe_segments("long.flac"):  # lazy, VAD-cut segments
        print(seg.start, seg.end, seg.text)
    stream = engine.stream(chunk_size=16)               # streaming (torch backend, chunked models)

A backend maps a padded waveform batch ``(B, S) float32, lengths (B,) int64`` to CTC
``(log_probs (B, T', V), out_lens (B,))``; everything else (decoding, word times by forced
alignment, batching by duration, VAD segmentation of long audio) is shared here.

A checkpoint (``.pt``) carries its config, tokenizer and CMVN; a harken ONNX file carries the same
facts in its ``metadata_props`` (``sample_rate``, ``feature_config``, ``vocabulary``,
``subsampling_factor``, ``model_type``, ``encoder_type``, ``frame_shift``, ``blank_id``,
``streaming_chunk``; optionally ``tokenizer``: the tokenizer's ``to_dict()`` as JSON, needed for
BPE encoding in forced alignment and hotwords).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, as_waveform
from harken.data.sampler import length_batches
from harken.runtime.blocks import iter_blocks
from harken.runtime.results import Segment, Transcript, Word

__all__ = ["Engine", "ModelInfo", "TorchBackend", "OnnxBackend", "VocabTokenizer", "read_onnx_metadata"]


@dataclass
class ModelInfo:
    """What the engine needs to know about a model besides its weights."""

    sample_rate: int = SAMPLE_RATE
    frame_shift: float = 0.01  # seconds per feature frame (before subsampling)
    frame_length: float = 0.025  # seconds per feature window
    subsampling: int = 4
    encoder_type: str = "conformer"
    model_type: str = "ctc"
    blank_id: int = 0
    streaming_chunk: int = 0  # output frames per chunk the model was exported/trained for (0: none)
    time_offset: float | None = None  # seconds; None: computed by harken.decode.align.frame_offset

    @property
    def frame_seconds(self) -> float:
        return self.frame_shift * self.subsampling


# ------------------------------------------------------------------------------------ backends
class TorchBackend:
    """A :class:`harken.models.ctc.CtcModel` with its frontend, in eval mode."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp, n = self.model(wave.to(self.device), lens.to(self.device))
        return lp.float().cpu(), n.cpu()


class OnnxBackend:
    """An onnxruntime session over a harken "wave" ONNX file (waveform in, log-probs out)."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if num_threads:
            so.intra_op_num_threads = int(num_threads)
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        ins = self.session.get_inputs()
        if len(ins) != 2:
            raise ValueError(f"{path}: expected inputs (waveform, lengths), found {[i.name for i in ins]}")
        self.input_names = [i.name for i in ins]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.min_input = int(self.metadata.get("min_input") or 0)
        if self.metadata.get("input_kind") == "fbank":
            raise ValueError(f"{path}: a fbank-input ONNX (sherpa-wenet variant) is for sherpa-onnx; "
                             "export the 'wave' variant for harken's engine")

    def __call__(self, wave: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.shape[1] < self.min_input:  # the graph's smallest input; lengths stay true
            wave = torch.nn.functional.pad(wave, (0, self.min_input - wave.shape[1]))
        feeds = {self.input_names[0]: wave.numpy().astype(np.float32, copy=False),
                 self.input_names[1]: lens.numpy().astype(np.int64, copy=False)}
        lp, n = self.session.run(None, feeds)[:2]
        return torch.from_numpy(lp).float(), torch.from_numpy(np.asarray(n)).long().reshape(-1)


class VocabTokenizer:
    """Decoding-side tokenizer from an ONNX ``vocabulary`` list: ids <= 1 (blank, <unk>) dropped,
    pieces joined, ``▁`` -> space.  ``encode`` (forced alignment) is a greedy longest match, exact
    for character vocabularies."""

    kind = "vocab"
    blank_id = 0
    unk_id = 1

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self._id = {t: i for i, t in enumerate(self.tokens)}
        self._maxlen = max((len(t) for t in self.tokens), default=1)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def decode(self, ids) -> str:
        n = len(self.tokens)
        s = "".join(self.tokens[int(i)] for i in ids if 1 < int(i) < n)
        return " ".join(s.replace("\u2581", " ").split())

    def encode(self, text: str) -> list[int]:
        bpe = any(t.startswith("\u2581") and len(t) > 1 for t in self.tokens)
        s = ("\u2581" + "\u2581".join(text.split())) if bpe else "\u2581".join(text.split())
        ids, i = [], 0
        while i < len(s):
            for n in range(min(self._maxlen, len(s) - i), 0, -1):
                j = self._id.get(s[i: i + n])
                if j is not None and j > 1:
                    ids.append(j)
                    i += n
                    break
            else:
                ids.append(self.unk_id)
                i += 1
        return ids


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _info_from_metadata(meta: dict[str, str], path: str) -> tuple[ModelInfo, Any]:
    def need(key):
        if key not in meta:
            raise ValueError(f"{path}: ONNX metadata has no '{key}'; re-export it with `harken export`")
        return meta[key]

    from harken.text.tokenizer import tokenizer_from_dict

    vocab = json.loads(need("vocabulary"))
    tok = tokenizer_from_dict(json.loads(meta["tokenizer"])) if meta.get("tokenizer") else VocabTokenizer(vocab)
    feat = json.loads(meta.get("feature_config") or "{}")
    if meta.get("frame_shift_ms"):
        shift = float(meta["frame_shift_ms"]) / 1000.0
    else:
        shift = float(meta.get("frame_shift") or feat.get("frame_shift_ms", 10.0))
        if shift >= 1.0:  # milliseconds
            shift /= 1000.0
    sub = int(need("subsampling_factor"))
    if meta.get("output_frame_shift_ms"):  # the true output frame step (wav2vec2: 20 ms, not 10 x sub)
        out_shift = float(meta["output_frame_shift_ms"]) / 1000.0
        if abs(out_shift - shift * sub) > 1e-6:
            shift, sub = out_shift, 1
    info = ModelInfo(
        sample_rate=int(meta.get("sample_rate", SAMPLE_RATE)),
        frame_shift=shift,
        frame_length=float(feat.get("frame_length_ms", 25.0)) / 1000.0,
        subsampling=sub,
        encoder_type=meta.get("encoder_type", "conformer"),
        model_type=meta.get("model_type", "ctc"),
        blank_id=int(meta.get("blank_id", 0)),
        streaming_chunk=int(meta.get("streaming_chunk") or 0),
        time_offset=float(meta["time_offset_ms"]) / 1000.0 if meta.get("time_offset_ms") else None,
    )
    if info.sample_rate != SAMPLE_RATE:
        raise ValueError(f"{path}: model expects {info.sample_rate} Hz audio; harken reads {SAMPLE_RATE} Hz")
    return info, tok


# -------------------------------------------------------------------------------------- engine
class Engine:
    """Batched offline inference (and streaming, on the torch backend) over one model."""

    def __init__(self, backend, tokenizer, info: ModelInfo, decode_cfg=None, config=None):
        self._setup(backend, tokenizer, info, decode_cfg=decode_cfg, config=config)

    def _setup(self, backend, tokenizer, info: ModelInfo, decode_cfg=None, config=None) -> None:
        from harken.decode.align import frame_offset

        self.backend = backend
        self.tokenizer = tokenizer
        self.info = info
        self.config = config
        self.frame_shift = info.frame_shift
        self.subsampling = info.subsampling
        self.encoder_type = info.encoder_type
        self.time_offset = (info.time_offset if info.time_offset is not None
                            else frame_offset(self.frame_shift, self.subsampling, info.frame_length))
        self.warmup_calls = 0
        self.decode_cfg = None
        self._decoder = None
        self.set_decoding(decode_cfg)

    @classmethod
    def _create(cls, *args, **kw) -> "Engine":
        obj = cls.__new__(cls)
        Engine._setup(obj, *args, **kw)
        return obj

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_model(cls, model, tokenizer, config, device: str | torch.device = "cpu",
                   decode_cfg=None) -> "Engine":
        """An engine over an in-memory :class:`CtcModel` (with frontend) and its experiment config."""
        fb = config.model.fbank
        info = ModelInfo(sample_rate=fb.sample_rate, frame_shift=fb.frame_shift_ms / 1000.0,
                         frame_length=fb.frame_length_ms / 1000.0,
                         subsampling=getattr(model, "subsampling_factor", None) or 4,
                         encoder_type=config.model.encoder.type,
                         streaming_chunk=int(getattr(config.model.encoder, "chunk_size", 0) or 0))
        frame_seconds = getattr(getattr(model, "encoder", None), "frame_seconds", None)
        if frame_seconds:  # encoders on raw waveforms (wav2vec2: 20 ms per output frame)
            info.frame_shift, info.subsampling = float(frame_seconds), 1
        return cls._create(TorchBackend(model, device), tokenizer, info, decode_cfg=decode_cfg, config=config)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", num_threads: int | None = None,
             decode_cfg=None, device: str = "cpu", warmup: bool = True) -> "Engine":
        """``path``: a harken checkpoint (``.pt``; torch backend) or a harken ONNX file
        (``.onnx``; onnxruntime backend).  ``backend``: "auto" (by the file), "torch" or "onnx".
        ``num_threads``: torch intra-op threads (process-wide) / ORT ``intra_op_num_threads``.
        ``warmup``: run one dummy inference now, so the first request is not slow."""
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such model file")
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"unknown backend {backend!r} (auto | torch | onnx)")
        is_onnx = path.endswith(".onnx")
        if backend == "auto":
            backend = "onnx" if is_onnx else "torch"
        if backend == "onnx":
            if not is_onnx:
                raise ValueError(f"{path}: the onnx backend needs an .onnx file; export one with `harken export`")
            be = OnnxBackend(path, num_threads)
            info, tok = _info_from_metadata(be.metadata, path)
            eng = cls._create(be, tok, info, decode_cfg=decode_cfg)
        else:
            if is_onnx:
                raise ValueError(f"{path}: an ONNX file needs backend 'onnx' (or 'auto')")
            eng = cls._from_checkpoint(path, device, num_threads, decode_cfg)
        if warmup:
            eng.warmup()
        return eng

    @classmethod
    def _from_checkpoint(cls, path: str, device: str, num_threads: int | None, decode_cfg) -> "Engine":
        from harken.config import ExperimentConfig, from_dict
        from harken.text.tokenizer import tokenizer_from_dict
        from harken.train.checkpoint import load_checkpoint
        from harken.train.trainer import build_model

        if num_threads:
            torch.set_num_threads(int(num_threads))
        obj = load_checkpoint(path)
        for key in ("config", "model", "tokenizer"):
            if key not in obj:
                raise ValueError(f"{path}: not a harken checkpoint (missing '{key}')")
        cfg = from_dict(ExperimentConfig, obj["config"])
        tok = tokenizer_from_dict(obj["tokenizer"])
        model = build_model(cfg, tok.vocab_size)
        model.load_state_dict(obj["model"])
        return cls.from_model(model, tok, cfg, device, decode_cfg=decode_cfg)

    def warmup(self, seconds: float = 1.0) -> None:
        """One dummy inference (allocations, oneDNN/ORT kernel selection) so that the first real
        request runs at full speed."""
        rng = np.random.default_rng(0)
        wave = (0.01 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
        self._log_probs([wave])
        self.warmup_calls += 1

    # ---------------------------------------------------------------------------------- basics
    @property
    def model(self):
        """The torch model (torch backend only; None for ONNX)."""
        return getattr(self.backend, "model", None)

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def set_decoding(self, decode_cfg) -> None:
        """Use ``harken.decode.DecodeConfig`` (beam, LM, hotwords) instead of greedy decoding; the
        decoder (and its LM) is built once here, not per call."""
        self.decode_cfg = decode_cfg
        self._decoder = None
        if decode_cfg is not None and decode_cfg.method != "greedy":
            from harken.decode import build_decoder

            self._decoder = build_decoder(self.tokenizer, decode_cfg)

    def _as_wave(self, audio) -> tuple[np.ndarray, str]:
        return as_waveform(audio)

    def _log_probs(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per waveform: its CTC log-probs (T', V) float32 on the CPU."""
        from harken.data.dataset import pad_waves

        wave, lens = pad_waves(waves)
        log_probs, out_lens = self.backend(wave, lens)
        return [log_probs[b, : int(n)] for b, n in enumerate(out_lens.tolist())]

    log_probs = _log_probs

    def _text(self, lp: torch.Tensor, toks) -> str:
        if self._decoder is not None:
            from harken.decode import decode_texts

            return decode_texts(lp[None], torch.tensor([lp.shape[0]]), self.tokenizer, self.decode_cfg,
                                self._decoder)[0]
        return self.tokenizer.decode([t for t, *_ in toks])

    def _decode(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        return [self.transcript_from_log_probs(lp, len(w) / SAMPLE_RATE)
                for w, lp in zip(waves, self._log_probs(waves))]

    def transcript_from_log_probs(self, lp: torch.Tensor, duration: float) -> Transcript:
        """Text, word times and confidence of one utterance's log-probs (T', V)."""
        from harken.decode.greedy import greedy_frames

        toks = greedy_frames(lp[None], torch.tensor([lp.shape[0]]))[0]
        text = self._text(lp, toks)
        words = self._aligned_words(lp, text)
        if words is None:  # fall back to the greedy spikes
            words = self._words(toks, self.frame_shift * self.subsampling)
        conf = float(np.mean([c for *_, c in toks])) if toks else 0.0
        return Transcript(text=text, words=words, confidence=conf, duration=duration)

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

    # ------------------------------------------------------------------------------ public API
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

    def transcribe_batch(self, files: Sequence, max_duration: float = 200.0) -> list[Transcript]:
        """Transcribe many files (paths, bytes or waveforms) in duration-sorted batches of at most
        ``max_duration`` padded seconds; results in the input order."""
        loaded = [self._as_wave(f) for f in files]
        results: list[Transcript | None] = [None] * len(loaded)
        for batch in length_batches([len(w) / SAMPLE_RATE for w, _ in loaded], max_duration):
            for i, t in zip(batch, self._decode([loaded[i][0] for i in batch])):
                t.source = loaded[i][1]
                results[i] = t
        return results  # type: ignore[return-value]

    def transcribe_segments(self, audio, max_segment: float = 20.0, batch_size: int = 8, vad: str = "energy",
                            block_seconds: float = 2.0, min_silence: float = 0.5, pad: float = 0.2,
                            **vad_kw) -> Iterator[Segment]:
        """Transcribe a recording of any length, lazily (a generator, like faster-whisper's
        ``segments``): the file is read in blocks of ``block_seconds``, cut at pauses into pieces
        of at most ``max_segment`` seconds (forced cuts where speech runs on), decoded
        ``batch_size`` pieces at a time, and the segments are yielded in order with file-relative
        times. Memory stays bounded by the batch, not the file.

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

    transcribe_long = transcribe_segments

    def stream(self, chunk_size: int | None = None, left_chunks: int | None = None):
        """A :class:`harken.runtime.streaming.StreamingDecoder` over this engine's torch model.
        ``chunk_size`` (output frames of 40 ms; default: the model's ``encoder.chunk_size``, else
        16) and ``left_chunks`` (default: the model's; -1 unlimited)."""
        from harken.runtime.streaming import StreamingDecoder

        if self.model is None:
            raise ValueError("streaming needs the torch backend (a .pt checkpoint); "
                             "ONNX streaming uses harken.runtime.streaming_onnx")
        return StreamingDecoder(self.model, self.tokenizer, chunk_size=chunk_size, left_chunks=left_chunks,
                                decode_cfg=self.decode_cfg, decoder=self._decoder)

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend_name}, encoder={self.encoder_type}, "
                f"vocab={len(self.tokenizer.tokens)})")

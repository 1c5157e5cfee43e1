"""The one inference engine behind the CLI, the Python API and the server.

    engine = Engine.load("exp/demo/best.pt")                 # torch backend
    engine = Engine.load("model.onnx", num_threads=1)        # onnxruntime backend (harken "wave" ONNX)
    engine.transcribe("a.wav").text
    engine.transcribe("a.wav", options=DecodeOptions(method="beam", word_timestamps=True))
    results = engine.infer_batch([wave1, wave2], options)    # a Transcript or an ItemError per item
    for seg in engine.transcribe_segments("long.flac"):       # lazy, VAD-cut segments
        print(seg.start, seg.end, seg.text)

**Immutable and thread-safe.** Everything an Engine holds is fixed at construction: the backend,
the tokenizer, the :class:`ModelInfo` and the default :class:`DecodeOptions`. Decoding options
travel with each call; the beam decoders (and their LMs) they need are built once per distinct
option set and kept in a small LRU cache guarded by a lock. The public methods may be called from
many threads at once: the torch model runs under ``inference_mode`` without mutating state, an
onnxruntime ``InferenceSession.run`` is documented thread-safe, decoders keep per-call state in
locals. No process-wide setting changes after load; ``num_threads`` on the torch backend is the
caller's explicit request and sets torch's (process-wide) intra-op pool once, at load.

**Where the GIL is released.** The backend forward (torch ATen kernels, onnxruntime ``run``)
releases the GIL for its whole duration, so other Python threads (an asyncio event loop, audio
decoding) keep running; so does the batched part of greedy decoding (an argmax over the batch).
Padding, length sorting and the per-item post-processing (collapsing greedy paths, the prefix
beam search, forced alignment's Viterbi) are Python and hold it; they are per item and short
next to the forward, and :meth:`infer_batch` does them item by item so no single hold is long.

A backend maps a padded waveform batch ``(B, S) float32, lengths (B,) int64`` to CTC
``(log_probs (B, T', V), out_lens (B,))``; everything else is shared here.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch

from harken.audio import AudioError, _check_rate, _is_tensor, as_waveform, resample
from harken.data.sampler import length_batches
from harken.decode.rescore import RescoreError, RescoreTooLong
from harken.models.info import ModelInfo, file_model_id
from harken.runtime.blocks import iter_blocks
from harken.runtime.options import DecodeOptions, ItemError
from harken.runtime.results import Segment, Transcript, Word

__all__ = ["Engine", "ModelInfo", "DecodeOptions", "ItemError", "TorchBackend", "OnnxBackend", "VocabTokenizer",
           "read_onnx_metadata", "DEFAULT_MAX_ITEM_SECONDS"]

BACKENDS = ("auto", "torch", "onnx", "torchscript", "pt2")
DEFAULT_MAX_ITEM_SECONDS = 60.0  # one forward pass at most this long unless the caller says otherwise
DECODER_CACHE_SIZE = 8


# ------------------------------------------------------------------------------------ backends
class TorchBackend:
    """A :class:`harken.models.ctc.CtcModel` with its frontend, in eval mode.

    Inputs shorter than the model's smallest input are zero-padded up to it with their true
    lengths kept, so they give zero output frames (an empty transcript) instead of a conv error."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.min_input = self._probe_min_input()

    @torch.inference_mode()
    def _probe_min_input(self) -> int:
        for s in (160, 320, 400, 640, 800, 1200, 1600, 2400, 3200, 4800, 8000, 16000):
            try:
                self.model(torch.zeros(1, s, device=self.device), torch.tensor([s], device=self.device))
                return s
            except RuntimeError:
                continue
        return 16000

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.shape[1] < self.min_input:
            wave = torch.nn.functional.pad(wave, (0, self.min_input - wave.shape[1]))
        lp, n = self.model(wave.to(self.device), lens.to(self.device))
        return lp.float().cpu(), n.cpu()


class OnnxBackend:
    """One onnxruntime session over a harken "wave" ONNX file (waveform in, log-probs out)."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, providers=None):
        from harken.runtime.ort import make_session

        self.path = str(path)
        self.session = make_session(self.path, num_threads=num_threads, providers=providers)
        ins = self.session.get_inputs()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("input_kind") == "fbank":
            raise ValueError(f"{path}: a fbank-input ONNX (sherpa-wenet variant) is for sherpa-onnx; "
                             "export the 'wave' variant for harken's engine")
        if len(ins) != 2:
            raise ValueError(f"{path}: expected inputs (waveform, lengths), found {[i.name for i in ins]}; "
                             "a streaming ONNX runs through harken.runtime.streaming")
        self.input_names = [i.name for i in ins]
        self.min_input = int(self.metadata.get("min_input") or 0)

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


def tokenizer_from_info(info: ModelInfo):
    """The tokenizer an artifact carries (its ``to_dict``), else one from its vocabulary."""
    if info.tokenizer:
        from harken.text.tokenizer import tokenizer_from_dict

        return tokenizer_from_dict(info.tokenizer)
    return VocabTokenizer(list(info.vocabulary))


class _Timer:
    __slots__ = ("t0",)

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.t0 = time.perf_counter() - self.t0


# -------------------------------------------------------------------------------------- engine
class Engine:
    """Batched offline inference (and streaming sessions) over one model; immutable, thread-safe."""

    MAX_PAD_RATIO = 1.3  # longest / shortest item of one forward in infer_batch

    def __init__(self, backend, tokenizer, info: ModelInfo, *, options: DecodeOptions | None = None,
                 config=None, path: str | None = None, max_item_seconds: float | None = None,
                 decode_cfg=None):
        self._backend = backend
        self._tokenizer = tokenizer
        self._info = info
        self._config = config
        self._path = path
        self._options = options if options is not None else DecodeOptions.from_config(decode_cfg)
        limit = max_item_seconds if max_item_seconds is not None else (info.max_input_seconds or
                                                                        DEFAULT_MAX_ITEM_SECONDS)
        self._max_item_seconds = float(limit)
        self._decoders: OrderedDict = OrderedDict()
        self._streams: dict = {}
        self._lock = threading.Lock()
        self.warmup_calls = 0

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_model(cls, model, tokenizer, config, device: str | torch.device = "cpu", *,
                   options: DecodeOptions | None = None, decode_cfg=None, **kw) -> "Engine":
        """An engine over an in-memory :class:`CtcModel` (with frontend) and its experiment config."""
        info = ModelInfo.from_model(model, tokenizer, config)
        return cls._make(TorchBackend(model, device), tokenizer, info, options=options, decode_cfg=decode_cfg,
                         config=config, **kw)

    @classmethod
    def _make(cls, backend, tokenizer, info, **kw) -> "Engine":
        obj = cls.__new__(cls)
        Engine.__init__(obj, backend, tokenizer, info, **kw)
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", num_threads: int | None = None, *,
             providers: Sequence[str] | None = None, device: str = "cpu", warmup: bool = True,
             options: DecodeOptions | None = None, decode_cfg=None,
             max_item_seconds: float | None = None) -> "Engine":
        """``path``: a harken checkpoint (``.pt``; torch backend), a harken ONNX file (``.onnx``;
        onnxruntime backend), a TorchScript export (``.ts``) or an AOTInductor package (``.pt2``).
        ``backend``: "auto" (by the file), "torch", "onnx", "torchscript" or "pt2".
        ``num_threads``: ORT ``intra_op_num_threads`` for this session; on the torch backend it
        sets torch's process-wide intra-op pool (an explicit request: nothing is changed
        otherwise). ``providers``: ORT execution providers (default CPU). ``options``: the default
        :class:`DecodeOptions` of calls that pass none. ``warmup``: one dummy inference now, so the
        first request is not slow. ``max_item_seconds``: the longest input of one forward pass
        (default: the model's limit, else 60 s); longer inputs are VAD-segmented by
        :meth:`transcribe` and refused (or segmented, with ``long_form``) by :meth:`infer_batch`.

        Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that
        is not a usable harken model."""
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such model file")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} ({' | '.join(BACKENDS)})")
        is_onnx = path.endswith(".onnx")
        compiled = {".ts": "torchscript", ".pt2": "pt2"}.get(os.path.splitext(path)[1])
        if backend == "auto":
            backend = "onnx" if is_onnx else compiled or "torch"
        kw = dict(options=options, decode_cfg=decode_cfg, path=path, max_item_seconds=max_item_seconds)
        if backend in ("torchscript", "pt2"):
            from harken.runtime.backends_compiled import Pt2Backend, TorchScriptBackend

            if num_threads:  # torch's pool runs these too (process-wide; an explicit request)
                torch.set_num_threads(int(num_threads))
            cls_be = TorchScriptBackend if backend == "torchscript" else Pt2Backend
            try:
                be = cls_be(path, num_threads)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001 - a foreign or corrupt archive
                raise ValueError(f"{path}: not a loadable {backend} model ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
            info = ModelInfo.from_metadata(be.metadata, where=path)
            if not info.model_id:
                info = info.replace(model_id=file_model_id(path))
            eng = cls._make(be, tokenizer_from_info(info), info, **kw)
        elif backend == "onnx":
            if not is_onnx:
                raise ValueError(f"{path}: the onnx backend needs an .onnx file; export one with `harken export`")
            be = _open_onnx(path, num_threads, providers)
            info = ModelInfo.from_metadata(be.metadata, where=path)
            if not info.model_id:
                info = info.replace(model_id=file_model_id(path))
            eng = cls._make(be, tokenizer_from_info(info), info, **kw)
        else:
            if is_onnx:
                raise ValueError(f"{path}: an ONNX file needs backend 'onnx' (or 'auto')")
            from harken.models.load import load_model

            if num_threads:
                torch.set_num_threads(int(num_threads))
            lm = load_model(path, device=device)
            eng = cls._make(TorchBackend(lm.model, device), lm.tokenizer, lm.info, config=lm.config, **kw)
        if warmup:
            eng.warmup()
        return eng

    def warmup(self, seconds: float = 1.0) -> None:
        """One dummy inference (allocations, oneDNN/ORT kernel selection) so that the first real
        request runs at full speed."""
        rng = np.random.default_rng(0)
        wave = (0.01 * rng.standard_normal(int(seconds * self.sample_rate))).astype(np.float32)
        self.log_probs([wave])
        self.warmup_calls += 1

    # ---------------------------------------------------------------------------------- basics
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        """The experiment config of a checkpoint (None for exported models)."""
        return self._config

    @property
    def options(self) -> DecodeOptions:
        """Default decoding options of calls that pass none."""
        return self._options

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def backend(self):
        return self._backend

    @property
    def model(self):
        """The torch model (torch backend only; None otherwise)."""
        return getattr(self._backend, "model", None)

    @property
    def device(self) -> torch.device:
        return getattr(self._backend, "device", torch.device("cpu"))

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def sample_rate(self) -> int:
        return int(self._info.sample_rate)

    @property
    def max_item_seconds(self) -> float:
        return self._max_item_seconds

    @property
    def frame_seconds(self) -> float:
        return self._info.output_frame_shift

    @property
    def encoder_type(self) -> str:
        return self._info.encoder_type

    @property
    def time_offset(self) -> float:
        return self._info.time_offset

    @property
    def subsampling(self) -> int:
        return self._info.subsampling

    @property
    def frame_shift(self) -> float:
        return self._info.frame_shift

    def _decoder(self, options: DecodeOptions):
        """The beam decoder for ``options`` (None for greedy), built once per option set (LRU)."""
        if options.method == "greedy":
            return None
        key = options.decoder_key
        with self._lock:
            dec = self._decoders.get(key)
            if dec is not None:
                self._decoders.move_to_end(key)
                return dec
        from harken.decode import build_decoder

        dec = build_decoder(self._tokenizer, options.decode_config())  # outside the lock: LM loading is slow
        with self._lock:
            self._decoders[key] = dec
            self._decoders.move_to_end(key)
            while len(self._decoders) > DECODER_CACHE_SIZE:
                self._decoders.popitem(last=False)
        return dec

    def rescorer(self, options: DecodeOptions):
        """The :class:`harken.decode.rescore.WhisperRescorer` ``options.rescore`` names ("auto": the
        Whisper model a Whisper-CTC checkpoint was fine-tuned from); loaded once per process."""
        from harken.decode.rescore import WhisperRescorer, resolve_ref

        own = self._info.extra.get("pretrained") if self._info.encoder_type == "whisper" else None
        return WhisperRescorer.load(resolve_ref(options.rescore, own))

    def _as_wave(self, audio, sample_rate: int | None = None) -> tuple[np.ndarray, str]:
        """Any input -> (float32 waveform at the model's rate, source name). Files and bytes are
        decoded and resampled to the model's rate whatever theirs; a waveform array is taken to be
        at ``sample_rate`` (None: the model's) and resampled from it."""
        sr = self.sample_rate
        if sample_rate is not None and (isinstance(audio, np.ndarray) or _is_tensor(audio)):
            rate = _check_rate("<array>", sample_rate)
            if rate != sr:
                wave, name = as_waveform(audio, sample_rate=rate)
                return resample(wave, rate, sr), name
        return as_waveform(audio, sample_rate=sr)

    def log_probs(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per waveform: its CTC log-probs (T', V) float32 on the CPU (one padded forward)."""
        from harken.data.dataset import pad_waves

        wave, lens = pad_waves(waves)
        log_probs, out_lens = self._backend(wave, lens)
        return [log_probs[b, : int(n)] for b, n in enumerate(out_lens.tolist())]

    # ------------------------------------------------------------------------------- decoding
    def transcript_from_log_probs(self, lp: torch.Tensor, duration: float,
                                  options: DecodeOptions | None = None, wave: np.ndarray | None = None) -> Transcript:
        """Text, confidence and (when ``options.word_timestamps``) word times of one utterance's
        log-probs (T', V). ``wave`` (at the model's rate): the audio, needed by ``options.rescore``."""
        options = options or self._options
        t0 = time.perf_counter()
        from harken.decode.greedy import greedy_frames

        toks = greedy_frames(lp[None], torch.tensor([lp.shape[0]]))[0]
        dec = self._decoder(options)
        t_rescore = 0.0
        if dec is not None:
            nbest = int(options.rescore_nbest) if options.rescore else 1
            hyps = dec.decode(lp[None], torch.tensor([lp.shape[0]]), nbest=nbest)[0]
            text = hyps[0].text if hyps else ""
            if options.rescore and len(hyps) > 1:
                if wave is None:
                    raise ValueError("rescoring needs the audio (transcript_from_log_probs(..., wave=...))")
                from harken.decode.rescore import SAMPLE_RATE as RESCORE_RATE
                from harken.decode.rescore import pick_best

                tr = time.perf_counter()
                w16 = wave if self.sample_rate == RESCORE_RATE else resample(wave, self.sample_rate, RESCORE_RATE)
                scores = self.rescorer(options).score(w16, [h.text for h in hyps])
                text = hyps[pick_best([h.score for h in hyps], scores, float(options.rescore_weight))].text
                t_rescore = time.perf_counter() - tr
        else:
            text = self._tokenizer.decode([t for t, *_ in toks])
        t1 = time.perf_counter()
        words: list[Word] = []
        if options.word_timestamps:
            aligned = self._aligned_words(lp, text)
            words = aligned if aligned is not None else self._words(toks, self.frame_seconds)
        t2 = time.perf_counter()
        conf = float(np.mean([c for *_, c in toks])) if toks else 0.0
        timings = {"decoder": t1 - t0 - t_rescore, "alignment": t2 - t1}
        if options.rescore:
            timings["rescore"] = t_rescore
        return Transcript(text=text, words=words, confidence=conf, duration=duration, timings=timings)

    def _aligned_words(self, log_probs: torch.Tensor, text: str, strict: bool = False) -> list[Word] | None:
        """Forced alignment of ``text`` to one utterance's log-probs (T, V); None (or, with
        ``strict``, an AlignmentError) when it cannot be aligned."""
        from harken.decode.align import AlignmentError, align_text

        if not text.strip():
            return []
        info = self._info
        try:
            spans = align_text(log_probs, text, self._tokenizer, info.output_frame_shift, 1, info.time_offset)
        except AlignmentError:
            if strict:
                raise
            return None
        return [Word(s.word, s.start, s.end, s.confidence) for s in spans]

    def _words(self, toks, step: float) -> list[Word]:
        """Greedy-spike word times: a symbol starting with the word-boundary mark (U+2581) ends the
        current word; if it carries letters (a BPE piece) it also begins the next one."""
        symbols = self._tokenizer.tokens
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
        off = self._info.time_offset
        return [Word(w, max(0.0, s * step + off), (e + 1) * step + off, float(np.mean(cs)))
                for w, s, e, cs in words]

    # ------------------------------------------------------------------------------ batch call
    def infer_batch(self, waves: Sequence, options: DecodeOptions | None = None, *,
                    max_item_seconds: float | None = None, long_form: bool = False,
                    max_batch_frames: int | None = None, sources: Sequence[str] | None = None,
                    sample_rate: int | None = None) -> list[Transcript | ItemError]:
        """Transcribe already-decoded waveforms (1-D, at ``sample_rate``, default the model's
        ``self.sample_rate``, and resampled to it otherwise; any int/float dtype is scaled, see
        :func:`harken.audio.as_waveform`). Returns, per input and in order,
        a :class:`Transcript` or an :class:`ItemError`; one bad item never fails the others.

        Limits: an item longer than ``max_item_seconds`` (default: the engine's) is an
        ``ItemError("too_long")``, or with ``long_form`` is cut by VAD into segments (returned
        in ``Transcript.segments``). ``max_batch_frames``: the most padded feature frames (10 ms)
        in one forward (default: 200 s of audio). Items are sorted by length into batches.

        Each result's ``timings`` holds seconds spent on it: ``frontend_encoder`` (its share,
        by length, of its batch's forward), ``decoder`` and ``alignment``; ``batch_size`` and
        ``padding`` (the fraction of padded samples in its batch) describe the batch it rode in."""
        options = options or self._options
        limit = float(max_item_seconds) if max_item_seconds is not None else self._max_item_seconds
        sr = self.sample_rate
        results: list[Transcript | ItemError | None] = [None] * len(waves)
        ok: list[int] = []
        arrays: dict[int, np.ndarray] = {}
        same_rate = sample_rate is None or int(sample_rate) == sr
        for i, w in enumerate(waves):
            src = sources[i] if sources is not None else ""
            try:
                arr, _ = (w, "<array>") if same_rate and _is_plain_wave(w) else self._as_wave(w, sample_rate)
            except (AudioError, TypeError, ValueError) as e:
                results[i] = ItemError("bad_audio", f"item {i}: {e}", index=i, source=src,
                                       audio_code=getattr(e, "code", ""))
                continue
            dur = len(arr) / sr
            if limit and dur > limit:
                if not long_form:
                    results[i] = ItemError("too_long", f"item {i}: {dur:.1f} s of audio is over the limit of "
                                           f"{limit:g} s for one input (ask for long_form segmentation)",
                                           index=i, source=src)
                    continue
                try:
                    t = Transcript.from_segments(self.transcribe_segments(arr, options=options,
                                                                          max_segment=min(20.0, limit)),
                                                 source=src, duration=dur)
                    results[i] = t
                except Exception as e:  # noqa: BLE001 - one item's failure stays that item's
                    results[i] = ItemError("internal", f"item {i}: {type(e).__name__}: {e}", index=i, source=src)
                continue
            arrays[i] = arr
            ok.append(i)
        budget = (max_batch_frames * self._info.frame_shift) if max_batch_frames else 200.0
        durs = [len(arrays[i]) / sr for i in ok]
        # sorted by length and cut where the longest would pass 1.3x the shortest: padding stays
        # under ~25%, which costs more than the batching gains on a CPU (measured: bench/batch_infer.py)
        for batch in length_batches(durs, max(budget, max(durs, default=0.0)), max_ratio=self.MAX_PAD_RATIO):
            idx = [ok[j] for j in batch]
            for i, r in zip(idx, self._run_batch([arrays[i] for i in idx], options)):
                if isinstance(r, ItemError):
                    r.index, r.source = i, sources[i] if sources is not None else ""
                    r.message = f"item {i}: {r.message}"
                elif sources is not None:
                    r.source = sources[i]
                results[i] = r
        return results  # type: ignore[return-value]

    def _run_batch(self, waves: list[np.ndarray], options: DecodeOptions) -> list[Transcript | ItemError]:
        sr = self.sample_rate
        try:
            with _Timer() as tm:
                lps = self.log_probs(waves)
        except Exception as e:  # noqa: BLE001
            if len(waves) > 1:  # find the culprit: one at a time
                return [r for w in waves for r in self._run_batch([w], options)]
            return [ItemError("internal", f"inference failed ({type(e).__name__}: {e})")]
        total = sum(len(w) for w in waves) or 1
        padded = max(len(w) for w in waves) * len(waves) or 1
        out: list[Transcript | ItemError] = []
        for w, lp in zip(waves, lps):
            try:
                t = self.transcript_from_log_probs(lp, len(w) / sr, options, wave=w)
            except RescoreError:
                raise  # a configuration error (no rescorer), not one item's failure
            except RescoreTooLong as e:
                out.append(ItemError("too_long", f"rescoring: {e}"))
                continue
            except Exception as e:  # noqa: BLE001
                out.append(ItemError("internal", f"decoding failed ({type(e).__name__}: {e})"))
                continue
            t.timings["frontend_encoder"] = tm.t0 * len(w) / total
            t.timings["batch_size"] = float(len(waves))
            t.timings["padding"] = 1.0 - total / padded
            out.append(t)
        return out

    # ------------------------------------------------------------------------------ public API
    def transcribe(self, audio, options: DecodeOptions | None = None, *,
                   sample_rate: int | None = None) -> Transcript:
        """Transcribe one input: a file path, raw file bytes, a binary file object (any sample
        rate: decoded and resampled to the model's), or a 1-D waveform (numpy of any int/float
        dtype, or a torch tensor) at ``sample_rate`` (default: the model's ``self.sample_rate``).
        Inputs longer than ``max_item_seconds`` are cut by VAD and come back with ``segments``.
        Raises :class:`harken.audio.AudioError` for unusable audio."""
        t0 = time.perf_counter()
        wave, src = self._as_wave(audio, sample_rate)
        t_dec = time.perf_counter() - t0
        r = self.infer_batch([wave], options, long_form=True)[0]
        if isinstance(r, ItemError):
            if r.code == "bad_audio":
                raise AudioError(f"{src}: {r.message.split(': ', 1)[-1]}", code=r.audio_code or "bad_input")
            raise RuntimeError(f"{src}: {r.message}")
        r.source = src
        r.timings["audio_decode"] = t_dec
        return r

    def iter_transcribe(self, inputs: Sequence, options: DecodeOptions | None = None,
                        max_duration: float = 200.0, *, sample_rate: int | None = None
                        ) -> Iterator[tuple[int, Transcript | ItemError]]:
        """Transcribe many inputs (paths, bytes, waveforms at ``sample_rate``, default the
        model's), yielding ``(index, result)`` as each
        batch of about ``max_duration`` seconds finishes (results of a batch in input order, not
        necessarily overall). Only one batch of audio is held at a time; a file that cannot be
        read is an ``ItemError("bad_audio")`` and the rest go on."""
        pending: list[tuple[int, np.ndarray, str]] = []
        held = 0.0

        def flush():
            res = self.infer_batch([w for _, w, _ in pending], options, long_form=True,
                                   sources=[s for *_, s in pending])
            out = [(i, r) for (i, _, _), r in zip(pending, res)]
            pending.clear()
            return out

        for i, a in enumerate(inputs):
            try:
                w, src = self._as_wave(a, sample_rate)
            except (AudioError, TypeError, ValueError, OSError) as e:
                yield i, ItemError("bad_audio", str(e), index=i, source=str(a) if isinstance(a, (str, os.PathLike))
                                   else type(a).__name__)
                continue
            pending.append((i, w, src))
            held += len(w) / self.sample_rate
            if held >= max_duration:
                yield from flush()
                held = 0.0
        if pending:
            yield from flush()

    def transcribe_batch(self, inputs: Sequence, options: DecodeOptions | None = None,
                         max_duration: float = 200.0, *, sample_rate: int | None = None
                         ) -> list[Transcript | ItemError]:
        """:meth:`iter_transcribe` collected in input order (an ItemError where one failed)."""
        out: list = [None] * len(inputs)
        for i, r in self.iter_transcribe(inputs, options, max_duration, sample_rate=sample_rate):
            out[i] = r
        return out

    def align(self, audio, text: str, normalize: bool = True, *, sample_rate: int | None = None) -> list[Word]:
        """Word times and confidences of a known transcript ``text`` in ``audio`` (a waveform at
        ``sample_rate``, default the model's, or a file) by CTC forced
        alignment. The text is normalised first (``normalize``), so the words returned are the
        normalised ones. Raises :class:`harken.decode.align.AlignmentError` when the audio is too
        short for the text."""
        from harken.text.normalize import normalize_text

        wave, _ = self._as_wave(audio, sample_rate)
        if normalize:
            text = normalize_text(text)
        lp = self.log_probs([wave])[0]
        return self._aligned_words(lp, text, strict=True) or []

    def transcribe_segments(self, audio, options: DecodeOptions | None = None, max_segment: float = 20.0,
                            batch_size: int = 8, vad: str = "energy", block_seconds: float = 2.0,
                            min_silence: float = 0.5, pad: float = 0.2, sample_rate: int | None = None,
                            **vad_kw) -> Iterator[Segment]:
        """Transcribe a recording of any length, lazily (a generator, like faster-whisper's
        ``segments``): the input is read in blocks of ``block_seconds`` (files: soundfile formats
        streamed, others streamed through ffmpeg), cut at pauses into pieces of at most
        ``max_segment`` seconds (forced cuts where speech runs on), decoded ``batch_size`` pieces at
        a time, and the segments are yielded in order with input-relative times. Memory stays
        bounded by the batch, not the input. ``vad``: "energy", "webrtc" or "auto"; ``vad_kw`` go
        to the detector (e.g. ``margin_db``, ``hangover``). A waveform array is at ``sample_rate``
        (default: the model's). The detector works at 16 kHz: audio is cut at that rate and each
        piece resampled to the model's rate before decoding."""
        from harken.vad import SAMPLE_RATE as VAD_RATE
        from harken.vad import Segmenter, make_vad

        options = options or self._options
        sr = self.sample_rate
        seg = Segmenter(vad=make_vad(vad, **vad_kw), max_segment=max_segment, min_silence=min_silence, pad=pad)
        pending: list[tuple[int, np.ndarray]] = []
        next_id = 0

        def run() -> Iterator[Segment]:
            nonlocal next_id
            waves = [resample(w, VAD_RATE, sr) for _, w in pending]
            lps = self.log_probs(waves)
            for (start, _), wave, lp in zip(pending, waves, lps):
                t = self.transcript_from_log_probs(lp, len(wave) / sr, options, wave=wave)
                off = start / VAD_RATE
                words = [Word(w.word, w.start + off, w.end + off, w.confidence) for w in t.words]
                yield Segment(next_id, off, off + len(wave) / sr, t.text, words, t.confidence)
                next_id += 1
            pending.clear()

        for block in iter_blocks(audio, block_seconds, sample_rate=VAD_RATE, input_rate=sample_rate or sr):
            if not np.all(np.isfinite(block)):
                raise AudioError(f"{_name(audio)}: audio contains NaN or infinite samples", code="corrupt")
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

    def streaming_model(self, chunk_size: int | None = None, left_chunks: int | None = None,
                        options: DecodeOptions | None = None, onnx_path: str | None = None):
        """The shared :class:`harken.runtime.streaming.StreamingModel` over this engine's model
        (one per chunk geometry and option set, cached): many stream sessions, stepped
        together in batched forwards. The torch backend streams its own model; an ONNX engine needs
        the streaming ONNX export (``onnx_path``)."""
        from harken.runtime.streaming import StreamingModel

        options = options or self._options
        key = ("stream", chunk_size, left_chunks, options.decoder_key, onnx_path)
        with self._lock:
            sm = self._streams.get(key)
        if sm is None:
            if self.model is None and onnx_path is None:
                raise ValueError(f"{self._path or 'this model'}: streaming an ONNX model needs its streaming "
                                 "export (harken.runtime.streaming_onnx.export_streaming_onnx), not the offline one")
            sm = StreamingModel.from_engine(self, chunk_size, left_chunks, onnx_path=onnx_path, options=options)
            with self._lock:
                self._streams[key] = sm
        return sm

    def stream(self, chunk_size: int | None = None, left_chunks: int | None = None,
               options: DecodeOptions | None = None):
        """A single-stream :class:`harken.runtime.streaming.StreamingDecoder` over
        :meth:`streaming_model` (``chunk_size``: output frames per chunk; default the model's,
        else 16)."""
        from harken.runtime.streaming import StreamingDecoder

        return StreamingDecoder(streaming_model=self.streaming_model(chunk_size, left_chunks, options))

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend_name}, encoder={self.encoder_type}, "
                f"vocab={len(self._tokenizer.tokens)}, model_id={self._info.model_id or '-'})")


def _is_plain_wave(w) -> bool:
    return isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 1 and bool(np.isfinite(w).all())


def _name(audio) -> str:
    if isinstance(audio, (str, os.PathLike)):
        return str(audio)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(audio, np.ndarray):
        return "<array>"
    return f"<{type(audio).__name__}>"


def _open_onnx(path: str, num_threads, providers) -> OnnxBackend:
    try:
        return OnnxBackend(path, num_threads, providers)
    except ValueError:
        raise
    except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ... on a corrupt or foreign file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable ONNX model ({msg[:200]})") from None

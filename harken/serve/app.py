"""The FastAPI application of ``harken serve``.

    app = create_app(cfg, engine, streaming_model=None)
    app.state.harken            # ServerState: cfg, engine, streaming_model, metrics, store, batcher,
                                # draining, auth; check_api_key(token) -> key id | None

Routes: ``POST /v1/transcribe`` (harken's REST), ``POST /v1/audio/transcriptions`` and
``GET /v1/models`` (OpenAI-compatible), ``GET /v1/requests[/{id}]`` (recognition log),
``/healthz``, ``/readyz``, ``/metrics``. The WebSocket route and the web page come from
``harken.serve.stream`` (its ``router``) when that module exists; gRPC from
``harken.serve.grpc_server`` (``start(state)`` -> handle, ``stop(handle)``, either may be async),
started in the lifespan when ``cfg.grpc_port`` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import inspect
import json
import logging
import math
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from harken.serve.audio_in import decode_upload, pcm_to_wave, split_long
from harken.serve.batcher import Batcher, QueueFull, lower_priority
from harken.serve.config import ServeConfig
from harken.serve.errors import ApiError, install_error_handlers
from harken.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from harken.serve.middleware import GuardMiddleware
from harken.serve.store import Record, StoreError, open_store

__all__ = ["create_app", "ServerState", "RateLimiter", "Auth"]

log = logging.getLogger("harken.serve")

FORMATS = ("json", "text", "srt", "vtt")
OPENAI_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
         "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "nl": "dutch", "pt": "portuguese", "ru": "russian", "zh": "chinese", "ja": "japanese"}


# ------------------------------------------------------------------------------------- auth
class Auth:
    """API keys stored as SHA-256 digests; a presented token is hashed and compared in constant time."""

    def __init__(self, keys):
        self.keys = list(keys)
        self._by_digest = {bytes.fromhex(k.sha256.lower()): k for k in self.keys}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, token: str | None):
        if not token:
            return None
        d = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found = None
        for digest, key in self._by_digest.items():  # no early exit: constant time over the key set
            if hmac.compare_digest(digest, d):
                found = key
        return found

    def check(self, token: str | None) -> str | None:
        k = self.lookup(token)
        return k.id if k is not None else None


class RateLimiter:
    """Token buckets per key: ``per_minute`` requests per minute, bursts of ``burst``."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = max(1, int(burst))
        self._b: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """None when allowed, else the seconds until the next request would be."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, t = self._b.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - t) * self.rate)
            if tokens >= 1.0:
                self._b[key] = (tokens - 1.0, now)
                if len(self._b) > 10000:  # forget idle buckets (full ones carry no state)
                    self._b = {k: v for k, v in self._b.items() if v[0] < self.burst}
                return None
            self._b[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


# ------------------------------------------------------------------------------------ state
class ServerState:
    def __init__(self, cfg: ServeConfig, engine, streaming_model=None):
        import harken

        self.cfg = cfg
        self.engine = engine
        self.streaming_model = streaming_model
        info = getattr(engine, "info", None)
        self.sample_rate = int(getattr(engine, "sample_rate", None) or getattr(info, "sample_rate", 16000) or 16000)
        self.model_id = str(getattr(info, "model_id", "") or "")
        path = getattr(engine, "path", None) or ""
        self.model_name = cfg.model_name or (Path(path).stem if path else "harken")
        self.version = getattr(harken, "__version__", "")
        self.metrics = Metrics(model=self.model_name, version=self.version,
                               provider="cuda" if "cuda" in str(getattr(engine, "device", "cpu")) else "cpu",
                               backend=str(getattr(engine, "backend_name", "")))
        self.metrics.model_loaded.labels(model=self.model_name).set(1)
        self.auth = Auth(cfg.auth.api_keys)
        self.rate_limiter = RateLimiter(cfg.limits.rate_limit_per_minute, cfg.limits.rate_limit_burst)
        self.store = open_store(cfg.store.url, self.metrics, retain_audio=cfg.store.retain_audio,
                                audio_max_bytes=cfg.store.audio_max_bytes, busy_timeout_ms=cfg.store.busy_timeout_ms)
        b = cfg.batching
        max_item = getattr(engine, "max_item_seconds", None)
        self.segment_seconds = min(b.segment_seconds, float(max_item)) if max_item else b.segment_seconds
        self.batcher = Batcher(engine, self.metrics,
                               max_batch_size=b.max_batch_size if b.enabled else 1,
                               max_wait_ms=b.max_wait_ms if b.enabled else 0.0,
                               max_batch_seconds=b.max_batch_seconds, max_queue=b.max_queue, workers=b.workers,
                               sample_rate=self.sample_rate, model=self.model_name,
                               max_item_seconds=self.segment_seconds + 1.0, nice=b.worker_nice,
                               expect_more=lambda: self.preparing > 0)
        self.decode_pool = ThreadPoolExecutor(max_workers=b.decode_workers, thread_name_prefix="harken-decode",
                                              initializer=lower_priority, initargs=(b.worker_nice,))
        self.draining = False
        self.ready = True  # the engine is loaded and warmed before the app is built
        self.started = time.time()
        self.inflight = 0
        self.preparing = 0  # requests reading or decoding audio (they will enqueue soon)
        self.grpc_handle = None

    def check_api_key(self, token: str | None) -> str | None:
        """The key id for a presented API key (None: not valid). With auth off, every caller is
        "anonymous"."""
        if not self.auth.enabled:
            return "anonymous"
        return self.auth.check(token)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "loading"
        if self.batcher.saturated:
            return False, "queue_full"
        why = self.batcher.health(stuck_after=max(30.0, self.cfg.limits.request_timeout_s))
        if why is not None:
            return False, why
        return True, "ok"

    def close(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()


# --------------------------------------------------------------------------------- helpers
def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authorize(request: Request, st: ServerState) -> str | None:
    """The caller's key id (None with auth off); ApiError 401 / 429 otherwise."""
    key_id = None
    if st.auth.enabled:
        token = _bearer(request)
        key_id = st.auth.check(token)
        if key_id is None:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)" if not token
                           else "the API key is not valid", code="invalid_api_key", reason="unauthorized")
    bucket = key_id or (request.client.host if request.client else "anonymous")
    wait = st.rate_limiter.take(bucket)
    if wait is not None:
        raise ApiError(429, f"rate limit of {st.cfg.limits.rate_limit_per_minute:g} requests per minute exceeded; "
                       f"retry in {wait:.1f} s", code="rate_limit_exceeded", reason="rate_limited",
                       retry_after=math.ceil(wait))
    return key_id


def _bool(v, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(400, f"{name}: expected true or false, got {v!r}", code="invalid_value", param=name)


def _num(v, name: str, lo: float, hi: float, integer: bool = False):
    try:
        x = float(v)
        if integer:
            if x != int(x):
                raise ValueError
            x = int(x)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name}: expected a number, got {v!r}", code="invalid_value", param=name) from None
    if not (lo <= x <= hi) or (isinstance(x, float) and not math.isfinite(x)):
        raise ApiError(400, f"{name}: must be between {lo:g} and {hi:g} (got {v})", code="invalid_value", param=name)
    return x


def _choice(v, name: str, choices) -> str:
    s = str(v).strip().lower()
    if s not in choices:
        raise ApiError(400, f"{name}: {v!r} is not one of {', '.join(choices)}", code="invalid_value", param=name)
    return s


def _parse_hotwords(values: list[str]) -> tuple:
    out = []
    for raw in values:
        for item in str(raw).split(","):
            item = item.strip()
            if not item:
                continue
            phrase, sep, boost = item.rpartition(":")
            if not sep:
                phrase, boost = item, "3.0"
            b = _num(boost, "hotwords", -20.0, 20.0)
            phrase = " ".join(phrase.lower().split())
            if not phrase or len(phrase) > 200:
                raise ApiError(400, f"hotwords: {item!r} is not a phrase[:boost]", code="invalid_value",
                               param="hotwords")
            out.append((phrase, float(b)))
    if len(out) > 200:
        raise ApiError(400, "hotwords: at most 200 phrases", code="invalid_value", param="hotwords")
    return tuple(out)


def make_options(st: ServerState, method: str | None, beam_size, hotwords: tuple, word_timestamps: bool):
    """DecodeOptions for a request (the server's LM for beam_lm)."""
    try:
        from harken.runtime.options import DecodeOptions
    except ImportError:  # pre-contract runtime: greedy only
        return None
    explicit = method is not None
    method = method or ("beam" if hotwords else "greedy")
    if method == "greedy" and hotwords:
        if explicit:
            raise ApiError(400, "hotwords need decoding=beam or beam_lm", code="invalid_value", param="hotwords")
    if method == "beam_lm" and not st.cfg.lm:
        raise ApiError(400, "decoding=beam_lm: this server has no language model (start it with lm=PATH.arpa)",
                       code="invalid_value", param="decoding")
    kw = dict(method=method, word_timestamps=bool(word_timestamps), hotwords=hotwords)
    if method != "greedy":
        kw["beam_size"] = int(beam_size or st.cfg.beam_size)
    if method == "beam_lm":
        kw.update(lm_path=st.cfg.lm, lm_weight=st.cfg.lm_weight, word_bonus=st.cfg.word_bonus)
    if method != "greedy" and st.cfg.rescore:
        kw.update(rescore=st.cfg.rescore, rescore_weight=st.cfg.rescore_weight, rescore_nbest=st.cfg.rescore_nbest)
    try:
        return DecodeOptions(**kw)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value", param="decoding") from None


def options_dict(opts, fmt: str) -> dict:
    if opts is None:
        return {"format": fmt}
    d = {"decoding": opts.method, "word_timestamps": opts.word_timestamps, "format": fmt}
    if opts.method != "greedy":
        d["beam_size"] = opts.beam_size
    if opts.hotwords:
        d["hotwords"] = [list(h) for h in opts.hotwords]
    if opts.rescore:
        d["rescore_weight"] = opts.rescore_weight
    return d


# ----------------------------------------------------------------------------- the pipeline
class Job:
    """One request's audio on its way through decode -> VAD pieces -> batch queue -> transcript."""

    def __init__(self, st: ServerState, endpoint: str, options, deadline: float):
        self.st = st
        self.endpoint = endpoint
        self.options = options
        self.deadline = deadline
        self.duration = 0.0
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.items = []
        self.compute = 0.0
        self.queue_wait = 0.0
        self._preparing = True  # counted in st.preparing until submitted or abandoned
        st.preparing += 1

    def _end_prep(self) -> None:
        if self._preparing:
            self._preparing = False
            self.st.preparing -= 1

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def _off_loop(self, fn, *args, timeout: float | None = None):
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.st.decode_pool, fn, *args)
        t = self.remaining() if timeout is None else min(timeout, self.remaining())
        try:
            return await asyncio.wait_for(fut, max(0.001, t))
        except asyncio.TimeoutError:
            if timeout is not None and timeout <= self.remaining():
                raise ApiError(422, "decoding the audio took too long", code="decode_timeout", param="file",
                               reason="timeout") from None
            raise ApiError(504, f"the request did not finish within {self.st.cfg.limits.request_timeout_s:g} s",
                           code="timeout", reason="timeout") from None

    async def load_file(self, data: bytes, param: str = "file") -> None:
        lim = self.st.cfg.limits
        try:
            # the decode deadline is load_audio's own (it kills the ffmpeg child: 422); here only the
            # request deadline applies, so time spent waiting for a free decode thread is not a 422
            wave = await self._off_loop(decode_upload, data, self.st.sample_rate, lim.max_audio_seconds,
                                        lim.decode_timeout_s, self.st.metrics, param)
        except BaseException:
            self._end_prep()
            raise
        await self.load_wave(wave)

    async def load_wave(self, wave: np.ndarray) -> None:
        try:
            await self._load_wave(wave)
        except BaseException:
            self._end_prep()
            raise

    async def _load_wave(self, wave: np.ndarray) -> None:
        self.duration = len(wave) / self.st.sample_rate
        if self.duration > self.st.cfg.limits.max_audio_seconds:
            raise ApiError(413, f"the decoded audio ({self.duration:.0f} s) is longer than the limit of "
                           f"{self.st.cfg.limits.max_audio_seconds:g} s", code="audio_too_long", param="file",
                           reason="too_long")
        if self.duration <= self.st.segment_seconds:
            self.pieces = [(0, wave)]
        else:
            self.pieces = await self._off_loop(split_long, wave, self.st.segment_seconds, self.st.sample_rate)

    def submit(self) -> None:
        self._end_prep()
        if not self.pieces:
            return
        try:
            self.items = self.st.batcher.submit([w for _, w in self.pieces], self.options, self.deadline)
        except QueueFull as e:
            self.st.metrics.reject("queue_full")
            raise ApiError(503, f"the server is busy ({e}); retry shortly", code="server_busy",
                           retry_after=self.st.cfg.limits.retry_after_s) from None

    def cancel(self) -> None:
        self._end_prep()
        for it in self.items:
            it.cancel()
            if not it.future.done():
                it.future.cancel()

    async def results(self, request: Request | None = None) -> AsyncIterator[Any]:
        """Transcripts of the pieces in order (as :class:`Segment` for long audio); drops the
        queued work and stops when the client disconnects."""
        from harken.runtime.results import Segment, Word

        watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
        try:
            for n, ((start, wave), it) in enumerate(zip(self.pieces, self.items)):
                waits = {it.future} | ({watcher} if watcher is not None else set())
                done, _ = await asyncio.wait(waits, timeout=max(0.0, self.remaining()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if watcher is not None and watcher in done:
                    raise ClientGone()
                if it.future not in done:
                    raise ApiError(504, f"the request did not finish within {self.st.cfg.limits.request_timeout_s:g} s",
                                   code="timeout", reason="timeout")
                try:
                    r = it.future.result()
                except asyncio.CancelledError:
                    raise ClientGone() from None
                except TimeoutError:
                    raise ApiError(504, "the request timed out waiting in the queue", code="timeout",
                                   reason="timeout") from None
                except Exception as e:
                    raise ApiError(500, f"inference failed ({type(e).__name__})", code="internal") from None
                self.compute += it.compute
                self.queue_wait = max(self.queue_wait, it.queue_wait)
                if not hasattr(r, "text"):  # an ItemError
                    code = getattr(r, "code", "internal")
                    if code == "bad_audio":
                        raise ApiError(400, f"file: {getattr(r, 'message', r)}", code="invalid_audio", param="file",
                                       reason="decode_error")
                    if code == "too_long":
                        raise ApiError(413, f"file: {getattr(r, 'message', r)}", code="audio_too_long",
                                       param="file", reason="too_long")
                    raise ApiError(500, "inference failed", code="internal")
                if len(self.pieces) == 1 and start == 0:
                    yield r
                else:
                    off = start / self.st.sample_rate
                    words = [Word(w.word, w.start + off, w.end + off, w.confidence) for w in r.words]
                    yield Segment(n, off, off + len(wave) / self.st.sample_rate, r.text, words, r.confidence)
        finally:
            if watcher is not None:
                watcher.cancel()
            self.cancel()

    async def transcript(self, request: Request | None = None):
        from harken.runtime.results import Segment, Transcript

        got = [r async for r in self.results(request)]
        if len(got) == 1 and not isinstance(got[0], Segment):
            t = got[0]
            t.duration = self.duration
            return t
        return Transcript.from_segments(got, duration=self.duration)


class ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def read_body(request: Request, st: ServerState) -> bytes:
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > st.cfg.limits.max_upload_bytes:
            raise ApiError(413, f"the upload is over the limit of {st.cfg.limits.max_upload_bytes} bytes",
                           code="file_too_large", param="file", reason="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, st: ServerState):
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415 if ctype else 400, f"expected multipart/form-data, got {ctype or 'no Content-Type'}",
                       code="unsupported_content_type", param="file")
    try:
        return await request.form(max_files=2, max_fields=64, max_part_size=1024 * 1024)
    except ApiError:
        raise
    except Exception as e:  # starlette's MultiPartException / HTTPException: a malformed body
        msg = getattr(e, "detail", None) or getattr(e, "message", None) or str(e) or type(e).__name__
        raise ApiError(400, f"malformed multipart body ({msg})", code="invalid_multipart", param="file",
                       reason="bad_request") from None


async def form_file(form, st: ServerState, name: str = "file") -> tuple[bytes, str]:
    up = form.get(name)
    if up is None or isinstance(up, str):
        raise ApiError(400, f"{name}: a file part named '{name}' is required", code="missing_file", param=name)
    size = getattr(up, "size", None)
    if size is not None and size > st.cfg.limits.max_upload_bytes:
        raise ApiError(413, f"{name}: {size} bytes is over the upload limit of {st.cfg.limits.max_upload_bytes} "
                       "bytes", code="file_too_large", param=name, reason="too_large")
    data = await up.read()
    if len(data) > st.cfg.limits.max_upload_bytes:
        raise ApiError(413, f"{name}: over the upload limit of {st.cfg.limits.max_upload_bytes} bytes",
                       code="file_too_large", param=name, reason="too_large")
    return data, (up.content_type or "")


def _words(ws) -> list[dict]:
    return [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
             "confidence": round(w.confidence, 4)} for w in ws]


def rest_body(t, rid: str, st: ServerState, word_timestamps: bool) -> dict:
    from harken.runtime.results import Segment

    segs = t.segments or [Segment(0, 0.0, t.duration, t.text, t.words, t.confidence)]
    out = {"id": rid, "model": st.model_name, "text": t.text, "duration": round(t.duration, 3),
           "confidence": round(t.confidence, 4),
           "segments": [{"id": g.id, "start": round(g.start, 3), "end": round(g.end, 3), "text": g.text,
                         "confidence": round(g.confidence, 4),
                         **({"words": _words(g.words)} if word_timestamps else {})}
                        for g in segs]}
    if word_timestamps:
        out["words"] = _words(t.words)
    return out


def render_text(t, fmt: str) -> str:
    from harken.output import to_srt, to_vtt

    if fmt == "text":
        return t.text + "\n"
    if fmt == "srt":
        return to_srt(t)
    return to_vtt(t)


def verbose_json(t, st: ServerState, language: str | None, words: bool, with_segments: bool = True) -> dict:
    from harken.runtime.results import Segment

    segs = t.segments or [Segment(0, 0.0, t.duration, t.text, t.words, t.confidence)]

    def seg(g) -> dict:
        text = g.text
        raw = text.encode("utf-8")
        ratio = len(raw) / len(zlib.compress(raw)) if raw else 0.0
        return {"id": g.id, "seek": int(round(g.start * 100)), "start": round(g.start, 3), "end": round(g.end, 3),
                "text": text, "tokens": [], "temperature": 0.0,
                "avg_logprob": round(math.log(max(g.confidence, 1e-6)), 4) if text else 0.0,
                "compression_ratio": round(ratio, 4), "no_speech_prob": 0.0 if text else 1.0}

    out = {"task": "transcribe", "language": language or st.cfg.language, "duration": round(t.duration, 3),
           "text": t.text}
    if with_segments:
        out["segments"] = [seg(g) for g in segs]
    if words:
        out["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in t.words]
    out["usage"] = {"type": "duration", "seconds": int(math.ceil(t.duration))}
    return out


# --------------------------------------------------------------------------------- the app
def _load_optional(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


async def _maybe_await(x):
    if inspect.isawaitable(x):
        return await x
    return x


MULTIPART_DOC = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "decoding": {"type": "string", "enum": ["greedy", "beam", "beam_lm"]},
            "beam_size": {"type": "integer", "minimum": 1, "maximum": 64},
            "hotwords": {"type": "array", "items": {"type": "string"}},
            "word_timestamps": {"type": "boolean"},
            "format": {"type": "string", "enum": list(FORMATS)},
        }}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "audio/wav": {"schema": {"type": "string", "format": "binary"}},
    }},
}
OPENAI_DOC = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file", "model"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "model": {"type": "string"},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "response_format": {"type": "string", "enum": list(OPENAI_FORMATS)},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
            "stream": {"type": "boolean"},
        }}}}},
}


def _err_doc(*codes) -> dict:
    desc = {400: "bad request or corrupt audio", 401: "missing or invalid API key", 404: "not found",
            408: "request body too slow", 413: "upload or decoded audio too large", 415: "unsupported format",
            422: "decode timeout", 429: "rate limited (Retry-After)", 500: "internal error",
            503: "busy or draining (Retry-After)", 504: "request timeout"}
    return {c: {"description": desc[c], "content": {"application/json": {"schema": {"type": "object"}}}}
            for c in codes}


TRANSCRIBE_ERRORS = _err_doc(400, 401, 408, 413, 415, 422, 429, 500, 503, 504)
_TEXT = {"schema": {"type": "string"}}
REST_OK = {200: {"description": "the transcript (json, text, srt or vtt)", "content": {
    "application/json": {"schema": {"type": "object"}}, "text/plain": _TEXT, "application/x-subrip": _TEXT,
    "text/vtt": _TEXT}}}
OPENAI_OK = {200: {"description": "the transcription", "content": {
    **REST_OK[200]["content"], "text/event-stream": _TEXT}}}


def create_app(cfg: ServeConfig, engine, streaming_model=None) -> FastAPI:
    st = ServerState(cfg, engine, streaming_model)
    grpc_mod = _load_optional("harken.serve.grpc_server") if cfg.grpc_port else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.loop = asyncio.get_running_loop()
        if sys.getswitchinterval() > 0.001:  # the loop thread gets the GIL back sooner from compute threads
            sys.setswitchinterval(0.001)
        if grpc_mod is not None:
            st.grpc_handle = await _maybe_await(grpc_mod.start(st))
        try:
            yield
        finally:
            st.draining = True
            st.metrics.model_loaded.labels(model=st.model_name).set(0)
            if grpc_mod is not None:
                try:
                    await _maybe_await(grpc_mod.stop(st.grpc_handle if st.grpc_handle is not None else st))
                except Exception:
                    log.exception("gRPC server stop failed")
            await asyncio.get_running_loop().run_in_executor(None, st.close)

    app = FastAPI(title="harken", version=st.version or "0", lifespan=lifespan,
                  description="Speech recognition server: harken REST, OpenAI-compatible transcriptions, "
                              "streaming, recognition log.")
    app.state.harken = st
    install_error_handlers(app)

    # ---------------------------------------------------------------------------- probes
    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses=_err_doc(503))
    async def readyz():
        ok, why = st.readiness()
        body = {"ready": ok, "status": why, "queue_depth": st.batcher.depth, "model": st.model_name}
        if ok:
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(st.cfg.limits.retry_after_s)})

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": _TEXT}}})
    async def metrics():
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------------------- models
    def model_obj() -> dict:
        return {"id": st.model_name, "object": "model", "created": int(st.started), "owned_by": "harken",
                "harken": {"model_id": st.model_id, "backend": str(getattr(engine, "backend_name", "")),
                           "sample_rate": st.sample_rate, "streaming": streaming_model is not None}}

    @app.get("/v1/models", tags=["openai"], responses=_err_doc(401, 429))
    async def list_models(request: Request):
        authorize(request, st)
        return {"object": "list", "data": [model_obj()]}

    @app.get("/v1/models/{model}", tags=["openai"], responses=_err_doc(401, 404, 429))
    async def get_model(model: str, request: Request):
        authorize(request, st)
        if model != st.model_name:
            raise ApiError(404, f"model {model!r} does not exist (this server has {st.model_name!r})",
                           code="model_not_found", param="model")
        return model_obj()

    # ---------------------------------------------------------------------------- logging
    def log_record(request: Request, endpoint: str, status: int, t0: float, key_id, job: Job | None, opts: dict,
                   text: str = "", error: str | None = None, audio: bytes | None = None, audio_type: str = ""):
        if st.store is None:
            return
        rec = Record(id=request.scope["state"]["request_id"], endpoint=endpoint, status=status, key_id=key_id,
                     audio_seconds=round(job.duration, 3) if job else 0.0, model_id=st.model_id or st.model_name,
                     options=opts, text=text, latency=round(time.perf_counter() - t0, 4), error=error,
                     audio=audio if st.cfg.store.retain_audio else None, audio_type=audio_type)
        st.store.log(rec)

    async def run(request: Request, endpoint: str, job_setup, opts_for_log: dict, key_id, respond, options):
        """Shared try/finally of the two transcription routes: in-flight gauge, metrics, the log."""
        t0 = time.perf_counter()
        st.metrics.inflight.labels(endpoint=endpoint).inc()
        st.inflight += 1
        job = None
        status, text, error = 500, "", None
        audio, atype = None, ""
        try:
            job = new_job(endpoint, options)
            audio, atype = await job_setup(job)
            job.submit()
            t = await job.transcript(request)
            status, text = 200, t.text
            st.metrics.observe_audio(endpoint, job.duration, job.compute)
            return respond(t, job)
        except ApiError as e:
            status, error = e.status, e.message
            raise
        except ClientGone:
            status, error = 499, "client disconnected"
            return Response(status_code=499)
        finally:
            if job is not None:
                job._end_prep()
            st.metrics.inflight.labels(endpoint=endpoint).dec()
            st.inflight -= 1
            log.log(logging.WARNING if status >= 500 else logging.DEBUG,
                    "%s %s status=%d audio=%.2fs latency=%.3fs key=%s%s", endpoint,
                    request.scope["state"]["request_id"], status, job.duration if job else 0.0,
                    time.perf_counter() - t0, key_id or "-", f" error={error!r}" if error else "")
            log_record(request, endpoint, status, t0, key_id, job, opts_for_log, text, error, audio, atype)

    def new_job(endpoint: str, options) -> Job:
        return Job(st, endpoint, options, time.monotonic() + cfg.limits.request_timeout_s)

    # ---------------------------------------------------------------------------- REST
    @app.post("/v1/transcribe", tags=["harken"], openapi_extra=MULTIPART_DOC, response_class=Response,
              responses={**REST_OK, **TRANSCRIBE_ERRORS})
    async def transcribe(request: Request):
        """Transcribe one file: multipart (``file`` plus option fields) or the raw file as the body
        (options in the query string; raw PCM with ``encoding=pcm_s16le|pcm_f32le&sample_rate=N``)."""
        key_id = authorize(request, st)
        ctype = request.headers.get("content-type", "").lower()
        q = request.query_params
        form = None
        if ctype.startswith("multipart/"):
            form = await read_form(request, st)
        elif ctype.startswith(("application/x-www-form-urlencoded", "application/json", "text/")):
            raise ApiError(415, f"Content-Type {ctype.split(';')[0]} is not audio: send multipart/form-data with a "
                           "'file' part, or the audio file itself as the body", code="unsupported_content_type",
                           param="file")

        def get(name, default=None):
            if form is not None and name in form and isinstance(form.get(name), str):
                return form.get(name)
            return q.get(name, default)

        def get_all(name) -> list[str]:
            vals = [v for v in form.getlist(name) if isinstance(v, str)] if form is not None else []
            return vals + q.getlist(name)

        fmt = _choice(get("format", "json"), "format", FORMATS)
        method = _choice(get("decoding"), "decoding", ("greedy", "beam", "beam_lm")) if get("decoding") else None
        beam = _num(get("beam_size"), "beam_size", 1, 64, integer=True) if get("beam_size") else None
        hot = _parse_hotwords(get_all("hotwords") + get_all("hotword"))
        wts = _bool(get("word_timestamps", "false"), "word_timestamps") or fmt in ("srt", "vtt")
        opts = make_options(st, method, beam, hot, wts)
        od = options_dict(opts, fmt)

        async def setup(job):
            if form is not None:
                data, atype = await form_file(form, st)
                await job.load_file(data)
            else:
                data = await read_body(request, st)
                enc = q.get("encoding")
                atype = ctype
                if enc or ctype.startswith(("audio/pcm", "audio/l16")):
                    rate = _num(q.get("sample_rate", "16000"), "sample_rate", 1000, 384000, integer=True)
                    ch = _num(q.get("channels", "1"), "channels", 1, 32, integer=True)
                    wave = await job._off_loop(pcm_to_wave, data, enc or "pcm_s16le", rate, ch, st.sample_rate,
                                               cfg.limits.max_audio_seconds, "body")
                    await job.load_wave(wave)
                else:
                    await job.load_file(data, param="body")
            return data, atype

        def respond(t, job):
            rid = request.scope["state"]["request_id"]
            if fmt == "json":
                return JSONResponse(rest_body(t, rid, st, wts))
            return PlainTextResponse(render_text(t, fmt), media_type=MEDIA[fmt])

        return await run(request, "rest", setup, od, key_id, respond, opts)

    # ---------------------------------------------------------------------------- OpenAI
    @app.post("/v1/audio/transcriptions", tags=["openai"], openapi_extra=OPENAI_DOC, response_class=Response,
              responses={**OPENAI_OK, **TRANSCRIBE_ERRORS})
    async def openai_transcriptions(request: Request):
        """OpenAI's ``audio.transcriptions.create`` (see docs/serving.md for the field mapping)."""
        key_id = authorize(request, st)
        form = await read_form(request, st)

        def get(name, default=None):
            v = form.get(name)
            return v if isinstance(v, str) else default

        fmt = _choice(get("response_format", "json"), "response_format", OPENAI_FORMATS)
        gran = [v for v in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
                if isinstance(v, str)]
        gran = {_choice(g, "timestamp_granularities[]", ("word", "segment")) for g in gran} or {"segment"}
        if get("temperature") is not None:
            _num(get("temperature"), "temperature", 0.0, 1.0)
        stream = _bool(get("stream", "false"), "stream")
        lang = get("language")
        if lang is not None and (len(lang) > 32 or not lang.replace("-", "").replace("_", "").isalnum()):
            raise ApiError(400, f"language: {lang!r} is not a language code (ISO-639-1, e.g. 'en')",
                           code="invalid_value", param="language")
        lang_name = None
        if lang and lang.lower() not in ("auto", ""):
            lang_name = LANGUAGE_NAMES.get(lang.lower().split("-")[0], lang.lower())
        words = "word" in gran and fmt == "verbose_json"
        opts = make_options(st, None, None, (), words or fmt in ("srt", "vtt"))
        od = options_dict(opts, fmt)
        od["openai_model"] = (get("model") or "")[:64]
        if stream:
            od["stream"] = True
        data, atype = await form_file(form, st)

        async def setup(job):
            await job.load_file(data)
            return data, atype

        if stream and fmt in ("json", "text"):
            return await sse_response(request, setup, od, key_id, opts)

        def respond(t, job):
            if fmt == "json":
                usage = {"type": "duration", "seconds": int(math.ceil(t.duration))}
                return JSONResponse({"text": t.text, "usage": usage})
            if fmt == "verbose_json":
                return JSONResponse(verbose_json(t, st, lang_name, words))
            return PlainTextResponse(render_text(t, fmt), media_type=MEDIA[fmt])

        return await run(request, "openai", setup, od, key_id, respond, opts)

    async def sse_response(request: Request, setup, od: dict, key_id, options):
        t0 = time.perf_counter()
        job = new_job("openai", options)
        try:
            audio, atype = await setup(job)  # errors before the stream starts stay plain JSON errors
            job.submit()
        except BaseException:
            job._end_prep()
            raise
        st.metrics.inflight.labels(endpoint="openai").inc()
        st.inflight += 1

        async def events():
            texts, status, error = [], 500, None
            try:
                async for r in job.results(None):
                    if r.text:
                        yield _sse({"type": "transcript.text.delta", "delta": (" " if texts else "") + r.text})
                        texts.append(r.text)
                status = 200
                st.metrics.observe_audio("openai", job.duration, job.compute)
                yield _sse({"type": "transcript.text.done", "text": " ".join(texts),
                            "usage": {"type": "duration", "seconds": int(math.ceil(job.duration))}})
                yield "data: [DONE]\n\n"
            except ApiError as e:
                status, error = e.status, e.message
                yield _sse({"type": "error", "error": {"message": e.message, "type": e.type, "code": e.code,
                                                       "param": e.param}})
            except asyncio.CancelledError:
                status, error = 499, "client disconnected"
                raise
            finally:
                job.cancel()
                st.metrics.inflight.labels(endpoint="openai").dec()
                st.inflight -= 1
                log_record(request, "openai", status, t0, key_id, job, od, " ".join(texts), error, audio, atype)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------------------- recognition log
    def need_store():
        if st.store is None:
            raise ApiError(404, "the recognition log is off on this server (store.url is null)", code="store_off")

    def visible_key(request: Request):
        """None: may see every record; else the only key id whose records are visible."""
        if not st.auth.enabled:
            return None
        k = st.auth.lookup(_bearer(request))
        return None if k is not None and k.admin else (k.id if k else "")

    @app.get("/v1/requests", tags=["harken"], responses=_err_doc(400, 401, 404, 429, 503))
    async def list_requests(request: Request, limit: int = 50, cursor: str | None = None):
        authorize(request, st)
        need_store()
        if not (1 <= limit <= 500):
            raise ApiError(400, f"limit: must be between 1 and 500 (got {limit})", code="invalid_value", param="limit")
        cur = None
        if cursor:
            try:
                cur = int(cursor)
            except ValueError:
                raise ApiError(400, "cursor: not a cursor from a previous page", code="invalid_value",
                               param="cursor") from None
        try:
            recs, nxt = await asyncio.get_running_loop().run_in_executor(
                None, lambda: st.store.list(limit=limit, cursor=cur, key_id=visible_key(request)))
        except StoreError as e:
            raise ApiError(503, str(e), code="store_unavailable", retry_after=5) from None
        return {"object": "list", "data": recs, "has_more": nxt is not None,
                "next_cursor": str(nxt) if nxt is not None else None}

    @app.get("/v1/requests/{rid}", tags=["harken"], responses=_err_doc(401, 404, 429, 503))
    async def get_request(rid: str, request: Request):
        authorize(request, st)
        need_store()
        try:
            rec = await asyncio.get_running_loop().run_in_executor(None, st.store.get, rid)
        except StoreError as e:
            raise ApiError(503, str(e), code="store_unavailable", retry_after=5) from None
        vk = visible_key(request)
        if rec is None or (vk is not None and rec.get("key_id") != vk):
            raise ApiError(404, f"no request {rid!r} in the recognition log", code="not_found", param="id")
        return rec

    @app.get("/v1/requests/{rid}/audio", tags=["harken"], response_class=Response,
             responses={200: {"description": "the retained upload", "content": {"application/octet-stream": _TEXT,
                                                                                 "audio/*": _TEXT}},
                        **_err_doc(401, 404, 429, 503)})
    async def get_request_audio(rid: str, request: Request):
        authorize(request, st)
        need_store()
        loop = asyncio.get_running_loop()
        try:
            rec = await loop.run_in_executor(None, st.store.get, rid)
            vk = visible_key(request)
            got = None
            if rec is not None and (vk is None or rec.get("key_id") == vk):
                got = await loop.run_in_executor(None, st.store.get_audio, rid)
        except StoreError as e:
            raise ApiError(503, str(e), code="store_unavailable", retry_after=5) from None
        if got is None:
            raise ApiError(404, f"no retained audio for request {rid!r}", code="not_found", param="id")
        return Response(got[0], media_type=got[1] or "application/octet-stream")

    # ---------------------------------------------------------------------------- plug-ins
    stream_mod = _load_optional("harken.serve.stream")
    if stream_mod is not None and hasattr(stream_mod, "router"):
        app.include_router(stream_mod.router)

    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-request-id"],
                           expose_headers=["x-request-id", "Retry-After"], max_age=600)
    app.add_middleware(GuardMiddleware, state=st)
    return app


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

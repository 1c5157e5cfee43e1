"""Streaming recognition: the WebSocket route ``/v1/stream``, the protocol state machine it shares
with gRPC's ``StreamingRecognize``, the background thread that steps every live stream together,
and the web page at ``/``.

Protocol v1 (JSON text messages and binary PCM frames; docs/serving.md has the full table)::

    C->S  {"type": "start", "version": 1, "sample_rate": 48000, "encoding": "pcm_s16le" | "pcm_f32le",
           "channels": 1, "interim_results": true, "word_timestamps": true, "api_key"?: "...",
           "endpointing"?: {"trailing_silence_ms": 800, "max_segment_ms": 20000} | false}
    S->C  {"type": "ready", "version": 1, "session_id": "...", "model": "...", "sample_rate": 16000,
           "input_sample_rate": 48000, "chunk_ms": 640}
    C->S  binary frames of raw PCM, any size (an odd byte is carried to the next frame)
    S->C  {"type": "partial", "segment_id": 0, "text": "...", "start": 0.0, "end": 1.28}
    S->C  {"type": "final", "segment_id": 0, "text": "...", "start": 0.0, "end": 2.4, "is_final": true,
           "words": [{"word", "start", "end", "confidence"}], "audio_processed": 2.56}
    C->S  {"type": "stop"}  (or an empty binary frame)
    S->C  {"type": "end", "audio_seconds": 3.1, "segments": 2}, then close 1000
    S->C  {"type": "error", "code": "<stable code>", "message": "..."}, then close with ERROR_CODES' code

Times are seconds from the stream start. The server resamples any input rate to the model's.
One :class:`StreamHub` per server owns the live streams; a single worker thread moves their
audio into :class:`harken.runtime.streaming.StreamSession` objects and advances all that have a
chunk ready in one batched :meth:`StreamingModel.step` call, so the event loop never runs the
model. Results travel back to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import APIRouter, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

__all__ = ["router", "PROTOCOL_VERSION", "ENCODINGS", "ERROR_CODES", "StreamError", "StreamHub", "StreamCall",
           "StartConfig", "get_hub", "parse_start", "active_streams", "drain"]

log = logging.getLogger("harken.serve.stream")

PROTOCOL_VERSION = 1
ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4}  # bytes per sample
STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"app.js": "text/javascript", "recorder-worklet.js": "text/javascript", "style.css": "text/css"}

# stable error code -> (WebSocket close code, gRPC status name, HTTP-like status for logs, metrics reason)
ERROR_CODES: dict[str, tuple[int, str, int, str | None]] = {
    "bad_json": (1003, "INVALID_ARGUMENT", 400, "bad_request"),  # a text message that is not a JSON object
    "bad_message": (1003, "INVALID_ARGUMENT", 400, "bad_request"),  # unknown type, or a second start
    "audio_before_start": (1003, "INVALID_ARGUMENT", 400, "bad_request"),
    "unsupported_encoding": (1003, "INVALID_ARGUMENT", 415, "bad_request"),
    "unsupported_version": (1003, "INVALID_ARGUMENT", 400, "bad_request"),
    "bad_config": (1008, "INVALID_ARGUMENT", 400, "bad_request"),  # a start field out of range
    "unauthorized": (1008, "UNAUTHENTICATED", 401, "unauthorized"),
    "forbidden_origin": (1008, "PERMISSION_DENIED", 403, "unauthorized"),  # a cross-site page (see cors_origins)
    "rate_limited": (1013, "RESOURCE_EXHAUSTED", 429, "rate_limited"),
    "too_large": (1009, "RESOURCE_EXHAUSTED", 413, "too_large"),  # one frame over the size limit
    "too_long": (1008, "OUT_OF_RANGE", 413, "too_long"),  # the stream passed max_stream_seconds
    "idle_timeout": (1008, "DEADLINE_EXCEEDED", 408, "timeout"),
    "overloaded": (1013, "UNAVAILABLE", 503, "too_many_streams"),
    "draining": (1013, "UNAVAILABLE", 503, "draining"),
    "streaming_unavailable": (1011, "UNIMPLEMENTED", 501, None),
    "internal": (1011, "INTERNAL", 500, None),
}

DEFAULT_MAX_FRAME_BYTES = 1 << 20  # one binary frame / gRPC audio message (limits.max_stream_frame_bytes)
BUFFER_SECONDS = 5.0  # audio a stream may have waiting for the model before its reader pauses
MAX_TEXT_CHARS = 65536  # a control message (start / stop) is small
MAX_RETAINED_SECONDS = 600.0  # retained stream audio (store.retain_audio) is cut after this


class StreamError(Exception):
    """A protocol or limit violation: ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        if code not in ERROR_CODES:
            code = "internal"
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def ws_close(self) -> int:
        return ERROR_CODES[self.code][0]

    @property
    def grpc_status(self) -> str:
        return ERROR_CODES[self.code][1]

    @property
    def http_status(self) -> int:
        return ERROR_CODES[self.code][2]

    @property
    def reason(self) -> str | None:
        return ERROR_CODES[self.code][3]

    def message_dict(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message}


class ClientGone(Exception):
    """The client disconnected (no message can reach it any more)."""


# ------------------------------------------------------------------------------ start message
@dataclass(frozen=True)
class StartConfig:
    version: int = PROTOCOL_VERSION
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1
    interim_results: bool = True
    word_timestamps: bool = False
    language: str = ""
    model: str = ""
    api_key: str | None = None
    trailing_silence_ms: float | None = None  # None: the server default
    max_segment_ms: float | None = None
    endpointing: bool = True

    @property
    def bytes_per_frame(self) -> int:
        return ENCODINGS[self.encoding] * self.channels

    def options(self) -> dict:
        d = {"sample_rate": self.sample_rate, "encoding": self.encoding, "channels": self.channels,
             "interim_results": self.interim_results, "word_timestamps": self.word_timestamps}
        if not self.endpointing:
            d["endpointing"] = False
        elif self.trailing_silence_ms is not None or self.max_segment_ms is not None:
            d["endpointing"] = {"trailing_silence_ms": self.trailing_silence_ms, "max_segment_ms": self.max_segment_ms}
        return d


def _flag(obj: dict, key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise StreamError("bad_config", f"start.{key}: expected true or false, got {v!r}")
    return v


def _int(obj: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = obj.get(key, default)
    if v is None or v == 0 and default:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise StreamError("bad_config", f"start.{key}: expected an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise StreamError("bad_config", f"start.{key}: must be between {lo} and {hi} (got {int(v)})")
    return int(v)


def _ms(obj: dict, key: str, hi: float) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= hi:
        raise StreamError("bad_config", f"start.endpointing.{key}: must be a number of ms in 0..{hi:g} (got {v!r})")
    return float(v)


def parse_start(obj: dict, model_rate: int = 16000, model_name: str = "") -> StartConfig:
    """Validate a ``start`` message (a dict, as from JSON or from the gRPC StreamingConfig)."""
    version = _int(obj, "version", PROTOCOL_VERSION, 0, 1 << 30)
    if version != PROTOCOL_VERSION:
        raise StreamError("unsupported_version", f"start.version: this server speaks protocol version "
                          f"{PROTOCOL_VERSION}, not {version}")
    enc = obj.get("encoding") or "pcm_s16le"
    if not isinstance(enc, str) or enc.lower() not in ENCODINGS:
        raise StreamError("unsupported_encoding", f"start.encoding: {enc!r} is not supported "
                          f"(use {' or '.join(ENCODINGS)})")
    rate = _int(obj, "sample_rate", model_rate, 1000, 384000)
    channels = _int(obj, "channels", 1, 1, 32)
    model = obj.get("model") or ""
    if not isinstance(model, str):
        raise StreamError("bad_config", f"start.model: expected a string, got {model!r}")
    if model and model_name and model != model_name:
        raise StreamError("bad_config", f"start.model: this server serves {model_name!r}, not {model!r}")
    lang = obj.get("language") or ""
    if not isinstance(lang, str) or len(lang) > 32:
        raise StreamError("bad_config", "start.language: expected a short language name or code")
    key = obj.get("api_key", obj.get("token"))
    if key is not None and not isinstance(key, str):
        raise StreamError("bad_config", "start.api_key: expected a string")
    ep = obj.get("endpointing", True)
    tsil = mseg = None
    if ep is False:
        endpointing = False
    elif ep is True or ep is None:
        endpointing = True
    elif isinstance(ep, dict):
        endpointing = True
        tsil = _ms(ep, "trailing_silence_ms", 60_000)
        mseg = _ms(ep, "max_segment_ms", 3_600_000)
    else:
        raise StreamError("bad_config", "start.endpointing: expected true, false or an object with "
                          "trailing_silence_ms / max_segment_ms")
    return StartConfig(version=version, sample_rate=rate, encoding=enc.lower(), channels=channels,
                       interim_results=_flag(obj, "interim_results", True),
                       word_timestamps=_flag(obj, "word_timestamps", False), language=lang, model=model,
                       api_key=key, trailing_silence_ms=tsil, max_segment_ms=mseg, endpointing=endpointing)


def _decode_pcm(data: bytes, cfg: StartConfig) -> np.ndarray:
    """Whole PCM frames -> float32 mono in [-1, 1] (non-finite samples become 0)."""
    if cfg.encoding == "pcm_s16le":
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
    else:
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(x).all():
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(x, -1.0, 1.0, out=x)
    if cfg.channels > 1:
        x = x.reshape(-1, cfg.channels).mean(axis=1, dtype=np.float32)
    return x


def _wav_bytes(pcm16: bytes, rate: int) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ one stream
class StreamCall:
    """One stream's protocol state machine, the same for the WebSocket and gRPC transports.

    The transport feeds it events (:meth:`on_text`, :meth:`on_config`, :meth:`on_audio`,
    :meth:`on_stop`) on the event loop and sends whatever :meth:`next_message` returns until a
    terminal message (``end`` or ``error``). States: ``waiting`` (no start yet) -> ``streaming``
    -> ``finishing`` (stop received; the last finals are being decoded) -> ``closed``."""

    def __init__(self, hub: "StreamHub", protocol: str, key_id: str | None = None, authorized: bool = False,
                 peer: str = ""):
        self.hub = hub
        self.protocol = protocol  # "ws" | "grpc"
        self.peer = peer
        self.key_id = key_id
        self.authorized = authorized or not hub.auth_enabled
        self.loop = asyncio.get_running_loop()
        self.id = "s" + uuid.uuid4().hex[:23]
        self.state = "waiting"
        self.cfg: StartConfig | None = None
        self.session = None  # StreamSession, made on start
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.t_open = time.monotonic()
        self.last_activity = self.t_open
        self.error: StreamError | None = None
        self.status = 0
        self.gone = False
        self.finals: list[str] = []
        self.segments_sent = 0
        # audio accounting (event loop)
        self._carry = b""
        self.input_samples = 0  # at the input rate
        # shared with the worker thread (under hub.lock)
        self.pending: list[np.ndarray] = []
        self.pending_samples = 0
        self.pending_t = 0.0  # receive time of the newest pending piece
        self.finish_requested = False
        self.finish_fed = False
        self.t_stop = 0.0
        self.too_long = False
        self.draining = False
        self.dead = False  # released: the worker forgets it
        # worker-thread only
        self.resampler = None
        self.fed_t = 0.0
        self.steps = 0
        self.compute = 0.0
        self.retained: list[bytes] | None = [] if hub.retain_audio else None
        self.retained_samples = 0

    # -------------------------------------------------------------------------- events (loop)
    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def on_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_CHARS:
            raise StreamError("too_large", f"a text message of {len(text)} characters is over the limit of "
                              f"{MAX_TEXT_CHARS}; audio goes in binary frames")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            raise StreamError("bad_json", "a text message must be a JSON object, e.g. {\"type\": \"start\", ...}") \
                from None
        if not isinstance(obj, dict):
            raise StreamError("bad_json", "a text message must be a JSON object, e.g. {\"type\": \"start\", ...}")
        typ = obj.get("type")
        if typ == "start":
            self.on_config(obj)
        elif typ == "stop":
            self.on_stop()
        else:
            shown = typ if isinstance(typ, str) and len(typ) <= 40 else "?"
            raise StreamError("bad_message", f"unknown message type {shown!r} (expected start or stop)")

    def on_config(self, obj: dict) -> None:
        if self.state != "waiting":
            raise StreamError("bad_message", "start was already received")
        hub = self.hub
        cfg = parse_start(obj, hub.sample_rate, hub.model_name)
        if not self.authorized:
            key_id = hub.check_key(cfg.api_key)
            if key_id is None:
                raise StreamError("unauthorized", "a valid API key is required (the Authorization header, "
                                  "or api_key in start)" if not cfg.api_key else "the API key is not valid")
            self.key_id, self.authorized = key_id, True
        wait = hub.rate_limit(self.key_id if hub.auth_enabled else self.peer)
        if wait is not None:
            raise StreamError("rate_limited", f"rate limit exceeded; retry in {wait:.1f} s", retry_after=wait)
        self.cfg = cfg
        self.session = hub.new_session(self)
        self.state = "streaming"
        hub.register(self)
        self.post({"type": "ready", "version": PROTOCOL_VERSION, "session_id": self.id, "model": hub.model_name,
                   "sample_rate": hub.sample_rate, "input_sample_rate": cfg.sample_rate, "chunk_ms": hub.chunk_ms})

    def on_audio(self, data: bytes) -> None:
        if self.state == "waiting":
            raise StreamError("audio_before_start", "binary audio arrived before the start message")
        if self.state != "streaming":
            return  # audio after stop is ignored
        if not data:
            self.on_stop()
            return
        if len(data) > self.hub.max_frame_bytes:
            raise StreamError("too_large", f"an audio frame of {len(data)} bytes is over the limit of "
                              f"{self.hub.max_frame_bytes} bytes; send smaller frames")
        cfg = self.cfg
        if self._carry:
            data = self._carry + data
        n = len(data) - len(data) % cfg.bytes_per_frame
        self._carry = bytes(data[n:])
        if not n:
            return
        x = _decode_pcm(bytes(data[:n]) if n != len(data) else data, cfg)
        limit = self.hub.max_stream_seconds
        over = False
        if limit > 0 and (self.input_samples + len(x)) / cfg.sample_rate > limit:
            x = x[: max(0, int(limit * cfg.sample_rate) - self.input_samples)]
            over = True
        self.input_samples += len(x)
        self.hub.feed(self, x)
        if over:
            self.too_long = True
            self.on_stop()

    def on_stop(self) -> None:
        if self.state == "waiting":
            raise StreamError("bad_message", "stop before start")
        if self.state != "streaming":
            return
        self.state = "finishing"
        self.t_stop = time.monotonic()
        self.hub.request_finish(self)

    # -------------------------------------------------------------------------- output
    def post(self, msg: dict) -> None:
        """Queue a message for the client (event loop thread)."""
        if self.state == "closed":
            return
        if msg["type"] in ("end", "error"):
            self.state = "closed"
        self.outbox.put_nowait(msg)

    def fail(self, err: StreamError) -> None:
        if self.state == "closed":
            return
        self.error = err
        if err.reason:
            self.hub.metrics_reject(err.reason)
        self.post(err.message_dict())

    async def next_message(self) -> dict:
        return await self.outbox.get()

    def deliver(self, results: list, t_recv: float, compute: float) -> None:
        """Results of one step (worker thread -> here via call_soon_threadsafe)."""
        self.compute += compute
        if self.state == "closed":
            return
        cfg = self.cfg
        for r in results:
            if r.is_final:
                if r.text.strip():
                    msg = {"type": "final", "segment_id": r.segment_id, "text": r.text, "start": round(r.start, 3),
                           "end": round(r.end, 3), "is_final": True,
                           "audio_processed": round(r.frames * self.hub.frame_seconds, 3)}
                    if cfg.word_timestamps:
                        msg["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                                         "confidence": round(w.confidence, 4)} for w in r.words]
                    msg["_t"] = self.t_stop if (r.stream_end and self.t_stop) else t_recv
                    self.finals.append(r.text)
                    self.segments_sent += 1
                    self.post(msg)
                if r.stream_end:
                    self.end()
            elif cfg.interim_results:
                self.post({"type": "partial", "segment_id": r.segment_id, "text": r.text, "start": round(r.start, 3),
                           "end": round(r.end, 3), "_t": t_recv})

    def end(self) -> None:
        seconds = round(self.input_samples / self.cfg.sample_rate, 3) if self.cfg else 0.0
        if self.too_long:
            self.fail(StreamError("too_long", f"the stream reached the limit of {self.hub.max_stream_seconds:g} s "
                                  "of audio; the results above cover it"))
            return
        if self.draining:
            self.fail(StreamError("draining", "the server is shutting down; the results above cover the audio "
                                  "sent so far; reconnect to continue", retry_after=self.hub.retry_after))
            return
        self.post({"type": "end", "audio_seconds": seconds, "segments": self.segments_sent})

    def sent(self, msg: dict) -> None:
        """Bookkeeping once a message has been handed to the transport."""
        t = msg.get("_t")
        if t:
            m = self.hub.metrics
            if m is not None:
                h = m.stream_final_latency if msg["type"] == "final" else m.stream_partial_latency
                h.labels(protocol=self.protocol).observe(max(0.0, time.monotonic() - t))

    @property
    def audio_seconds(self) -> float:
        return self.input_samples / self.cfg.sample_rate if self.cfg else 0.0

    # -------------------------------------------------------------------------- driving
    async def run(self, recv: Callable[[], Awaitable[tuple[str, Any]]],
                  send: Callable[[dict], Awaitable[None]]) -> None:
        """Read events with ``recv`` (returns ("text", str) | ("bytes", b) | ("config", dict) |
        ("stop", None) | ("eof", None); raises :class:`ClientGone`) and send messages with
        ``send`` until the stream ends, fails or the client goes. Returns normally in every case;
        ``self.error`` / ``self.gone`` tell what happened."""
        reader = asyncio.ensure_future(self._read(recv))
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            while True:
                getter = asyncio.ensure_future(self.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    exc = reader.exception() if not reader.cancelled() else None
                    if isinstance(exc, ClientGone) or reader.cancelled():
                        self.gone = True
                        return
                    if isinstance(exc, StreamError):
                        self.fail(exc)
                    elif exc is not None:
                        log.error("stream %s: reader failed: %r", self.id, exc)
                        self.fail(StreamError("internal", "internal error"))
                    reader = asyncio.ensure_future(self._idle())  # nothing more to read; drain the outbox
                    continue
                msg = getter.result()
                wire = {k: v for k, v in msg.items() if k != "_t"}
                try:
                    await send(wire)
                except ClientGone:
                    self.gone = True
                    return
                self.sent(msg)
                if msg["type"] in ("end", "error"):
                    return
        finally:
            for t in (reader, watchdog):
                t.cancel()
            self.state = "closed"

    async def _idle(self) -> None:
        await asyncio.Event().wait()

    async def _read(self, recv) -> None:
        while True:
            if self.state == "streaming" and not self.room.is_set():
                await self.room.wait()  # backpressure: the model is behind this client
                self.touch()  # waiting for the model is not the client's idleness
            kind, value = await recv()
            self.touch()
            if kind == "bytes":
                self.on_audio(value)
            elif kind == "text":
                self.on_text(value)
            elif kind == "config":
                self.on_config(value)
            elif kind == "stop":
                self.on_stop()
            elif kind == "eof":  # the client closed its side: like stop once streaming
                if self.state == "waiting":
                    raise ClientGone()
                self.on_stop()
                await self._idle()

    async def _watchdog(self) -> None:
        idle = self.hub.idle_timeout
        if idle <= 0:
            return
        while self.state != "closed":
            if self.state == "finishing" or not self.room.is_set():
                self.touch()
                await asyncio.sleep(min(idle, 0.5))
                continue
            left = self.last_activity + idle - time.monotonic()
            if left <= 0:
                what = "no start message" if self.state == "waiting" else "no audio"
                self.fail(StreamError("idle_timeout", f"{what} for {idle:g} s; the stream was closed"))
                return
            await asyncio.sleep(left + 0.01)


# -------------------------------------------------------------------------------------- the hub
class StreamHub:
    """Every live stream of one server, and the worker thread that steps them together."""

    def __init__(self, st):
        self.st = st
        cfg = st.cfg
        lim = cfg.limits
        self.max_streams = int(getattr(lim, "max_streams", 64))
        self.idle_timeout = float(getattr(lim, "stream_idle_timeout_s", 30.0))
        self.max_stream_seconds = float(getattr(lim, "max_stream_seconds", 3600.0))
        self.max_frame_bytes = int(getattr(lim, "max_stream_frame_bytes", DEFAULT_MAX_FRAME_BYTES))
        self.retry_after = max(1, int(getattr(lim, "retry_after_s", 1) or 1))
        self.max_batch = int(getattr(getattr(cfg, "batching", None), "max_stream_batch", 0) or 64)
        self.retain_audio = bool(getattr(getattr(cfg, "store", None), "retain_audio", False))
        self.model_name = getattr(st, "model_name", "") or "harken"
        self.metrics = getattr(st, "metrics", None)
        self.calls: set[StreamCall] = set()  # admitted (handshake done), event loop only
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.live: list[StreamCall] = []  # started streams the worker serves (under lock)
        self.closed = False
        self._thread: threading.Thread | None = None
        self._sm = None
        self._sm_error: str | None = None
        self._load_model()

    # -------------------------------------------------------------------------- model
    def _load_model(self) -> None:
        sm = getattr(self.st, "streaming_model", None)
        if sm is None:
            try:
                from harken.runtime.streaming import StreamingModel

                sm = StreamingModel.from_engine(self.st.engine)
            except Exception as e:  # a non-streaming model: the route says so
                self._sm_error = str(e) or type(e).__name__
                sm = None
        self._sm = sm
        if sm is not None:
            self.sample_rate = int(sm.sample_rate)
            self.frame_seconds = float(sm.frame_seconds)
            self.chunk_ms = round(1000.0 * sm.chunk_seconds, 3)
        else:
            self.sample_rate = int(getattr(self.st, "sample_rate", 16000) or 16000)
            self.frame_seconds, self.chunk_ms = 0.04, 0.0

    @property
    def streaming_model(self):
        return self._sm

    # -------------------------------------------------------------------------- auth, limits
    @property
    def auth_enabled(self) -> bool:
        auth = getattr(self.st, "auth", None)
        return bool(getattr(auth, "enabled", False))

    def check_key(self, token: str | None) -> str | None:
        return self.st.check_api_key(token)

    def rate_limit(self, bucket: str | None) -> float | None:
        """Streams share the per-key (or per-client, without auth) budget of the REST routes."""
        rl = getattr(self.st, "rate_limiter", None)
        if rl is None:
            return None
        return rl.take(bucket or "anonymous")

    def metrics_reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)

    def admission(self) -> StreamError | None:
        """Why a new stream cannot be opened now (None: it can)."""
        if getattr(self.st, "draining", False):
            return StreamError("draining", "the server is shutting down; connect to another replica",
                               retry_after=self.retry_after)
        if self._sm is None:
            return StreamError("streaming_unavailable", f"this model cannot stream ({self._sm_error}); use "
                               "POST /v1/transcribe, or serve a causal chunked model")
        if len(self.calls) >= self.max_streams:
            return StreamError("overloaded", f"the server has {self.max_streams} streams open, its limit; retry "
                               "shortly", retry_after=self.retry_after)
        return None

    def open(self, protocol: str, key_id: str | None = None, authorized: bool = False, peer: str = "") -> StreamCall:
        call = StreamCall(self, protocol, key_id, authorized, peer)
        self.calls.add(call)
        if self.metrics is not None:
            self.metrics.streams_active.labels(protocol=protocol).inc()
        return call

    def release(self, call: StreamCall) -> None:
        """The transport is done with ``call`` (any reason): free its slot, log it."""
        if call not in self.calls:
            return
        self.calls.discard(call)
        with self.lock:
            call.dead = True
            if call in self.live:
                self.live.remove(call)
            call.pending = []
        if self.metrics is not None:
            self.metrics.streams_active.labels(protocol=call.protocol).dec()
        self._account(call)

    def _account(self, call: StreamCall) -> None:
        endpoint = "ws" if call.protocol == "ws" else "grpc_stream"
        err = call.error
        if err is not None:
            status = err.http_status
        elif call.gone or call.state != "closed":
            status = 499  # the client went away before the end message
        else:
            status = 200
        elapsed = time.monotonic() - call.t_open
        m = self.metrics
        if m is not None:
            try:
                m.observe_request(endpoint, status, elapsed)
                if call.audio_seconds > 0:
                    m.observe_audio(endpoint, call.audio_seconds, call.compute)
            except Exception:  # metrics never break a stream
                log.exception("stream metrics failed")
        store = getattr(self.st, "store", None)
        if store is None or call.cfg is None:
            return
        try:
            from harken.serve.store import Record

            audio = None
            if call.retained:
                audio = _wav_bytes(b"".join(call.retained), self.sample_rate)
            rec = Record(id=call.id, endpoint=endpoint, status=status, key_id=call.key_id,
                         audio_seconds=round(call.audio_seconds, 3),
                         model_id=getattr(self.st, "model_id", "") or self.model_name,
                         options=call.cfg.options(), text=" ".join(call.finals), latency=round(elapsed, 4),
                         error=err.message if err is not None else ("client disconnected" if status == 499 else None),
                         audio=audio, audio_type="audio/wav" if audio else "")
            store.log(rec)
        except Exception:  # the log never fails a stream
            log.exception("stream %s: recognition log failed", call.id)

    # -------------------------------------------------------------------------- worker side
    def new_session(self, call: StreamCall):
        from harken.runtime.streaming import EndpointConfig

        cfg = call.cfg
        ep = None
        if cfg.endpointing:
            d = EndpointConfig()
            srv = getattr(self.st.cfg, "streaming", None)  # server defaults, when the config has them
            if srv is not None:
                d = EndpointConfig(
                    trailing_silence_ms=float(getattr(srv, "trailing_silence_ms", d.trailing_silence_ms)),
                    max_segment_ms=float(getattr(srv, "max_segment_ms", d.max_segment_ms)))
            ep = EndpointConfig(trailing_silence_ms=d.trailing_silence_ms if cfg.trailing_silence_ms is None
                                else cfg.trailing_silence_ms,
                                max_segment_ms=d.max_segment_ms if cfg.max_segment_ms is None else cfg.max_segment_ms)
        return self._sm.new_session(endpoint=ep, word_timestamps=cfg.word_timestamps, session_id=call.id)

    def register(self, call: StreamCall) -> None:
        with self.wake:
            self.live.append(call)
            self._ensure_thread()

    def feed(self, call: StreamCall, x: np.ndarray) -> None:
        if not len(x):
            return
        with self.wake:
            call.pending.append(x)
            call.pending_samples += len(x)
            call.pending_t = time.monotonic()
            if call.pending_samples > BUFFER_SECONDS * call.cfg.sample_rate:
                call.room.clear()
            self.wake.notify()

    def request_finish(self, call: StreamCall) -> None:
        with self.wake:
            call.finish_requested = True
            self.wake.notify()

    def _ensure_thread(self) -> None:  # under self.lock
        if self._thread is None or not self._thread.is_alive():
            self.closed = False
            self._thread = threading.Thread(target=_worker_main, args=(weakref.ref(self),), daemon=True,
                                            name="harken-stream-step")
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify_all()
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(timeout)

    def _ingest(self, call: StreamCall, pieces: list[np.ndarray], finish: bool) -> None:
        """Move a stream's received audio into its session: resample to the model rate (worker thread)."""
        rate = call.cfg.sample_rate
        x = np.concatenate(pieces) if len(pieces) > 1 else (pieces[0] if pieces else np.zeros(0, np.float32))
        if rate != self.sample_rate:
            if call.resampler is None:
                import soxr

                call.resampler = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="float32", quality="HQ")
            x = call.resampler.resample_chunk(x, last=finish)
        if len(x):
            call.session.accept_waveform(x)
            if call.retained is not None and call.retained_samples < MAX_RETAINED_SECONDS * self.sample_rate:
                keep = x[: int(MAX_RETAINED_SECONDS * self.sample_rate) - call.retained_samples]
                call.retained.append((np.clip(keep, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
                call.retained_samples += len(keep)
        if finish:
            call.session.input_finished()

    def _backlog_ok(self, call: StreamCall) -> bool:
        """Feed a session only while it has at most a few chunks of features waiting."""
        s = call.session
        feats = getattr(s, "feats", None)
        win = getattr(s, "_win", 0) or 1
        return feats is None or feats.shape[0] < 3 * win

    def work_once(self) -> bool:
        """One round: ingest pending audio, one batched step over every ready session. False when
        there was nothing to do."""
        with self.lock:
            todo = []
            for call in self.live:
                if call.dead:
                    continue
                take = call.pending if (call.pending and self._backlog_ok(call)) else []
                fin = bool(call.finish_requested and not call.finish_fed and (not call.pending or take))
                if take or fin:
                    todo.append((call, take, fin, call.pending_t))
                    call.pending = [] if take else call.pending
                    if take:
                        call.pending_samples = 0
                    if fin:
                        call.finish_fed = True
        woke = []
        for call, take, fin, t in todo:
            try:
                self._ingest(call, take, fin)
                call.fed_t = t or call.fed_t
            except Exception as e:
                log.exception("stream %s: audio ingest failed", call.id)
                self._post_error(call, e)
            if take:
                woke.append(call)
        for call in woke:
            _to_loop(call, call.room.set)
        with self.lock:
            ready = [c for c in self.live if not c.dead and c.session is not None and c.session.ready]
        if not ready:
            return bool(todo)
        if len(ready) > self.max_batch:  # the least-stepped first, so no stream starves
            ready.sort(key=lambda c: c.steps)
            ready = ready[: self.max_batch]
        for c in ready:
            c.steps += 1
        sessions = [c.session for c in ready]
        t0 = time.perf_counter()
        try:
            results = self._sm.step(sessions)
        except Exception:
            log.exception("stream step failed for a batch of %d; retrying one by one", len(ready))
            results = []
            for c in ready:
                try:
                    results.append(self._sm.step([c.session])[0])
                except Exception as e:
                    self._post_error(c, e)
                    results.append(None)
        dt = time.perf_counter() - t0
        m = self.metrics
        if m is not None:
            try:
                m.batch_size.labels(model=m.model, kind="stream_step").observe(len(ready))
                m.batch_compute.labels(model=m.model, kind="stream_step").observe(dt)
            except Exception:
                pass
        share = dt / max(1, len(ready))
        for c, res in zip(ready, results):
            if res is None:
                continue
            with self.lock:
                if c.dead:
                    continue
            if c.session.done:
                with self.lock:
                    if c in self.live:
                        self.live.remove(c)
            _to_loop(c, c.deliver, res, c.fed_t, share)
        return True

    def _post_error(self, call: StreamCall, e: Exception) -> None:
        with self.lock:
            call.dead = True
            if call in self.live:
                self.live.remove(call)
        err = StreamError("internal", f"recognition failed ({type(e).__name__})")
        _to_loop(call, call.fail, err)

    def _has_work(self) -> bool:
        for c in self.live:
            if c.dead:
                continue
            if (c.pending and self._backlog_ok(c)) or (c.finish_requested and not c.finish_fed):
                return True
            if c.session is not None and c.session.ready:
                return True
        return False


def _to_loop(call: StreamCall, fn, *args) -> None:
    """Run ``fn(*args)`` on the stream's event loop (dropped when that loop has closed)."""
    try:
        call.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


WORKER_IDLE_EXIT_S = 30.0  # the worker thread ends after this long with no live stream (restarted on demand)


def _worker_main(ref) -> None:
    """The stepping loop (a daemon thread; ends when its hub closes, is garbage, or has had no
    live stream for WORKER_IDLE_EXIT_S)."""
    idle_since = time.monotonic()
    while True:
        hub = ref()
        if hub is None:
            return
        with hub.wake:
            if hub.closed:
                return
            if not hub._has_work():
                if hub.live:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > WORKER_IDLE_EXIT_S:
                    hub._thread = None
                    return
                hub.wake.wait(0.5)
            if hub.closed:
                return
        try:
            hub.work_once()
        except Exception:  # never let the thread die
            log.exception("stream worker round failed")
            time.sleep(0.05)
        del hub


_HUBS_LOCK = threading.Lock()


def active_streams(st) -> int:
    """Streams open on server state ``st`` (WebSocket and gRPC; for drain logic and tests)."""
    hub = getattr(st, "_stream_hub", None)
    return len(hub.calls) if hub is not None else 0


async def drain(st, timeout: float) -> bool:
    """Graceful end of every open stream of ``st`` (call on the server's loop once ``st.draining``
    is set, so new streams get 503): streams not started yet get ``error draining``; live ones
    stop taking audio, get their last finals, then ``error draining`` (close 1013, so clients
    reconnect elsewhere). True when none is left, False after ``timeout`` seconds."""
    hub = getattr(st, "_stream_hub", None)
    for call in list(hub.calls) if hub is not None else ():
        if call.state == "waiting":
            call.fail(StreamError("draining", "the server is shutting down; connect to another replica",
                                  retry_after=hub.retry_after))
        elif call.state in ("streaming", "finishing"):
            call.draining = True
            call.on_stop()
    end = time.monotonic() + timeout
    while active_streams(st):
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(0.05)
    return True


def get_hub(st) -> StreamHub:
    """The :class:`StreamHub` of a server state (made on first use, kept on the state)."""
    hub = getattr(st, "_stream_hub", None)
    if hub is None:
        with _HUBS_LOCK:
            hub = getattr(st, "_stream_hub", None)
            if hub is None:
                hub = StreamHub(st)
                st._stream_hub = hub
    return hub


# ------------------------------------------------------------------------------- the WebSocket
def _ws_token(ws: WebSocket) -> str | None:
    h = ws.headers.get("authorization")
    if h:
        scheme, _, token = h.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return ws.headers.get("x-api-key") or None


def _origin_refused(ws: WebSocket, st) -> str | None:
    """A browser's cross-site Origin that ``cors_origins`` does not allow (None: allowed). Clients
    that send no Origin (non-browser) and same-origin pages (the server's own page) pass."""
    origin = ws.headers.get("origin")
    if not origin:
        return None
    from urllib.parse import urlsplit

    host = ws.headers.get("host", "")
    if urlsplit(origin).netloc.lower() == host.lower():
        return None
    allowed = list(getattr(st.cfg, "cors_origins", []) or [])
    if "*" in allowed or origin.rstrip("/") in [a.rstrip("/") for a in allowed]:
        return None
    return origin[:100]


async def _deny(ws: WebSocket, err: StreamError) -> None:
    from harken.serve.errors import error_body

    status = err.http_status
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, int(math.ceil(err.retry_after or 1))))
    body = error_body(err.message, "server_error" if status >= 500 else "invalid_request_error", None, err.code)
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
    except RuntimeError:  # the server has no denial-response extension: a bare close (HTTP 403)
        await ws.close(code=err.ws_close)


@asynccontextmanager
async def _lifespan(app):
    yield
    st = getattr(app.state, "harken", None)
    hub = getattr(st, "_stream_hub", None)
    if hub is not None:
        await asyncio.get_running_loop().run_in_executor(None, hub.close)


router = APIRouter(lifespan=_lifespan)


@router.websocket("/v1/stream")
async def ws_stream(websocket: WebSocket):
    st = websocket.app.state.harken
    hub = get_hub(st)
    err = hub.admission()
    if err is not None:
        if err.reason:
            hub.metrics_reject(err.reason)
        await _deny(websocket, err)
        return
    bad_origin = _origin_refused(websocket, st)
    if bad_origin:
        hub.metrics_reject("unauthorized")
        await _deny(websocket, StreamError("forbidden_origin", f"pages from {bad_origin} may not open streams here "
                                           "(add the origin to cors_origins)"))
        return
    key_id, authorized = None, False
    token = _ws_token(websocket)
    if hub.auth_enabled and token is not None:
        key_id = hub.check_key(token)
        if key_id is None:
            hub.metrics_reject("unauthorized")
            await _deny(websocket, StreamError("unauthorized", "the API key is not valid"))
            return
        authorized = True
    call = hub.open("ws", key_id, authorized, peer=websocket.client.host if websocket.client else "")
    try:
        await websocket.accept()

        async def recv():
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                raise ClientGone()
            if msg.get("bytes") is not None:
                return "bytes", msg["bytes"]
            return "text", msg.get("text") or ""

        async def send(obj: dict):
            try:
                await websocket.send_text(json.dumps(obj, ensure_ascii=False))
            except Exception as e:  # closed under us
                raise ClientGone() from e

        await call.run(recv, send)
        if not call.gone:
            code = call.error.ws_close if call.error is not None else 1000
            try:
                await websocket.close(code=code)
            except Exception:
                pass
    except ClientGone:
        call.gone = True
    finally:
        hub.release(call)


# --------------------------------------------------------------------------------- the page
def _page(name: str) -> Response:
    path = STATIC / name
    if not path.is_file():
        return JSONResponse({"error": {"message": f"{name} is missing from the package", "type": "server_error",
                                       "param": None, "code": "internal"}}, status_code=500)
    return FileResponse(path, media_type=PAGE_FILES.get(name, "text/html"), headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index():
    path = STATIC / "index.html"
    if not path.is_file():
        return HTMLResponse("<h1>harken</h1><p>the web page is missing from this install</p>", status_code=500)
    return HTMLResponse(path.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    if name not in PAGE_FILES:
        return JSONResponse({"error": {"message": f"no static file {name!r}", "type": "not_found_error",
                                       "param": None, "code": "not_found"}}, status_code=404)
    return _page(name)

"""gRPC for ``harken serve`` (``harken.asr.v1.Recognizer`` on ``cfg.grpc_port``, 50051 by default):
unary ``Recognize`` through the same batch queue as ``POST /v1/transcribe``, and bidirectional
``StreamingRecognize`` through the same :class:`harken.serve.stream.StreamCall` state machine as
the WebSocket route. Also ``grpc.health.v1.Health`` and server reflection.

The server is a ``grpc.aio`` server on the application's own event loop (started and stopped by
the app's lifespan with :func:`start` / :func:`stop`). API keys come in the metadata
(``authorization: Bearer <key>`` or ``x-api-key``); a streaming client may also put ``api_key``
in its config. The schema is ``harken/serve/proto/harken_asr.proto``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from harken.serve.proto import harken_asr_pb2 as pb
from harken.serve.proto import harken_asr_pb2_grpc as pb_grpc
from harken.serve.stream import ClientGone, StreamError, get_hub

__all__ = ["start", "stop", "GrpcHandle", "RecognizerServicer", "SERVICE_NAME", "result_to_proto",
           "config_to_dict"]

log = logging.getLogger("harken.serve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recognizer"].full_name  # "harken.asr.v1.Recognizer"

# HTTP status of an ApiError -> gRPC status
_HTTP_TO_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                 408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                 415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
                 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED,
                 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def _metadata_token(context) -> str | None:
    for k, v in context.invocation_metadata() or ():
        k = k.lower()
        if k == "authorization":
            scheme, _, token = str(v).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif k == "x-api-key" and v:
            return str(v).strip()
    return None


def _peer_host(context) -> str:
    p = context.peer() or ""
    return p.rsplit(":", 1)[0] if ":" in p else p


def config_to_dict(c: pb.StreamingConfig) -> dict:
    """The WebSocket ``start`` message equivalent of a StreamingConfig."""
    d: dict[str, Any] = {"type": "start", "version": c.version or 1, "sample_rate": c.sample_rate,
                         "encoding": c.encoding or "pcm_s16le", "channels": c.channels or 1,
                         "word_timestamps": c.word_timestamps}
    if c.HasField("interim_results"):
        d["interim_results"] = c.interim_results
    for k in ("language", "model", "api_key"):
        if getattr(c, k):
            d[k] = getattr(c, k)
    if c.HasField("endpointing"):
        d["endpointing"] = {"trailing_silence_ms": c.endpointing.trailing_silence_ms,
                            "max_segment_ms": c.endpointing.max_segment_ms}
    return d


def _words(ws) -> list:
    return [pb.Word(word=w["word"], start=w["start"], end=w["end"], confidence=w.get("confidence", 0.0))
            for w in ws]


def result_to_proto(msg: dict) -> pb.StreamingResult:
    """A protocol message (the WebSocket JSON) as a StreamingResult."""
    r = pb.StreamingResult(type=msg["type"])
    for k in ("session_id", "model", "chunk_ms", "sample_rate", "version", "segment_id", "text", "start", "end",
              "is_final", "audio_processed", "audio_seconds", "segments", "code", "message", "input_sample_rate"):
        v = msg.get(k)
        if v is not None:
            setattr(r, k, v)
    if msg.get("words"):
        r.words.extend(_words(msg["words"]))
    return r


class RecognizerServicer(pb_grpc.RecognizerServicer):
    def __init__(self, st):
        self.st = st

    # ------------------------------------------------------------------------------ streaming
    async def StreamingRecognize(self, request_iterator, context):
        st = self.st
        hub = get_hub(st)
        err = hub.admission()
        token = _metadata_token(context)
        key_id, authorized = None, False
        if err is None and hub.auth_enabled and token is not None:
            key_id = hub.check_key(token)
            if key_id is None:
                err = StreamError("unauthorized", "the API key is not valid")
            authorized = True
        if err is not None:
            if err.reason:
                hub.metrics_reject(err.reason)
            md = (("retry-after", str(max(1, math.ceil(err.retry_after)))),) if err.retry_after else ()
            await context.abort(getattr(grpc.StatusCode, err.grpc_status), f"{err.code}: {err.message}",
                                trailing_metadata=md)
            return
        call = hub.open("grpc", key_id, authorized, peer=_peer_host(context))

        async def recv():
            try:
                req = await context.read()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise ClientGone() from e
            if req is grpc.aio.EOF:
                return "eof", None
            which = req.WhichOneof("request")
            if which == "config":
                return "config", config_to_dict(req.config)
            if which == "audio":
                return "bytes", bytes(req.audio)
            if which == "stop":
                return "stop", None
            raise StreamError("bad_message", "a request must hold config, audio or stop")

        async def send(msg: dict):
            try:
                await context.write(result_to_proto(msg))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise ClientGone() from e

        try:
            await call.run(recv, send)
        finally:
            hub.release(call)
        if call.error is not None and not call.gone:
            e = call.error
            if e.retry_after:
                context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(e.retry_after)))),))
            context.set_code(getattr(grpc.StatusCode, e.grpc_status))
            context.set_details(f"{e.code}: {e.message}")

    # ------------------------------------------------------------------------------ unary
    async def Recognize(self, request, context):
        from harken.serve.app import Job, make_options
        from harken.serve.audio_in import pcm_to_wave
        from harken.serve.errors import ApiError

        st = self.st
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex
        status, key_id, text, error, job, opts = 500, None, "", None, None, None
        m = st.metrics
        m.inflight.labels(endpoint="grpc_unary").inc()
        try:
            if getattr(st, "draining", False):
                raise ApiError(503, "the server is shutting down", code="draining", reason="draining", retry_after=1)
            if st.auth.enabled:
                token = _metadata_token(context)
                key_id = st.check_api_key(token)
                if key_id is None:
                    raise ApiError(401, "a valid API key is required (metadata authorization: Bearer <key>)"
                                   if not token else "the API key is not valid", code="invalid_api_key",
                                   reason="unauthorized")
            wait = st.rate_limiter.take(key_id or _peer_host(context))
            if wait is not None:
                raise ApiError(429, f"rate limit exceeded; retry in {wait:.1f} s", code="rate_limit_exceeded",
                               reason="rate_limited", retry_after=math.ceil(wait))
            c = request.config
            hot = tuple((" ".join(k.lower().split()), float(v)) for k, v in c.hotwords.items() if k.strip())
            method = c.decoding or None
            if method is not None and method not in ("greedy", "beam", "beam_lm"):
                raise ApiError(400, f"config.decoding: {method!r} is not one of greedy, beam, beam_lm",
                               code="invalid_value", param="decoding")
            opts = make_options(st, method, c.beam_size or None, hot, c.word_timestamps)
            if c.model and c.model != st.model_name:
                raise ApiError(404, f"model {c.model!r} does not exist (this server has {st.model_name!r})",
                               code="model_not_found", param="model")
            lim = st.cfg.limits
            if len(request.audio) > lim.max_upload_bytes:
                raise ApiError(413, f"audio: {len(request.audio)} bytes is over the limit of {lim.max_upload_bytes}",
                               code="file_too_large", param="audio", reason="too_large")
            job = Job(st, "grpc_unary", opts, time.monotonic() + lim.request_timeout_s)
            enc = (c.encoding or "").lower()
            if enc in ("", "auto"):
                await job.load_file(bytes(request.audio), param="audio")
            else:
                loop = asyncio.get_running_loop()
                wave = await loop.run_in_executor(st.decode_pool, pcm_to_wave, bytes(request.audio), enc,
                                                  c.sample_rate or st.sample_rate, c.channels or 1, st.sample_rate,
                                                  lim.max_audio_seconds, "audio")
                await job.load_wave(wave)
            job.submit()
            t = await job.transcript(None)
            status, text = 200, t.text
            m.observe_audio("grpc_unary", job.duration, job.compute)
            resp = pb.RecognizeResponse(request_id=rid, text=t.text, duration=round(t.duration, 3),
                                        confidence=round(t.confidence, 4), model=st.model_name)
            if c.word_timestamps:
                resp.words.extend(pb.Word(word=w.word, start=round(w.start, 3), end=round(w.end, 3),
                                          confidence=round(w.confidence, 4)) for w in t.words)
            from harken.runtime.results import Segment

            for g in t.segments or [Segment(0, 0.0, t.duration, t.text, t.words, t.confidence)]:
                seg = pb.Segment(id=g.id, start=round(g.start, 3), end=round(g.end, 3), text=g.text,
                                 confidence=round(g.confidence, 4))
                if c.word_timestamps:
                    seg.words.extend(pb.Word(word=w.word, start=round(w.start, 3), end=round(w.end, 3),
                                             confidence=round(w.confidence, 4)) for w in g.words)
                resp.segments.append(seg)
            context.set_trailing_metadata((("x-request-id", rid),))
            return resp
        except ApiError as e:
            status, error = e.status, e.message
            if e.reason:
                m.reject(e.reason)
            md = [("x-request-id", rid)]
            if e.status in (429, 503):
                md.append(("retry-after", str(max(1, int(math.ceil(e.retry_after or 1))))))
            await context.abort(_HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INTERNAL),
                                f"{e.code}: {e.message}" if e.code else e.message, trailing_metadata=tuple(md))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("gRPC Recognize failed")
            status, error = 500, "internal error"
            await context.abort(grpc.StatusCode.INTERNAL, "internal: internal server error")
        finally:
            if job is not None and status != 200:
                job.cancel()
            m.inflight.labels(endpoint="grpc_unary").dec()
            m.observe_request("grpc_unary", status, time.perf_counter() - t0)
            self._log(rid, status, key_id, job, opts, text, error, time.perf_counter() - t0)

    def _log(self, rid, status, key_id, job, opts, text, error, latency) -> None:
        st = self.st
        if st.store is None:
            return
        try:
            from harken.serve.app import options_dict
            from harken.serve.store import Record

            st.store.log(Record(id=rid, endpoint="grpc_unary", status=status, key_id=key_id,
                                audio_seconds=round(job.duration, 3) if job else 0.0,
                                model_id=st.model_id or st.model_name, options=options_dict(opts, "proto"),
                                text=text, latency=round(latency, 4), error=error))
        except Exception:
            log.exception("gRPC recognition log failed")


# ---------------------------------------------------------------------------------- lifecycle
@dataclass
class GrpcHandle:
    server: Any
    health: Any
    port: int
    address: str


async def start(st) -> GrpcHandle:
    """Start the gRPC server of server state ``st`` on ``st.cfg.host:st.cfg.grpc_port`` (on the
    running event loop); raises OSError when the port cannot be bound."""
    cfg = st.cfg
    max_in = int(cfg.limits.max_upload_bytes) + (1 << 20)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_in),
                                      ("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_RecognizerServicer_to_server(RecognizerServicer(st), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    host = cfg.host or "127.0.0.1"
    address = f"[{host}]:{cfg.grpc_port}" if ":" in host else f"{host}:{cfg.grpc_port}"
    port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"gRPC: cannot listen on {address}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", SERVICE_NAME):
        await hs.set(name, serving)
    log.info("gRPC listening on %s", address)
    return GrpcHandle(server, hs, port, address)


async def stop(handle, grace: float | None = None) -> None:
    """Health goes NOT_SERVING, then the server stops (in-flight calls get ``grace`` seconds)."""
    if not isinstance(handle, GrpcHandle):
        return
    try:
        await handle.health.enter_graceful_shutdown()
    except Exception:
        pass
    await handle.server.stop(5.0 if grace is None else grace)

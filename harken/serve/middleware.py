"""ASGI middleware and the uvicorn protocol that guard the server against slow and oversized
clients, give every response an ``x-request-id``, and count requests.

* :class:`GuardMiddleware` (outermost): issues or echoes ``x-request-id``; refuses a declared
  ``Content-Length`` over the upload limit with 413 before reading; while a request body is being
  received, a stall longer than ``body_idle_timeout_s`` or a body slower than ``body_timeout_s``
  is answered with 408, and more bytes than the limit with 413; counts ``harken_requests_total``
  and the latency histogram for the ``/v1`` routes.
* :class:`HeaderTimeoutH11Protocol`: uvicorn's h11 protocol with a deadline for complete request
  headers (uvicorn has none: a client trickling header bytes would hold the connection forever).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol

from harken.serve.errors import ApiError

__all__ = ["GuardMiddleware", "HeaderTimeoutH11Protocol", "endpoint_of", "MULTIPART_OVERHEAD"]

MULTIPART_OVERHEAD = 1 << 20  # form fields and boundaries allowed on top of the file itself
_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def endpoint_of(path: str) -> str | None:
    """The metrics ``endpoint`` label of a path (None: not counted)."""
    if path == "/v1/transcribe":
        return "rest"
    if path == "/v1/audio/transcriptions":
        return "openai"
    if path.startswith("/v1/models"):
        return "models"
    if path.startswith("/v1/requests"):
        return "requests"
    if path.startswith("/v1/"):
        return "other"
    return None


class _BodyDone(Exception):
    pass


class GuardMiddleware:
    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        lim = st.cfg.limits
        t0 = time.perf_counter()
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                v = v.decode("latin-1")
                rid = v if _RID.match(v) else None
                break
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = endpoint_of(scope.get("path", ""))
        status_box = [0]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = dict(message, headers=headers)
            await send(message)

        async def respond(err: ApiError):
            if started[0]:
                return
            st.metrics.reject(err.reason or "bad_request")
            resp = err.response()
            await resp(scope, receive, send_wrapper)

        limit = lim.max_upload_bytes + MULTIPART_OVERHEAD
        clen = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    clen = int(v)
                except ValueError:
                    clen = -1
        try:
            if clen is not None and clen < 0:
                raise ApiError(400, "Content-Length is not a number", code="invalid_header", reason="bad_request")
            if clen is not None and clen > limit:
                raise ApiError(413, f"the request body of {clen} bytes is over the upload limit of "
                               f"{lim.max_upload_bytes} bytes", code="file_too_large", param="file",
                               reason="too_large", headers={"Connection": "close"})
        except ApiError as e:
            await respond(e)
            self._count(endpoint, status_box[0] or e.status, t0)
            return

        received = [0]
        body_done = [scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE")]
        body_start = time.monotonic()

        async def guarded_receive():
            if body_done[0]:
                return await receive()
            remaining = lim.body_timeout_s - (time.monotonic() - body_start) if lim.body_timeout_s else None
            timeout = lim.body_idle_timeout_s or None
            if remaining is not None:
                timeout = min(timeout, remaining) if timeout else remaining
            if timeout is not None and timeout <= 0:
                raise ApiError(408, "the request body took too long to arrive", code="request_timeout",
                               reason="timeout", headers={"Connection": "close"})
            try:
                msg = await asyncio.wait_for(receive(), timeout) if timeout else await receive()
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stalled (no data for {lim.body_idle_timeout_s:g} s) "
                               "or took too long", code="request_timeout", reason="timeout",
                               headers={"Connection": "close"}) from None
            if msg["type"] == "http.request":
                received[0] += len(msg.get("body", b""))
                if received[0] > limit:
                    raise ApiError(413, f"the request body is over the upload limit of {lim.max_upload_bytes} bytes",
                                   code="file_too_large", param="file", reason="too_large",
                                   headers={"Connection": "close"})
                if not msg.get("more_body", False):
                    body_done[0] = True
            else:
                body_done[0] = True
            return msg

        try:
            await self.app(scope, guarded_receive, send_wrapper)
        except ApiError as e:
            await respond(e)
        finally:
            self._count(endpoint, status_box[0] or 500, t0)

    def _count(self, endpoint, status, t0) -> None:
        if endpoint is not None:
            self.state.metrics.observe_request(endpoint, status, time.perf_counter() - t0)


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes a connection whose request headers are not complete ``header_timeout`` seconds after
    its first byte (or after the previous response)."""

    header_timeout: float = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._hdr_timer = None
        self._hdr_cycle = self.cycle
        self._arm()

    def _arm(self) -> None:
        if self.header_timeout and self._hdr_timer is None:
            self._hdr_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if self._hdr_timer is not None:
            self._hdr_timer.cancel()
            self._hdr_timer = None

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting:
            self._arm()
        super().data_received(data)
        if getattr(self, "_upgraded", False):
            return
        if self.cycle is not None and self.cycle is not self._hdr_cycle:
            self._hdr_cycle = self.cycle  # a new request's headers are complete
            self._disarm()

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()  # the connection now belongs to the WebSocket protocol (its own timeouts)
        self._upgraded = True
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # keep-alive idle is uvicorn's timeout_keep_alive

    def _header_deadline(self) -> None:
        self._hdr_timer = None
        if getattr(self, "_upgraded", False):
            return
        if self.cycle is None or self.cycle is self._hdr_cycle and self.cycle.response_complete:
            if not self.transport.is_closing():
                try:
                    self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                         b"connection: close\r\n\r\n")
                except Exception:
                    pass
                self.transport.close()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

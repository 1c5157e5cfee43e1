"""One error type for every refusal, rendered in OpenAI's shape on every route:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

with the status, ``Retry-After`` on 429/503 and ``x-should-retry: false`` where a retry cannot help.
The status of each fault is documented in docs/serving.md.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "error_body", "install_error_handlers"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    """A refusal with an HTTP status, OpenAI error fields and a metrics ``reason``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 reason: str | None = None, retry_after: float | None = None, headers: dict | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.reason = reason
        self.type = type or _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.status in (429, 503):
            h["Retry-After"] = str(max(1, int(round(self.retry_after or 1))))
        if self.status in (413, 415, 422, 400, 401, 404, 504):
            h.setdefault("x-should-retry", "false")
        if self.status in (408, 413):  # the rest of the body is not wanted: do not read it for keep-alive
            h.setdefault("Connection", "close")
        if self.status == 401:
            h.setdefault("WWW-Authenticate", "Bearer")
        return h

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.response_headers())


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form")]
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg', 'invalid value')}" if param else e.get("msg", "invalid request")), param


def install_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        st = getattr(request.app.state, "harken", None)
        if st is not None and exc.reason:
            st.metrics.reject(exc.reason)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        st = getattr(request.app.state, "harken", None)
        if st is not None:
            st.metrics.reject("bad_request")
        return ApiError(400, msg, code="invalid_value", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return ApiError(exc.status_code, msg, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # last resort: never a traceback to the client
        import logging

        logging.getLogger("harken.serve").exception("internal error on %s", request.url.path)
        return ApiError(500, "internal server error", code="internal").response()

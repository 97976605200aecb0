"""OpenAI-style error answers, ``{"error": {"message", "type", "param", "code"}}``, and the handlers that
turn every failure into one (validation -> 400, never a bare 500 for a bad input)."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import QueueFull, ShuttingDown
from .inputs import ItemProblem

log = logging.getLogger("fastclip.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
_KINDS = {400: "invalid_request", 401: "auth", 404: "not_found", 405: "invalid_request", 413: "too_large",
          415: "invalid_request", 422: "invalid_request", 429: "queue_full", 503: "unavailable"}


class APIError(Exception):
    """An error answer: HTTP ``status``, ``message``, optional ``param`` / ``code`` / extra headers."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        super().__init__(message)


def error_response(metrics, status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    """The JSON error body, counted in ``fastclip_errors_total{kind}``."""
    if metrics is not None:
        metrics.errors.labels(_KINDS.get(status, "internal" if status >= 500 else "invalid_request")).inc()
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                                "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ITEM = re.compile(r"^((?:input|labels|templates)\[\d+\])")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error -> ("<param>: <reason>", param), without pydantic's internal loc parts."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = ".".join(str(p) for p in loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    kind = err.get("type")
    if kind == "json_invalid":
        return f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    if param is None:
        return "request body must be a JSON object (Content-Type: application/json)", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", param
    if kind == "missing":
        return f"missing field {param!r}", param
    item = _ITEM.match(msg)
    if item:
        return msg, item.group(1)
    if msg.startswith(param):
        return msg, param
    return f"{param}: {msg}", param


def install_error_handlers(app: FastAPI, metrics) -> None:
    """Register the handlers; every answer they give is OpenAI-style JSON and counted by kind."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(metrics, exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(ItemProblem)
    async def _item(request: Request, exc: ItemProblem):
        return error_response(metrics, exc.status, str(exc), param=f"input[{exc.index}]", code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(metrics, 400, message, param=param, code="invalid_request")

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        retry = str(getattr(request.app.state, "retry_after_s", 1))
        return error_response(metrics, 429, f"{exc}; retry later", code="queue_full", headers={"Retry-After": retry})

    @app.exception_handler(ShuttingDown)
    async def _down(request: Request, exc: ShuttingDown):
        return error_response(metrics, 503, str(exc), code="shutting_down", headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return error_response(metrics, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error while handling %s %s", request.method, request.url.path)
        return error_response(metrics, 500, f"internal error: {type(exc).__name__}", code="internal_error")

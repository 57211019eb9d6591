"""The one mapping from NovaCron's error tree to HTTP responses.

Errors are ``{"error": {"code", "message", "details"}}``. Bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from novacron import errors as e

log = logging.getLogger("novacron.serve")

# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[e.NovaCronError], int]] = [
    (e.InvalidRequest, 422),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.NoCapacity, 409),
    (e.QuotaExceeded, 403),
    (e.NotSupported, 400),
    (e.Unauthenticated, 401),
    (e.Forbidden, 403),
    (e.StoreLocked, 503),
    (e.StoreError, 500),
    (e.HostUnreachable, 503),
    (e.Throttled, 503),
    (e.DriverError, 502),
    (e.Unavailable, 503),
    (e.OperationTimeout, 504),
]


MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``MAX_BODY_BYTES`` with 413, whether or not
    they declare a Content-Length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            await _too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(413, "payload_too_large",
                              f"request body over {MAX_BODY_BYTES} bytes")
    await response(scope, receive, send)


PROVIDER_AUTH_STATUS = 422  # a provider refused NovaCron's credentials (see errors.AuthError)
PROVIDER_QUOTA_STATUS = 409  # a provider's quota on NovaCron's account (see errors.QuotaExceeded)


def status_of(exc: e.NovaCronError) -> int:
    """The HTTP status of a NovaCron error."""
    if isinstance(exc, e.AuthError) and exc.details.get("provider"):
        return PROVIDER_AUTH_STATUS
    if isinstance(exc, e.QuotaExceeded) and exc.details.get("provider"):
        return PROVIDER_QUOTA_STATUS
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, code: str, message: str,
                   details: Any = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"code": code, "message": message, "details": details or {}}})


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"field": "body" if err.get("type") == "json_invalid" else
             ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
             "problem": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()]


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(e.NovaCronError)
    async def _novacron(_: Request, exc: e.NovaCronError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("request failed: %s", exc.message)
        return error_response(status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        summary = "; ".join(f"{d['field'] or 'body'}: {d['problem']}" for d in details[:5])
        return error_response(422, "invalid_request", f"invalid request: {summary}",
                              {"errors": details})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

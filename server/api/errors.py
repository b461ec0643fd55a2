"""One error envelope, `{"error": {"type", "message"}}`, and one place mapping exceptions to statuses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapters import FusionError
from server.api.schemas import ErrorResponse
from server.bank.loader import BankError
from server.errors import MTAError
from server.store import StoreUnavailable

log = logging.getLogger(__name__)

# Typed exceptions from below the service layer -> (status, type).
_STATUS: dict[type[Exception], tuple[int, str]] = {
    StoreUnavailable: (503, "store_unavailable"),
    BankError: (422, "invalid_bank"),
    FusionError: (422, "fusion_error"),
}


# What each error status means here, for the OpenAPI schema (`error_responses`).
ERROR_STATUSES: dict[int, str] = {
    400: "The body could not be read (e.g. it is not UTF-8).",
    401: "No bearer token (`Authorization: Bearer <MTA_ADMIN_TOKEN>`).",
    403: "Wrong admin token, or admin endpoints disabled (no MTA_ADMIN_TOKEN).",
    404: "The user, job or stacked LoRA named in the request does not exist.",
    409: "Conflicts with the current state (e.g. the user already has an active fine-tune job).",
    413: "Request body over MTA_MAX_REQUEST_BYTES.",
    422: "Invalid request: wrong types or values, limits exceeded, an invalid bank or fusion.",
    429: "The fine-tune queue is full; retry later.",
    500: "Internal error (a bug): logged on the server.",
    503: "A dependency is unavailable: the user store, the generation engine, the adapter cache's disk,"
    " or (readiness) the server is not ready.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route for these error statuses, all in the error envelope; shared so
    the schema states every status a route can answer without a dict per route."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


class PayloadTooLarge(StarletteHTTPException):
    """A streamed (chunked) body passed the limit while it was read. An HTTPException, because
    FastAPI turns any other error raised while reading a body into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"type": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MTAError)
    async def _mta(_: Request, exc: MTAError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "payload_too_large" if isinstance(exc, PayloadTooLarge) else "http_error"
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)  # e.g. Allow on a 405

    for exc_type, (status, code) in _STATUS.items():

        async def _typed(_: Request, exc: Exception, status: int = status, code: str = code) -> JSONResponse:
            return error_response(status, code, str(exc))

        app.add_exception_handler(exc_type, _typed)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

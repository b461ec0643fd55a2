"""Typed errors the services raise; server.api.errors maps them to HTTP responses."""

from __future__ import annotations


class MTAError(Exception):
    """Base class: `status` is the HTTP status, `code` the machine-readable error type."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(MTAError):
    status = 422
    code = "invalid_request"


class NotFound(MTAError):
    status = 404
    code = "not_found"


class Unauthorized(MTAError):
    status = 401
    code = "unauthorized"


class Forbidden(MTAError):
    status = 403
    code = "forbidden"


class Unavailable(MTAError):
    status = 503
    code = "unavailable"


class AdapterCacheFull(Unavailable):
    """The adapter cache's filesystem is full (ENOSPC/EDQUOT): a new adapter cannot be written."""

    code = "adapter_cache_full"


class Conflict(MTAError):
    status = 409
    code = "conflict"


class TooManyRequests(MTAError):
    status = 429
    code = "too_many_requests"

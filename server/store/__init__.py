"""Per-user state (profile, embedding, blobs such as the stacked LoRA) and fine-tune jobs
(records, one active job per user, a FIFO queue) behind one protocol.

`open_store(url)` picks the backend from the URL scheme:
    sqlite:///relative/path.db, sqlite:////absolute/path.db   embedded SQLite (default)
    redis://host:port/db, rediss://..., unix:///path.sock     Redis
"""

from __future__ import annotations

from collections.abc import Callable

from .base import (
    JOB_STATUSES,
    ProfileChanged,
    StoreError,
    StoreUnavailable,
    UserNotFound,
    UserRecord,
    UserStamp,
    UserStore,
    redact_url,
)
from .redis import RedisUserStore
from .sqlite import SQLiteUserStore

__all__ = [
    "JOB_STATUSES",
    "ProfileChanged",
    "RedisUserStore",
    "SQLiteUserStore",
    "StoreError",
    "StoreUnavailable",
    "UserNotFound",
    "UserRecord",
    "UserStamp",
    "UserStore",
    "open_store",
]


def _open_sqlite(url: str) -> SQLiteUserStore:
    """SQLAlchemy's convention: everything after `sqlite:///` is the path (absolute if it starts with /)."""
    rest = url.partition("://")[2]
    path = rest[1:] if rest.startswith("/") else ""  # no host part allowed
    if not path:
        raise ValueError(f"SQLite store URL must be sqlite:///relative.db or sqlite:////abs/path.db, got {url!r}")
    return SQLiteUserStore(path)


_BACKENDS: dict[str, Callable[[str], UserStore]] = {
    "sqlite": _open_sqlite,
    "redis": RedisUserStore,
    "rediss": RedisUserStore,
    "unix": RedisUserStore,
}


def open_store(url: str) -> UserStore:
    """The store for `url`; SQLite opens (and migrates) its file now, Redis connects lazily."""
    scheme, separator, _ = url.partition("://")
    backend = _BACKENDS.get(scheme.lower()) if separator else None
    if backend is None:
        raise ValueError(
            f"unsupported store URL {redact_url(url)!r}: expected one of "
            + ", ".join(f"{name}://" for name in _BACKENDS)
        )
    return backend(url)

"""The user store's contract: one record type, one protocol, one error family.

Both backends (SQLite, Redis) implement `UserStore` and share the validation and
(de)serialisation helpers below, so a profile written by one reads back identically
from the other and both reject the same bad input.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

# Embeddings are stored as raw little-endian float32 bytes: exact, compact, and the
# same bytes in both backends regardless of the host's byte order.
EMBEDDING_DTYPE = np.dtype("<f4")

# Blob names are ours ("stacked_lora"), never user input. Forbidding ":" keeps the Redis
# key `blob:{user_id}:{name}` unambiguous even when a user id contains ":".
_BLOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_USER_ID_CHARS = 512


class StoreError(Exception):
    """A user-store operation failed (bug, corrupt data, closed store)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or is busy right now; the API answers 503."""


class UserNotFound(StoreError):
    """The operation needs an existing profile (e.g. `put_blob` after `delete_user`)."""


@dataclass(frozen=True, eq=False)
class UserRecord:
    """A user's profile as stored. `eq=False`: numpy arrays have no boolean `==`."""

    user_id: str
    items: list[dict[str, Any]]
    embedding: np.ndarray | None  # [dim] float32
    embedding_model: str | None
    profile_version: int  # 1 on the first profile write, +1 on every later one
    updated_at: float  # unix time of the last write (profile or embedding)


@runtime_checkable
class UserStore(Protocol):
    """Async user store, safe for concurrent callers.

    Every method may raise `StoreUnavailable`; after one, a write's outcome is unknown
    (it may have been applied), so callers re-read rather than assume. Bad input raises
    `ValueError` before any I/O.
    """

    async def get_user(self, user_id: str) -> UserRecord | None: ...

    async def put_profile(
        self,
        user_id: str,
        items: list[dict[str, Any]],
        embedding: np.ndarray | None,
        embedding_model: str | None,
    ) -> UserRecord:
        """Replace the whole profile atomically and bump `profile_version`."""
        ...

    async def set_embedding(
        self, user_id: str, embedding: np.ndarray, embedding_model: str, expected_profile_version: int
    ) -> bool:
        """Store a re-computed embedding only if the profile is still at that version."""
        ...

    async def delete_user(self, user_id: str) -> bool:
        """Remove the profile and all the user's blobs atomically; False if there was no profile."""
        ...

    async def put_blob(self, user_id: str, name: str, data: bytes) -> int:
        """Store a blob for an existing user (else `UserNotFound`); returns its new version."""
        ...

    async def get_blob(self, user_id: str, name: str) -> tuple[int, bytes] | None: ...

    async def delete_blob(self, user_id: str, name: str) -> bool: ...

    async def count_users(self) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# --- validation -------------------------------------------------------------------


def check_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID_CHARS:
        raise ValueError(f"user_id must be a non-empty string of at most {MAX_USER_ID_CHARS} characters")
    return user_id


def check_blob_name(name: str) -> str:
    if not isinstance(name, str) or not _BLOB_NAME.fullmatch(name):
        raise ValueError(f"blob name must match {_BLOB_NAME.pattern!r}, got {name!r}")
    return name


def check_blob_data(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
    return bytes(data)


# --- (de)serialisation shared by both backends ------------------------------------


def encode_items(items: list[dict[str, Any]]) -> str:
    """Items as compact JSON text. Accepted as they are: only the shape is checked."""
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("items must be a list of JSON objects")
    try:
        return json.dumps(items, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"items are not JSON-serialisable: {e}") from e


def decode_items(text: str | bytes) -> list[dict[str, Any]]:
    return json.loads(text)


def encode_embedding(embedding: np.ndarray | None, embedding_model: str | None) -> bytes | None:
    """Raw float32 bytes of a 1-D embedding; an embedding and its model name come together."""
    if (embedding is None) != (embedding_model is None):
        raise ValueError("embedding and embedding_model must both be set or both be None")
    if embedding is None:
        return None
    if not isinstance(embedding_model, str) or not embedding_model:
        raise ValueError("embedding_model must be a non-empty string")
    array = np.asarray(embedding)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"embedding must be a non-empty 1-D vector, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError("embedding must hold finite floating-point values")
    return array.astype(EMBEDDING_DTYPE, copy=False).tobytes()


def decode_embedding(data: bytes | None) -> np.ndarray | None:
    """A writable native float32 copy, so callers may normalise it in place."""
    if data is None:
        return None
    return np.frombuffer(data, dtype=EMBEDDING_DTYPE).astype(np.float32)


@dataclass(frozen=True)
class EncodedProfile:
    """A validated profile in its stored form, ready for either backend to write."""

    items: str  # JSON
    embedding: bytes | None  # raw little-endian float32
    embedding_model: str | None
    updated_at: float

    def to_record(self, user_id: str, profile_version: int) -> UserRecord:
        """The record as a later `get_user` returns it (decoded from the stored form)."""
        return decode_record(
            user_id, self.items, self.embedding, self.embedding_model, profile_version, self.updated_at
        )


def encode_profile(
    items: list[dict[str, Any]], embedding: np.ndarray | None, embedding_model: str | None
) -> EncodedProfile:
    return EncodedProfile(
        items=encode_items(items),
        embedding=encode_embedding(embedding, embedding_model),
        embedding_model=embedding_model,
        updated_at=time.time(),
    )


def decode_record(
    user_id: str,
    items: str | bytes,
    embedding: bytes | None,
    embedding_model: str | bytes | None,
    profile_version: int | bytes,
    updated_at: float | bytes,
) -> UserRecord:
    """Build a record from stored fields; Redis hands back every field as bytes."""
    if isinstance(embedding_model, bytes):
        embedding_model = embedding_model.decode()
    return UserRecord(
        user_id=user_id,
        items=decode_items(items),
        embedding=decode_embedding(embedding),
        embedding_model=embedding_model,
        profile_version=int(profile_version),
        updated_at=float(updated_at),
    )


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))

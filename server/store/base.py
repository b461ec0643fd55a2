"""The user store's contract: one record type, one protocol, one error family.

Both backends (SQLite, Redis) implement `UserStore` and share the validation and
(de)serialisation helpers below, so a profile written by one reads back identically
from the other and both reject the same bad input.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from functools import cached_property
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
MAX_JOB_ID_CHARS = 256

# A fine-tune job's life: queued -> running -> succeeded | failed.
JOB_STATUSES = frozenset({"queued", "running", "succeeded", "failed"})
# A job in one of these has ended: its record is indexed by `finished_at`, for pruning.
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed"})


class StoreError(Exception):
    """A user-store operation failed (bug, corrupt data, closed store)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached, is busy, or refuses the operation for a reason an operator
    must fix (e.g. Redis out of memory under `maxmemory`); the API answers 503 with the reason."""


class UserNotFound(StoreError):
    """The operation needs an existing profile (e.g. `put_blob` after `delete_user`)."""


class ProfileChanged(StoreError):
    """A conditional profile write found another version than the one it was based on."""


@dataclass(frozen=True, eq=False)
class UserRecord:
    """A user's profile as stored. `eq=False`: numpy arrays have no boolean `==`."""

    user_id: str
    stored_items: str | bytes  # the items' JSON as stored: decoded on first use of `items`
    embedding: np.ndarray | None  # [dim] float32
    embedding_model: str | None
    profile_version: int  # 1 on the first profile write, +1 on every later one
    updated_at: float  # unix time of the last write (profile or embedding)

    @cached_property
    def items(self) -> list[dict[str, Any]]:
        """Decoded when first read: a warm request, whose history index is cached, never reads them."""
        return decode_items(self.stored_items)


@dataclass(frozen=True)
class UserStamp:
    """What identifies a user's stored state without reading it: a reader that keeps what it
    derived from the profile (its rendered history, fusion plan) and from one blob knows from a
    stamp whether that is still current. Every profile or embedding write moves `updated_at`."""

    profile_version: int
    updated_at: float
    blob: tuple[int, int] | None  # (version, size in bytes) of the named blob, None without one


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
        *,
        expected_version: int | None = None,
    ) -> UserRecord:
        """Replace the whole profile atomically and bump `profile_version`.

        With `expected_version` (0: no profile yet) the write applies only if the profile is
        still at that version, else `ProfileChanged`: a read-modify-write (an append) based on
        a profile another writer has replaced meanwhile must not overwrite it."""
        ...

    async def set_embedding(
        self, user_id: str, embedding: np.ndarray, embedding_model: str, expected_profile_version: int
    ) -> bool:
        """Store a re-computed embedding only if the profile is still at that version."""
        ...

    async def delete_user(self, user_id: str) -> bool:
        """Remove the profile, all the user's blobs, job records, active-job slot and queued job ids
        atomically; False if there was no profile (the rest is removed anyway)."""
        ...

    async def put_blob(self, user_id: str, name: str, data: bytes) -> int:
        """Store a blob for an existing user (else `UserNotFound`); returns its new version."""
        ...

    async def get_blob(self, user_id: str, name: str) -> tuple[int, bytes] | None: ...

    async def blob_stamp(self, user_id: str, name: str) -> tuple[int, int] | None:
        """(version, size in bytes) of a blob without reading it: a reader that keeps what it
        derived from a blob knows whether that is still current."""
        ...

    async def user_stamp(self, user_id: str, blob_name: str) -> UserStamp | None:
        """The profile's stamp and the named blob's, in one read of neither's data (None: no
        profile): what a returning user's request reads from the store."""
        ...

    async def delete_blob(self, user_id: str, name: str) -> bool: ...

    async def count_users(self) -> int: ...

    def changed_users(self) -> AsyncIterator[str | None]:
        """Users whose stacked LoRA was replaced or removed, or who were deleted, by any process
        sharing the store, for as long as the caller iterates. None: changes may have been missed
        (at the start, after a reconnect), so a caller forgets every user's cached state."""
        ...

    # --- fine-tune jobs: records, one active job per user, a FIFO queue of job ids ----

    async def put_job(self, job_id: str, data: dict[str, Any]) -> None:
        """Upsert a job record: a JSON object with this `job_id`, a `user_id`, a `status` (one of
        `JOB_STATUSES`) and free fields; a terminal status also indexes it by its `finished_at`
        (a number; the time of the write if absent). A job keeps its user and its place in the
        creation order: if `job_id` already belongs to another user, nothing is written and
        `ValueError` is raised (the one `ValueError` found by the store, not before I/O). No
        profile is needed: it creates records (a submission); later writes use `update_job`."""
        ...

    async def update_job(self, job_id: str, data: dict[str, Any], from_statuses: Collection[str]) -> bool:
        """Replace an existing record only while its status is one of `from_statuses`
        (compare-and-set); False, with nothing written, if it is gone (deleted with its user,
        pruned) or has moved on. Never creates a record, so a runner's heartbeat or result cannot
        bring back a job deleted with its user. Another user's `job_id`: `ValueError`, as `put_job`."""
        ...

    async def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    async def delete_job(self, job_id: str) -> bool:
        """Remove a job everywhere, atomically: its record, its queued ids, and the user's active-job
        slot if this job holds it. False if there was no record (the rest is removed anyway)."""
        ...

    async def list_jobs(
        self, statuses: Collection[str] | None = None, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Job records in creation order, optionally only those with one of `statuses` / of `user_id`."""
        ...

    async def prune_jobs(self, finished_before: float, limit: int) -> int:
        """Delete up to `limit` records of jobs that ended (`TERMINAL_JOB_STATUSES`) before
        `finished_before` (unix time), oldest first, found by an index (never a scan of every job);
        how many were deleted."""
        ...

    async def active_job_slots(self) -> dict[str, str]:
        """Every held active-job slot: user id -> the job id holding it (for the stale-job sweep)."""
        ...

    async def queued_job_ids(self) -> list[str]:
        """The ids in the queue, oldest first, without removing them (for the stale-job sweep)."""
        ...

    async def claim_active_job(self, user_id: str, job_id: str) -> str | None:
        """Take the user's single active-job slot atomically: None if `job_id` now holds it (also
        when it already did), else the job id holding it."""
        ...

    async def release_active_job(self, user_id: str, job_id: str) -> bool:
        """Free the slot only if `job_id` holds it (compare-and-delete); whether it did."""
        ...

    async def enqueue_job(self, job_id: str, max_queued: int) -> bool:
        """Append to the FIFO queue unless it holds `max_queued` ids already (atomic); False = full."""
        ...

    async def dequeue_job(self, timeout: float) -> str | None:
        """Pop the oldest job id, waiting up to `timeout` seconds (0: do not wait); None if none came.
        Each id goes to exactly one of any number of concurrent consumers. An id may outlive its
        record (`delete_user` racing `enqueue_job`): check `get_job` before running it."""
        ...

    async def queued_count(self) -> int: ...

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


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_CHARS or not job_id.isprintable():
        raise ValueError(f"job_id must be a non-empty printable string of at most {MAX_JOB_ID_CHARS} characters")
    return job_id


def check_job_statuses(statuses: Collection[str] | None) -> frozenset[str] | None:
    """None (any status) or a set of known statuses; a bare string is refused, not split into letters."""
    if statuses is None:
        return None
    if isinstance(statuses, (str, bytes)) or not all(isinstance(status, str) for status in statuses):
        raise ValueError(f"statuses must be a collection of status strings, got {statuses!r}")
    wanted = frozenset(statuses)
    if unknown := wanted - JOB_STATUSES:
        raise ValueError(f"unknown job status(es) {sorted(unknown)}: expected some of {sorted(JOB_STATUSES)}")
    return wanted


def check_from_statuses(statuses: Collection[str]) -> frozenset[str]:
    """The statuses a compare-and-set `update_job` accepts: at least one known status."""
    wanted = check_job_statuses(statuses)
    if not wanted:
        raise ValueError(f"from_statuses must name at least one status, got {statuses!r}")
    return wanted


def check_max_queued(max_queued: int) -> int:
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
        raise ValueError(f"max_queued must be a non-negative integer, got {max_queued!r}")
    return max_queued


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit


def check_timestamp(when: float) -> float:
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ValueError(f"a time must be a finite number of seconds, got {when!r}")
    return float(when)


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


# --- (de)serialisation shared by both backends ------------------------------------


def _encode_json(value: Any, what: str) -> str:
    """Compact JSON text, exactly reversible (no NaN/Infinity, which are not JSON)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} are not JSON-serialisable: {e}") from e


def encode_items(items: list[dict[str, Any]]) -> str:
    """Items as compact JSON text. Accepted as they are: only the shape is checked."""
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("items must be a list of JSON objects")
    return _encode_json(items, "items")


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
        stored_items=items,
        embedding=decode_embedding(embedding),
        embedding_model=embedding_model,
        profile_version=int(profile_version),
        updated_at=float(updated_at),
    )


@dataclass(frozen=True)
class EncodedJob:
    """A validated job record in its stored form; `user_id`, `status` and (once it ended)
    `finished_at` are copied out for indexing."""

    job_id: str
    user_id: str
    status: str
    data: str  # JSON object
    finished_at: float | None  # set for TERMINAL_JOB_STATUSES only


def encode_job(job_id: str, data: dict[str, Any]) -> EncodedJob:
    check_job_id(job_id)
    if not isinstance(data, dict):
        raise ValueError(f"a job record must be a JSON object, got {type(data).__name__}")
    if data.get("job_id") != job_id:
        raise ValueError(f"the job record's job_id {data.get('job_id')!r} is not {job_id!r}")
    user_id = check_user_id(data.get("user_id"))  # type: ignore[arg-type]
    status = data.get("status")
    if status not in JOB_STATUSES:
        raise ValueError(f"job status must be one of {sorted(JOB_STATUSES)}, got {status!r}")
    return EncodedJob(job_id, user_id, status, _encode_json(data, "job fields"), job_finished_at(status, data))


def job_finished_at(status: str, data: dict[str, Any]) -> float | None:
    """When a job ended, for the retention index: its `finished_at`, else now (a record without one)."""
    if status not in TERMINAL_JOB_STATUSES:
        return None
    when = data.get("finished_at")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return time.time()
    return float(when)


def decode_job(data: str | bytes) -> dict[str, Any]:
    return json.loads(data)


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))

"""Embedded user store: one SQLite file in WAL mode, the default backend.

One connection guarded by a `threading.Lock`; every call runs in a worker thread
(`asyncio.to_thread`) so the event loop never blocks on disk, and the lock makes
concurrent async callers safe. Multi-row changes run in `BEGIN IMMEDIATE` transactions.
The exception is `user_stamp`, every request's one read: a point query on the primary key
(tens of microseconds from the page cache; a WAL reader waits for no writer), which runs on
the event loop when the connection is free, because the hop to a worker thread and back
costs more than the query.

The job queue is a table; `dequeue_job` polls it every `_POLL_INTERVAL` seconds with
`asyncio.sleep` in between (SQLite has no blocking pop), taking the write lock only
when the queue is not empty.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .base import (
    ProfileChanged,
    StoreError,
    StoreUnavailable,
    UserNotFound,
    UserRecord,
    UserStamp,
    check_blob_data,
    check_blob_name,
    check_job_id,
    check_from_statuses,
    check_job_statuses,
    check_limit,
    check_max_queued,
    check_timeout,
    check_timestamp,
    check_user_id,
    decode_job,
    decode_record,
    encode_embedding,
    encode_job,
    encode_profile,
)

T = TypeVar("T")

# `PRAGMA user_version` = number of migrations applied; append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            user_id TEXT PRIMARY KEY,
            items TEXT NOT NULL,
            embedding BLOB,
            embedding_model TEXT,
            profile_version INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # AUTOINCREMENT never reuses a rowid, and REPLACE gives the row a new one: the
        # rowid is the blob's version, unique store-wide even after deletes.
        """CREATE TABLE blobs (
            version INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            data BLOB NOT NULL,
            UNIQUE (user_id, name)
        )""",
    ),
    (
        # `seq` is the creation order; an upsert keeps the row, so a job keeps its place.
        # No foreign key to users: a job is submitted before `add_to_profile` creates the user.
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            status TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_user ON jobs (user_id, seq)",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        """CREATE TABLE active_jobs (
            user_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL
        )""",
        # FIFO by `seq`; a job id may be queued more than once, as in a Redis list.
        """CREATE TABLE job_queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL
        )""",
        "CREATE INDEX job_queue_by_job ON job_queue (job_id)",
    ),
    (
        # When a job ended (NULL while it is active), so `prune_jobs` finds old records by index.
        "ALTER TABLE jobs ADD COLUMN finished_at REAL",
        """UPDATE jobs SET finished_at = CASE
               WHEN json_type(data, '$.finished_at') IN ('integer', 'real') THEN json_extract(data, '$.finished_at')
               ELSE CAST(strftime('%s', 'now') AS REAL) END
           WHERE status IN ('succeeded', 'failed')""",
        "CREATE INDEX jobs_by_finish ON jobs (finished_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# Primary result codes meaning "cannot serve right now" (busy, disk, permissions),
# as opposed to bugs or corruption.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

_USER_COLUMNS = "user_id, items, embedding, embedding_model, profile_version, updated_at"

# How often an empty-queue `dequeue_job` looks again.
_POLL_INTERVAL = 0.05


class SQLiteUserStore:
    """`UserStore` in a local SQLite file; survives restarts, one process at a time is best."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        with self._errors():
            self._conn: sqlite3.Connection | None = _open(self.path, busy_timeout)

    def __repr__(self) -> str:
        return f"SQLiteUserStore({str(self.path)!r})"

    async def get_user(self, user_id: str) -> UserRecord | None:
        check_user_id(user_id)

        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = ?", (user_id,)).fetchone()
            return decode_record(*row) if row else None

        return await self._run(read)

    async def put_profile(
        self,
        user_id: str,
        items: list[dict[str, Any]],
        embedding: np.ndarray | None,
        embedding_model: str | None,
        *,
        expected_version: int | None = None,
    ) -> UserRecord:
        check_user_id(user_id)
        profile = encode_profile(items, embedding, embedding_model)

        def write(conn: sqlite3.Connection) -> int:
            if expected_version is not None:
                row = conn.execute("SELECT profile_version FROM users WHERE user_id = ?", (user_id,)).fetchone()
                if (row[0] if row else 0) != expected_version:
                    raise ProfileChanged(f"profile of {user_id!r} is at version {row[0] if row else 0}, not {expected_version}")
            # UPSERT, not REPLACE: REPLACE deletes the row first and the cascade would drop the blobs.
            conn.execute(
                """INSERT INTO users (user_id, items, embedding, embedding_model, profile_version, updated_at)
                   VALUES (?, ?, ?, ?, 1, ?)
                   ON CONFLICT (user_id) DO UPDATE SET
                       items = excluded.items,
                       embedding = excluded.embedding,
                       embedding_model = excluded.embedding_model,
                       profile_version = profile_version + 1,
                       updated_at = excluded.updated_at""",
                (user_id, profile.items, profile.embedding, profile.embedding_model, profile.updated_at),
            )
            return conn.execute("SELECT profile_version FROM users WHERE user_id = ?", (user_id,)).fetchone()[0]

        version = await self._run(write, transaction=True)
        return profile.to_record(user_id, version)

    async def set_embedding(
        self, user_id: str, embedding: np.ndarray, embedding_model: str, expected_profile_version: int
    ) -> bool:
        check_user_id(user_id)
        data = encode_embedding(embedding, embedding_model)

        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                """UPDATE users SET embedding = ?, embedding_model = ?, updated_at = ?
                   WHERE user_id = ? AND profile_version = ?""",
                (data, embedding_model, time.time(), user_id, int(expected_profile_version)),
            )
            return cursor.rowcount == 1

        return await self._run(write)

    async def delete_user(self, user_id: str) -> bool:
        """One transaction; the foreign key's ON DELETE CASCADE removes the blobs with the profile."""
        check_user_id(user_id)

        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "DELETE FROM job_queue WHERE job_id IN (SELECT job_id FROM jobs WHERE user_id = ?)", (user_id,)
            )
            conn.execute("DELETE FROM jobs WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM active_jobs WHERE user_id = ?", (user_id,))
            return conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount == 1

        return await self._run(delete, transaction=True)

    async def put_blob(self, user_id: str, name: str, data: bytes) -> int:
        check_user_id(user_id)
        check_blob_name(name)
        data = check_blob_data(data)

        def write(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
                raise UserNotFound(f"no profile for user {user_id!r}: store it before its blobs")
            cursor = conn.execute("REPLACE INTO blobs (user_id, name, data) VALUES (?, ?, ?)", (user_id, name, data))
            assert cursor.lastrowid is not None  # set by every successful INSERT
            return cursor.lastrowid

        return await self._run(write, transaction=True)

    async def get_blob(self, user_id: str, name: str) -> tuple[int, bytes] | None:
        check_user_id(user_id)
        check_blob_name(name)

        def read(conn: sqlite3.Connection) -> tuple[int, bytes] | None:
            row = conn.execute(
                "SELECT version, data FROM blobs WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone()
            return (row[0], bytes(row[1])) if row else None

        return await self._run(read)

    async def blob_stamp(self, user_id: str, name: str) -> tuple[int, int] | None:
        check_user_id(user_id)
        check_blob_name(name)

        def read(conn: sqlite3.Connection) -> tuple[int, int] | None:
            row = conn.execute(
                "SELECT version, length(data) FROM blobs WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._run(read)

    async def user_stamp(self, user_id: str, blob_name: str) -> UserStamp | None:
        check_user_id(user_id)
        check_blob_name(blob_name)

        def read(conn: sqlite3.Connection) -> UserStamp | None:
            row = conn.execute(
                """SELECT u.profile_version, u.updated_at, b.version, length(b.data) FROM users u
                   LEFT JOIN blobs b ON b.user_id = u.user_id AND b.name = ? WHERE u.user_id = ?""",
                (blob_name, user_id),
            ).fetchone()
            if row is None:
                return None
            return UserStamp(row[0], row[1], None if row[2] is None else (row[2], row[3]))

        return await self._run(read, inline=True)

    async def delete_blob(self, user_id: str, name: str) -> bool:
        check_user_id(user_id)
        check_blob_name(name)
        return await self._run(
            lambda conn: conn.execute("DELETE FROM blobs WHERE user_id = ? AND name = ?", (user_id, name)).rowcount
            == 1
        )

    async def count_users(self) -> int:
        return await self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    async def changed_users(self) -> AsyncIterator[str | None]:
        """None, then nothing: a SQLite store has one serving process, which forgets what it changes."""
        yield None
        await asyncio.Event().wait()

    async def put_job(self, job_id: str, data: dict[str, Any]) -> None:
        job = encode_job(job_id, data)

        def write(conn: sqlite3.Connection) -> int:
            # The WHERE makes an upsert by another user a no-op (rowcount 0).
            return conn.execute(
                """INSERT INTO jobs (job_id, user_id, status, data, finished_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (job_id) DO UPDATE SET
                       status = excluded.status, data = excluded.data, finished_at = excluded.finished_at
                   WHERE user_id = excluded.user_id""",
                (job.job_id, job.user_id, job.status, job.data, job.finished_at),
            ).rowcount

        if await self._run(write) != 1:
            raise ValueError(f"job {job_id!r} belongs to another user than {job.user_id!r}")

    async def update_job(self, job_id: str, data: dict[str, Any], from_statuses: Collection[str]) -> bool:
        job = encode_job(job_id, data)
        allowed = sorted(check_from_statuses(from_statuses))

        def write(conn: sqlite3.Connection) -> bool:
            # UPDATE, never INSERT: a record deleted (with its user) stays deleted.
            updated = conn.execute(
                f"""UPDATE jobs SET status = ?, data = ?, finished_at = ?
                    WHERE job_id = ? AND user_id = ? AND status IN ({', '.join('?' * len(allowed))})""",
                (job.status, job.data, job.finished_at, job.job_id, job.user_id, *allowed),
            ).rowcount
            if updated == 1:
                return True
            owner = conn.execute("SELECT user_id FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
            if owner is not None and owner[0] != job.user_id:
                raise ValueError(f"job {job_id!r} belongs to another user than {job.user_id!r}")
            return False

        return await self._run(write, transaction=True)

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        check_job_id(job_id)
        row = await self._run(lambda conn: conn.execute("SELECT data FROM jobs WHERE job_id = ?", (job_id,)).fetchone())
        return decode_job(row[0]) if row else None

    async def delete_job(self, job_id: str) -> bool:
        check_job_id(job_id)

        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM job_queue WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM active_jobs WHERE job_id = ?", (job_id,))
            return conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,)).rowcount == 1

        return await self._run(delete, transaction=True)

    async def list_jobs(
        self, statuses: Collection[str] | None = None, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        wanted = check_job_statuses(statuses)
        if user_id is not None:
            check_user_id(user_id)
        if wanted is not None and not wanted:
            return []
        where, params = ["1"], []
        if wanted is not None:
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            params += sorted(wanted)
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        query = f"SELECT data FROM jobs WHERE {' AND '.join(where)} ORDER BY seq"
        rows = await self._run(lambda conn: conn.execute(query, params).fetchall())
        return [decode_job(row[0]) for row in rows]

    async def prune_jobs(self, finished_before: float, limit: int) -> int:
        before, limit = check_timestamp(finished_before), check_limit(limit)

        def prune(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT job_id FROM jobs WHERE finished_at < ? ORDER BY finished_at LIMIT ?", (before, limit)
            ).fetchall()
            if not rows:
                return 0
            ids = [row[0] for row in rows]
            marks = ", ".join("?" * len(ids))
            conn.execute(f"DELETE FROM job_queue WHERE job_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM active_jobs WHERE job_id IN ({marks})", ids)
            return conn.execute(f"DELETE FROM jobs WHERE job_id IN ({marks})", ids).rowcount

        return await self._run(prune, transaction=True)

    async def active_job_slots(self) -> dict[str, str]:
        rows = await self._run(lambda conn: conn.execute("SELECT user_id, job_id FROM active_jobs").fetchall())
        return dict(rows)

    async def queued_job_ids(self) -> list[str]:
        rows = await self._run(lambda conn: conn.execute("SELECT job_id FROM job_queue ORDER BY seq").fetchall())
        return [row[0] for row in rows]

    async def claim_active_job(self, user_id: str, job_id: str) -> str | None:
        check_user_id(user_id)
        check_job_id(job_id)

        def claim(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO active_jobs (user_id, job_id) VALUES (?, ?)", (user_id, job_id))
            return conn.execute("SELECT job_id FROM active_jobs WHERE user_id = ?", (user_id,)).fetchone()[0]

        holder = await self._run(claim, transaction=True)
        return None if holder == job_id else holder

    async def release_active_job(self, user_id: str, job_id: str) -> bool:
        check_user_id(user_id)
        check_job_id(job_id)
        return await self._run(
            lambda conn: conn.execute(
                "DELETE FROM active_jobs WHERE user_id = ? AND job_id = ?", (user_id, job_id)
            ).rowcount
            == 1
        )

    async def enqueue_job(self, job_id: str, max_queued: int) -> bool:
        check_job_id(job_id)
        check_max_queued(max_queued)

        def push(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT COUNT(*) FROM job_queue").fetchone()[0] >= max_queued:
                return False
            conn.execute("INSERT INTO job_queue (job_id) VALUES (?)", (job_id,))
            return True

        return await self._run(push, transaction=True)

    async def dequeue_job(self, timeout: float) -> str | None:
        deadline = time.monotonic() + check_timeout(timeout)
        while True:
            job_id = await self._pop_job()
            remaining = deadline - time.monotonic()
            if job_id is not None or remaining <= 0:
                return job_id
            await asyncio.sleep(min(_POLL_INTERVAL, remaining))

    async def queued_count(self) -> int:
        return await self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM job_queue").fetchone()[0])

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        """Idempotent; later calls raise `StoreError`."""

        def close() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

        await asyncio.to_thread(close)

    # --- plumbing -------------------------------------------------------------------

    async def _pop_job(self) -> str | None:
        """One pop that a cancelled caller cannot lose: cancellation does not stop the worker
        thread, so a job it popped meanwhile goes back to the front of the queue."""
        pop = asyncio.ensure_future(self._run(_pop_job))
        try:
            return await asyncio.shield(pop)
        except asyncio.CancelledError:
            try:
                job_id = await pop
            except StoreError:
                job_id = None  # the pop failed: nothing to give back
            if job_id is not None:
                await self._run(lambda conn: _requeue_job_first(conn, job_id), transaction=True)
            raise

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = False, inline: bool = False) -> T:
        """`fn(connection)` in a worker thread; with `inline` (a point read), on the event loop
        if the connection is free at once, never waiting for it there."""
        if inline and self._lock.acquire(blocking=False):
            try:
                return self._locked_call(fn, transaction)
            finally:
                self._lock.release()
        return await asyncio.to_thread(self._call, fn, transaction)

    def _call(self, fn: Callable[[sqlite3.Connection], T], transaction: bool) -> T:
        with self._lock:
            return self._locked_call(fn, transaction)

    def _locked_call(self, fn: Callable[[sqlite3.Connection], T], transaction: bool) -> T:
        with self._errors():
            if self._conn is None:
                raise StoreError(f"{self!r} is closed")
            if not transaction:
                return fn(self._conn)
            with _transaction(self._conn):
                return fn(self._conn)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Map sqlite3 errors to the store's types by result code, never by message."""
        try:
            yield
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", None)
            name = getattr(e, "sqlite_errorname", type(e).__name__)
            if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"SQLite user store {self.path} is unavailable: {e} ({name})") from e
            raise StoreError(f"SQLite user store {self.path}: {e} ({name})") from e
        except OSError as e:  # creating the parent directory
            raise StoreUnavailable(f"SQLite user store {self.path} is unavailable: {e}") from e


def _pop_job(conn: sqlite3.Connection) -> str | None:
    """The oldest queued id, removed. A plain read first: an idle poll never takes the write lock."""
    if conn.execute("SELECT 1 FROM job_queue LIMIT 1").fetchone() is None:
        return None
    with _transaction(conn):  # another process may have emptied the queue meanwhile: read again
        row = conn.execute("SELECT seq, job_id FROM job_queue ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            return None
        conn.execute("DELETE FROM job_queue WHERE seq = ?", (row[0],))
        return row[1]


def _requeue_job_first(conn: sqlite3.Connection, job_id: str) -> None:
    """Put a popped id back ahead of all others (explicit seqs below AUTOINCREMENT's are fine)."""
    conn.execute(
        "INSERT INTO job_queue (seq, job_id) SELECT COALESCE(MIN(seq), 1) - 1, ? FROM job_queue", (job_id,)
    )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """`BEGIN IMMEDIATE` takes the write lock up front, so read-then-write cannot deadlock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; `_transaction` opens them explicitly.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: never corrupt; a power loss may drop the last commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite user store {path} has schema version {version}, newer than this server's {SCHEMA_VERSION}"
            )
        for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")

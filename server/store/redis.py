"""Redis user store, for several server replicas sharing users.

Keys (all under `key_prefix`):
    user:{id}         hash  items, embedding, embedding_model, profile_version, updated_at
    blob:{id}:{name}  hash  version, data
    blobs:{id}        set   the user's blob names, so `delete_user` finds every blob
    users             set   user ids, for `count_users`
    blob_version      int   store-wide blob version counter (versions are never reused)
    job:{job_id}      hash  user_id, status, data (the record as JSON)
    jobs              zset  every job id, scored by creation sequence number
    user_jobs:{id}    zset  the user's job ids, same scores, so `delete_user` finds every job
    job_seq           int   job creation counter
    active_job:{id}   str   the job id holding the user's active-job slot
    job_queue         list  queued job ids, oldest first (RPUSH, BLPOP)

Read-modify-write steps are atomic: MULTI/EXEC for `put_profile`, `delete_blob` and
`delete_user` (WATCHing the blob-name and job sets), Lua for the compare-and-set
`set_embedding`, for `put_blob` (which must see the user exist and bump the counter in
one step), `put_job`, the active-job slot and the bounded `enqueue_job`.

`dequeue_job` is a BLPOP, which waits longer than the 2 s socket timeout may allow: it
runs on a second connection pool without a socket timeout, bounded instead by
`asyncio.timeout(timeout + socket timeout)` around the call (redis-py closes a connection
whose read is cancelled, so the server drops the pending BLPOP with it).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (
    StoreError,
    StoreUnavailable,
    UserNotFound,
    UserRecord,
    check_blob_data,
    check_blob_name,
    check_job_id,
    check_job_statuses,
    check_max_queued,
    check_timeout,
    check_user_id,
    decode_job,
    decode_record,
    encode_embedding,
    encode_job,
    encode_profile,
    redact_url,
)

# Shorter waits do not block: see `dequeue_job`.
_MIN_BLOCKING_TIMEOUT = 0.01

_USER_FIELDS = ("items", "embedding", "embedding_model", "profile_version", "updated_at")

# KEYS: user hash. ARGV: expected profile_version, embedding, embedding_model, updated_at.
_SET_EMBEDDING = """
if redis.call('HGET', KEYS[1], 'profile_version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'embedding', ARGV[2], 'embedding_model', ARGV[3], 'updated_at', ARGV[4])
return 1
"""

# KEYS: user hash, blob hash, blob-name set, version counter. ARGV: name, data.
# Returns the new version, or 0 when the user has no profile.
_PUT_BLOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local version = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[2], 'version', version, 'data', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return version
"""

# KEYS: job hash, all-jobs zset, user-jobs zset, job counter. ARGV: job_id, user_id, status, data.
# Returns 1, or 0 when the job exists under another user (nothing written).
_PUT_JOB = """
local owner = redis.call('HGET', KEYS[1], 'user_id')
if owner and owner ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'user_id', ARGV[2], 'status', ARGV[3], 'data', ARGV[4])
if not owner then
    local seq = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[2], seq, ARGV[1])
    redis.call('ZADD', KEYS[3], seq, ARGV[1])
end
return 1
"""

# KEYS: active-job key. ARGV: job_id. Returns the other holder, or nil when ARGV[1] holds the slot.
_CLAIM_ACTIVE_JOB = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""

# KEYS: active-job key. ARGV: job_id.
_RELEASE_ACTIVE_JOB = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS: job hash, all-jobs zset, user-jobs zset, active-job key, queue list. ARGV: job_id.
# Returns 1 if the record existed.
_DELETE_JOB = """
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
redis.call('LREM', KEYS[5], 0, ARGV[1])
return existed
"""

# KEYS: queue list. ARGV: job_id, max_queued.
_ENQUEUE_JOB = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1
"""


class RedisUserStore:
    """`UserStore` in Redis. Connects lazily; the pool reconnects after an outage by itself."""

    def __init__(self, url: str, key_prefix: str = "mta:", *, timeout: float = 2.0) -> None:
        self.key_prefix = key_prefix
        self._where = f"Redis user store {redact_url(url)} (prefix {key_prefix!r})"
        self._timeout = timeout
        # Short socket timeouts: a hung or unreachable Redis fails within about `timeout`
        # (2 * timeout if unreachable: connect, retry connect) instead of hanging. One quick
        # retry on connection errors only replaces a pooled connection that died while
        # Redis restarted; timeouts are not retried (the command may have been applied).
        self._redis: aioredis.Redis | None = _connect(url, timeout, socket_timeout=timeout)
        # Blocking pops only: no socket timeout, so a BLPOP may wait longer than `timeout`;
        # `dequeue_job` bounds each call itself. Separate pool: a waiting consumer holds a
        # connection that the other calls must not queue behind.
        self._blocking: aioredis.Redis | None = _connect(url, timeout, socket_timeout=None)
        self._set_embedding = self._redis.register_script(_SET_EMBEDDING)
        self._put_blob = self._redis.register_script(_PUT_BLOB)
        self._put_job = self._redis.register_script(_PUT_JOB)
        self._claim_active_job = self._redis.register_script(_CLAIM_ACTIVE_JOB)
        self._release_active_job = self._redis.register_script(_RELEASE_ACTIVE_JOB)
        self._enqueue_job = self._redis.register_script(_ENQUEUE_JOB)
        self._delete_job = self._redis.register_script(_DELETE_JOB)

    def __repr__(self) -> str:
        return f"RedisUserStore({self._where})"

    async def get_user(self, user_id: str) -> UserRecord | None:
        check_user_id(user_id)
        with self._errors():
            fields = await self._client().hmget(self._user_key(user_id), _USER_FIELDS)
        return None if fields[0] is None else decode_record(user_id, *fields)

    async def put_profile(
        self,
        user_id: str,
        items: list[dict[str, Any]],
        embedding: np.ndarray | None,
        embedding_model: str | None,
    ) -> UserRecord:
        check_user_id(user_id)
        profile = encode_profile(items, embedding, embedding_model)
        key = self._user_key(user_id)
        fields: dict[str, Any] = {"items": profile.items, "updated_at": repr(profile.updated_at)}
        if profile.embedding is not None:
            fields |= {"embedding": profile.embedding, "embedding_model": profile.embedding_model}
        with self._errors():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.hdel(key, "embedding", "embedding_model")
                pipe.hset(key, mapping=fields)
                pipe.hincrby(key, "profile_version", 1)
                pipe.sadd(self._users_key, user_id)
                _, _, version, _ = await pipe.execute()
        return profile.to_record(user_id, version)

    async def set_embedding(
        self, user_id: str, embedding: np.ndarray, embedding_model: str, expected_profile_version: int
    ) -> bool:
        check_user_id(user_id)
        data = encode_embedding(embedding, embedding_model)
        with self._errors():
            applied = await self._set_embedding(
                keys=[self._user_key(user_id)],
                args=[int(expected_profile_version), data, embedding_model, repr(time.time())],
                client=self._client(),
            )
        return applied == 1

    async def delete_user(self, user_id: str) -> bool:
        check_user_id(user_id)
        names_key = self._blob_names_key(user_id)
        jobs_key = self._user_jobs_key(user_id)

        async def delete(pipe: Pipeline) -> None:
            # WATCH (by `transaction`) on the name and job sets: a blob or job added meanwhile retries this.
            names = await pipe.smembers(names_key)
            job_ids = [job_id.decode() for job_id in await pipe.zrange(jobs_key, 0, -1)]
            pipe.multi()
            pipe.delete(self._user_key(user_id))
            pipe.delete(names_key, *(self._blob_key(user_id, name.decode()) for name in names))
            pipe.srem(self._users_key, user_id)
            pipe.delete(jobs_key, self._active_job_key(user_id), *map(self._job_key, job_ids))
            if job_ids:
                pipe.zrem(self._jobs_key, *job_ids)
            for job_id in job_ids:
                pipe.lrem(self._queue_key, 0, job_id)

        with self._errors():
            results = await self._client().transaction(delete, names_key, jobs_key)
        return results[0] == 1

    async def put_blob(self, user_id: str, name: str, data: bytes) -> int:
        check_user_id(user_id)
        check_blob_name(name)
        data = check_blob_data(data)
        keys = [
            self._user_key(user_id),
            self._blob_key(user_id, name),
            self._blob_names_key(user_id),
            self._blob_version_key,
        ]
        with self._errors():
            version = await self._put_blob(keys=keys, args=[name, data], client=self._client())
        if version == 0:
            raise UserNotFound(f"no profile for user {user_id!r}: store it before its blobs")
        return int(version)

    async def get_blob(self, user_id: str, name: str) -> tuple[int, bytes] | None:
        check_user_id(user_id)
        check_blob_name(name)
        with self._errors():
            version, data = await self._client().hmget(self._blob_key(user_id, name), ["version", "data"])
        return None if version is None else (int(version), data)

    async def delete_blob(self, user_id: str, name: str) -> bool:
        check_user_id(user_id)
        check_blob_name(name)
        with self._errors():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.delete(self._blob_key(user_id, name))
                pipe.srem(self._blob_names_key(user_id), name)
                deleted, _ = await pipe.execute()
        return deleted == 1

    async def count_users(self) -> int:
        with self._errors():
            return await self._client().scard(self._users_key)

    async def put_job(self, job_id: str, data: dict[str, Any]) -> None:
        job = encode_job(job_id, data)
        keys = [self._job_key(job_id), self._jobs_key, self._user_jobs_key(job.user_id), self._job_seq_key]
        with self._errors():
            written = await self._put_job(
                keys=keys, args=[job_id, job.user_id, job.status, job.data], client=self._client()
            )
        if written == 0:
            raise ValueError(f"job {job_id!r} belongs to another user than {job.user_id!r}")

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        check_job_id(job_id)
        with self._errors():
            data = await self._client().hget(self._job_key(job_id), "data")
        return None if data is None else decode_job(data)

    async def delete_job(self, job_id: str) -> bool:
        check_job_id(job_id)
        client = self._client()
        with self._errors():
            # A job never changes user (`put_job`), so its user read first names the right keys.
            user_id = await client.hget(self._job_key(job_id), "user_id")
            if user_id is None:
                await client.lrem(self._queue_key, 0, job_id)
                return False
            keys = [
                self._job_key(job_id),
                self._jobs_key,
                self._user_jobs_key(user_id.decode()),
                self._active_job_key(user_id.decode()),
                self._queue_key,
            ]
            deleted = await self._delete_job(keys=keys, args=[job_id], client=client)
        return deleted == 1

    async def list_jobs(
        self, statuses: Collection[str] | None = None, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Statuses first, then only the matching records (which may be large: training examples)."""
        wanted = check_job_statuses(statuses)
        index = self._jobs_key if user_id is None else self._user_jobs_key(check_user_id(user_id))
        if wanted is not None and not wanted:
            return []
        client = self._client()
        with self._errors():
            job_ids = [job_id.decode() for job_id in await client.zrange(index, 0, -1)]
            if wanted is not None and job_ids:
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.hget(self._job_key(job_id), "status")
                    found = await pipe.execute()
                job_ids = [job_id for job_id, status in zip(job_ids, found) if status and status.decode() in wanted]
            if not job_ids:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self._job_key(job_id), "data")
                records = await pipe.execute()
        # A job deleted (with its user) between the reads is skipped; one updated meanwhile is
        # re-checked against the filter on its final record.
        jobs = [decode_job(data) for data in records if data is not None]
        return jobs if wanted is None else [job for job in jobs if job.get("status") in wanted]

    async def claim_active_job(self, user_id: str, job_id: str) -> str | None:
        check_user_id(user_id)
        check_job_id(job_id)
        with self._errors():
            holder = await self._claim_active_job(
                keys=[self._active_job_key(user_id)], args=[job_id], client=self._client()
            )
        return None if holder is None else holder.decode()

    async def release_active_job(self, user_id: str, job_id: str) -> bool:
        check_user_id(user_id)
        check_job_id(job_id)
        with self._errors():
            released = await self._release_active_job(
                keys=[self._active_job_key(user_id)], args=[job_id], client=self._client()
            )
        return released == 1

    async def enqueue_job(self, job_id: str, max_queued: int) -> bool:
        check_job_id(job_id)
        check_max_queued(max_queued)
        with self._errors():
            pushed = await self._enqueue_job(keys=[self._queue_key], args=[job_id, max_queued], client=self._client())
        return pushed == 1

    async def dequeue_job(self, timeout: float) -> str | None:
        """BLPOP on the blocking pool. BLPOP's 0 means forever (as may a timeout that Redis
        rounds to 0 ms), so a wait under `_MIN_BLOCKING_TIMEOUT` is a plain LPOP instead.

        If Redis does not answer within `timeout` + the socket timeout the call is cancelled,
        which closes its connection (the server then drops the pending BLPOP), and raises
        `StoreUnavailable`. Only a pop the server made but could not deliver before that is lost.
        """
        timeout = check_timeout(timeout)
        if timeout < _MIN_BLOCKING_TIMEOUT:
            with self._errors():
                job_id = await self._client().lpop(self._queue_key)
            return None if job_id is None else job_id.decode()
        if self._blocking is None:
            raise StoreError(f"{self!r} is closed")
        with self._errors():
            try:
                async with asyncio.timeout(timeout + self._timeout):
                    popped = await self._blocking.blpop([self._queue_key], timeout=timeout)
            except TimeoutError as e:  # asyncio's, not redis-py's
                raise StoreUnavailable(f"{self._where} is unavailable: BLPOP got no answer in time") from e
        return None if popped is None else popped[1].decode()

    async def queued_count(self) -> int:
        with self._errors():
            return await self._client().llen(self._queue_key)

    async def ping(self) -> None:
        with self._errors():
            await self._client().ping()

    async def close(self) -> None:
        """Idempotent; later calls raise `StoreError`."""
        client, self._redis = self._redis, None
        blocking, self._blocking = self._blocking, None
        for pool in (client, blocking):
            if pool is not None:
                await pool.aclose()

    # --- plumbing -------------------------------------------------------------------

    def _user_key(self, user_id: str) -> str:
        return f"{self.key_prefix}user:{user_id}"

    def _blob_key(self, user_id: str, name: str) -> str:
        return f"{self.key_prefix}blob:{user_id}:{name}"

    def _blob_names_key(self, user_id: str) -> str:
        return f"{self.key_prefix}blobs:{user_id}"

    @property
    def _users_key(self) -> str:
        return f"{self.key_prefix}users"

    @property
    def _blob_version_key(self) -> str:
        return f"{self.key_prefix}blob_version"

    def _job_key(self, job_id: str) -> str:
        return f"{self.key_prefix}job:{job_id}"

    def _user_jobs_key(self, user_id: str) -> str:
        return f"{self.key_prefix}user_jobs:{user_id}"

    def _active_job_key(self, user_id: str) -> str:
        return f"{self.key_prefix}active_job:{user_id}"

    @property
    def _jobs_key(self) -> str:
        return f"{self.key_prefix}jobs"

    @property
    def _job_seq_key(self) -> str:
        return f"{self.key_prefix}job_seq"

    @property
    def _queue_key(self) -> str:
        return f"{self.key_prefix}job_queue"

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError(f"{self!r} is closed")
        return self._redis

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Every Redis error becomes `StoreUnavailable` (503). Connection problems are an outage; an
        error the server answers (out of memory under `maxmemory`, a read-only replica, a failed
        snapshot, a busy script, a key of the wrong type) is a state of the deployment that the
        request cannot fix and an operator must, so it is reported the same way, with the reason."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise StoreUnavailable(f"{self._where} is unavailable: {type(e).__name__}: {e}") from e
        except RedisError as e:
            raise StoreUnavailable(f"{self._where} is unavailable: {_explain(e)}") from e


# Redis error replies (their first word) that an operator must act on, and what they mean.
_REFUSALS = {
    "OOM": "Redis is out of memory (used memory > maxmemory and the eviction policy frees nothing):"
    " it refuses writes until memory is freed or maxmemory is raised",
    "READONLY": "Redis is a read-only replica: writes need the primary",
    "MISCONF": "Redis cannot save its snapshot and refuses writes (see the Redis log)",
    "BUSY": "Redis is busy running a script",
    "MASTERDOWN": "the Redis replica lost its primary",
    "NOREPLICAS": "Redis has not enough replicas to accept writes",
    "CLUSTERDOWN": "the Redis cluster is down",
    "TRYAGAIN": "Redis asks to try again (resharding)",
}

_REFUSAL = re.compile(rf"(?:^|[\s:-])({'|'.join(_REFUSALS)}) ")
# redis-py strips the codes it has a class for (OOM, READONLY, ...) from the message.
_CODE_OF_CLASS = {OutOfMemoryError: "OOM", ReadOnlyError: "READONLY"}


def _explain(e: RedisError) -> str:
    """A clear reason first, then Redis's own words."""
    text = str(e)
    code = next((c for cls, c in _CODE_OF_CLASS.items() if isinstance(e, cls)), None)
    if code is None and (m := _REFUSAL.search(text)) is not None:
        code = m.group(1)
    if code is None:
        return f"Redis refused the command ({type(e).__name__}: {text})"
    return f"{_REFUSALS[code]} (Redis replied {code}: {text.removeprefix(code + ' ')})"


def _connect(url: str, connect_timeout: float, *, socket_timeout: float | None) -> aioredis.Redis:
    """A lazily connecting client; one quick retry replaces a connection that died in a restart."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )

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
    active_jobs       zset  queued and running job ids, same scores: what the stale-job sweep reads
    finished_jobs     zset  ended job ids, scored by `finished_at`: what `prune_jobs` reads
    job_indexes       str   "1" once `active_jobs` and `finished_jobs` cover every job (see below)
    job_seq           int   job creation counter
    active_job:{id}   str   the job id holding the user's active-job slot
    active_users      set   users holding a slot, so the sweep finds every slot without a SCAN
    job_queue         list  queued job ids, oldest first (RPUSH, BLPOP)

Read-modify-write steps are atomic: MULTI/EXEC for `put_profile`, `delete_blob` and
`delete_user` (WATCHing the blob-name and job sets), Lua for the compare-and-set
`set_embedding`, for `put_blob` (which must see the user exist and bump the counter in
one step), `put_job` and `update_job` (record and indexes in one step; `update_job` writes
only an existing record in an expected status), the active-job slot and the bounded
`enqueue_job`. A store written before `active_jobs`/`finished_jobs` existed gets them filled
once (`_index_jobs`, one pass over `jobs`) before the first read that needs them.

`dequeue_job` is a BLPOP, which waits longer than the 2 s socket timeout may allow: it
runs on a second connection pool without a socket timeout, bounded instead by
`asyncio.timeout(timeout + socket timeout)` around the call (redis-py closes a connection
whose read is cancelled, so the server drops the pending BLPOP with it).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Collection, Iterator
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
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    EncodedJob,
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
    job_finished_at,
    redact_url,
)

# Shorter waits do not block: see `dequeue_job`.
_MIN_BLOCKING_TIMEOUT = 0.01
# Statuses indexed by `active_jobs` (the rest: `finished_jobs`).
_ACTIVE_STATUSES = JOB_STATUSES - TERMINAL_JOB_STATUSES
# Jobs read per round trip by the one-time `_index_jobs` pass.
_INDEX_BATCH = 500
_RESUBSCRIBE_DELAY = 0.5  # seconds, doubled after each failed attempt up to the maximum
_RESUBSCRIBE_MAX_DELAY = 10.0

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
redis.call('PUBLISH', ARGV[3], ARGV[4])
return version
"""

# KEYS: job hash, all-jobs zset, user-jobs zset, job counter, active-jobs zset, finished-jobs zset.
# ARGV: job_id, user_id, status, data, finished_at ('' while active), mode, statuses...
# Mode 'put' upserts; mode 'update' writes only an existing record whose status is one of ARGV[7..].
# Returns 1 when written, 0 when an update found no such record, -1 when the job is another user's.
_PUT_JOB = """
local owner = redis.call('HGET', KEYS[1], 'user_id')
if owner and owner ~= ARGV[2] then return -1 end
if ARGV[6] == 'update' then
    if not owner then return 0 end
    local status, allowed = redis.call('HGET', KEYS[1], 'status'), false
    for i = 7, #ARGV do
        if ARGV[i] == status then allowed = true end
    end
    if not allowed then return 0 end
end
redis.call('HSET', KEYS[1], 'user_id', ARGV[2], 'status', ARGV[3], 'data', ARGV[4])
local seq = owner and redis.call('ZSCORE', KEYS[2], ARGV[1])
if not seq then
    seq = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[2], seq, ARGV[1])
    redis.call('ZADD', KEYS[3], seq, ARGV[1])
end
if ARGV[5] == '' then
    redis.call('ZADD', KEYS[5], seq, ARGV[1])
    redis.call('ZREM', KEYS[6], ARGV[1])
else
    redis.call('ZREM', KEYS[5], ARGV[1])
    redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
end
return 1
"""

# KEYS: active-job key, active-users set. ARGV: job_id, user_id.
# Returns the other holder, or nil when ARGV[1] holds the slot.
_CLAIM_ACTIVE_JOB = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return false
"""

# KEYS: active-job key, active-users set. ARGV: job_id, user_id.
_RELEASE_ACTIVE_JOB = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SREM', KEYS[2], ARGV[2])
return redis.call('DEL', KEYS[1])
"""

# KEYS: job hash, all-jobs zset, user-jobs zset, active-job key, queue list, active-jobs zset,
# finished-jobs zset, active-users set. ARGV: job_id, user_id. Returns 1 if the record existed.
_DELETE_JOB = """
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] then
    redis.call('DEL', KEYS[4])
    redis.call('SREM', KEYS[8], ARGV[2])
end
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
        self._jobs_indexed = False  # `_index_jobs` has seen the `job_indexes` marker (or set it)

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
        *,
        expected_version: int | None = None,
    ) -> UserRecord:
        check_user_id(user_id)
        profile = encode_profile(items, embedding, embedding_model)
        key = self._user_key(user_id)
        fields: dict[str, Any] = {"items": profile.items, "updated_at": repr(profile.updated_at)}
        if profile.embedding is not None:
            fields |= {"embedding": profile.embedding, "embedding_model": profile.embedding_model}

        async def write(pipe: Pipeline) -> None:
            # With an expected version the key is WATCHed (by `transaction`): a write in between retries.
            if expected_version is not None:
                current = int(await pipe.hget(key, "profile_version") or 0)
                if current != expected_version:
                    raise ProfileChanged(f"profile of {user_id!r} is at version {current}, not {expected_version}")
            pipe.multi()
            pipe.hdel(key, "embedding", "embedding_model")
            pipe.hset(key, mapping=fields)
            pipe.hincrby(key, "profile_version", 1)
            pipe.sadd(self._users_key, user_id)

        with self._errors():
            results = await self._client().transaction(write, key)
        return profile.to_record(user_id, results[2])

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
            pipe.srem(self._active_users_key, user_id)
            if job_ids:
                for index in (self._jobs_key, self._active_jobs_key, self._finished_jobs_key):
                    pipe.zrem(index, *job_ids)
            for job_id in job_ids:
                pipe.lrem(self._queue_key, 0, job_id)
            pipe.publish(self._changes_channel, user_id)

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
            version = await self._put_blob(
                keys=keys, args=[name, data, self._changes_channel, user_id], client=self._client()
            )
        if version == 0:
            raise UserNotFound(f"no profile for user {user_id!r}: store it before its blobs")
        return int(version)

    async def get_blob(self, user_id: str, name: str) -> tuple[int, bytes] | None:
        check_user_id(user_id)
        check_blob_name(name)
        with self._errors():
            version, data = await self._client().hmget(self._blob_key(user_id, name), ["version", "data"])
        return None if version is None else (int(version), data)

    async def blob_stamp(self, user_id: str, name: str) -> tuple[int, int] | None:
        check_user_id(user_id)
        check_blob_name(name)
        key = self._blob_key(user_id, name)
        with self._errors():  # no MULTI: Redis refuses transactions when out of memory, reads go on
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.hget(key, "version")
                pipe.hstrlen(key, "data")
                version, size = await pipe.execute()
        return None if version is None else (int(version), int(size))

    async def user_stamp(self, user_id: str, blob_name: str) -> UserStamp | None:
        check_user_id(user_id)
        check_blob_name(blob_name)
        blob_key = self._blob_key(user_id, blob_name)
        with self._errors():  # one round trip, no MULTI (as `blob_stamp`)
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.hmget(self._user_key(user_id), ["profile_version", "updated_at"])
                pipe.hget(blob_key, "version")
                pipe.hstrlen(blob_key, "data")
                (version, updated_at), blob_version, size = await pipe.execute()
        if version is None:
            return None
        return UserStamp(int(version), float(updated_at), None if blob_version is None else (int(blob_version), int(size)))

    async def delete_blob(self, user_id: str, name: str) -> bool:
        check_user_id(user_id)
        check_blob_name(name)
        with self._errors():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.delete(self._blob_key(user_id, name))
                pipe.srem(self._blob_names_key(user_id), name)
                pipe.publish(self._changes_channel, user_id)
                deleted, *_ = await pipe.execute()
        return deleted == 1

    async def count_users(self) -> int:
        with self._errors():
            return await self._client().scard(self._users_key)

    async def changed_users(self) -> AsyncIterator[str | None]:
        """Subscribed to the store's change channel (every write above that changes what a replica
        may have cached publishes the user id); resubscribes after an outage, with backoff."""
        delay = _RESUBSCRIBE_DELAY
        while True:
            pubsub = self._client().pubsub()
            try:
                await pubsub.subscribe(self._changes_channel)
                delay = _RESUBSCRIBE_DELAY
                yield None  # what was published while unsubscribed is lost
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        yield message["data"].decode()
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(2 * delay, _RESUBSCRIBE_MAX_DELAY)
            finally:
                await pubsub.aclose()

    async def put_job(self, job_id: str, data: dict[str, Any]) -> None:
        await self._write_job(encode_job(job_id, data), "put", ())

    async def update_job(self, job_id: str, data: dict[str, Any], from_statuses: Collection[str]) -> bool:
        job = encode_job(job_id, data)
        return await self._write_job(job, "update", sorted(check_from_statuses(from_statuses)))

    async def _write_job(self, job: EncodedJob, mode: str, from_statuses: Collection[str]) -> bool:
        """One `_PUT_JOB` call: the record and its indexes in one step."""
        keys = [
            self._job_key(job.job_id),
            self._jobs_key,
            self._user_jobs_key(job.user_id),
            self._job_seq_key,
            self._active_jobs_key,
            self._finished_jobs_key,
        ]
        finished = "" if job.finished_at is None else repr(job.finished_at)
        args = [job.job_id, job.user_id, job.status, job.data, finished, mode, *from_statuses]
        with self._errors():
            written = await self._put_job(keys=keys, args=args, client=self._client())
        if written == -1:
            raise ValueError(f"job {job.job_id!r} belongs to another user than {job.user_id!r}")
        return written == 1

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
                async with client.pipeline(transaction=False) as pipe:
                    pipe.lrem(self._queue_key, 0, job_id)
                    pipe.zrem(self._active_jobs_key, job_id)
                    pipe.zrem(self._finished_jobs_key, job_id)
                    await pipe.execute()
                return False
            return await self._delete_job_of(job_id, user_id.decode())

    async def _delete_job_of(self, job_id: str, user_id: str) -> bool:
        """`_DELETE_JOB` for a job of `user_id` (a job never changes user, so its keys are known)."""
        keys = [
            self._job_key(job_id),
            self._jobs_key,
            self._user_jobs_key(user_id),
            self._active_job_key(user_id),
            self._queue_key,
            self._active_jobs_key,
            self._finished_jobs_key,
            self._active_users_key,
        ]
        with self._errors():
            deleted = await self._delete_job(keys=keys, args=[job_id, user_id], client=self._client())
        return deleted == 1

    async def list_jobs(
        self, statuses: Collection[str] | None = None, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Statuses first, then only the matching records (which may be large: training examples)."""
        wanted = check_job_statuses(statuses)
        index = self._jobs_key if user_id is None else self._user_jobs_key(check_user_id(user_id))
        if wanted is not None and not wanted:
            return []
        by_activity = user_id is None and wanted is not None and wanted <= _ACTIVE_STATUSES
        if by_activity:
            await self._index_jobs()
            index = self._active_jobs_key  # the sweep's reads touch active jobs only
        client = self._client()
        with self._errors():
            job_ids = [job_id.decode() for job_id in await client.zrange(index, 0, -1)]
            if wanted is not None and job_ids:
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.hget(self._job_key(job_id), "status")
                    found = await pipe.execute()
                statuses_of = {job_id: status.decode() for job_id, status in zip(job_ids, found) if status}
                if by_activity and (ended := [j for j in job_ids if statuses_of.get(j) not in _ACTIVE_STATUSES]):
                    await client.zrem(self._active_jobs_key, *ended)  # left by a racing `_index_jobs`
                job_ids = [job_id for job_id in job_ids if statuses_of.get(job_id) in wanted]
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

    async def prune_jobs(self, finished_before: float, limit: int) -> int:
        before, limit = check_timestamp(finished_before), check_limit(limit)
        await self._index_jobs()
        client = self._client()
        with self._errors():
            # Exclusive bound: "(" + score, as SQLite's `finished_at < ?`.
            found = await client.zrangebyscore(self._finished_jobs_key, "-inf", f"({before!r}", start=0, num=limit)
            job_ids = [job_id.decode() for job_id in found]
            if not job_ids:
                return 0
            async with client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self._job_key(job_id), "user_id")
                owners = await pipe.execute()
        pruned = 0
        for job_id, owner in zip(job_ids, owners):
            if owner is None:  # deleted meanwhile: only its index entry is left
                with self._errors():
                    await client.zrem(self._finished_jobs_key, job_id)
            else:
                pruned += await self._delete_job_of(job_id, owner.decode())
        return pruned

    async def active_job_slots(self) -> dict[str, str]:
        client = self._client()
        with self._errors():
            users = sorted(user.decode() for user in await client.smembers(self._active_users_key))
            if not users:
                return {}
            holders = await client.mget([self._active_job_key(user) for user in users])
        return {user: holder.decode() for user, holder in zip(users, holders) if holder is not None}

    async def queued_job_ids(self) -> list[str]:
        with self._errors():
            return [job_id.decode() for job_id in await self._client().lrange(self._queue_key, 0, -1)]

    async def claim_active_job(self, user_id: str, job_id: str) -> str | None:
        check_user_id(user_id)
        check_job_id(job_id)
        with self._errors():
            holder = await self._claim_active_job(
                keys=self._slot_keys(user_id), args=[job_id, user_id], client=self._client()
            )
        return None if holder is None else holder.decode()

    async def release_active_job(self, user_id: str, job_id: str) -> bool:
        check_user_id(user_id)
        check_job_id(job_id)
        with self._errors():
            released = await self._release_active_job(
                keys=self._slot_keys(user_id), args=[job_id, user_id], client=self._client()
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

    async def _index_jobs(self) -> None:
        """Once per store: put the jobs of a store written before `active_jobs` and `finished_jobs`
        existed into them, then mark the store (`job_indexes`). Idempotent and safe to run
        concurrently; a job written meanwhile is indexed by `_PUT_JOB` itself, and an entry this
        pass adds from an older read is harmless (`list_jobs` re-checks status, `prune_jobs` the
        record)."""
        if self._jobs_indexed:
            return
        client = self._client()
        with self._errors():
            if await client.get(self._job_indexes_key) is None:
                start = 0
                while batch := await client.zrange(self._jobs_key, start, start + _INDEX_BATCH - 1, withscores=True):
                    await self._index_batch(client, [(job_id.decode(), seq) for job_id, seq in batch])
                    start += len(batch)
                await client.set(self._job_indexes_key, "1")
        self._jobs_indexed = True

    async def _index_batch(self, client: aioredis.Redis, batch: list[tuple[str, float]]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for job_id, _ in batch:
                pipe.hmget(self._job_key(job_id), ["status", "data"])
            records = await pipe.execute()
        active: dict[str, float] = {}
        finished: dict[str, float] = {}
        for (job_id, seq), (status, data) in zip(batch, records):
            if status is None:
                continue
            if status.decode() in _ACTIVE_STATUSES:
                active[job_id] = seq
            else:
                finished[job_id] = job_finished_at(status.decode(), decode_job(data)) or time.time()
        async with client.pipeline(transaction=False) as pipe:
            if active:
                pipe.zadd(self._active_jobs_key, active)
            if finished:
                pipe.zadd(self._finished_jobs_key, finished)
            await pipe.execute()

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
    def _changes_channel(self) -> str:  # a pub/sub channel: `changed_users`
        return f"{self.key_prefix}user-changes"

    @property
    def _blob_version_key(self) -> str:
        return f"{self.key_prefix}blob_version"

    def _job_key(self, job_id: str) -> str:
        return f"{self.key_prefix}job:{job_id}"

    def _user_jobs_key(self, user_id: str) -> str:
        return f"{self.key_prefix}user_jobs:{user_id}"

    def _active_job_key(self, user_id: str) -> str:
        return f"{self.key_prefix}active_job:{user_id}"

    def _slot_keys(self, user_id: str) -> list[str]:
        """The keys of the slot scripts: the user's slot, and the set of users holding one."""
        return [self._active_job_key(user_id), self._active_users_key]

    @property
    def _jobs_key(self) -> str:
        return f"{self.key_prefix}jobs"

    @property
    def _active_jobs_key(self) -> str:
        return f"{self.key_prefix}active_jobs"

    @property
    def _finished_jobs_key(self) -> str:
        return f"{self.key_prefix}finished_jobs"

    @property
    def _job_indexes_key(self) -> str:
        return f"{self.key_prefix}job_indexes"

    @property
    def _active_users_key(self) -> str:
        return f"{self.key_prefix}active_users"

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

"""Redis user store, for several server replicas sharing users.

Keys (all under `key_prefix`):
    user:{id}         hash  items, embedding, embedding_model, profile_version, updated_at
    blob:{id}:{name}  hash  version, data
    blobs:{id}        set   the user's blob names, so `delete_user` finds every blob
    users             set   user ids, for `count_users`
    blob_version      int   store-wide blob version counter (versions are never reused)

Read-modify-write steps are atomic: MULTI/EXEC for `put_profile`, `delete_blob` and
`delete_user` (WATCHing the blob-name set), Lua for the compare-and-set `set_embedding`
and for `put_blob` (which must see the user exist and bump the counter in one step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (
    StoreError,
    StoreUnavailable,
    UserNotFound,
    UserRecord,
    check_blob_data,
    check_blob_name,
    check_user_id,
    decode_record,
    encode_embedding,
    encode_profile,
    redact_url,
)

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


class RedisUserStore:
    """`UserStore` in Redis. Connects lazily; the pool reconnects after an outage by itself."""

    def __init__(self, url: str, key_prefix: str = "mta:", *, timeout: float = 2.0) -> None:
        self.key_prefix = key_prefix
        self._where = f"Redis user store {redact_url(url)} (prefix {key_prefix!r})"
        # Short socket timeouts: a hung or unreachable Redis fails within about `timeout`
        # (2 * timeout if unreachable: connect, retry connect) instead of hanging. One quick
        # retry on connection errors only replaces a pooled connection that died while
        # Redis restarted; timeouts are not retried (the command may have been applied).
        self._redis: aioredis.Redis | None = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1, supported_errors=(RedisConnectionError,)),
            health_check_interval=30,
        )
        self._set_embedding = self._redis.register_script(_SET_EMBEDDING)
        self._put_blob = self._redis.register_script(_PUT_BLOB)

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

        async def delete(pipe: Pipeline) -> None:
            # WATCH (by `transaction`) on the name set: a blob added meanwhile retries this.
            names = await pipe.smembers(names_key)
            pipe.multi()
            pipe.delete(self._user_key(user_id))
            pipe.delete(names_key, *(self._blob_key(user_id, name.decode()) for name in names))
            pipe.srem(self._users_key, user_id)

        with self._errors():
            deleted_profile, _, _ = await self._client().transaction(delete, names_key)
        return deleted_profile == 1

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

    async def ping(self) -> None:
        with self._errors():
            await self._client().ping()

    async def close(self) -> None:
        """Idempotent; later calls raise `StoreError`."""
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

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

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError(f"{self!r} is closed")
        return self._redis

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Connection problems become `StoreUnavailable` (503); other Redis errors `StoreError`."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise StoreUnavailable(f"{self._where} is unavailable: {type(e).__name__}: {e}") from e
        except RedisError as e:
            raise StoreError(f"{self._where}: {type(e).__name__}: {e}") from e

"""Materialized per-user adapters on disk (tmpfs), LRU-bounded, each with its own vLLM lora_int_id.

vLLM 0.32 loads adapters only from a path, so a fused adapter is written once under its
cache key and reused by every user whose neighbourhood rounds to the same key. An entry in
use by a request (a lease) is never deleted under it: eviction and invalidation defer the
removal of its directory until the last lease is released.

A full filesystem (ENOSPC, or EDQUOT for a quota) while an adapter is written is a 503
(`AdapterCacheFull`) for that request only: adapters already cached and the base model are
still served, and the next miss tries again, so the server recovers once space is freed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import re
import shutil
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import AdapterCacheFull

log = logging.getLogger(__name__)

_NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# safetensors' Rust writer raises SafetensorError, not OSError, with the OS error in the text:
# "Error while serializing: I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full filesystem or quota."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(int(n) in _NO_SPACE for n in _RUST_OS_ERROR.findall(str(e))):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class AdapterKey:
    """What makes two users' adapters identical (docs/architecture.md, section 2)."""

    bank: str  # ServedBank.uid: a bank load, not just its version string
    anchors: tuple[tuple[str, float], ...]  # (anchor id, rounded weight), most similar first
    mode: str
    stacked_version: int | None = None

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:24]


@dataclass
class CachedAdapter:
    key: AdapterKey
    lora_int_id: int
    path: Path
    info: Any = None  # what `build` returned (e.g. the adapter's rank): lives and dies with the entry
    leases: int = 0
    retired: bool = False  # evicted or invalidated: delete when the last lease ends


@dataclass
class _Build:
    """The lock that makes concurrent first requests for one key build it once, and its users."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterCache:
    """LRU of materialized adapters; ids are never reused within a process."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = Path(root)
        self.capacity = capacity
        self.stats = CacheStats()
        self._entries: OrderedDict[AdapterKey, CachedAdapter] = OrderedDict()
        # Only keys being built (or waited for) right now: dropped by the last user, success or not.
        self._building: dict[AdapterKey, _Build] = {}
        self._next_id = 1
        # Adapters of an earlier process are unknown to this engine: start clean.
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def lease(
        self, key: AdapterKey, build: Callable[[Path], Awaitable[Any]]
    ) -> AsyncIterator[tuple[CachedAdapter, bool]]:
        """Yield (adapter, cache_hit), building it with `build(path)` on a miss; what `build`
        returns is kept as the entry's `info`."""
        entry, hit = await self._get_or_build(key, build)
        entry.leases += 1
        try:
            yield entry, hit
        finally:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                shutil.rmtree(entry.path, ignore_errors=True)

    async def _get_or_build(
        self, key: AdapterKey, build: Callable[[Path], Awaitable[Any]]
    ) -> tuple[CachedAdapter, bool]:
        if (entry := self._hit(key)) is not None:
            return entry, True
        building = self._building.setdefault(key, _Build())
        building.users += 1
        try:
            async with building.lock:  # concurrent first requests for one key build it once
                return await self._build_locked(key, build)
        finally:
            building.users -= 1
            if building.users == 0:  # nobody waits on this lock any more (the build succeeded or failed)
                del self._building[key]

    def _hit(self, key: AdapterKey) -> CachedAdapter | None:
        if (entry := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
        return entry

    async def _build_locked(
        self, key: AdapterKey, build: Callable[[Path], Awaitable[Any]]
    ) -> tuple[CachedAdapter, bool]:
        """Under the key's build lock: another request may have built it while this one waited."""
        if (entry := self._hit(key)) is not None:
            return entry, True
        self.stats.misses += 1
        lora_int_id = self._next_id
        self._next_id += 1
        path = self.root / f"{lora_int_id}-{key.digest()}"
        try:
            info = await build(path)
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            if not out_of_space(e):
                raise
            log.warning("adapter cache %s is out of space: %s", self.root, e)
            raise AdapterCacheFull(
                "the adapter cache is out of disk space: this user's adapter cannot be materialized"
                " now; adapters already cached and the base model are still served. Retry later."
            ) from e
        entry = CachedAdapter(key=key, lora_int_id=lora_int_id, path=path, info=info)
        self._entries[key] = entry
        self._evict()
        return entry, False

    def _retire(self, entry: CachedAdapter) -> None:
        entry.retired = True
        if entry.leases == 0:
            shutil.rmtree(entry.path, ignore_errors=True)

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            _, entry = self._entries.popitem(last=False)
            self.stats.evictions += 1
            self._retire(entry)

    def invalidate(self, predicate: Callable[[AdapterKey], bool] = lambda _: True) -> int:
        """Drop matching entries (e.g. all of an old bank); in-flight requests keep theirs."""
        doomed = [k for k in self._entries if predicate(k)]
        for k in doomed:
            self._retire(self._entries.pop(k))
        return len(doomed)

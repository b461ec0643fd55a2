"""Materialized per-user adapters on disk (tmpfs), LRU-bounded, each with its own vLLM lora_int_id.

vLLM 0.32 loads adapters only from a path, so a fused adapter is written once under its
cache key and reused by every user whose neighbourhood rounds to the same key. An entry in
use by a request (a lease) is never deleted under it: eviction and invalidation defer the
removal of its directory until the last lease is released.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AdapterKey:
    """What makes two users' adapters identical (DESIGN.md section 2)."""

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
    leases: int = 0
    retired: bool = False  # evicted or invalidated: delete when the last lease ends


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
        self._building: defaultdict[AdapterKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._next_id = 1
        # Adapters of an earlier process are unknown to this engine: start clean.
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def lease(
        self, key: AdapterKey, build: Callable[[Path], Awaitable[None]]
    ) -> AsyncIterator[tuple[CachedAdapter, bool]]:
        """Yield (adapter, cache_hit), building it with `build(path)` on a miss."""
        entry, hit = await self._get_or_build(key, build)
        entry.leases += 1
        try:
            yield entry, hit
        finally:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                shutil.rmtree(entry.path, ignore_errors=True)

    async def _get_or_build(
        self, key: AdapterKey, build: Callable[[Path], Awaitable[None]]
    ) -> tuple[CachedAdapter, bool]:
        if (entry := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry, True
        lock = self._building[key]
        async with lock:  # concurrent first requests for one key build it once
            if (entry := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry, True
            self.stats.misses += 1
            lora_int_id = self._next_id
            self._next_id += 1
            path = self.root / f"{lora_int_id}-{key.digest()}"
            await build(path)
            entry = CachedAdapter(key=key, lora_int_id=lora_int_id, path=path)
            self._entries[key] = entry
            self._building.pop(key, None)
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

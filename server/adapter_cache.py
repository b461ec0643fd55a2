"""Materialized per-user adapters on disk (tmpfs), LRU-bounded, each with its own vLLM lora_int_id.

vLLM 0.32 loads adapters only from a path, so a fused adapter is written once under its
cache key and reused by every user whose neighbourhood rounds to the same key. An entry in
use by a request (a lease) is never deleted under it: eviction and invalidation defer the
removal of its directory until the last lease is released.

Every server has a directory of its own under the configured root (`srv-<pid>-<random>`, locked
with `flock` on its sibling `.lock` file for the life of the process): the default root
(/dev/shm/mta-adapters-<uid>) is shared by every server of an account on a host, so a start
removes only the directories of servers that are gone (whose lock is free).

The cache is bounded in entries and, optionally, in bytes; evicted directories still leased
count until they are deleted. A full filesystem (ENOSPC, or EDQUOT for a quota) while an
adapter is written evicts least recently used adapters that no request holds and retries once;
then it is a 503 (`AdapterCacheFull`) for that request only: adapters already cached and the
base model are still served, and the next miss tries again, so the server recovers once space
is freed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
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
_OWNED_PREFIX = "srv-"  # a server's directory under the root; `<name>.lock` beside it is its lock
_LOCK_SUFFIX = ".lock"

Unload = Callable[[int], Coroutine[Any, Any, Any]]  # tell the engine to drop a lora_int_id (its files are gone)


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


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it is gone)."""
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue
    return total


def _lock_if_current(fd: int, lock: Path) -> bool:
    """Lock `fd` without waiting; true only if it is still the file at `lock` (a server that
    cleans stale directories may have removed it between its open and this lock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        st, held = os.stat(lock), os.fstat(fd)
        current = (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
    except FileNotFoundError:
        current = False
    if not current:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return current


def remove_stale_dirs(root: Path) -> int:
    """Remove the directories of servers that are gone (their lock is free); returns how many.
    Live servers' directories, and anything not made by a server, are left alone."""
    removed = 0
    for lock in root.glob(f"{_OWNED_PREFIX}*{_LOCK_SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # removed meanwhile by another server
        try:
            if _lock_if_current(fd, lock):
                shutil.rmtree(root / lock.name.removesuffix(_LOCK_SUFFIX), ignore_errors=True)
                lock.unlink(missing_ok=True)  # last, under the lock: a crash here is retried next start
                removed += 1
        finally:
            os.close(fd)
    return removed


def claim_dir(root: Path) -> tuple[Path, int]:
    """A new directory of this process under `root`, and the fd holding its lock until exit."""
    while True:
        name = f"{_OWNED_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        lock = root / f"{name}{_LOCK_SUFFIX}"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        if _lock_if_current(fd, lock):
            (root / name).mkdir(mode=0o700)
            return root / name, fd
        os.close(fd)  # a cleaner took it for a dead server's: try another name


@dataclass(frozen=True)
class AdapterKey:
    """What makes two users' adapters identical (docs/architecture.md, section 2).

    A stacked adapter is one user's own: its key has the user and a digest of the stacked LoRA's
    bytes, so a store that issues a blob version twice (Redis losing writes) never serves one
    user's stacked LoRA to another."""

    bank: str  # ServedBank.uid: a bank load, not just its version string
    anchors: tuple[tuple[str, float], ...]  # (anchor id, rounded weight), most similar first
    mode: str
    stacked_version: int | None = None
    user_id: str | None = None  # stacked adapters only
    stacked_digest: str | None = None  # sha256 of the stacked blob, stacked adapters only

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
    size: int = 0  # bytes on disk, counted in `AdapterCache.bytes` until the directory is deleted


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
    """LRU of materialized adapters; ids are never reused within a process.

    `unload(lora_int_id)`, if given, runs when an adapter's directory is deleted: vLLM on CPU
    keeps the safetensors files of the adapters it loaded memory-mapped, so their tmpfs pages
    are freed only once the engine drops them too."""

    def __init__(self, root: Path, capacity: int, max_bytes: int | None = None, unload: Unload | None = None) -> None:
        self.base = Path(root)
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.unload = unload
        self.stats = CacheStats()
        self.bytes = 0  # cached adapters + evicted ones still leased
        self._entries: OrderedDict[AdapterKey, CachedAdapter] = OrderedDict()
        # Only keys being built (or waited for) right now: dropped by the last user, success or not.
        self._building: dict[AdapterKey, _Build] = {}
        self._unloading: set[asyncio.Task[Any]] = set()
        self._next_id = 1
        self.base.mkdir(parents=True, exist_ok=True)
        if stale := remove_stale_dirs(self.base):
            log.info("adapter cache: removed %d directories of servers that are gone from %s", stale, self.base)
        # Adapters of an earlier process are unknown to this engine: a directory of its own, empty.
        self.root, self._lock_fd = claim_dir(self.base)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Delete this server's directory and release its lock (a clean shutdown)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd >= 0:
            Path(f"{self.root}{_LOCK_SUFFIX}").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = -1

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
                self._delete(entry)

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
        info = await self._write(path, build)
        entry = CachedAdapter(key=key, lora_int_id=lora_int_id, path=path, info=info, size=dir_bytes(path))
        self._entries[key] = entry
        self.bytes += entry.size
        self._evict()
        return entry, False

    async def _write(self, path: Path, build: Callable[[Path], Awaitable[Any]]) -> Any:
        """`build(path)`; on a full filesystem, make room and retry once, then AdapterCacheFull."""
        for retry in (False, True):
            try:
                return await build(path)
            except Exception as e:
                shutil.rmtree(path, ignore_errors=True)
                if not out_of_space(e):
                    raise
                log.warning("adapter cache %s is out of space: %s", self.root, e)
                if retry or not await self._make_room():
                    raise AdapterCacheFull(
                        "the adapter cache is out of disk space: this user's adapter cannot be materialized"
                        " now; adapters already cached and the base model are still served. Retry later."
                    ) from e
        raise AssertionError("unreachable")

    async def _make_room(self) -> bool:
        """Evict least recently used adapters no request holds, about one adapter's worth (the
        largest cached), and wait for the engine to let go of them; false if nothing can be freed."""
        needed = max((e.size for e in self._entries.values()), default=0)
        freed = 0
        for key, entry in list(self._entries.items()):
            if freed >= needed > 0:
                break
            if entry.leases == 0:
                del self._entries[key]
                self.stats.evictions += 1
                self._retire(entry)
                freed += entry.size
        pending = bool(self._unloading)
        await self.settle()
        return freed > 0 or pending

    async def settle(self, timeout: float = 30) -> None:
        """Wait until the engine has dropped the adapters deleted so far (their space is free);
        bounded, so that a wedged engine cannot hang a request here too."""
        if self._unloading:
            await asyncio.wait(set(self._unloading), timeout=timeout)

    def _retire(self, entry: CachedAdapter) -> None:
        entry.retired = True
        if entry.leases == 0:
            self._delete(entry)

    def _delete(self, entry: CachedAdapter) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)
        self.bytes -= entry.size
        if self.unload is not None:
            self._start_unload(entry.lora_int_id)

    def _start_unload(self, lora_int_id: int) -> None:
        assert self.unload is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: nothing to unload from (no engine runs)
            return
        task = loop.create_task(self.unload(lora_int_id), name=f"mta-unload-lora-{lora_int_id}")
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    def _over_bounds(self) -> bool:
        return len(self._entries) > self.capacity or (self.max_bytes is not None and self.bytes > self.max_bytes)

    def _evict(self) -> None:
        """LRU first, until within both bounds; never the newest entry (just built, for its request)."""
        while self._over_bounds() and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            self.stats.evictions += 1
            self._retire(entry)

    def invalidate(self, predicate: Callable[[AdapterKey], bool] = lambda _: True) -> int:
        """Drop matching entries (e.g. all of an old bank); in-flight requests keep theirs."""
        doomed = [k for k in self._entries if predicate(k)]
        for k in doomed:
            self._retire(self._entries.pop(k))
        return len(doomed)

"""Per-user personalization: profiles and embeddings in the store, fused adapters in the cache."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from server.adapter_cache import AdapterCache, AdapterKey
from server.adapters import LoraWeights, save_adapter, serving_dtype
from server.bank.loader import BankError
from server.bank.registry import BankRegistry, ServedBank
from server.errors import Conflict, InvalidInput, NotFound
from server.fusion import FusionPlan, materialize, plan_fusion
from server.metrics import Metrics
from server.prompts import ProfileIndex
from server.settings import Settings
from server.stacking import STACKED_BLOB, StackedBlob, StackedMeta
from server.store import ProfileChanged, UserRecord, UserStamp, UserStore

log = logging.getLogger(__name__)

APPEND_ATTEMPTS = 8  # conditional writes an append tries before answering 409 (each loses only to another write)


def zero_lora(like: LoraWeights) -> LoraWeights:
    """A rank-1 adapter with B = 0 on the modules of `like`: the base model, served as a LoRA."""
    a = {m: torch.zeros(1, t.shape[1]) for m, t in like.a.items()}
    b = {m: torch.zeros(t.shape[0], 1) for m, t in like.b.items()}
    return LoraWeights(a=a, b=b, scaling=1.0)


@dataclass(frozen=True)
class UserContext:
    """One request's snapshot: the bank it uses to the end, the user's plan and history texts."""

    user_id: str
    served: ServedBank
    record: UserRecord | None
    plan: FusionPlan | None
    history: list[str]
    stacked: StackedMeta | None = None  # the user's stacked LoRA, if any (served only if not stale)
    history_index: ProfileIndex | None = None  # `history` with its BM25 index (cached per profile version)

    @property
    def stacked_error(self) -> str | None:
        """Why the stacked LoRA cannot be served on this model (corrupt, other layers)."""
        return self.stacked.error if self.stacked is not None else None

    @property
    def personalized(self) -> bool:
        return self.plan is not None

    @property
    def stacked_stale(self) -> bool:
        """Trained over another bank's fused adapter: served fused-only until fine-tuned again."""
        return self.stacked is not None and self.stacked_error is None and self.stacked.bank_version != self.served.version

    @property
    def serves_stacked(self) -> bool:
        return self.plan is not None and self.stacked is not None and self.stacked_error is None and not self.stacked_stale


V = TypeVar("V")


class UserLru(Generic[V]):
    """What a request derives from a user's stored data, LRU-bounded, keyed by tuples that start
    with the user id: the rendered history with its BM25 index (so a request no longer renders and
    indexes the whole profile again), the fusion plan, what a stacked LoRA is (not its bytes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> V | None:
        if (value := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, user_id: str | None) -> None:
        """A deleted user's history leaves memory with the user (None: every user's)."""
        for key in [k for k in self._entries if user_id is None or k[0] == user_id]:
            del self._entries[key]


@dataclass(frozen=True)
class BankSwap:
    old: ServedBank | None
    new: ServedBank
    dropped_adapters: int


@dataclass(frozen=True)
class AdapterLease:
    lora_int_id: int
    path: str
    rank: int
    cache_hit: bool


class Personalizer:
    def __init__(
        self,
        settings: Settings,
        store: UserStore,
        banks: BankRegistry,
        cache: AdapterCache | None = None,  # None in `mta worker`, which only builds plans
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.banks = banks
        self.cache = cache
        self.metrics = metrics
        self._base_needs_zero_adapter = settings.device == "cpu" and not settings.fast_cpu_lora_ops
        self._adapter_dtype = serving_dtype(settings.dtype)
        self._indexes: UserLru[ProfileIndex] = UserLru(settings.profile_index_cache_size)
        self._plans: UserLru[FusionPlan] = UserLru(settings.profile_index_cache_size)
        self._stacked: UserLru[StackedMeta] = UserLru(settings.profile_index_cache_size)
        self._records: UserLru[UserRecord] = UserLru(settings.profile_index_cache_size)

    def validate_items(self, items: list[dict[str, Any]]) -> None:
        """The profile limits (count, size, some text per item); InvalidInput names the first problem."""
        s = self.settings
        if not items:
            raise InvalidInput("items must contain at least one history item")
        if len(items) > s.max_profile_items:
            raise InvalidInput(f"too many items: {len(items)} > max_profile_items {s.max_profile_items}")
        for i, item in enumerate(items):
            texts = [str(v) for k, v in item.items() if k != "id" and v is not None and str(v).strip()]
            if not texts:
                raise InvalidInput(f"items[{i}] has no non-empty text field")
            size = sum(len(str(k)) + len(str(v)) for k, v in item.items())
            if size > s.max_item_chars:
                raise InvalidInput(f"items[{i}] has {size} characters > max_item_chars {s.max_item_chars}")

    def _plan(self, served: ServedBank, record: UserRecord) -> FusionPlan:
        assert record.embedding is not None
        return plan_fusion(
            served.bank,
            record.embedding,
            bank_uid=served.uid,
            top_k=served.top_k,
            mode=served.mode,
            temperature=self.settings.weight_temperature,
            round_step=self.settings.weight_round_step,
        )

    async def put_profile(
        self, user_id: str, items: list[dict[str, Any]], *, expected_version: int | None = None
    ) -> UserContext:
        self.validate_items(items)
        served = self.banks.current
        history = [served.render(i) for i in items]
        embedding = await asyncio.to_thread(served.embedder.embed_user, history)
        record = await self.store.put_profile(
            user_id, items, embedding, served.embedding_model, expected_version=expected_version
        )
        return UserContext(user_id, served, record, self._plan(served, record), history)

    async def append_items(self, user_id: str, items: list[dict[str, Any]]) -> tuple[UserContext, int]:
        """Append history items (creating the profile if absent) and keep the newest
        `max_profile_items` (a rolling window); re-embeds the user. Returns (context, dropped).

        A read-modify-write: the write is conditional on the version read, and redone on top of
        a concurrent write, so two appends at once both land."""
        self.validate_items(items)
        for _ in range(APPEND_ATTEMPTS):
            record = await self.store.get_user(user_id)
            merged = (list(record.items) if record is not None else []) + list(items)
            dropped = max(0, len(merged) - self.settings.max_profile_items)
            version = record.profile_version if record is not None else 0
            try:
                return await self.put_profile(user_id, merged[dropped:], expected_version=version), dropped
            except ProfileChanged:
                continue
        raise Conflict(f"the profile of {user_id!r} kept changing during {APPEND_ATTEMPTS} attempts to append; retry")

    async def context(self, user_id: str, *, missing_ok: bool = False) -> UserContext:
        """The user's fusion plan on the current bank; re-embeds a profile from another embedding model.

        A user without a profile is the base model, or NotFound with `MTA_UNKNOWN_USER=404` unless
        `missing_ok` (a caller that may create the profile itself)."""
        served = self.banks.current
        stamp = await self.store.user_stamp(user_id, STACKED_BLOB)  # a warm request's one store read
        record = await self._record(user_id, stamp) if stamp is not None else None
        if stamp is None or record is None:
            if self.settings.unknown_user == "404" and not missing_ok:
                raise NotFound(f"user {user_id!r} has no profile (PUT /users/{user_id}/profile first)")
            return UserContext(user_id, served, None, None, [])
        index = await self._history_index(served, record)
        if record.embedding is None or record.embedding_model != served.embedding_model:
            embedding = await asyncio.to_thread(served.embedder.embed_user, index.history)
            await self.store.set_embedding(user_id, embedding, served.embedding_model, record.profile_version)
            record = dataclasses.replace(record, embedding=embedding, embedding_model=served.embedding_model)
        stacked = await self._stacked_meta(user_id, stamp.blob)
        return UserContext(user_id, served, record, self._cached_plan(served, record), index.history, stacked, index)

    async def _record(self, user_id: str, stamp: UserStamp) -> UserRecord | None:
        """The stored profile as of `stamp`, read again only after a write (None: deleted meanwhile).

        Keyed by (user, profile version, time of the write), as the history index: a record read
        just after another write is kept under its own stamp, and the next request reads again."""
        if (record := self._records.get((user_id, stamp.profile_version, stamp.updated_at))) is None:
            if (record := await self.store.get_user(user_id)) is not None:
                self._records.put((user_id, record.profile_version, record.updated_at), record)
        return record

    def _cached_plan(self, served: ServedBank, record: UserRecord) -> FusionPlan:
        """The user's fusion plan (retrieval and weights) once per profile write and bank load."""
        key = (record.user_id, record.profile_version, record.updated_at, served.uid)
        if (plan := self._plans.get(key)) is None:
            plan = self._plan(served, record)
            self._plans.put(key, plan)
        return plan

    async def _stacked_meta(self, user_id: str, stamp: tuple[int, int] | None) -> StackedMeta | None:
        """The user's stacked LoRA as requests see it, given its stamp (version, size). Its bytes are
        read, hashed and checked against the model's layers only when the stamp changed: a corrupt
        one is reported in the response and served fused-only, never handed to vLLM (which would
        fail the request, or the engine)."""
        if stamp is None:
            return None
        if (meta := self._stacked.get((user_id, *stamp))) is None:
            blob = await self.store.get_blob(user_id, STACKED_BLOB)
            if blob is None:  # deleted meanwhile
                return None
            meta = await asyncio.to_thread(StackedBlob.parse(*blob).meta, self.banks.targets)
            if meta.error:
                log.warning("user %r: stacked LoRA version %d is not served: %s", user_id, meta.version, meta.error)
            self._stacked.put((user_id, meta.version, meta.size), meta)
        return meta

    async def _history_index(self, served: ServedBank, record: UserRecord) -> ProfileIndex:
        """The rendered history and its BM25 index: built off the event loop, once per profile version.

        Keyed by (user, profile version, time of the write, bank load): a deleted and re-created
        profile, or a version issued twice by a store that lost writes, has another write time;
        another bank may render differently."""
        key = (record.user_id, record.profile_version, record.updated_at, served.uid)
        if (index := self._indexes.get(key)) is None:
            items = record.items
            index = await asyncio.to_thread(lambda: ProfileIndex([served.render(i) for i in items]))
            self._indexes.put(key, index)
        return index

    @asynccontextmanager
    async def adapter(self, ctx: UserContext) -> AsyncIterator[AdapterLease | None]:
        """The user's materialized adapter, held until the request ends (None: base model)."""
        assert self.cache is not None and self.metrics is not None
        if ctx.plan is None:
            if not self._base_needs_zero_adapter:
                yield None
                return
            # vLLM 0.32's stock CPU LoRA ops give adapter-less requests the last slot's adapter
            # when they share a batch with LoRA requests: serve the base model as a zero adapter.
            bank = ctx.served.bank

            async def build_zero(path: Any) -> int:
                await asyncio.to_thread(
                    save_adapter,
                    zero_lora(next(iter(bank.loras.values()))),
                    path,
                    base_model_name_or_path=bank.manifest.base_model,
                    dtype=self._adapter_dtype,
                )
                return 1

            async with self.cache.lease(AdapterKey(ctx.served.uid, (), "zero"), build_zero) as (entry, hit):
                yield AdapterLease(entry.lora_int_id, str(entry.path), 1, hit)
            return
        plan, bank = ctx.plan, ctx.served.bank
        stacked = ctx.stacked if ctx.serves_stacked else None
        max_rank = self.settings.max_lora_rank

        async def build(path: Any) -> int:  # the rank, kept on the cache entry (evicted with it)
            start = time.perf_counter()
            lora = await self._stacked_lora(ctx.user_id, stacked) if stacked else None
            rank = await asyncio.to_thread(materialize, bank, plan, path, max_rank, lora, self._adapter_dtype)
            self.metrics.fusion_seconds.observe(time.perf_counter() - start)
            return rank

        key = plan.key(stacked.version, user_id=ctx.user_id, stacked_digest=stacked.digest) if stacked else plan.key()
        async with self.cache.lease(key, build) as (entry, hit):
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            yield AdapterLease(entry.lora_int_id, str(entry.path), entry.info, hit)

    async def _stacked_lora(self, user_id: str, meta: StackedMeta) -> LoraWeights:
        """The stacked LoRA's weights, read again from the store to build the adapter (a fused
        adapter is shared by a neighbourhood; a stacked one is the user's own, keyed by user and
        content); 409 if it changed since the request looked (a fine-tune just ended: retry)."""
        blob = await self.store.get_blob(user_id, STACKED_BLOB)
        stacked = StackedBlob.parse(*blob) if blob else None
        if stacked is None or await asyncio.to_thread(lambda: stacked.digest) != meta.digest:
            raise Conflict(f"the stacked LoRA of {user_id!r} changed during the request; retry")
        return await asyncio.to_thread(stacked.lora)

    def forget_adapters(self, ctx: UserContext) -> None:
        """Drop cached adapters of this user: the fused one of the current plan and any stacked one."""
        if self.cache is None:
            return
        fused_key = ctx.plan.key() if ctx.plan else None
        user_id = ctx.user_id
        self.cache.invalidate(lambda k: k == fused_key or k.user_id == user_id)

    async def delete_user(self, user_id: str) -> None:
        """Remove everything about the user: profile, stacked LoRA, jobs and cached adapters."""
        ctx = await self.context(user_id)
        if ctx.record is None:
            raise NotFound(f"user {user_id!r} not found")
        self.forget_adapters(ctx)
        self._forget_derived(user_id)
        await self.store.delete_user(user_id)

    async def delete_stacked(self, user_id: str) -> None:
        ctx = await self.context(user_id)
        if ctx.stacked is None:
            raise NotFound(f"user {user_id!r} has no stacked LoRA")
        if self.cache is not None:
            self.cache.invalidate(lambda k: k.user_id == user_id)
        await self.store.delete_blob(user_id, STACKED_BLOB)

    async def follow_changes(self) -> None:
        """Forget what this replica caches about users that another replica deleted or a worker
        re-trained (the store's change feed), so no replica keeps a deleted user's adapter."""
        async for user_id in self.store.changed_users():
            if self.cache is not None:
                self.cache.invalidate(lambda k: k.user_id is not None and user_id in (None, k.user_id))
            self._forget_derived(user_id)

    def _forget_derived(self, user_id: str | None) -> None:
        for cache in (self._records, self._indexes, self._plans, self._stacked):
            cache.forget(user_id)

    async def swap_bank(self, path: Path) -> BankSwap:
        """The one bank-swap protocol (start-up, the admin reload, a worker following a job's bank).

        The new bank loads beside the old one (a broken bank raises BankError and the old one
        keeps serving); then the old bank's adapters, which no request can ask for again, are
        dropped from the adapter cache and from vLLM (`remove_lora`; in-flight ones finish
        first), and the served version is published.
        """
        try:
            old, new = await self.banks.load(path)
        except BankError:
            if self.metrics is not None:
                self.metrics.bank_reloads.labels(result="refused").inc()
            raise
        dropped = 0
        if old is not None and self.cache is not None:
            dropped = self.cache.invalidate(lambda k: k.bank == old.uid)
            await self.cache.settle()  # the engine has let go of them too: their space is free on return
        if self.metrics is not None:
            self.metrics.set_bank(new.version)
            if old is not None:
                self.metrics.bank_reloads.labels(result="ok").inc()
        return BankSwap(old, new, dropped)

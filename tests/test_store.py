"""One behaviour suite for every user-store backend, plus each backend's failure modes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import (
    ProfileChanged,
    RedisUserStore,
    SQLiteUserStore,
    StoreError,
    StoreUnavailable,
    UserNotFound,
    UserStamp,
    UserStore,
    open_store,
)
from server.store.sqlite import SCHEMA_VERSION

# `redis_url` (session scope) comes from tests/conftest.py; importing it here as well would
# register a second session fixture and start a second redis-server.
from .redis_server import RedisServer, free_port, private_redis_server, redis_key_prefix  # noqa: F401

MODEL = "all-MiniLM-L6-v2"
LORA = "stacked_lora"
# A user id with the characters that could confuse key schemes or encodings.
USER = "user:42/é 李"

# LaMP-like history items: accepted as they are, so they must come back exactly.
ITEMS = [
    {"id": "1100", "text": "Ein Film über Freundschaft — «très drôle» 😂", "title": "Ünï", "tag": "comedy"},
    {
        "id": "1101",
        "description": 'A heist gone wrong.\nline two\t"quoted" \\ back\u0000slash',
        "tag": "crime",
        "score": 4.25,
        "meta": {"authors": ["A. Ng", "李雷"], "year": 2019, "flags": {"ok": True, "none": None, "big": 2**70}},
    },
    {"text": "", "title": "empty text", "ratio": 1 / 3},
]

StoreOpener = Callable[[], UserStore]


def embedding(seed: int = 0, dim: int = 384) -> np.ndarray:
    """Random float32 plus values that only survive a bit-exact round trip."""
    special = np.array([-0.0, 1e-45, np.finfo(np.float32).max, np.float32(1 / 3)], dtype=np.float32)
    random = np.random.default_rng(seed).standard_normal(dim - special.size).astype(np.float32)
    return np.concatenate([special, random])  # [dim]


def job(job_id: str, user_id: str = USER, status: str = "queued", **fields: Any) -> dict[str, Any]:
    """A job record as the job service writes it: the required keys plus free fields."""
    return {"job_id": job_id, "user_id": user_id, "status": status, "progress": 0.0, "error": None, **fields}


async def drain(store: UserStore) -> list[str]:
    """Every queued id, oldest first, without waiting."""
    popped = []
    while (job_id := await store.dequeue_job(0)) is not None:
        popped.append(job_id)
    return popped


def assert_same_items(actual: object, expected: object) -> None:
    """JSON text equality: also catches True vs 1, key order, float representation."""
    assert json.dumps(actual, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)


def assert_same_embedding(actual: np.ndarray | None, expected: np.ndarray) -> None:
    assert actual is not None
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert actual.tobytes() == expected.astype(np.float32).tobytes()


@pytest.fixture(params=["sqlite", "redis"])
async def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreOpener]:
    """Opens the backend on the same data at every call, so a test can simulate a restart."""
    if request.param == "sqlite":

        def make() -> UserStore:
            return SQLiteUserStore(tmp_path / "nested" / "dir" / "users.db")

    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_key_prefix")

        def make() -> UserStore:
            return RedisUserStore(url, key_prefix=prefix)

    opened: list[UserStore] = []

    def opener() -> UserStore:
        opened.append(make())
        return opened[-1]

    yield opener
    for store in opened:
        await store.close()


@pytest.fixture
def store(reopen: StoreOpener) -> UserStore:
    return reopen()


# --- behaviour, every backend -------------------------------------------------------


async def test_implements_protocol(store: UserStore) -> None:
    assert isinstance(store, UserStore)
    await store.ping()


async def test_unknown_user(store: UserStore) -> None:
    assert await store.get_user("nobody") is None
    assert await store.get_blob("nobody", LORA) is None
    assert await store.delete_blob("nobody", LORA) is False
    assert await store.delete_user("nobody") is False
    assert await store.set_embedding("nobody", embedding(), MODEL, 1) is False
    assert await store.count_users() == 0


async def test_profile_round_trip(store: UserStore) -> None:
    vector = embedding()
    before = time.time()
    written = await store.put_profile(USER, ITEMS, vector, MODEL)
    read = await store.get_user(USER)
    assert read is not None
    for record in (written, read):
        assert record.user_id == USER
        assert_same_items(record.items, ITEMS)
        assert_same_embedding(record.embedding, vector)
        assert record.embedding_model == MODEL
        assert record.profile_version == 1
        assert before <= record.updated_at <= time.time()
    assert written.items is not ITEMS  # the record holds the stored copy, not the caller's list


async def test_embedding_is_stored_as_float32(store: UserStore) -> None:
    vector = np.linspace(-1, 1, 16)  # float64 in, float32 out
    record = await store.put_profile("u", [], vector, MODEL)
    assert_same_embedding(record.embedding, vector.astype(np.float32))
    assert_same_embedding((await store.get_user("u")).embedding, vector.astype(np.float32))


async def test_profile_without_embedding_and_replacement_clears_it(store: UserStore) -> None:
    await store.put_profile("u", ITEMS, embedding(), MODEL)
    record = await store.put_profile("u", [], None, None)
    read = await store.get_user("u")
    for r in (record, read):
        assert r.items == [] and r.embedding is None and r.embedding_model is None
        assert r.profile_version == 2


async def test_profile_version_increments_and_replaces(store: UserStore) -> None:
    times = []
    for version in (1, 2, 3):
        items = [{"text": f"only item of write {version}"}]
        record = await store.put_profile("u", items, embedding(version), MODEL)
        assert record.profile_version == version
        read = await store.get_user("u")
        assert read.profile_version == version
        assert_same_items(read.items, items)  # replaced, never merged
        times.append(read.updated_at)
    assert times == sorted(times)


async def test_conditional_profile_write_applies_only_at_the_expected_version(store: UserStore) -> None:
    with pytest.raises(ProfileChanged, match="version 0, not 1"):
        await store.put_profile("u", ITEMS, embedding(1), MODEL, expected_version=1)
    assert await store.get_user("u") is None  # nothing written
    assert (await store.put_profile("u", ITEMS, embedding(1), MODEL, expected_version=0)).profile_version == 1
    with pytest.raises(ProfileChanged, match="version 1, not 0"):
        await store.put_profile("u", ITEMS[:1], embedding(2), MODEL, expected_version=0)
    assert (await store.put_profile("u", ITEMS[:1], embedding(2), MODEL, expected_version=1)).profile_version == 2
    read = await store.get_user("u")
    assert read.profile_version == 2 and len(read.items) == 1

    # Read-modify-write appends racing each other: each retries on a conflict, none is lost.
    async def append(i: int) -> None:
        while True:
            record = await store.get_user("u")
            await asyncio.sleep(0)  # let the others read the same version
            try:
                await store.put_profile(
                    "u", [*record.items, {"text": f"append {i}"}], None, None, expected_version=record.profile_version
                )
                return
            except ProfileChanged:
                continue

    await asyncio.gather(*(append(i) for i in range(8)))
    texts = [item["text"] for item in (await store.get_user("u")).items]
    assert sorted(texts[1:]) == sorted(f"append {i}" for i in range(8))


async def test_set_embedding_compare_and_set(store: UserStore) -> None:
    await store.put_profile("u", ITEMS, embedding(1), MODEL)
    await store.put_profile("u", ITEMS[:1], embedding(2), MODEL)

    assert await store.set_embedding("u", embedding(3), "bge-small", expected_profile_version=1) is False
    unchanged = await store.get_user("u")
    assert_same_embedding(unchanged.embedding, embedding(2))
    assert unchanged.embedding_model == MODEL

    assert await store.set_embedding("u", embedding(3, dim=512), "bge-small", expected_profile_version=2) is True
    updated = await store.get_user("u")
    assert_same_embedding(updated.embedding, embedding(3, dim=512))
    assert updated.embedding_model == "bge-small"
    assert updated.profile_version == 2  # not a profile write
    assert_same_items(updated.items, ITEMS[:1])
    assert updated.updated_at >= unchanged.updated_at

    await store.put_profile("u", ITEMS, embedding(4), MODEL)
    assert await store.set_embedding("u", embedding(5), "bge-small", expected_profile_version=2) is False


async def test_blob_versions_increase_and_are_never_reused(store: UserStore) -> None:
    await store.put_profile(USER, ITEMS, embedding(), MODEL)
    first = await store.put_blob(USER, LORA, b"v1")
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    second = await store.put_blob(USER, LORA, payload)
    other = await store.put_blob(USER, "other.blob", b"")
    assert 0 < first < second
    assert await store.get_blob(USER, LORA) == (second, payload)
    assert await store.get_blob(USER, "other.blob") == (other, b"")
    # What a reader needs to know whether its copy is current, without the bytes.
    assert await store.blob_stamp(USER, LORA) == (second, len(payload))
    assert await store.blob_stamp(USER, "other.blob") == (other, 0)
    assert await store.blob_stamp(USER, "missing.blob") is None

    await store.put_profile(USER, [], None, None)  # a profile write keeps the blobs
    assert await store.get_blob(USER, LORA) == (second, payload)

    assert await store.delete_blob(USER, LORA) is True
    assert await store.get_blob(USER, LORA) is None and await store.blob_stamp(USER, LORA) is None
    assert await store.delete_blob(USER, LORA) is False
    third = await store.put_blob(USER, LORA, b"v3")
    assert third > second  # a cache keyed by version can never see an old version again
    assert await store.get_blob(USER, "other.blob") == (other, b"")


async def test_user_stamp_moves_with_every_write(store: UserStore) -> None:
    assert await store.user_stamp(USER, LORA) is None
    first = await store.put_profile(USER, ITEMS, embedding(1), MODEL)
    stamp = await store.user_stamp(USER, LORA)
    assert (stamp.profile_version, stamp.updated_at, stamp.blob) == (first.profile_version, first.updated_at, None)

    version = await store.put_blob(USER, LORA, b"abc")
    assert (await store.user_stamp(USER, LORA)).blob == (version, 3)
    assert (await store.user_stamp(USER, "other.blob")).blob is None
    assert await store.set_embedding(USER, embedding(2), MODEL, expected_profile_version=first.profile_version)
    embedded = await store.user_stamp(USER, LORA)
    assert embedded.profile_version == first.profile_version and embedded.updated_at > first.updated_at
    assert embedded.updated_at == (await store.get_user(USER)).updated_at

    second = await store.put_profile(USER, ITEMS[:1], embedding(3), MODEL)
    assert await store.user_stamp(USER, LORA) == UserStamp(second.profile_version, second.updated_at, (version, 3))
    await store.delete_user(USER)
    assert await store.user_stamp(USER, LORA) is None


async def test_put_blob_needs_a_profile(store: UserStore) -> None:
    with pytest.raises(UserNotFound):
        await store.put_blob("ghost", LORA, b"x")
    await store.put_profile("u", [], None, None)
    await store.delete_user("u")
    with pytest.raises(UserNotFound):  # e.g. a fine-tune finishing after the user was deleted
        await store.put_blob("u", LORA, b"x")
    assert await store.get_blob("u", LORA) is None


async def test_delete_user_removes_profile_and_blobs(store: UserStore) -> None:
    for user in (USER, "bystander"):
        await store.put_profile(user, ITEMS, embedding(), MODEL)
        await store.put_blob(user, LORA, b"lora of " + user.encode())
    await store.put_blob(USER, "second.blob", b"x")

    assert await store.delete_user(USER) is True
    assert await store.get_user(USER) is None
    assert await store.get_blob(USER, LORA) is None
    assert await store.get_blob(USER, "second.blob") is None
    assert await store.count_users() == 1
    assert await store.delete_user(USER) is False

    bystander = await store.get_blob("bystander", LORA)
    assert bystander is not None and bystander[1] == b"lora of bystander"

    recreated = await store.put_profile(USER, [], None, None)
    assert recreated.profile_version == 1
    assert await store.get_blob(USER, LORA) is None


async def test_count_users(store: UserStore) -> None:
    for user in ("a", "b", "c"):
        await store.put_profile(user, [], None, None)
    await store.put_profile("a", ITEMS, None, None)
    assert await store.count_users() == 3
    await store.delete_user("b")
    assert await store.count_users() == 2


async def test_concurrent_profile_writes_stay_consistent(store: UserStore) -> None:
    async def write(i: int) -> int:
        items = [{"text": f"item from writer {i}", "i": i}] * (i + 1)
        record = await store.put_profile("u", items, np.full(8, i, np.float32), f"model-{i}")
        return record.profile_version

    versions = await asyncio.gather(*(write(i) for i in range(20)))
    assert sorted(versions) == list(range(1, 21))
    final = await store.get_user("u")
    assert final.profile_version == 20
    writer = final.items[0]["i"]
    assert writer == versions.index(20)  # the last write wins, whole
    assert len(final.items) == writer + 1
    assert_same_embedding(final.embedding, np.full(8, writer, np.float32))
    assert final.embedding_model == f"model-{writer}"


async def test_concurrent_blob_writes_get_distinct_versions(store: UserStore) -> None:
    await store.put_profile("u", [], None, None)
    versions = await asyncio.gather(*(store.put_blob("u", LORA, f"blob {i}".encode()) for i in range(20)))
    assert len(set(versions)) == 20
    latest = max(versions)
    assert await store.get_blob("u", LORA) == (latest, f"blob {versions.index(latest)}".encode())


async def test_data_survives_restart(reopen: StoreOpener) -> None:
    first = reopen()
    await first.put_profile(USER, ITEMS, embedding(1), MODEL)
    assert await first.set_embedding(USER, embedding(2), "bge-small", expected_profile_version=1)
    blob_version = await first.put_blob(USER, LORA, b"weights")
    await first.close()

    second = reopen()
    record = await second.get_user(USER)
    assert_same_items(record.items, ITEMS)
    assert_same_embedding(record.embedding, embedding(2))
    assert (record.embedding_model, record.profile_version) == ("bge-small", 1)
    assert await second.get_blob(USER, LORA) == (blob_version, b"weights")
    assert (await second.put_profile(USER, [], None, None)).profile_version == 2
    assert await second.put_blob(USER, LORA, b"new") > blob_version
    assert await second.count_users() == 1


async def test_closed_store_refuses_calls(store: UserStore) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError):
        await store.get_user("u")
    with pytest.raises(StoreError):
        await store.put_blob("u", LORA, b"x")


# --- fine-tune jobs, every backend ------------------------------------------------------


async def test_job_round_trip_and_filters(store: UserStore) -> None:
    assert await store.get_job("ft-none") is None
    assert await store.list_jobs() == []
    extra = {"params": {"rank": 4, "learning_rate": 1e-4}, "examples": [["in «é»", "out 李 😂"]], "big": 2**70}
    records = [
        job("ft-1", USER, "queued", **extra),
        job("ft-2", "bystander", "running"),
        job("ft-3", USER, "failed", error="queue full"),
        job("ft-4", "bystander", "succeeded", final_loss=0.25),
    ]
    for record in records:
        await store.put_job(record["job_id"], record)
    assert_same_items(await store.get_job("ft-1"), records[0])
    assert_same_items(await store.list_jobs(), records)

    # An upsert replaces the record whole and keeps its place in the creation order.
    records[0] = job("ft-1", USER, "running", step=3)
    await store.put_job("ft-1", records[0])
    assert_same_items(await store.get_job("ft-1"), records[0])
    assert_same_items(await store.list_jobs(), records)

    assert_same_items(await store.list_jobs(["running"]), [records[0], records[1]])
    assert_same_items(await store.list_jobs({"failed", "succeeded"}), [records[2], records[3]])
    assert_same_items(await store.list_jobs(user_id=USER), [records[0], records[2]])
    assert_same_items(await store.list_jobs(("running",), user_id="bystander"), [records[1]])
    assert await store.list_jobs(["queued"]) == []
    assert await store.list_jobs([]) == []
    assert await store.list_jobs(user_id="nobody") == []


async def test_invalid_jobs_are_rejected(store: UserStore) -> None:
    await store.put_job("ft-1", job("ft-1", USER))
    for bad in (
        job("ft-2", USER, "done"),  # unknown status
        job("ft-other", USER),  # job_id differs from the key
        {"job_id": "ft-2", "status": "queued"},  # no user
        job("ft-2", USER, loss=float("nan")),  # not JSON
        job("ft-2", USER, tags={"a set"}),
    ):
        with pytest.raises(ValueError):
            await store.put_job("ft-2", bad)
    assert await store.get_job("ft-2") is None
    with pytest.raises(ValueError, match="another user"):  # a job never changes hands
        await store.put_job("ft-1", job("ft-1", "bystander", "running"))
    assert (await store.get_job("ft-1"))["user_id"] == USER
    assert await store.list_jobs(user_id="bystander") == []
    for bad_id in ("", "x" * 300, "tab\there"):
        with pytest.raises(ValueError):
            await store.get_job(bad_id)
    with pytest.raises(ValueError):
        await store.list_jobs("running")  # a bare string, not a collection of statuses
    with pytest.raises(ValueError):
        await store.list_jobs(["done"])
    for bad_timeout in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            await store.dequeue_job(bad_timeout)
    for bad_max in (-1, 1.5, True):
        with pytest.raises(ValueError):
            await store.enqueue_job("ft-1", bad_max)  # type: ignore[arg-type]
    assert await store.queued_count() == 0


async def test_active_job_slot(store: UserStore) -> None:
    assert await store.release_active_job(USER, "ft-1") is False  # nothing to release
    assert await store.claim_active_job(USER, "ft-1") is None
    assert await store.claim_active_job(USER, "ft-1") is None  # idempotent for the holder
    assert await store.claim_active_job(USER, "ft-2") == "ft-1"
    assert await store.claim_active_job("bystander", "ft-3") is None  # one slot per user

    assert await store.release_active_job(USER, "ft-2") is False  # not the holder: no effect
    assert await store.claim_active_job(USER, "ft-2") == "ft-1"
    assert await store.release_active_job(USER, "ft-1") is True
    assert await store.release_active_job(USER, "ft-1") is False
    assert await store.claim_active_job(USER, "ft-2") is None
    assert await store.claim_active_job("bystander", "ft-4") == "ft-3"

    results = await asyncio.gather(*(store.claim_active_job("racer", f"ft-r{i}") for i in range(10)))
    winners = [f"ft-r{i}" for i, holder in enumerate(results) if holder is None]
    assert len(winners) == 1
    assert all(holder in (None, winners[0]) for holder in results)


async def test_queue_is_bounded_and_fifo(store: UserStore) -> None:
    assert await store.queued_count() == 0
    assert await store.dequeue_job(0) is None
    assert await store.enqueue_job("ft-0", 0) is False  # max 0: always full
    for i in range(3):
        assert await store.enqueue_job(f"ft-{i}", 3) is True
    assert await store.enqueue_job("ft-3", 3) is False
    assert await store.queued_count() == 3
    assert await store.dequeue_job(0.5) == "ft-0"
    assert await store.enqueue_job("ft-3", 3) is True  # room again
    assert await drain(store) == ["ft-1", "ft-2", "ft-3"]
    assert await store.queued_count() == 0

    results = await asyncio.gather(*(store.enqueue_job(f"ft-c{i}", 5) for i in range(12)))
    assert sum(results) == 5  # the check and the push are one step
    assert await store.queued_count() == 5


async def test_dequeue_waits_for_a_job_or_times_out(store: UserStore) -> None:
    started = time.monotonic()
    assert await store.dequeue_job(0.2) is None
    assert 0.15 <= time.monotonic() - started < 2

    waiting = asyncio.create_task(store.dequeue_job(5))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    pushed = time.monotonic()
    assert await store.enqueue_job("ft-late", 10)
    assert await asyncio.wait_for(waiting, timeout=5) == "ft-late"
    assert time.monotonic() - pushed < 1
    assert await store.queued_count() == 0


async def test_concurrent_consumers_get_each_job_once(store: UserStore) -> None:
    async def consume() -> list[str]:
        got = []
        while (job_id := await store.dequeue_job(0.3)) is not None:
            got.append(job_id)
            await asyncio.sleep(0)  # let the other consumer take its turn
        return got

    consumers = [asyncio.create_task(consume()) for _ in range(2)]
    await asyncio.sleep(0.05)  # both are waiting now
    jobs = [f"ft-{i}" for i in range(10)]
    for job_id in jobs:
        assert await store.enqueue_job(job_id, 100)
    first, second = await asyncio.wait_for(asyncio.gather(*consumers), timeout=10)
    assert sorted(first + second) == sorted(jobs)  # every job exactly once
    assert first == sorted(first, key=jobs.index) and second == sorted(second, key=jobs.index)
    assert await store.queued_count() == 0


async def test_cancelled_dequeue_loses_no_job(store: UserStore) -> None:
    """A consumer cancelled mid-pop (shutdown, asyncio.timeout) leaves the job queued or returns it."""
    for i in range(20):
        assert await store.enqueue_job(f"ft-{i}", 10)
        consumer = asyncio.create_task(store.dequeue_job(1.0))
        for _ in range(i % 4):
            await asyncio.sleep(0)  # cancel at various points of the pop
        consumer.cancel()
        try:
            delivered = [await consumer]
        except asyncio.CancelledError:
            delivered = []
        assert delivered + await drain(store) == [f"ft-{i}"]


async def test_delete_user_removes_jobs_slot_and_queued_ids(store: UserStore) -> None:
    for user, prefix in ((USER, "ft-u"), ("bystander", "ft-b")):
        await store.put_profile(user, ITEMS, None, None)
        for i, status in enumerate(("queued", "queued", "failed")):
            await store.put_job(f"{prefix}{i}", job(f"{prefix}{i}", user, status))
        assert await store.claim_active_job(user, f"{prefix}0") is None
    for job_id in ("ft-u0", "ft-b0", "ft-u1", "ft-b1"):
        assert await store.enqueue_job(job_id, 10)
    assert await store.enqueue_job("ft-unknown", 10)  # an id without a record stays

    assert await store.delete_user(USER) is True
    assert await store.get_job("ft-u0") is None
    assert await store.list_jobs(user_id=USER) == []
    assert [j["job_id"] for j in await store.list_jobs()] == ["ft-b0", "ft-b1", "ft-b2"]
    assert await store.claim_active_job(USER, "ft-new") is None  # the slot was freed
    assert await store.claim_active_job("bystander", "ft-x") == "ft-b0"
    assert await drain(store) == ["ft-b0", "ft-b1", "ft-unknown"]

    # Jobs of a user without a profile go too (delete_user then answers False).
    await store.put_job("ft-orphan", job("ft-orphan", "ghost", "running"))
    assert await store.enqueue_job("ft-orphan", 10)
    assert await store.claim_active_job("ghost", "ft-orphan") is None
    assert await store.delete_user("ghost") is False
    assert await store.get_job("ft-orphan") is None
    assert await store.queued_count() == 0
    assert await store.claim_active_job("ghost", "ft-next") is None


async def test_delete_job_removes_its_record_queued_ids_and_slot_only(store: UserStore) -> None:
    """What a refused fine-tune submission uses to leave nothing behind."""
    for i in range(3):
        await store.put_job(f"ft-{i}", job(f"ft-{i}"))
        assert await store.enqueue_job(f"ft-{i}", 10)
    assert await store.claim_active_job(USER, "ft-0") is None
    assert await store.claim_active_job("bystander", "ft-9") is None

    assert await store.delete_job("ft-0") is True
    assert await store.get_job("ft-0") is None
    assert [j["job_id"] for j in await store.list_jobs(user_id=USER)] == ["ft-1", "ft-2"]
    assert await store.claim_active_job(USER, "ft-1") is None  # ft-0's slot was freed
    assert await store.delete_job("ft-2") is True
    assert await store.claim_active_job(USER, "ft-3") == "ft-1"  # another job's slot stays
    assert await store.claim_active_job("bystander", "ft-x") == "ft-9"
    assert await drain(store) == ["ft-1"]
    assert await store.delete_job("ft-0") is False  # gone already
    assert await store.enqueue_job("ft-unknown", 10)
    assert await store.delete_job("ft-unknown") is False and await store.queued_count() == 0  # its id too
    with pytest.raises(ValueError):
        await store.delete_job("")


async def test_jobs_survive_restart(reopen: StoreOpener) -> None:
    first = reopen()
    records = [job("ft-1", USER, "running", step=2), job("ft-2", "bystander")]
    for record in records:
        await first.put_job(record["job_id"], record)
    assert await first.claim_active_job(USER, "ft-1") is None
    for job_id in ("ft-2", "ft-3"):
        assert await first.enqueue_job(job_id, 10)
    await first.close()

    second = reopen()
    assert_same_items(await second.list_jobs(), records)
    assert_same_items(await second.get_job("ft-1"), records[0])
    assert await second.claim_active_job(USER, "ft-9") == "ft-1"
    assert await second.queued_count() == 2
    assert await second.dequeue_job(0.5) == "ft-2"
    await second.put_job("ft-0", job("ft-0", USER))  # created later, listed later
    assert [j["job_id"] for j in await second.list_jobs()] == ["ft-1", "ft-2", "ft-0"]


async def test_closed_store_refuses_job_calls(store: UserStore) -> None:
    await store.close()
    for call in (store.get_job("ft-1"), store.enqueue_job("ft-1", 1), store.dequeue_job(0.1), store.queued_count()):
        with pytest.raises(StoreError):
            await call


async def test_update_job_writes_only_an_existing_record_in_an_expected_status(store: UserStore) -> None:
    """Issue 14: a runner's writes after `delete_user` (heartbeat, result, failure) re-created the job."""
    running = job("ft-1", USER, "running", step=1)
    assert await store.update_job("ft-1", running, ["queued"]) is False  # never creates
    assert await store.get_job("ft-1") is None and await store.list_jobs() == []

    await store.put_job("ft-0", job("ft-0", USER))
    await store.put_job("ft-1", job("ft-1", USER, examples=[["in", "out"]]))
    assert await store.update_job("ft-1", running, ["running"]) is False  # not in that status: unchanged
    assert (await store.get_job("ft-1"))["status"] == "queued"
    assert await store.update_job("ft-1", running, ["queued"]) is True
    assert_same_items(await store.get_job("ft-1"), running)
    assert [j["job_id"] for j in await store.list_jobs()] == ["ft-0", "ft-1"]  # keeps its place
    assert_same_items(await store.list_jobs(["running"]), [running])
    assert await store.update_job("ft-1", {**running, "step": 2}, ("queued", "running")) is True
    with pytest.raises(ValueError, match="another user"):
        await store.update_job("ft-1", job("ft-1", "bystander", "running"), ["running"])
    for bad in ([], "running", ["done"], None):
        with pytest.raises(ValueError):
            await store.update_job("ft-1", running, bad)  # type: ignore[arg-type]

    # Deleted with its user: a late heartbeat or result writes nothing.
    assert await store.delete_user(USER) is False
    for status in ("running", "succeeded", "failed"):
        assert await store.update_job("ft-1", job("ft-1", USER, status), ["queued", "running"]) is False
    assert await store.get_job("ft-1") is None and await store.list_jobs() == []
    assert await store.active_job_slots() == {} and await store.queued_job_ids() == []


async def test_prune_jobs_deletes_only_jobs_that_ended_before_the_cutoff(store: UserStore) -> None:
    now = time.time()
    records = [
        job("ft-old-ok", USER, "succeeded", finished_at=now - 100),
        job("ft-active", USER, "running", finished_at=None),
        job("ft-old-failed", "bystander", "failed", finished_at=now - 90),
        job("ft-new-failed", USER, "failed", finished_at=now - 1),
        job("ft-queued", "bystander"),
        job("ft-no-time", USER, "failed"),  # indexed at the time of the write
    ]
    for record in records:
        await store.put_job(record["job_id"], record)
    assert await store.claim_active_job("bystander", "ft-old-failed") is None  # a slot left behind
    assert await store.prune_jobs(now - 50, 1) == 1  # the oldest first
    assert await store.get_job("ft-old-ok") is None
    assert await store.prune_jobs(now - 50, 10) == 1
    assert await store.prune_jobs(now - 50, 10) == 0
    assert [j["job_id"] for j in await store.list_jobs()] == ["ft-active", "ft-new-failed", "ft-queued", "ft-no-time"]
    assert await store.active_job_slots() == {}  # the pruned job's slot went with it

    # A job indexes by its end when it ends, and only then.
    assert await store.update_job("ft-active", job("ft-active", USER, "failed", finished_at=now - 60), ["running"])
    assert await store.prune_jobs(now - 50, 10) == 1
    assert await store.prune_jobs(now + 10, 10) == 2  # ft-new-failed, ft-no-time; never ft-queued
    assert [j["job_id"] for j in await store.list_jobs()] == ["ft-queued"]
    if isinstance(store, RedisUserStore):  # the indexes hold the candidates only, no scan of every job
        client = store._client()
        assert await client.zrange(store._active_jobs_key, 0, -1) == [b"ft-queued"]
        assert await client.exists(store._finished_jobs_key) == 0
    for bad in ((float("nan"), 1), (now, 0), (now, 1.5), (now, True)):
        with pytest.raises(ValueError):
            await store.prune_jobs(*bad)  # type: ignore[arg-type]


async def test_active_job_slots_and_queued_job_ids_are_listed(store: UserStore) -> None:
    assert await store.active_job_slots() == {} and await store.queued_job_ids() == []
    for user, job_id in ((USER, "ft-1"), ("bystander", "ft-2"), ("third", "ft-3")):
        await store.put_job(job_id, job(job_id, user))
        assert await store.claim_active_job(user, job_id) is None
        assert await store.enqueue_job(job_id, 10)
    assert await store.active_job_slots() == {USER: "ft-1", "bystander": "ft-2", "third": "ft-3"}
    assert await store.queued_job_ids() == ["ft-1", "ft-2", "ft-3"]
    assert await store.dequeue_job(0) == "ft-1"
    assert await store.release_active_job("bystander", "ft-2")
    assert await store.delete_job("ft-3")
    assert await store.delete_user(USER) is False
    assert await store.active_job_slots() == {}
    assert await store.queued_job_ids() == ["ft-2"]


@pytest.mark.parametrize(
    ("items", "vector", "model"),
    [
        ("not a list", None, None),
        (["not an object"], None, None),
        ([{"tags": {"a set"}}], None, None),
        ([], np.ones((2, 3), np.float32), MODEL),  # not 1-D
        ([], np.array([], np.float32), MODEL),
        ([], np.array([1.0, np.nan], np.float32), MODEL),
        ([], np.ones(3, np.float32), None),  # an embedding needs its model name
        ([], None, MODEL),
    ],
)
async def test_invalid_profiles_are_rejected(store: UserStore, items: object, vector: object, model: object) -> None:
    with pytest.raises(ValueError):
        await store.put_profile("u", items, vector, model)  # type: ignore[arg-type]
    assert await store.get_user("u") is None


async def test_invalid_keys_are_rejected(store: UserStore) -> None:
    await store.put_profile("u", [], None, None)
    for bad_name in ("", "a:b", "../x", "x" * 200):
        with pytest.raises(ValueError):
            await store.put_blob("u", bad_name, b"x")
    with pytest.raises(ValueError):
        await store.get_user("")


# --- Redis failure modes ------------------------------------------------------------


async def test_redis_unreachable_fails_fast() -> None:
    store = RedisUserStore(f"redis://127.0.0.1:{free_port()}/0", key_prefix="mta-test-closed:")
    calls = (
        store.ping(),
        store.get_user("u"),
        store.put_profile("u", [], None, None),
        store.count_users(),
        store.put_job("ft-1", job("ft-1")),
        store.get_job("ft-1"),
        store.list_jobs(["running"]),
        store.claim_active_job("u", "ft-1"),
        store.release_active_job("u", "ft-1"),
        store.enqueue_job("ft-1", 10),
        store.dequeue_job(0),
        store.dequeue_job(0.5),
        store.queued_count(),
    )
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Redis user store"):
                await call
            assert time.monotonic() - started < 5
    finally:
        await store.close()


async def test_redis_outage_then_recovery_with_the_same_store(private_redis_server: RedisServer) -> None:
    store = RedisUserStore(private_redis_server.url, key_prefix="mta-test:")
    try:
        await store.put_profile("u", ITEMS, embedding(), MODEL)
        await store.put_blob("u", LORA, b"x")  # loads the Lua script into this server

        private_redis_server.stop()
        for call in (
            store.get_user("u"),
            store.put_profile("u", [], None, None),
            store.put_blob("u", LORA, b"y"),
            store.delete_user("u"),
            store.ping(),
            store.put_job("ft-1", job("ft-1", "u")),
            store.claim_active_job("u", "ft-1"),
            store.enqueue_job("ft-1", 10),
            store.dequeue_job(0.5),
            store.queued_count(),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, timeout=10)
            assert time.monotonic() - started < 5

        private_redis_server.start()  # same port, empty (no persistence)
        await store.ping()
        assert await store.get_user("u") is None
        assert (await store.put_profile("u", ITEMS, None, None)).profile_version == 1
        assert await store.put_blob("u", LORA, b"z") > 0  # script re-loaded after NOSCRIPT
        assert await store.set_embedding("u", embedding(), MODEL, expected_profile_version=1)
        assert await store.enqueue_job("ft-1", 10)  # scripts and the blocking pool recover too
        assert await store.dequeue_job(0.5) == "ft-1"
    finally:
        await store.close()


async def test_redis_change_feed_names_changed_users_and_resubscribes_after_an_outage(private_redis_server: RedisServer) -> None:
    """What another replica needs to drop cached adapters: deletes and stacked-LoRA writes, by user;
    after an outage a None (changes may have been missed) before the feed goes on."""
    writer = RedisUserStore(private_redis_server.url, key_prefix="mta-test:")
    reader = RedisUserStore(private_redis_server.url, key_prefix="mta-test:")
    feed = reader.changed_users()
    try:
        assert await asyncio.wait_for(anext(feed), 5) is None  # subscribed
        await writer.put_profile("u", ITEMS, None, None)  # a new profile version: nothing cached goes stale
        await writer.put_blob("u", LORA, b"x")
        await writer.delete_blob("u", LORA)
        await writer.put_profile("v", ITEMS, None, None)
        await writer.delete_user("v")
        assert [await asyncio.wait_for(anext(feed), 5) for _ in range(3)] == ["u", "u", "v"]
        with pytest.raises(UserNotFound):  # no such user: nothing changed, nothing published
            await writer.put_blob("w", LORA, b"y")
        private_redis_server.stop()
        pending = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(1.5)
        assert not pending.done()  # retrying, not failing
        private_redis_server.start()
        assert await asyncio.wait_for(pending, 15) is None  # resubscribed: forget everything once
        await writer.put_profile("u", ITEMS, None, None)
        await writer.delete_user("u")
        assert await asyncio.wait_for(anext(feed), 5) == "u"
    finally:
        await feed.aclose()
        await reader.close()
        await writer.close()


async def test_redis_hung_server_times_out(private_redis_server: RedisServer) -> None:
    """A server that accepts but never answers (SIGSTOP) must not hang the caller."""
    store = RedisUserStore(private_redis_server.url, key_prefix="mta-test:", timeout=0.5)
    assert private_redis_server.process is not None
    pid = private_redis_server.process.pid
    try:
        await store.put_profile("u", [], None, None)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            await asyncio.wait_for(store.get_user("u"), timeout=10)
        assert time.monotonic() - started < 3
        # The blocking pop has no socket timeout of its own: its guard is timeout + 0.5 s.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.dequeue_job(0.3), timeout=10)
        assert time.monotonic() - started < 3
        os.kill(pid, signal.SIGCONT)
        assert (await store.get_user("u")).profile_version == 1
        assert await store.enqueue_job("ft-1", 10)
        assert await store.dequeue_job(0.3) == "ft-1"
    finally:
        os.kill(pid, signal.SIGCONT)
        await store.close()


async def test_redis_blocking_pop_outlasts_the_socket_timeout(redis_url: str, redis_key_prefix: str) -> None:
    """BLPOP waits its full timeout even when that exceeds the socket timeout (0.3 s here)."""
    store = RedisUserStore(redis_url, key_prefix=redis_key_prefix, timeout=0.3)
    try:
        started = time.monotonic()
        assert await store.dequeue_job(1.0) is None
        assert 0.9 <= time.monotonic() - started < 3
        waiting = asyncio.create_task(store.dequeue_job(2.0))
        await asyncio.sleep(0.8)
        assert await store.get_user("u") is None  # other calls are not stuck behind the waiting pop
        assert await store.enqueue_job("ft-1", 10)
        assert await asyncio.wait_for(waiting, timeout=5) == "ft-1"
    finally:
        await store.close()


# --- SQLite specifics ---------------------------------------------------------------


async def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "users.db"
    store = SQLiteUserStore(path)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    store = SQLiteUserStore(path, busy_timeout=0.1)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable, match="SQLite user store"):
            await store.put_profile("u", [], None, None)
        other.execute("ROLLBACK")
        assert (await store.put_profile("u", [], None, None)).profile_version == 1
    finally:
        other.close()
        await store.close()


async def test_sqlite_reads_a_users_stamp_on_the_event_loop_but_never_waits_there(tmp_path: Path) -> None:
    """Every request's one read skips the worker-thread hop when the connection is free; when it
    is not, the read waits in a worker thread and the event loop goes on."""
    store = SQLiteUserStore(tmp_path / "users.db")
    try:
        written = await store.put_profile("u", ITEMS, None, None)
        expected = UserStamp(written.profile_version, written.updated_at, None)
        ran: list[int] = []
        asyncio.get_running_loop().call_soon(ran.append, 1)
        assert await store.user_stamp("u", LORA) == expected
        assert not ran  # answered without giving the loop a turn
        store._lock.acquire()  # another caller holds the connection
        try:
            read = asyncio.create_task(store.user_stamp("u", LORA))
            await asyncio.sleep(0.1)  # the loop runs meanwhile
            assert not read.done()
        finally:
            store._lock.release()
        assert await read == expected
    finally:
        await store.close()


async def test_sqlite_unusable_path_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreUnavailable):
        SQLiteUserStore(tmp_path / "a-file" / "users.db")


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteUserStore(path)


# --- open_store ----------------------------------------------------------------------


async def test_sqlite_migration_indexes_ended_jobs_by_their_end(tmp_path: Path) -> None:
    """A store of schema 2 (before `finished_at`): its ended jobs are pruned by the time they ended."""
    from server.store.sqlite import _MIGRATIONS

    path, now = tmp_path / "users.db", time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (s for migration in _MIGRATIONS[:2] for s in migration):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    for record in (job("ft-old", status="failed", finished_at=now - 100), job("ft-run", status="running")):
        conn.execute(
            "INSERT INTO jobs (job_id, user_id, status, data) VALUES (?, ?, ?, ?)",
            (record["job_id"], USER, record["status"], json.dumps(record)),
        )
    conn.close()
    store = SQLiteUserStore(path)
    try:
        assert await store.prune_jobs(now - 50, 10) == 1
        assert [j["job_id"] for j in await store.list_jobs(["running"])] == ["ft-run"]
        assert await store.update_job("ft-run", job("ft-run", status="failed", finished_at=now - 60), ["running"])
        assert await store.prune_jobs(now - 50, 10) == 1 and await store.list_jobs() == []
    finally:
        await store.close()


async def test_redis_indexes_jobs_written_before_the_indexes(redis_url: str, redis_key_prefix: str) -> None:
    """Jobs of an older server (no `active_jobs`/`finished_jobs`): found by the sweep's reads and pruned."""
    import redis.asyncio as aioredis

    now, prefix = time.time(), redis_key_prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        for seq, record in enumerate(
            (job("ft-old", status="failed", finished_at=now - 100), job("ft-run", status="running")), start=1
        ):
            await client.hset(
                f"{prefix}job:{record['job_id']}",
                mapping={"user_id": USER, "status": record["status"], "data": json.dumps(record)},
            )
            await client.zadd(f"{prefix}jobs", {record["job_id"]: seq})
            await client.zadd(f"{prefix}user_jobs:{USER}", {record["job_id"]: seq})
        await client.set(f"{prefix}job_seq", 2)
    finally:
        await client.aclose()
    store = RedisUserStore(redis_url, key_prefix=prefix)
    try:
        assert [j["job_id"] for j in await store.list_jobs(["running"])] == ["ft-run"]
        assert await store.prune_jobs(now - 50, 10) == 1
        assert await store.get_job("ft-old") is None
        assert await store.update_job("ft-run", job("ft-run", status="failed", finished_at=now - 60), ["running"])
        assert await store.list_jobs(["running"]) == []
        assert await store.prune_jobs(now - 50, 10) == 1 and await store.list_jobs() == []
    finally:
        await store.close()


async def test_open_store_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel/users.db")
    absolute = open_store(f"sqlite:///{tmp_path / 'abs.db'}")  # four slashes: absolute
    try:
        assert isinstance(relative, SQLiteUserStore) and relative.path == Path("rel/users.db")
        assert isinstance(absolute, SQLiteUserStore) and absolute.path == tmp_path / "abs.db"
        assert (tmp_path / "rel" / "users.db").exists() and (tmp_path / "abs.db").exists()
    finally:
        await relative.close()
        await absolute.close()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://u:pw@example.com:6380/1", "unix:///tmp/r.sock"])
async def test_open_store_redis_schemes(url: str) -> None:
    store = open_store(url)  # connects lazily: nothing needs to listen
    assert isinstance(store, RedisUserStore)
    assert "pw" not in repr(store)
    await store.close()


@pytest.mark.parametrize(
    "url", ["postgres://admin:s3cret@db/users", "users.db", "sqlite://host/users.db", "sqlite:///", "sqlite:"]
)
def test_open_store_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError) as error:
        open_store(url)
    assert "s3cret" not in str(error.value)

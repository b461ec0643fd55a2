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

import numpy as np
import pytest

from server.store import (
    RedisUserStore,
    SQLiteUserStore,
    StoreError,
    StoreUnavailable,
    UserNotFound,
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

    await store.put_profile(USER, [], None, None)  # a profile write keeps the blobs
    assert await store.get_blob(USER, LORA) == (second, payload)

    assert await store.delete_blob(USER, LORA) is True
    assert await store.get_blob(USER, LORA) is None
    assert await store.delete_blob(USER, LORA) is False
    third = await store.put_blob(USER, LORA, b"v3")
    assert third > second  # a cache keyed by version can never see an old version again
    assert await store.get_blob(USER, "other.blob") == (other, b"")


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
    try:
        for call in (store.ping(), store.get_user("u"), store.put_profile("u", [], None, None), store.count_users()):
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
    finally:
        await store.close()


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
        os.kill(pid, signal.SIGCONT)
        assert (await store.get_user("u")).profile_version == 1
    finally:
        os.kill(pid, signal.SIGCONT)
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

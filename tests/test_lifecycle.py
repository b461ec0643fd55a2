"""Server lifecycle: restarts keep users (both stores); a failed start exits with the reason.
Failure handling (issue 14): a refused fine-tune changes nothing, jobs have a time limit, the
fine-tune runner survives store failures and /readyz reports it, Redis refusals are 503s, a long
profile item never fails a request, no per-adapter state leaks."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from server.store import RedisUserStore, SQLiteUserStore, StoreUnavailable

from .conftest import HISTORY_TEMPLATE, THEMES, job_services, server_env
from .prerequisites import missing
from .redis_server import RedisServer, delete_prefix, redis_key_prefix, start_redis_server  # noqa: F401
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, PROMPT, generate, put_profile
from .test_finetune import EXAMPLES, submit, wait_job
from .test_jobs_lifecycle import wait_status


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_restart_keeps_users(backend, request, tmp_path, tiny_model_dir, tiny_bank):
    extra = {}
    if backend == "redis":
        extra["MTA_STORE_URL"] = request.getfixturevalue("redis_url")
    proc = ServerProcess(tmp_path, server_env(tmp_path, tiny_model_dir, tiny_bank, **extra))
    proc.start()
    try:
        with proc.client() as c:
            put_profile(c, f"restart-{backend}", PROFILES["romance"])
            first = generate(c, f"restart-{backend}")
        assert proc.stop() == 0
        proc.start()
        with proc.client() as c:
            view = c.get(f"/users/restart-{backend}").json()
            assert view["profile_items"] == 2 and view["anchors"][0]["id"] == "romance"
            again = generate(c, f"restart-{backend}")
            assert again["token_ids"] == first["token_ids"] and again["adapter"]["cache_hit"] is False
    finally:
        proc.stop()


def test_engine_that_cannot_start_exits_with_the_reason(tmp_path, tiny_model_dir, tiny_bank):
    import json
    import shutil

    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / tiny_model_dir.name))
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    proc = ServerProcess(tmp_path, server_env(tmp_path, broken, tiny_bank))
    with pytest.raises(RuntimeError) as e:
        proc.start(timeout=180)
    assert "exited with 3" in str(e.value)
    assert "cannot start: vLLM engine failed to start" in proc.log_path.read_text()


# --- issue 14: refusals change nothing, jobs end, the runner lives, Redis refusals are 503s -------
#
# One API server on a private Redis with a tiny `maxmemory` and `noeviction` (filling it makes
# Redis refuse every write: a real store failure), MTA_UNKNOWN_USER=404, a queue of one job and
# a history budget of 300 tokens. The in-process tests (time limit, runner health, leaks) drive
# the real job service, runner, trainer and adapter cache on a real SQLite store, without HTTP.

MAXMEMORY = "8mb"
JUNK_KEY = "mta-test:junk"
HISTORY_TOKENS = 300
LONG = {"examples": EXAMPLES * 16, "epochs": 20}  # 640 steps
MEDIUM = {"examples": EXAMPLES * 4, "epochs": 5}  # 40 steps: from 0.5 s (idle machine) to about 20 s (busy)


@pytest.fixture(scope="module")
def oom_redis(tmp_path_factory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        missing("redis", "redis-server is not installed")
    args = ("--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction")
    server = start_redis_server(tmp_path_factory.mktemp("oom-redis"), args=args)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_api(tmp_path_factory, tiny_model_dir, tiny_bank, oom_redis) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    env = server_env(
        tmp,
        tiny_model_dir,
        tiny_bank,
        MTA_STORE_URL=oom_redis.url,
        MTA_UNKNOWN_USER="404",
        MTA_FINETUNE_QUEUE_SIZE="1",
        MTA_MAX_HISTORY_TOKENS=str(HISTORY_TOKENS),
    )
    proc = ServerProcess(tmp, env)
    try:
        yield proc.start()
    finally:
        proc.stop()


@contextmanager
def redis_out_of_memory(url: str) -> Iterator[None]:
    """Push Redis past its `maxmemory` with one small command that makes a big value (SETRANGE at an
    offset of `maxmemory`: accepted, since memory was under the limit before it). With `noeviction`
    Redis then refuses every write ("OOM command not allowed ...") until the value is deleted."""
    client = redis.Redis.from_url(url)
    try:
        client.setrange(JUNK_KEY, int(client.config_get("maxmemory")["maxmemory"]), b"x")
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            client.set("mta-test:probe", b"1")
        yield
    finally:
        client.delete(JUNK_KEY)
        client.close()


def runner_state(c: httpx.Client, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get("/readyz")
        state = r.json().get("finetune_runner") if r.status_code == 200 else None
        if state is not None and until(state):
            return state
        time.sleep(0.1)
    raise TimeoutError(f"/readyz never showed the runner state wanted: {r.status_code} {r.text}")


def user_keys(url: str, user_id: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return sorted(client.scan_iter(match=f"*{user_id}*"))


async def test_redis_error_replies_are_store_unavailable_with_the_reason(oom_redis):
    prefix = f"mta-test:{uuid.uuid4().hex}:"
    store = RedisUserStore(oom_redis.url, key_prefix=prefix)
    try:
        await store.put_profile("oom-u", [{"text": "a"}], None, None)
        with redis_out_of_memory(oom_redis.url):
            writes = [
                lambda: store.put_profile("oom-u", [{"text": "b"}], None, None),
                lambda: store.put_blob("oom-u", "stacked", b"x"),
                lambda: store.put_job("ft-1", {"job_id": "ft-1", "user_id": "oom-u", "status": "queued"}),
                lambda: store.claim_active_job("oom-u", "ft-1"),
                lambda: store.enqueue_job("ft-1", 10),
            ]
            for write in writes:
                with pytest.raises(StoreUnavailable, match="out of memory") as e:
                    await write()
                assert "replied OOM" in str(e.value) and "command not allowed" in str(e.value), e.value
            assert (await store.get_user("oom-u")).profile_version == 1  # reads are served
        assert (await store.put_profile("oom-u", [{"text": "b"}], None, None)).profile_version == 2
    finally:
        await store.close()
        delete_prefix(oom_redis.url, prefix)


def test_redis_out_of_memory_is_a_503_with_the_reason_and_recovers(redis_api, oom_redis):
    user = f"oom-{uuid.uuid4().hex[:8]}"
    with redis_api.client() as c:
        put_profile(c, user, PROFILES["space"])
        before = generate(c, user)
        with redis_out_of_memory(oom_redis.url):
            for method, path, body in [
                ("PUT", f"/users/{user}/profile", {"items": PROFILES["crime"]}),
                ("POST", f"/users/{user}/finetune", {"examples": EXAMPLES}),
                ("POST", f"/users/{user}/finetune", {"examples": EXAMPLES, "add_to_profile": True}),
            ]:
                r = c.request(method, path, json=body)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                err = r.json()["error"]
                assert err["type"] == "store_unavailable", err
                assert "out of memory" in err["message"] and "maxmemory" in err["message"], err
            # What only reads is still served.
            assert generate(c, user)["token_ids"] == before["token_ids"]
            assert c.get(f"/users/{user}").json()["profile_version"] == 1
        assert put_profile(c, user, PROFILES["crime"])["profile_version"] == 2  # no restart needed
        assert c.delete(f"/users/{user}").status_code == 204


def test_a_long_profile_item_is_cut_to_the_history_budget_and_never_fails_a_request(redis_api, tiny_model_dir):
    from transformers import AutoTokenizer

    from server.prompts import chat_prompt, render_item, user_content

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentence = "A crew of astronauts travels through a wormhole to find a new home for humanity. "
    item = {"description": (sentence * 300)[:19_000], "tag": "sci-fi"}  # valid: max_item_chars is 20,000
    rendered = render_item(item, HISTORY_TEMPLATE)
    assert len(tok(rendered)["input_ids"]) > 2000  # far more than the 512 positions
    user = f"long-{uuid.uuid4().hex[:8]}"
    with redis_api.client() as c:
        put_profile(c, user, [item])
        # The item is cut to MTA_MAX_HISTORY_TOKENS: that many tokens of it go before the instruction.
        out = generate(c, user)
        frame = len(chat_prompt(tok, [{"role": "user", "content": user_content(PROMPT, "")}]))
        assert abs(out["usage"]["prompt_tokens"] - (frame + HISTORY_TOKENS)) <= 3, (out["usage"], frame)
        from server.prompts import count_tokens, truncate_tokens  # exactly: the item's first tokens

        cut = truncate_tokens(tok, rendered, HISTORY_TOKENS)
        assert rendered.startswith(cut) and HISTORY_TOKENS - 2 <= count_tokens(tok, cut) <= HISTORY_TOKENS
        expected = chat_prompt(tok, [{"role": "user", "content": user_content(PROMPT, cut)}])
        assert out["usage"]["prompt_tokens"] == len(expected) and out["personalized"] is True
        # Every API flavour.
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
        assert c.post("/generate", json={"user_id": user, **chat}).status_code == 200
        assert c.post("/generate", json={"user_id": user, "prompt": PROMPT, "chat_template": False}).status_code == 200
        r = c.post("/v1/chat/completions", json={"user": user, **chat})
        assert r.status_code == 200, r.text
        assert c.post("/v1/completions", json={"user": user, "prompt": PROMPT, "max_tokens": 8}).status_code == 200
        # A long instruction and the largest max_tokens: the item shrinks to the room that is left.
        instruction = "Which tag fits this movie? " + "A detective hunts a killer in a rainy city. " * 10
        alone = len(chat_prompt(tok, [{"role": "user", "content": instruction}]))
        assert 512 - 64 - alone < HISTORY_TOKENS  # less room than the budget
        r = c.post("/generate", json={"user_id": user, "prompt": instruction, "max_tokens": 64})
        assert r.status_code == 200, r.text
        used = r.json()["usage"]["prompt_tokens"]
        assert alone + 20 < used <= 512 - 64, (alone, used)  # the history is in, cut to fit
        # An instruction that does not fit by itself is still refused, and says so.
        r = c.post("/generate", json={"user_id": user, "prompt": instruction * 3, "max_tokens": 64})
        assert r.status_code == 422 and "max_model_len" in r.json()["error"]["message"], r.text
        assert c.delete(f"/users/{user}").status_code == 204


def test_add_to_profile_creates_the_user_when_unknown_users_are_404(redis_api):
    user = f"new-{uuid.uuid4().hex[:8]}"
    with redis_api.client() as c:
        assert c.get(f"/users/{user}").status_code == 404
        assert c.post("/generate", json={"user_id": user, "prompt": PROMPT}).status_code == 404  # MTA_UNKNOWN_USER=404
        accepted = submit(c, user, add_to_profile=True, epochs=1)
        assert accepted.status_code == 202, accepted.text
        assert c.get(f"/users/{user}").json()["profile_items"] == len(EXAMPLES)
        r = submit(c, f"{user}-x")  # without add_to_profile, a user without a profile cannot train
        assert r.status_code == 404 and "add_to_profile" in r.json()["error"]["message"], r.text
        job = wait_job(c, accepted.json()["job_id"])
        assert job["status"] == "succeeded", job  # trained on the new profile, never before it
        assert "awaits_profile_version" not in job and "examples" not in job
        assert generate(c, user)["stacked"] is True
        assert c.delete(f"/users/{user}").status_code == 204


def test_the_runner_survives_a_store_failure_in_a_job_and_readyz_shows_it(redis_api, oom_redis):
    user = f"survivor-{uuid.uuid4().hex[:8]}"
    with redis_api.client() as c:
        put_profile(c, user, PROFILES["space"])
        r = submit(c, user, **MEDIUM)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        wait_status(c, job_id, "running")
        with redis_out_of_memory(oom_redis.url):
            # The training goes on without its heartbeat; then Redis refuses the LoRA, and the
            # record of the failure too: the runner retries that with backoff, and says so.
            try:  # as long as the training takes (long on a busy machine)
                state = runner_state(c, lambda s: s["state"] == "retrying the store", timeout=600)
            except TimeoutError as e:
                state = e  # checked below: first, whether the job ends at all
            assert c.get(f"/jobs/{job_id}").json()["status"] == "running"
        job = wait_job(c, job_id, timeout=300)  # written as soon as Redis takes writes again
        assert not isinstance(state, Exception), state
        assert state["ok"] is True and state["job_id"] == job_id, state
        assert "out of memory" in state["store_error"], state
        assert job["status"] == "failed", job
        assert "cannot store the stacked LoRA" in job["error"] and "out of memory" in job["error"], job
        state = runner_state(c, lambda s: s["state"] == "idle")
        assert state["mode"] == "inprocess" and state["ok"] is True and state["store_error"] is None, state
        # The runner lives on: the user's slot is free and the next job trains and is served.
        again = wait_job(c, submit(c, user).json()["job_id"])
        assert again["status"] == "succeeded", again
        assert generate(c, user)["stacked"] is True
        assert c.delete(f"/users/{user}").status_code == 204


def test_a_refused_finetune_changes_nothing(redis_api, oom_redis):
    """Last on this server: its long job runs until the server stops."""
    tag = uuid.uuid4().hex[:8]
    busy, waiting, existing, newcomer = (f"{name}-{tag}" for name in ("busy", "waiting", "existing", "newcomer"))
    with redis_api.client() as c:
        for user, theme in ((busy, "crime"), (waiting, "romance"), (existing, "comedy")):
            put_profile(c, user, PROFILES[theme])
        first = submit(c, busy, **LONG)
        assert first.status_code == 202, first.text
        wait_status(c, first.json()["job_id"], "running")
        assert submit(c, waiting).status_code == 202  # the one queued job (MTA_FINETUNE_QUEUE_SIZE=1)
        views = {u: c.get(f"/users/{u}").json() for u in (busy, existing)}

        # 409: the user's active job. add_to_profile must not have touched the profile.
        r = submit(c, busy, add_to_profile=True)
        assert r.status_code == 409 and first.json()["job_id"] in r.json()["error"]["message"], r.text
        assert c.get(f"/users/{busy}").json() == views[busy]
        # 429: the queue is full. No profile change, no job record, no slot taken.
        for user in (existing, newcomer):
            r = submit(c, user, add_to_profile=True)
            assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"], r.text
        assert c.get(f"/users/{existing}").json() == views[existing]
        assert c.get(f"/users/{newcomer}").status_code == 404  # not created
        assert user_keys(oom_redis.url, newcomer) == []
        assert [k for k in user_keys(oom_redis.url, existing) if b"job" in k] == []
        assert c.get(f"/jobs/{first.json()['job_id']}").json()["status"] == "running"


@pytest.fixture
async def local(tmp_path, tiny_model_dir, tiny_bank, one_torch_thread):
    """The real job service, runner, personalizer and adapter cache on a real SQLite store."""
    store = SQLiteUserStore(tmp_path / "users.db")
    yield await job_services(
        store, tmp_path, tiny_model_dir, tiny_bank, cache_size=2, job_timeout_seconds=1.5, job_stale_seconds=5
    )
    await store.close()


async def test_a_job_fails_at_its_wall_clock_limit(local):
    from server.jobs import FinetuneParams
    from server.stacking import STACKED_BLOB

    await local.personalizer.put_profile("slow", PROFILES["space"])
    pairs = [(e["input"], e["output"]) for e in LONG["examples"]]
    job = await local.jobs.submit("slow", pairs, FinetuneParams(epochs=20, rank=4, learning_rate=0.01), False)
    assert await local.store.dequeue_job(0) == job["job_id"]
    start = time.monotonic()
    done = await local.runner.run_one(job["job_id"])
    took = time.monotonic() - start
    assert done["status"] == "failed" and "job_timeout_seconds (1.5 s)" in done["error"], done
    assert done["step"] < 640 and took < 1.5 + 30, (done["step"], took)  # stopped soon after the limit
    assert (await local.store.get_job(job["job_id"]))["status"] == "failed"
    assert await local.store.get_blob("slow", STACKED_BLOB) is None
    assert await local.store.claim_active_job("slow", "ft-next") is None  # the user may train again


async def test_runner_health_reports_a_wedged_and_a_dead_runner(local):
    """/readyz answers 503 with `health()["problem"]` when `ok` is false (see the server tests)."""
    runner = local.runner
    stop = asyncio.Event()
    task = runner.start(stop)
    try:
        await asyncio.sleep(0.5)
        health = runner.health()
        assert health["ok"] is True and health["state"] == "idle", health
        # A store call that never returns (a hung disk): the SQLite store's calls wait for its lock.
        await asyncio.to_thread(local.store._lock.acquire)
        try:
            deadline = time.monotonic() + 30
            while (health := runner.health())["ok"]:
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.1)
            assert "wedged" in health["problem"] and "job_stale_seconds 5" in health["problem"], health
        finally:
            local.store._lock.release()
        deadline = time.monotonic() + 30
        while not runner.health()["ok"]:  # it goes on by itself
            assert time.monotonic() < deadline, runner.health()
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.wait({task})
        health = runner.health()
        assert health["ok"] is False and health["state"] == "dead", health
        assert "dead" in health["problem"] and "cancelled" in health["problem"], health
    finally:
        stop.set()
        task.cancel()
        await asyncio.wait({task})


async def test_no_state_is_kept_for_evicted_adapters_or_failed_builds(local):
    from server.adapter_cache import AdapterKey

    p, cache = local.personalizer, local.cache
    ranks = {}
    for theme in PROFILES:  # four neighbourhoods, a cache of two
        ctx = await p.put_profile(f"leak-{theme}", PROFILES[theme])
        async with p.adapter(ctx) as lease:
            ranks[theme] = lease.rank
    assert ranks == dict.fromkeys(PROFILES, 8) and len(cache) == 2 and cache.stats.evictions == 2
    assert len(vars(p).get("_ranks", {})) <= cache.capacity  # was one entry per adapter ever built
    ctx = await p.context("leak-space")  # evicted: rebuilt, then a hit, with its rank either way
    for hit in (False, True):
        async with p.adapter(ctx) as lease:
            assert (lease.rank, lease.cache_hit) == (8, hit)

    # A failed build leaves no lock behind; a request waiting on it builds the adapter, once.
    key = AdapterKey("bank#x", (("space", 1.0),), "cat")
    gate, calls = asyncio.Event(), []

    async def failing(path: Path) -> int:
        calls.append("failing")
        await gate.wait()
        raise RuntimeError("the build failed")

    async def working(path: Path) -> int:
        calls.append("working")
        path.mkdir()
        return 3

    async def use(build) -> tuple[int, bool]:
        async with cache.lease(key, build) as (entry, hit):
            return entry.info, hit

    first = asyncio.create_task(use(failing))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(use(working))
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and results[1] == (3, False), results
    assert calls == ["failing", "working"] and cache._building == {}
    with pytest.raises(RuntimeError):
        async with cache.lease(AdapterKey("bank#x", (), "cat"), failing):
            pass
    assert cache._building == {}


# --- issue 14: adapter cache ownership and bounds, stacked-adapter keys, the BM25 index -------------

# A server's adapter cache in a process of its own: prints its directory, writes one adapter, then
# waits to be killed (SIGKILL: no shutdown code runs, as for a crashed server).
CACHE_HOLDER = """
import sys, time
from pathlib import Path
from server.adapter_cache import AdapterCache
cache = AdapterCache(Path(sys.argv[1]), 4)
(cache.root / "1-adapter").mkdir()
print(cache.root, flush=True)
time.sleep(600)
"""


@contextmanager
def cache_holder(root: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another server's adapter cache under `root`: its process and its directory."""
    proc = subprocess.Popen([sys.executable, "-c", CACHE_HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line, f"the cache holder exited with {proc.wait(timeout=30)}"
        yield proc, Path(line)
    finally:
        proc.kill()
        proc.wait(timeout=30)


async def test_servers_sharing_the_adapter_cache_root_never_delete_each_others_adapters(tmp_path):
    """The default root (/dev/shm/mta-adapters-<uid>) is shared by every server of an account: a
    start removes only the directories of servers that are gone (their lock is free)."""
    from server.adapter_cache import AdapterCache, AdapterKey

    root = tmp_path / "shared"
    with cache_holder(root) as (live, live_dir), cache_holder(root) as (dead, dead_dir):
        dead.kill()
        dead.wait(timeout=30)
        assert live_dir != dead_dir and (dead_dir / "1-adapter").is_dir()
        mine = AdapterCache(root, 4)
        assert (live_dir / "1-adapter").is_dir(), "a live server's adapter was deleted"
        assert not dead_dir.exists()  # a dead server's adapters are removed
        assert mine.root not in (live_dir, dead_dir) and mine.root.parent == root

        async def build(path: Path) -> int:
            path.mkdir()
            return 1

        async with mine.lease(AdapterKey("bank#1", (("space", 1.0),), "cat"), build) as (entry, _):
            other = AdapterCache(root, 4)  # a third server starts while this one serves
            assert entry.path.is_dir() and (live_dir / "1-adapter").is_dir()
        other.close()  # a clean shutdown removes its own directory only
        assert not other.root.exists() and entry.path.is_dir() and (live_dir / "1-adapter").is_dir()
        mine.close()
        assert not mine.root.exists() and (live_dir / "1-adapter").is_dir()
    assert AdapterCache(root, 4).root.parent == root and not live_dir.exists()  # now a dead one too


async def test_adapter_cache_bytes_are_bounded_counting_evicted_adapters_still_in_use(tmp_path, monkeypatch):
    from server.adapter_cache import AdapterCache, AdapterKey
    from server.settings import Settings

    monkeypatch.setenv("MTA_ADAPTER_CACHE_MAX_BYTES", "2500")
    assert Settings(_env_file=None).adapter_cache_max_bytes == 2500
    assert Settings(_env_file=None, adapter_cache_max_bytes=None).adapter_cache_max_bytes is None
    cache = AdapterCache(tmp_path / "adapters", capacity=100, max_bytes=2500)

    async def build(path: Path) -> None:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 1000)

    def on_disk() -> int:
        return sum(f.stat().st_size for f in cache.root.rglob("*") if f.is_file())

    keys = [AdapterKey("bank#1", ((f"a{i}", 1.0),), "cat") for i in range(5)]
    async with cache.lease(keys[0], build) as (first, _):
        async with cache.lease(keys[1], build) as (second, _):
            pass
        assert len(cache) == 2 and cache.bytes == 2000
        async with cache.lease(keys[2], build) as (third, _):
            # 3000 > 2500: the LRU adapter goes, but it is still in use (leased), so its bytes stay
            # on disk and count: the next one goes too.
            assert list(cache._entries) == [keys[2]] and cache.stats.evictions == 2
            assert first.path.is_dir() and not second.path.exists()
            assert cache.bytes == on_disk() == 2000
    assert not first.path.exists() and cache.bytes == on_disk() == 1000  # its lease ended
    for key in keys[3:]:
        async with cache.lease(key, build):
            assert cache.bytes == on_disk() <= 2500
    assert list(cache._entries) == keys[3:] and not third.path.exists()
    cache.invalidate()
    assert cache.bytes == on_disk() == 0


async def test_users_whose_stacked_loras_share_a_version_get_their_own_adapters(
    local, redis_url, redis_key_prefix, tmp_path
):
    """A Redis that loses writes (a failover to a replica that missed them) may issue a blob
    version twice: the stacked adapter's cache key has the user and the blob's content too."""
    import torch

    from server.adapters import LoraWeights, load_adapter
    from server.fusion import materialize
    from server.personalize import Personalizer
    from server.stacking import STACKED_BLOB, StackedBlob, stacked_to_bytes

    store = RedisUserStore(redis_url, key_prefix=redis_key_prefix)
    p = Personalizer(local.settings, store, local.personalizer.banks, local.cache, local.personalizer.metrics)
    served = p.banks.current
    like = next(iter(served.bank.loras.values()))

    def stacked_lora(seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        a = {m: torch.randn(2, t.shape[1], generator=g) for m, t in like.a.items()}
        b = {m: torch.randn(t.shape[0], 2, generator=g) for m, t in like.b.items()}
        return stacked_to_bytes(LoraWeights(a=a, b=b, scaling=1.0), bank_version=served.version, job_id=f"ft-{seed}")

    try:
        users = ["twin-a", "twin-b"]
        for user in users:  # one neighbourhood: one fused adapter for both
            await p.put_profile(user, PROFILES["space"])
        version = await store.put_blob(users[0], STACKED_BLOB, stacked_lora(1))
        with redis.Redis.from_url(redis_url) as client:
            client.decr(f"{redis_key_prefix}blob_version")  # the counter's last INCR was lost
        assert await store.put_blob(users[1], STACKED_BLOB, stacked_lora(2)) == version

        ctxs = [await p.context(user) for user in users]
        assert [c.stacked.version for c in ctxs] == [version, version] and ctxs[0].plan == ctxs[1].plan
        leases = {}
        for ctx in ctxs:
            async with p.adapter(ctx) as lease:
                leases[ctx.user_id] = lease
                served_lora = load_adapter(lease.path)
                expected = tmp_path / f"expected-{ctx.user_id}"
                own_blob = StackedBlob.parse(*await store.get_blob(ctx.user_id, STACKED_BLOB))
                materialize(served.bank, ctx.plan, expected, p.settings.max_lora_rank, own_blob.lora())
                own = load_adapter(expected)
                for m in own.modules:  # the user's own stacked LoRA, not the other user's
                    assert torch.equal(served_lora.b[m], own.b[m]) and torch.equal(served_lora.a[m], own.a[m]), m
        assert leases["twin-a"].lora_int_id != leases["twin-b"].lora_int_id
        assert not leases["twin-b"].cache_hit
        # Deleting one user's stacked LoRA drops only that user's stacked adapter.
        await p.delete_stacked("twin-a")
        async with p.adapter(await p.context("twin-b")) as lease:
            assert lease.lora_int_id == leases["twin-b"].lora_int_id and lease.cache_hit
    finally:
        await store.close()


async def test_the_profile_bm25_index_is_built_once_per_profile_version_off_the_event_loop(local, monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    from server import prompts
    from server.generation import GenerationInput, Generator

    builds: list[int] = []

    class CountedBM25(prompts.BM25Okapi):
        def __init__(self, corpus, *args, **kwargs) -> None:
            builds.append(threading.get_ident())
            super().__init__(corpus, *args, **kwargs)

    monkeypatch.setattr(prompts, "BM25Okapi", CountedBM25)
    p = local.personalizer
    generator = Generator(local.settings, None, p, AutoTokenizer.from_pretrained(tiny_model_dir), p.metrics)
    user, loop_thread = f"bm25-{uuid.uuid4().hex[:8]}", threading.get_ident()
    await p.put_profile(user, THEMES["space"])  # three items: BM25's idf is 0 for every term of two
    first = await p.context(user)
    assert len(builds) == 1 and first.history_index is not None
    assert first.history_index.top1("an alien creature hunts the crew") == first.history[1]
    inp = GenerationInput(user_id=user, prompt="Which tag fits a movie about robots at war?")
    ids = await generator.prompt_ids(inp, first, 16)
    second = await p.context(user)  # the next request: the same index, nothing rebuilt
    assert second.history_index is first.history_index
    assert await generator.prompt_ids(inp, second, 16) == ids and len(builds) == 1
    assert "galactic war" in generator.tokenizer.decode(ids)  # the BM25 top-1 item is in the prompt

    await p.put_profile(user, THEMES["crime"])  # a new profile version: a new index
    third = await p.context(user)
    assert len(builds) == 2 and third.history_index is not first.history_index
    assert third.history == [prompts.render_item(i, HISTORY_TEMPLATE) for i in THEMES["crime"]]
    assert loop_thread not in builds  # built in a worker thread, never on the event loop


async def test_a_returning_users_request_reads_only_the_users_stamp(local, monkeypatch):
    """A warm request reads the profile's and the stacked LoRA's stamps, not the profile; a write
    by another process on the same store (a replica, a worker) is seen by the very next request."""
    from server import prompts
    from server.personalize import Personalizer
    from server.stacking import STACKED_BLOB

    p = local.personalizer
    other = Personalizer(local.settings, local.store, p.banks)  # another replica on the same store
    user = f"stamp-{uuid.uuid4().hex[:8]}"
    await p.put_profile(user, THEMES["space"])
    reads: list[str] = []
    get_user = local.store.get_user

    async def counted(user_id: str):
        reads.append(user_id)
        return await get_user(user_id)

    monkeypatch.setattr(local.store, "get_user", counted)
    first, second = await p.context(user), await p.context(user)
    assert reads == [user] and second.record is first.record and second.plan == first.plan

    await other.put_profile(user, THEMES["crime"])
    third = await p.context(user)
    assert reads == [user, user] and third.record.profile_version == first.record.profile_version + 1
    assert third.history == [prompts.render_item(i, HISTORY_TEMPLATE) for i in THEMES["crime"]]

    version = await local.store.put_blob(user, STACKED_BLOB, b"not a stacked LoRA")  # as a worker would
    fourth = await p.context(user)
    assert fourth.stacked is not None and fourth.stacked.version == version and fourth.stacked_error
    assert reads == [user, user] and fourth.record is third.record
    await other.delete_user(user)
    assert (await p.context(user)).record is None

"""Fine-tune jobs across processes: `mta worker` on Redis, and jobs interrupted by a crash or restart;
in process, on SQLite and Redis (issue 14): lost jobs and slots, users deleted mid-job, ended records."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from server.errors import Conflict
from server.store import RedisUserStore, SQLiteUserStore, StoreUnavailable, UserStore

from .conftest import job_services, server_env
from .redis_server import redis_key_prefix  # noqa: F401 (fixture, for `reopen`)
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, generate, put_profile
from .test_finetune import EXAMPLES, submit, wait_job
from .test_store import reopen, store  # noqa: F401 (fixtures: each test runs on SQLite and on Redis)

LONG = {"examples": EXAMPLES * 16, "epochs": 20}  # 640 steps: long enough to interrupt
PAIRS = [(e["input"], e["output"]) for e in EXAMPLES]


def wait_status(client, job_id: str, status: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached {status}: {job}")


def test_worker_runs_jobs_from_redis_and_stale_jobs_fail(tmp_path, tiny_model_dir, tiny_bank, redis_url):
    env = server_env(
        tmp_path,
        tiny_model_dir,
        tiny_bank,
        MTA_STORE_URL=redis_url,
        MTA_FINETUNE_RUNNER="worker",
        MTA_JOB_STALE_SECONDS="4",
    )
    api = ServerProcess(tmp_path, env).start()
    worker = ServerProcess(tmp_path, env, args=("worker",), ready_line="worker ready").start()
    try:
        with api.client() as c:
            put_profile(c, "w-user", PROFILES["space"])
            before = generate(c, "w-user")
            job = wait_job(c, submit(c, "w-user").json()["job_id"])
            assert job["status"] == "succeeded", job["error"]
            after = generate(c, "w-user")  # served by the API process from the worker's result
            assert after["stacked"] is True and after["stacked_version"] == job["stacked_version"]
            assert after["token_ids"] != before["token_ids"]

            # A worker killed mid-job: the job is reported failed, never left "running".
            long = submit(c, "w-user", **LONG).json()["job_id"]
            wait_status(c, long, "running")
            worker.stop(sig=signal.SIGKILL)
            failed = wait_status(c, long, "failed", timeout=30)
            assert "interrupted" in failed["error"]
            assert submit(c, "w-user", epochs=1).status_code == 202  # the user's slot is free again
    finally:
        worker.stop()
        api.stop()


def test_restart_fails_the_running_job_and_keeps_serving(tmp_path, tiny_model_dir, tiny_bank):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "models" / tiny_model_dir.name))
    proc = ServerProcess(tmp_path, server_env(tmp_path, model, tiny_bank)).start()
    try:
        with proc.client() as c:
            put_profile(c, "r-user", PROFILES["crime"])
            r = submit(c, "r-user", **LONG)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            wait_status(c, job_id, "running")
        proc.stop()
        proc.start()
        with proc.client() as c:
            job = c.get(f"/jobs/{job_id}").json()
            assert job["status"] == "failed" and "restart" in job["error"]
            assert generate(c, "r-user")["personalized"] is True
            # A job whose training raises is reported failed with the reason: this process's
            # trainer loads the model on its first job, and the model files are gone now.
            shutil.rmtree(model)
            failed = wait_job(c, submit(c, "r-user", epochs=1).json()["job_id"])
            assert failed["status"] == "failed" and str(model) in failed["error"], failed
            assert generate(c, "r-user")["personalized"] is True  # serving goes on
            assert submit(c, "r-user", epochs=1).status_code == 202  # the user's slot is free again
    finally:
        proc.stop()


# --- in process, every store backend (issue 14) -------------------------------------------------


@pytest.fixture
async def jobs(store, tmp_path, tiny_model_dir, tiny_bank, one_torch_thread):
    """The real job service, runner and personalizer on `store` (every backend)."""
    return await job_services(store, tmp_path, tiny_model_dir, tiny_bank, job_stale_seconds=30)


def params(epochs: int = 1):
    from server.jobs import FinetuneParams

    return FinetuneParams(epochs=epochs, rank=2, learning_rate=0.01)


async def stored_traces(store: UserStore) -> list:
    """Everything the store holds (this test's data only): rows of every table, or the Redis keys
    under the test's prefix other than the store-wide counters and markers."""
    if isinstance(store, SQLiteUserStore):
        conn = sqlite3.connect(store.path)
        try:
            tables = ("users", "blobs", "jobs", "active_jobs", "job_queue")
            return [(t, row) for t in tables for row in conn.execute(f"SELECT * FROM {t}").fetchall()]
        finally:
            conn.close()
    assert isinstance(store, RedisUserStore)
    counters = {f"{store.key_prefix}{name}".encode() for name in ("job_seq", "blob_version", "job_indexes")}
    return sorted(set(await store._client().keys(f"{store.key_prefix}*")) - counters)


async def test_lost_queued_jobs_and_slots_are_failed_or_freed_so_the_user_may_submit_again(jobs, monkeypatch):
    """A lost queue pop, a runner dead between its pop and "running", a store failure between
    claiming the slot and enqueueing: each used to leave the user with 409 for ever."""
    from server.jobs import LOST, JobSweeper
    from server.metrics import JobMetrics

    store = jobs.store
    users = ("popped", "half-submitted", "unrecorded", "taken", "waiting")
    for user in users:
        await jobs.personalizer.put_profile(user, PROFILES["space"])
    popped = await jobs.jobs.submit("popped", PAIRS, params(), False)
    assert await store.dequeue_job(0) == popped["job_id"]  # and never run: a lost pop or a dead runner

    async def unavailable(*args, **kwargs):
        raise StoreUnavailable("the store failed half-way")

    with monkeypatch.context() as m:  # the submission fails, and so does its clean-up
        m.setattr(store, "enqueue_job", unavailable)
        m.setattr(store, "delete_job", unavailable)
        with pytest.raises(StoreUnavailable):
            await jobs.jobs.submit("half-submitted", PAIRS, params(), False)  # record and slot, no queue entry
        m.setattr(store, "put_job", unavailable)
        with pytest.raises(StoreUnavailable):
            await jobs.jobs.submit("unrecorded", PAIRS, params(), False)  # a slot, no record
    taken = await jobs.jobs.submit("taken", PAIRS, params(), False)
    assert await store.dequeue_job(0) == taken["job_id"]  # a runner took it ...
    waiting = await jobs.jobs.submit("waiting", PAIRS, params(), False)  # in the queue, as it should be
    for user in users:
        with pytest.raises(Conflict):
            await jobs.jobs.submit(user, PAIRS, params(), False)
    slots = await store.active_job_slots()
    half, unrecorded = slots["half-submitted"], slots["unrecorded"]
    assert (await store.get_job(half))["status"] == "queued" and await store.get_job(unrecorded) is None

    sweeper = JobSweeper(jobs.settings.model_copy(update={"job_stale_seconds": 1.0}), store, JobMetrics(None))
    first = await sweeper.sweep()  # out of the queue for a moment is normal: nothing yet
    assert first == {"interrupted": 0, "lost": 0, "slots_freed": 0, "pruned": 0}, first
    await asyncio.sleep(1.2)
    record = await store.get_job(taken["job_id"])  # ... and marks it taken (`JobRunner.run_one`)
    assert await store.update_job(taken["job_id"], {**record, "dequeued_at": time.time()}, ["queued"])
    second = await sweeper.sweep()
    assert second == {"interrupted": 0, "lost": 2, "slots_freed": 1, "pruned": 0}, second

    for job_id in (popped["job_id"], half):
        failed = await store.get_job(job_id)
        assert failed["status"] == "failed" and failed["error"] == LOST and failed["finished_at"], failed
        assert "examples" not in failed  # an ended job keeps no training data
    assert (await store.get_job(taken["job_id"]))["status"] == "queued"  # a runner holds it: untouched
    assert (await store.get_job(waiting["job_id"]))["status"] == "queued"
    assert await store.queued_job_ids() == [waiting["job_id"]]
    for user in ("popped", "half-submitted", "unrecorded"):  # the slot is free: accepted
        assert (await jobs.jobs.submit(user, PAIRS, params(), False))["status"] == "queued"
    for user in ("taken", "waiting"):
        with pytest.raises(Conflict):
            await jobs.jobs.submit(user, PAIRS, params(), False)


async def test_the_runner_sweeps_stale_and_lost_jobs_and_prunes_ended_records(jobs):
    """The sweep runs beside the runner's loop (embedded or `mta worker`), every job_stale_seconds / 4."""
    from server.jobs import JobRunner

    store, now = jobs.store, time.time()
    settings = jobs.settings.model_copy(update={"job_stale_seconds": 1.0, "job_retention_seconds": 60.0})
    runner = JobRunner(settings, store, jobs.personalizer, settings.model_path)

    def record(job_id: str, user: str, status: str, **fields) -> dict:
        return {"job_id": job_id, "user_id": user, "status": status, "created_at": now - 3600, **fields}

    examples = [list(pair) for pair in PAIRS]
    beat = {"started_at": now - 3600, "heartbeat_at": now - 3600}
    stale = record("ft-" + "1" * 16, "stale", "running", **beat, examples=examples)
    lost = record("ft-" + "2" * 16, "lost", "queued", examples=examples)
    old = record("ft-" + "3" * 16, "old", "succeeded", finished_at=now - 3600)
    recent = record("ft-" + "4" * 16, "recent", "failed", finished_at=now - 10)
    for job in (stale, lost, old, recent):
        await store.put_job(job["job_id"], job)
    for job in (stale, lost):
        assert await store.claim_active_job(job["user_id"], job["job_id"]) is None
    stop = asyncio.Event()
    task = runner.start(stop)
    try:
        deadline = time.monotonic() + 30
        while await store.get_job(old["job_id"]) is not None or await store.active_job_slots():
            assert time.monotonic() < deadline, (await store.list_jobs(), await store.active_job_slots())
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    interrupted, failed = await store.get_job(stale["job_id"]), await store.get_job(lost["job_id"])
    assert "interrupted" in interrupted["error"] and failed["error"].startswith("lost:")
    assert "examples" not in interrupted and "examples" not in failed
    assert (await store.get_job(recent["job_id"]))["status"] == "failed"  # within its retention: kept


async def test_deleting_a_user_while_its_job_runs_leaves_nothing_behind(jobs):
    """The runner's heartbeat, and its failure record, used to re-create the deleted job's record
    with its training examples."""
    store, user = jobs.store, "leaving"
    await jobs.personalizer.put_profile(user, PROFILES["crime"])
    pairs = [(e["input"], e["output"]) for e in LONG["examples"]]
    job = await jobs.jobs.submit(user, pairs, params(LONG["epochs"]), False)
    assert await store.dequeue_job(0) == job["job_id"]
    running = asyncio.create_task(jobs.runner.run_one(job["job_id"]))
    try:
        deadline = time.monotonic() + 120
        while not ((now := await store.get_job(job["job_id"])) and now["status"] == "running" and now["step"] > 0):
            assert time.monotonic() < deadline and not running.done(), now
            await asyncio.sleep(0.05)
        await jobs.personalizer.delete_user(user)
        ended = await asyncio.wait_for(asyncio.shield(running), 120)  # stopped at its next heartbeat
    finally:
        jobs.runner.interrupt()
        await asyncio.wait({running})
    await asyncio.sleep(1.5)  # three heartbeats' time: nothing writes any more
    assert await stored_traces(store) == []
    assert ended is None  # no record to report
    assert await store.get_job(job["job_id"]) is None and await store.list_jobs() == []
    assert await store.active_job_slots() == {} and await store.queued_job_ids() == []


async def test_ended_jobs_keep_no_training_examples(jobs):
    from server.jobs import fail_job

    store = jobs.store
    await jobs.personalizer.put_profile("trainee", PROFILES["space"])
    submitted = await jobs.jobs.submit("trainee", PAIRS[:2], params(), True)  # add_to_profile, too
    assert "awaits_profile_version" in await store.get_job(submitted["job_id"])
    assert await store.dequeue_job(0) == submitted["job_id"]
    done = await jobs.runner.run_one(submitted["job_id"])
    assert done["status"] == "succeeded", done
    stored = await store.get_job(submitted["job_id"])
    assert stored == done and stored["examples_count"] == 2 and stored["final_loss"] is not None
    assert "examples" not in stored and "awaits_profile_version" not in stored

    queued = await jobs.jobs.submit("trainee", PAIRS, params(), False)
    failed = await fail_job(store, await store.get_job(queued["job_id"]), "a reason")
    assert failed == await store.get_job(queued["job_id"]) and "examples" not in failed
    assert await fail_job(store, failed, "again") is None  # ended: never written twice
    assert await store.active_job_slots() == {}


def test_job_retention_seconds_setting(monkeypatch):
    from server.settings import Settings

    assert Settings(_env_file=None).job_retention_seconds == 7 * 24 * 3600
    monkeypatch.setenv("MTA_JOB_RETENTION_SECONDS", "3600")
    assert Settings(_env_file=None).job_retention_seconds == 3600

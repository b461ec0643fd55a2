"""Fine-tune jobs: submitted by the API, run in-process (embedded default) or by `mta worker`.

Job records and the FIFO queue live in the user store, so API replicas and workers share them
and nothing is lost on restart. One active job per user (a slot in the store), a bounded queue.
Every runner also sweeps the store (`JobSweeper`): jobs no runner will end are failed, slots no
job holds are freed, and ended records (which keep no training data) expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from server.adapters import serving_dtype
from server.errors import Conflict, InvalidInput, NotFound, TooManyRequests
from server.metrics import JobMetrics
from server.personalize import Personalizer
from server.settings import Settings
from server.stacking import STACKED_BLOB, stack_config, stacked_to_bytes, train_stacked, training_examples
from server.store import ProfileChanged, StoreUnavailable, UserStore

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE = ("queued", "running")
# Fields of a job record that GET /jobs never shows: the training data, the profile version an
# `add_to_profile` job waits to see exceed (its examples are added after the job is accepted),
# and when a runner took it from the queue (what the sweep tells a lost job by).
_PRIVATE_FIELDS = frozenset({"examples", "awaits_profile_version", "dequeued_at"})
# Fields a job drops when it ends: a finished record keeps no training data.
_TRAINING_FIELDS = ("examples", "awaits_profile_version")
# The runner's waits between attempts to reach the store: 0.5, 1, 2, 4, ... s, at most this.
_MAX_BACKOFF = 30.0
# The sweep runs every job_stale_seconds / 4, at most this many seconds apart.
_MAX_SWEEP_INTERVAL = 30.0
# Ended job records deleted per store call by the sweep (the rest at the next sweep).
_PRUNE_BATCH = 500


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int
    rank: int
    learning_rate: float


def _now() -> float:
    return time.time()


def public_view(job: dict[str, Any]) -> dict[str, Any]:
    """What GET /jobs shows: everything but the training examples (and internal bookkeeping)."""
    return {k: v for k, v in job.items() if k not in _PRIVATE_FIELDS}


def _backoff(failures: int) -> float:
    return min(_MAX_BACKOFF, 0.5 * 2 ** min(failures - 1, 16))


def ended(job: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The record of a job that ends now (succeeded or failed): without its training data."""
    return {k: v for k, v in {**job, **fields}.items() if k not in _TRAINING_FIELDS}


async def write_transition(store: UserStore, job: dict[str, Any], from_statuses: Collection[str]) -> bool:
    """`update_job`, and whether the record is now `job`: an earlier attempt whose answer was lost
    (a timeout, then `_retry`) may have written it already, which the compare-and-set refuses."""
    if await store.update_job(job["job_id"], job, from_statuses):
        return True
    return await store.get_job(job["job_id"]) == job


class JobService:
    """The API side: validate, record, enqueue; report status; remove stacked LoRAs."""

    def __init__(self, settings: Settings, store: UserStore, personalizer: Personalizer) -> None:
        self.settings = settings
        self.store = store
        self.personalizer = personalizer
        self.metrics = JobMetrics(personalizer.metrics)
        self.metrics.watch_queue(store, settings.finetune_queue_size)

    def _validate(self, pairs: list[tuple[str, str]]) -> None:
        s = self.settings
        if not pairs:
            raise InvalidInput("examples must contain at least one {input, output} pair")
        if len(pairs) > s.finetune_max_examples:
            raise InvalidInput(f"too many examples: {len(pairs)} > finetune_max_examples {s.finetune_max_examples}")
        for i, (inp, out) in enumerate(pairs):
            if not inp.strip() or not out.strip():
                raise InvalidInput(f"examples[{i}] has an empty input or output")
            if len(inp) + len(out) > s.finetune_max_example_chars:
                raise InvalidInput(
                    f"examples[{i}] has {len(inp) + len(out)} characters > finetune_max_example_chars"
                    f" {s.finetune_max_example_chars}"
                )

    async def submit(
        self, user_id: str, pairs: list[tuple[str, str]], params: FinetuneParams, add_to_profile: bool
    ) -> dict[str, Any]:
        """Accept a job (202) or refuse it; a refusal (422, 404, 409, 429) changes nothing.

        Order: every check that needs no write; the user's active-job slot (409); the record and
        the bounded queue (429: record and slot removed again); only then, for `add_to_profile`,
        the profile. The runner holds such a job until the profile write is visible
        (`awaits_profile_version`), so it never trains on the profile of before.
        """
        s = self.settings
        self._validate(pairs)
        # add_to_profile may create the user, also with MTA_UNKNOWN_USER=404.
        ctx = await self.personalizer.context(user_id, missing_ok=True)
        if ctx.record is None and not add_to_profile:
            raise NotFound(f"user {user_id!r} has no profile: PUT /users/{user_id}/profile first, or set add_to_profile")
        fused_rank = ctx.served.fused_rank
        if fused_rank + params.rank > s.max_lora_rank:
            raise InvalidInput(
                f"rank {params.rank} on top of the fused rank {fused_rank} exceeds max_lora_rank {s.max_lora_rank}"
            )
        items = None
        if add_to_profile:
            items = (ctx.record.items if ctx.record else []) + [{"input": i, "output": o} for i, o in pairs]
            self.personalizer.validate_items(items)  # the profile limits, before anything is written
        job_id = f"ft-{uuid.uuid4().hex[:16]}"
        holder = await self.store.claim_active_job(user_id, job_id)
        if holder is not None:
            raise Conflict(f"user {user_id!r} already has an active fine-tune job {holder}")
        job = {
            "job_id": job_id,
            "user_id": user_id,
            "status": "queued",
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "heartbeat_at": None,
            "progress": 0.0,
            "step": 0,
            "total_steps": None,
            "loss": None,
            "initial_loss": None,
            "final_loss": None,
            "error": None,
            "params": params.__dict__,
            "examples_count": len(pairs),
            "examples": [list(p) for p in pairs],
            "bank_version": ctx.served.version,
            "bank_path": str(ctx.served.bank.path),
            "stacked_version": None,
        }
        if items is not None:
            job["awaits_profile_version"] = ctx.record.profile_version if ctx.record else 0
        try:
            await self.store.put_job(job_id, job)
            accepted = await self.store.enqueue_job(job_id, s.finetune_queue_size)
        except BaseException:
            await self._withdraw(job_id)
            raise
        if not accepted:
            await self._withdraw(job_id)
            raise TooManyRequests(f"the fine-tune queue is full ({s.finetune_queue_size} jobs); retry later")
        if items is not None:
            try:  # on the profile the items were added to: a write in between refuses this job (409)
                await self.personalizer.put_profile(user_id, items, expected_version=job["awaits_profile_version"])
            except ProfileChanged as e:
                await self._withdraw(job_id)
                raise Conflict(f"the profile of {user_id!r} changed while the fine-tune was submitted; retry") from e
            except BaseException:
                await self._withdraw(job_id)
                raise
        self.metrics.submitted()
        return public_view(job)

    async def _withdraw(self, job_id: str) -> None:
        """Remove a job this request could not finish submitting: record, queued id, slot (best effort)."""
        try:
            await self.store.delete_job(job_id)
        except Exception:  # noqa: BLE001 - the caller's error is the one to report
            log.exception("fine-tune %s: could not remove the refused job", job_id)

    async def get(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        if not is_stale(job, self.settings.job_stale_seconds):
            return public_view(job)
        failed = await fail_if_stale(self.store, job, self.settings.job_stale_seconds)
        if failed is not None:  # its runner died: failed now
            self.metrics.interrupted(job_id)
            return public_view(failed)
        job = await self.store.get_job(job_id)  # ended or deleted meanwhile, by someone else
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return public_view(job)


async def fail_job(
    store: UserStore, job: dict[str, Any], error: str, from_statuses: Collection[str] = ACTIVE
) -> dict[str, Any] | None:
    """Fail a job that is still in one of `from_statuses`, and free its user's slot unless the job
    is still active (e.g. a runner started it meanwhile).

    Returns the failed record, or None if nothing was written: the job had ended (someone else
    failed or finished it), was deleted with its user (it must not come back), or moved on."""
    failed = ended(job, status="failed", error=error, finished_at=_now())
    written = await write_transition(store, failed, from_statuses)
    if not written and (now := await store.get_job(job["job_id"])) is not None and now["status"] in ACTIVE:
        return None
    await store.release_active_job(job["user_id"], job["job_id"])  # only if this job holds it
    return failed if written else None


def is_stale(job: dict[str, Any], stale_seconds: float) -> bool:
    """A running job whose runner has not beaten for `stale_seconds`: the runner is dead."""
    beat = job.get("heartbeat_at") or job.get("started_at") or 0
    return job["status"] == "running" and _now() - beat > stale_seconds


async def fail_if_stale(store: UserStore, job: dict[str, Any], stale_seconds: float) -> dict[str, Any] | None:
    """A running job whose runner stopped beating (crash, restart) is reported failed, never
    'running'; the failed record, or None if it was not stale or has ended meanwhile."""
    if not is_stale(job, stale_seconds):
        return None
    return await fail_job(store, job, "interrupted: the worker running it stopped (crash or restart)", ("running",))


LOST = (
    "lost: it left the queue but no runner started it within job_stale_seconds (a runner stopped"
    " between taking and starting it, or its submission failed half-way); submit it again"
)


def _touched(job: dict[str, Any]) -> float:
    """When a queued job last changed hands: its submission, or a runner taking it from the queue."""
    return max(job.get("created_at") or 0.0, job.get("dequeued_at") or 0.0)


class JobSweeper:
    """The periodic clean-up every runner does (`JobRunner.run_forever`), safe to run in many
    processes at once: every write is a compare-and-set or a compare-and-delete.

    - A running job without a heartbeat for `job_stale_seconds` is failed (its runner died).
    - A queued job that is not in the queue is normal for a moment (a runner took it and stamps
      `dequeued_at` before it starts it). One still so, unchanged, at the next sweep and idle for
      `job_stale_seconds` was lost (a pop whose answer never arrived, a runner that died before
      starting it, a submission that failed half-way): it is failed with `LOST`, freeing the slot.
    - A slot held by an ended job, or for `job_stale_seconds` by a job without a record (a
      submission that failed between claiming the slot and writing the record), is freed.
    - Ended job records older than `job_retention_seconds` are deleted.
    Without this, the user of a lost job or slot would get 409 for ever.
    """

    def __init__(self, settings: Settings, store: UserStore, metrics: JobMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._lost: dict[str, float] = {}  # queued job out of the queue -> its `_touched` when seen
        self._unheld: dict[tuple[str, str], float] = {}  # (user, job) slot without a record -> first seen

    @property
    def interval(self) -> float:
        return min(self.settings.job_stale_seconds / 4, _MAX_SWEEP_INTERVAL)

    async def sweep(self) -> dict[str, int]:
        """One pass; how many jobs it failed (stale running, lost queued), slots it freed, records it pruned."""
        return {
            "interrupted": await self._fail_stale_running(),
            "lost": await self._fail_lost_queued(),
            "slots_freed": await self._free_orphaned_slots(),
            "pruned": await self.store.prune_jobs(_now() - self.settings.job_retention_seconds, _PRUNE_BATCH),
        }

    async def _fail_stale_running(self) -> int:
        n = 0
        for job in await self.store.list_jobs(["running"]):
            if await fail_if_stale(self.store, job, self.settings.job_stale_seconds) is not None:
                n += 1
                self.metrics.interrupted(job["job_id"])
        return n

    async def _fail_lost_queued(self) -> int:
        # The records before the queue: a job submitted in between is not seen, rather than seen out of it.
        queued = await self.store.list_jobs(["queued"])
        in_queue = set(await self.store.queued_job_ids())
        lost, n = {}, 0
        for job in queued:
            job_id, touched = job["job_id"], _touched(job)
            if job_id in in_queue:
                continue
            if self._lost.get(job_id) == touched and _now() - touched > self.settings.job_stale_seconds:
                if await fail_job(self.store, job, LOST, ("queued",)) is not None:
                    n += 1
                    self.metrics.finished(job_id, "failed")
                    log.warning("fine-tune %s of user %r: %s", job_id, job["user_id"], LOST)
            else:
                lost[job_id] = touched
        self._lost = lost
        return n

    async def _free_orphaned_slots(self) -> int:
        unheld, n = {}, 0
        for user_id, job_id in (await self.store.active_job_slots()).items():
            job = await self.store.get_job(job_id)
            if job is not None and job["status"] in ACTIVE:
                continue
            if job is None:  # a submission may be between its claim and its record: wait
                since = self._unheld.get((user_id, job_id), time.monotonic())
                if time.monotonic() - since <= self.settings.job_stale_seconds:
                    unheld[(user_id, job_id)] = since
                    continue
            if await self.store.release_active_job(user_id, job_id):
                n += 1
                held_by = f"{job['status']} job" if job else "job without a record"
                log.warning("fine-tune: freed user %r's job slot, held by %s %s", user_id, held_by, job_id)
        self._unheld = unheld
        return n


class _Abort:
    """Why a running job must stop (time limit, lost store); read by the training thread at each step."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


class JobRunner:
    """Takes jobs from the store's queue and trains stacked LoRAs, one at a time.

    It never dies of a job: a training or store error fails that job with the reason, and the
    job's own records (running, failed, succeeded, the slot) are retried with backoff until the
    store takes them. `health()` says whether it is alive and making progress (for /readyz).
    """

    def __init__(
        self,
        settings: Settings,
        store: UserStore,
        personalizer: Personalizer,
        model_path: Path,
        *,
        follow_bank: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.personalizer = personalizer
        self.model_path = model_path
        # A separate worker loads the bank a job was submitted against (the API may have reloaded).
        self.follow_bank = follow_bank
        self._model: Any = None
        self._tokenizer: Any = None
        self._interrupt = threading.Event()
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Health: what it does, for which job, when it last made progress, the last store error.
        self._state = "idle"
        self._job_id: str | None = None
        self._progress_at = time.monotonic()
        self._store_error: str | None = None
        self.metrics = JobMetrics(personalizer.metrics)
        self.metrics.watch_runner(self)
        self.sweeper = JobSweeper(settings, store, self.metrics)

    def interrupt(self) -> None:
        """Stop the running training at its next step (server shutdown); the job is reported failed."""
        self._interrupt.set()

    def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        """Run `run_forever` as a task of the running loop (the embedded runner)."""
        self._task = asyncio.create_task(self.run_forever(stop), name="finetune-runner")
        return self._task

    def health(self) -> dict[str, Any]:
        """`ok` false, with a `problem`, when the runner task ended or made no progress (a dequeue, a
        training step, a store write) for longer than `job_stale_seconds`."""
        stalled = time.monotonic() - self._progress_at
        info: dict[str, Any] = {
            "ok": True,
            "state": self._state,
            "job_id": self._job_id,
            "seconds_since_progress": round(stalled, 1),
            "store_error": self._store_error,
        }
        task = self._task
        if task is None or task.done():
            if task is None:
                why = "it was not started"
            elif task.cancelled():
                why = "it was cancelled"
            elif (exc := task.exception()) is not None:
                why = f"it crashed: {type(exc).__name__}: {exc}"
            else:
                why = "it stopped (server shutdown)"
            problem = f"fine-tune runner is dead ({why}): queued jobs do not run"
            return {**info, "ok": False, "state": "dead", "problem": problem}
        if stalled > self.settings.job_stale_seconds:
            doing = self._state + (f" (job {self._job_id})" if self._job_id else "")
            problem = (
                f"fine-tune runner is wedged: no progress for {stalled:.0f} s (job_stale_seconds"
                f" {self.settings.job_stale_seconds:g}) while {doing}"
            )
            if self._store_error:
                problem += f"; last store error: {self._store_error}"
            return {**info, "ok": False, "problem": problem}
        return info

    async def recover(self, *, all_running: bool) -> int:
        """At start: fail jobs left 'running' by a dead runner (all of them for the embedded runner)."""
        n = 0
        for job in await self.store.list_jobs(["running"]):
            if all_running:
                failed = await fail_job(self.store, job, "interrupted by a server restart", ("running",))
            else:
                failed = await fail_if_stale(self.store, job, self.settings.job_stale_seconds)
            if failed is not None:
                n += 1
                self.metrics.interrupted(job["job_id"])
        return n

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Run queued jobs one at a time until `stop`, with the sweep (`JobSweeper`) beside them."""
        self._stop = stop
        sweeping = asyncio.create_task(self._sweep_forever(stop), name="finetune-sweep")
        try:
            await self._run_jobs(stop)
        finally:
            sweeping.cancel()
            await asyncio.wait({sweeping})

    async def _sweep_forever(self, stop: asyncio.Event) -> None:
        """The sweep every `interval` seconds; a failed one (store outage) is logged and retried then."""
        while not stop.is_set():
            try:
                done = await self.sweeper.sweep()
            except Exception as e:  # noqa: BLE001 - the next sweep retries; the runner's health is its own
                log.warning("fine-tune sweep failed: %s: %s", type(e).__name__, e)
            else:
                if any(done.values()):
                    log.info("fine-tune sweep: %s", done)
            await self._sleep(self.sweeper.interval)

    async def _run_jobs(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._state, self._job_id = "idle", None
            try:
                job_id = await self.store.dequeue_job(timeout=1.0)
            except Exception as e:  # noqa: BLE001 - store outage: keep the runner alive and retry
                failures += 1
                await self._store_failed(e, "cannot read the job queue", failures)
                continue
            self._progress()
            failures = 0
            if job_id is None:
                continue
            try:
                await self.run_one(job_id)
            except Exception as e:  # noqa: BLE001 - a bug, a store error that retrying cannot fix, or shutdown
                log.exception("fine-tune runner: job %s ended with an unexpected error", job_id)
                await self._fail_if_active(job_id, f"the fine-tune runner failed on it: {type(e).__name__}: {e}")

    async def _fail_if_active(self, job_id: str, error: str) -> None:
        """Last resort after an unexpected error: report the job failed rather than leave it active."""
        try:
            job = await self.store.get_job(job_id)
            if job is not None and job["status"] in ACTIVE:
                await fail_job(self.store, job, error)
                self.metrics.finished(job_id, "failed")
        except Exception:  # noqa: BLE001 - logged; the next job is what matters now
            log.exception("fine-tune runner: cannot record the failure of job %s", job_id)

    def _progress(self) -> None:
        self._progress_at = time.monotonic()
        self._store_error = None

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the runner is told to stop."""
        if self._stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _store_failed(self, e: Exception, what: str, failures: int) -> None:
        delay = _backoff(failures)
        self._state = "retrying the store"
        self._store_error = f"{what}: {type(e).__name__}: {e}"
        log.warning("fine-tune runner: %s (attempt %d, next in %.1f s): %s", what, failures, delay, e)
        await self._sleep(delay)

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """`op()` until the store takes it, with backoff; given up (re-raised) only at shutdown."""
        failures = 0
        state = self._state
        while True:
            try:
                result = await op()
            except StoreUnavailable as e:
                failures += 1
                if self._stopping():
                    raise
                await self._store_failed(e, what, failures)
                continue
            if failures:
                log.info("fine-tune runner: %s: done after %d failed attempt(s)", what, failures)
            self._state = state
            self._progress()
            return result

    def _load(self) -> None:
        if self._model is None:
            from server.training import load_base_model, load_tokenizer

            self._model = load_base_model(self.model_path)
            self._tokenizer = load_tokenizer(self.model_path)

    async def run_one(self, job_id: str) -> dict[str, Any] | None:
        """Run one dequeued job to its end; the job ends `succeeded` or `failed`, never stuck."""
        self._job_id = job_id
        read = self._reader(job_id)
        job = await read()
        if job is None or job["status"] != "queued":
            return job  # deleted with its user or withdrawn, or already handled
        job = {**job, "dequeued_at": _now()}  # the sweep tells a job a runner holds from a lost one by this
        if not await self._retry(f"take job {job_id}", lambda: write_transition(self.store, job, ("queued",))):
            return await read()  # deleted, failed as lost, or taken by another runner meanwhile
        ready = await self._await_profile(job)
        if ready is None:
            return await read()
        if not ready:
            wait = self.settings.job_stale_seconds
            return await self._finish_failed(
                job, f"its submission did not finish: add_to_profile was not applied within {wait:g} s"
            )
        job = {**job, "status": "running", "started_at": _now(), "heartbeat_at": _now()}
        running = dict(job)
        mark = f"mark job {job_id} running"
        if not await self._retry(mark, lambda: write_transition(self.store, running, ("queued",))):
            return await read()  # deleted with its user, or failed as lost, meanwhile
        self.metrics.started(job_id)
        self._state = "running"
        limit = self.settings.job_timeout_seconds
        deadline = time.monotonic() + limit
        timed_out = f"timed out: the job ran longer than job_timeout_seconds ({limit:g} s)"
        abort = _Abort()

        def progress(step: int, total: int, loss: float) -> None:  # in the training thread
            self._progress_at = time.monotonic()
            if self._interrupt.is_set():
                raise InterruptedError("interrupted by a server shutdown or restart")
            if time.monotonic() > deadline:
                abort.set(timed_out)
            if abort.reason is not None:
                raise TimeoutError(abort.reason) if abort.reason == timed_out else RuntimeError(abort.reason)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step}: loss is {loss}")
            job.update(step=step, total_steps=total, progress=round(step / total, 4), loss=loss)

        beating = asyncio.create_task(self._heartbeat(job, abort))
        training = asyncio.ensure_future(self._train(job, progress))
        error: str | None = None
        try:
            done, _ = await asyncio.wait({training}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:  # a phase without training steps (loading, fusing) or a stuck step
                abort.set(timed_out)
                error = timed_out
            elif training.exception() is not None:
                e = training.exception()
                error = abort.reason or f"{type(e).__name__}: {e}"
        finally:
            beating.cancel()  # stop the heartbeat's writes before the final one
            await asyncio.wait({beating})
        if error is None:
            outcome, data = training.result()
            try:  # the result lands, or the job fails with the reason (e.g. Redis out of memory)
                outcome["stacked_version"] = await self.store.put_blob(job["user_id"], STACKED_BLOB, data)
            except Exception as e:  # noqa: BLE001
                error = f"cannot store the stacked LoRA: {type(e).__name__}: {e}"
        if error is not None:
            log.warning("fine-tune %s failed: %s", job_id, error)
            failed = await self._finish_failed(job, error)
            if not training.done():  # failed at its deadline; the training stops at its next step
                self._state = "stopping a timed-out training"
                await asyncio.wait({training})  # a step that never returns: `health()` says wedged
                if not training.cancelled():
                    training.exception()  # retrieved: its error is the timeout already reported
                log.info("fine-tune %s: the timed-out training stopped", job_id)
            return failed
        job = ended(job, **outcome)
        recorded = await self._retry(
            f"record job {job_id}'s result", lambda: write_transition(self.store, job, ("running",))
        )
        user_id = job["user_id"]
        await self._retry(f"free user {user_id}'s job slot", lambda: self.store.release_active_job(user_id, job_id))
        if not recorded:  # its LoRA is stored (the user exists), but a sweep had failed the job
            log.warning("fine-tune %s: the result is not recorded: the job ended or was deleted meanwhile", job_id)
            self.metrics.finished(job_id, "failed")
            return await read()
        self.metrics.finished(job_id, "succeeded")
        log.info("fine-tune %s of user %r succeeded: stacked version %s", job_id, user_id, job.get("stacked_version"))
        return job

    def _reader(self, job_id: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
        """Read the job's record, retried until the store answers."""
        return lambda: self._retry(f"read job {job_id}", lambda: self.store.get_job(job_id))

    async def _finish_failed(self, job: dict[str, Any], error: str) -> dict[str, Any] | None:
        """Fail the job unless it ended or was deleted meanwhile; its record now (None: deleted)."""
        what = f"record job {job['job_id']}'s failure"
        failed = await self._retry(what, lambda: fail_job(self.store, job, error))
        self.metrics.finished(job["job_id"], "failed")
        return failed if failed is not None else await self._reader(job["job_id"])()

    async def _await_profile(self, job: dict[str, Any]) -> bool | None:
        """An add_to_profile job: wait until the submission's profile write shows (True); None if the
        job was withdrawn meanwhile (the write failed), False if it never showed (the API died)."""
        before = job.get("awaits_profile_version")
        if before is None:
            return True
        self._state = "waiting for the profile write"
        deadline = time.monotonic() + self.settings.job_stale_seconds
        while True:
            record = await self._retry("read the profile", lambda: self.store.get_user(job["user_id"]))
            if record is not None and record.profile_version > before:
                return True
            current = await self._retry(f"read job {job['job_id']}", lambda: self.store.get_job(job["job_id"]))
            if current is None or current["status"] != "queued":
                return None
            if time.monotonic() > deadline:
                return False
            if self._stopping():  # back in the queue for the next start
                await self.store.enqueue_job(job["job_id"], 2**31)
                return None
            await asyncio.sleep(0.05)

    async def _heartbeat(self, job: dict[str, Any], abort: _Abort) -> None:
        """The one writer of a running job's record: progress and a heartbeat, twice a second.

        A failed write is retried at the next beat. A store lost for `job_stale_seconds` stops the
        training: by then every reader reports the job failed (`fail_if_stale`). So does a record
        that is gone (deleted with its user) or no longer running (failed by a sweep)."""
        last_written = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            job["heartbeat_at"] = _now()
            try:
                # Only while the record exists and runs: a job deleted with its user stays deleted.
                running = await self.store.update_job(job["job_id"], dict(job), ("running",))
            except Exception as e:  # noqa: BLE001 - never end the job from here but by `abort`
                lost = time.monotonic() - last_written
                self._store_error = f"heartbeat of job {job['job_id']}: {type(e).__name__}: {e}"
                log.warning("fine-tune %s: heartbeat not written (%.0f s): %s", job["job_id"], lost, e)
                if lost > self.settings.job_stale_seconds:
                    abort.set(f"lost the store for {lost:.0f} s (job_stale_seconds): {type(e).__name__}: {e}")
            else:
                last_written = time.monotonic()
                self._store_error = None
                if not running:
                    abort.set("the job was deleted (with its user) or failed while it ran")
                    return

    async def _train(self, job: dict[str, Any], progress: Any) -> tuple[dict[str, Any], bytes]:
        """Train the stacked LoRA; returns the job's final fields and the LoRA's bytes (stored by the caller)."""
        user_id, params = job["user_id"], job["params"]
        if self.follow_bank and job["bank_version"] != self.personalizer.banks.current.version:
            await self.personalizer.swap_bank(Path(job["bank_path"]))
        ctx = await self.personalizer.context(user_id)
        if ctx.record is None or ctx.plan is None:
            raise RuntimeError(f"user {user_id!r} has no profile any more")
        from server.fusion import build_adapter

        fused = build_adapter(ctx.served.bank, ctx.plan, self.settings.max_lora_rank)
        pairs = [tuple(p) for p in job["examples"]]
        rendered = [ctx.served.render({"input": i, "output": o}) for i, o in pairs]
        examples = training_examples(pairs, ctx.history, rendered)
        config = stack_config(
            self.settings, rank=params["rank"], learning_rate=params["learning_rate"], epochs=params["epochs"]
        )
        await asyncio.to_thread(self._load)
        result = await asyncio.to_thread(train_stacked, self._model, self._tokenizer, fused, examples, config, progress)
        data = stacked_to_bytes(
            result.lora, bank_version=ctx.served.version, job_id=job["job_id"], dtype=serving_dtype(self.settings.dtype)
        )
        return {
            "status": "succeeded",
            "finished_at": _now(),
            "progress": 1.0,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "losses": result.losses,
            "seconds": round(result.seconds, 3),
            "bank_version": ctx.served.version,
            "stacked_version": None,
            "stacked_bytes": len(data),
        }, data

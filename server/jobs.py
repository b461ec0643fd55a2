"""Fine-tune jobs: submitted by the API, run in-process (embedded default) or by `mta worker`.

Job records and the FIFO queue live in the user store, so API replicas and workers share them
and nothing is lost on restart. One active job per user (a slot in the store), a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters import serving_dtype
from server.errors import Conflict, InvalidInput, NotFound, TooManyRequests
from server.personalize import Personalizer
from server.settings import Settings
from server.stacking import STACKED_BLOB, stacked_to_bytes, train_stacked, training_examples
from server.store import UserStore
from server.training import TrainConfig

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int
    rank: int
    learning_rate: float


def _now() -> float:
    return time.time()


def public_view(job: dict[str, Any]) -> dict[str, Any]:
    """What GET /jobs shows: everything but the training examples."""
    return {k: v for k, v in job.items() if k != "examples"}


class JobService:
    """The API side: validate, record, enqueue; report status; remove stacked LoRAs."""

    def __init__(self, settings: Settings, store: UserStore, personalizer: Personalizer) -> None:
        self.settings = settings
        self.store = store
        self.personalizer = personalizer

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
        s = self.settings
        self._validate(pairs)
        ctx = await self.personalizer.context(user_id)
        if ctx.record is None and not add_to_profile:
            raise NotFound(f"user {user_id!r} has no profile: PUT /users/{user_id}/profile first, or set add_to_profile")
        fused_rank = ctx.served.fused_rank
        if fused_rank + params.rank > s.max_lora_rank:
            raise InvalidInput(
                f"rank {params.rank} on top of the fused rank {fused_rank} exceeds max_lora_rank {s.max_lora_rank}"
            )
        if add_to_profile:
            items = (ctx.record.items if ctx.record else []) + [{"input": i, "output": o} for i, o in pairs]
            await self.personalizer.put_profile(user_id, items)  # validates the profile limits
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
        await self.store.put_job(job_id, job)
        if not await self.store.enqueue_job(job_id, s.finetune_queue_size):
            await self.store.release_active_job(user_id, job_id)
            await self.store.put_job(job_id, {**job, "status": "failed", "error": "queue full", "finished_at": _now()})
            raise TooManyRequests(f"the fine-tune queue is full ({s.finetune_queue_size} jobs); retry later")
        return public_view(job)

    async def get(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return public_view(await fail_if_stale(self.store, job, self.settings.job_stale_seconds))


async def fail_job(store: UserStore, job: dict[str, Any], error: str) -> dict[str, Any]:
    job = {**job, "status": "failed", "error": error, "finished_at": _now()}
    await store.put_job(job["job_id"], job)
    await store.release_active_job(job["user_id"], job["job_id"])
    return job


async def fail_if_stale(store: UserStore, job: dict[str, Any], stale_seconds: float) -> dict[str, Any]:
    """A running job whose runner stopped beating (crash, restart) is reported failed, never 'running'."""
    beat = job.get("heartbeat_at") or job.get("started_at") or 0
    if job["status"] == "running" and _now() - beat > stale_seconds:
        return await fail_job(store, job, "interrupted: the worker running it stopped (crash or restart)")
    return job


class JobRunner:
    """Takes jobs from the store's queue and trains stacked LoRAs, one at a time."""

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

    def interrupt(self) -> None:
        """Stop the running training at its next step (server shutdown); the job is reported failed."""
        self._interrupt.set()

    async def recover(self, *, all_running: bool) -> int:
        """At start: fail jobs left 'running' by a dead runner (all of them for the embedded runner)."""
        n = 0
        for job in await self.store.list_jobs(["running"]):
            if all_running:
                job = await fail_job(self.store, job, "interrupted by a server restart")
            else:
                job = await fail_if_stale(self.store, job, self.settings.job_stale_seconds)
            n += job["status"] == "failed"
        return n

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                job_id = await self.store.dequeue_job(timeout=1.0)
            except Exception:  # noqa: BLE001 - store outage: keep the runner alive and retry
                log.exception("fine-tune runner: cannot read the queue; retrying")
                await asyncio.sleep(2)
                continue
            if job_id is not None:
                await self.run_one(job_id)

    def _load(self) -> None:
        if self._model is None:
            from server.training import load_base_model, load_tokenizer

            self._model = load_base_model(self.model_path)
            self._tokenizer = load_tokenizer(self.model_path)

    async def run_one(self, job_id: str) -> dict[str, Any] | None:
        job = await self.store.get_job(job_id)
        if job is None or job["status"] != "queued":
            return job  # deleted with its user, or already handled
        job = {**job, "status": "running", "started_at": _now(), "heartbeat_at": _now()}
        await self.store.put_job(job_id, job)

        def progress(step: int, total: int, loss: float) -> None:  # in the training thread
            if self._interrupt.is_set():
                raise InterruptedError("interrupted by a server shutdown or restart")
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step}: loss is {loss}")
            job.update(step=step, total_steps=total, progress=round(step / total, 4), loss=loss)

        beating = asyncio.create_task(self._heartbeat(job))
        try:
            outcome, error = await self._train(job, progress), None
        except Exception as e:  # noqa: BLE001 - every failure is reported on the job
            outcome, error = {}, f"{type(e).__name__}: {e}"
        finally:
            beating.cancel()  # stop the heartbeat's writes before the final one
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        if error is not None:
            log.warning("fine-tune %s failed: %s", job_id, error)
            return await fail_job(self.store, job, error)
        job = {**job, **outcome}
        await self.store.put_job(job_id, job)
        await self.store.release_active_job(job["user_id"], job_id)
        return job

    async def _heartbeat(self, job: dict[str, Any]) -> None:
        """The one writer of a running job's record: progress and a heartbeat, twice a second."""
        while True:
            await asyncio.sleep(0.5)
            job["heartbeat_at"] = _now()
            await self.store.put_job(job["job_id"], dict(job))

    async def _train(self, job: dict[str, Any], progress: Any) -> dict[str, Any]:
        """Train and store the stacked LoRA; returns the job's final fields (the caller writes them)."""
        user_id, params = job["user_id"], job["params"]
        if self.follow_bank and job["bank_version"] != self.personalizer.banks.current.version:
            await self.personalizer.banks.load(Path(job["bank_path"]))
        ctx = await self.personalizer.context(user_id)
        if ctx.record is None or ctx.plan is None:
            raise RuntimeError(f"user {user_id!r} has no profile any more")
        from server.fusion import build_adapter

        fused = build_adapter(ctx.served.bank, ctx.plan, self.settings.max_lora_rank)
        pairs = [tuple(p) for p in job["examples"]]
        rendered = [ctx.served.render({"input": i, "output": o}) for i, o in pairs]
        examples = training_examples(pairs, ctx.history, rendered)
        config = TrainConfig(
            rank=params["rank"],
            alpha=params["rank"],
            learning_rate=params["learning_rate"],
            epochs=params["epochs"],
            batch_size=self.settings.finetune_batch_size,
            seed=self.settings.finetune_seed,
        )
        await asyncio.to_thread(self._load)
        result = await asyncio.to_thread(train_stacked, self._model, self._tokenizer, fused, examples, config, progress)
        data = stacked_to_bytes(
            result.lora, bank_version=ctx.served.version, job_id=job["job_id"], dtype=serving_dtype(self.settings.dtype)
        )
        version = await self.store.put_blob(user_id, STACKED_BLOB, data)
        return {
            "status": "succeeded",
            "finished_at": _now(),
            "progress": 1.0,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "losses": result.losses,
            "seconds": round(result.seconds, 3),
            "bank_version": ctx.served.version,
            "stacked_version": version,
            "stacked_bytes": len(data),
        }

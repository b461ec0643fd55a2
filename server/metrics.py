"""Prometheus metrics, on a registry per app so several apps (tests) never collide.

Counters and histograms are updated where things happen (the HTTP middleware, the personalizer,
the fine-tune jobs). Gauges describing state that another object owns (the adapter cache on disk,
the engine, the embedded fine-tune runner, the shared job queue) are read at scrape time by
`_StateCollector` from the objects given to `watch_*`; until one is given, its metrics are exported
without samples. The dashboard and alert rules in deploy/ query only these names
(tests/test_dashboard.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# How long a scrape-time read of the job queue may take before the depth is reported unknown.
_QUEUE_READ_TIMEOUT = 5.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mta_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "mta_request_latency_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.fusion_seconds = Histogram(
            "mta_fusion_seconds", "Fuse + materialize one adapter (cache misses)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.overhead_seconds = Histogram(
            "mta_request_overhead_seconds",
            "Server-side work from a generation's start to its engine submit (user context, prompt, adapter);"
            " adapter: base, hit (cached) or miss (fused and loaded for this request)",
            ["adapter"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("mta_adapter_cache_hits", "Adapter cache hits", registry=r)
        self.cache_misses = Counter("mta_adapter_cache_misses", "Adapter cache misses", registry=r)
        self.generated_tokens = Counter("mta_generated_tokens", "Completion tokens", ["personalized"], registry=r)
        self.bank = Gauge("mta_bank_info", "Loaded bank (value 1)", ["bank_version"], registry=r)
        self.bank_reloads = Counter("mta_bank_reloads", "Bank reloads", ["result"], registry=r)
        # Fine-tune jobs, counted by the process that does the step (server/jobs.py): the API
        # accepts, its embedded runner starts and finishes (a `mta worker` exports nothing).
        self.jobs_submitted = Counter(
            "mta_finetune_jobs_submitted", "Fine-tune jobs accepted (202) by this API process", registry=r
        )
        self.jobs_started = Counter(
            "mta_finetune_jobs_started", "Fine-tune jobs this process's runner started training", registry=r
        )
        self.jobs_finished = Counter(
            "mta_finetune_jobs_finished",
            "Fine-tune jobs this process saw end: succeeded, or failed (training or store error, timeout,"
            " dead runner)",
            ["status"],
            registry=r,
        )
        for status in ("succeeded", "failed"):
            self.jobs_finished.labels(status=status)  # both series from the start, at 0
        self.jobs_interrupted = Counter(
            "mta_finetune_jobs_interrupted",
            "Running fine-tune jobs this process found with a dead runner (no heartbeat for"
            " MTA_JOB_STALE_SECONDS, or a restart) and failed; also counted as finished{status=failed}",
            registry=r,
        )
        self.state = _StateCollector()
        r.register(self.state)

    def set_bank(self, version: str) -> None:
        self.bank.clear()
        self.bank.labels(bank_version=version).set(1)

    # --- state read at scrape time ---------------------------------------------------------------

    def watch_adapter_cache(self, cache: Any) -> None:
        """Export the adapter cache's bytes on disk, entries, capacity, evictions (an `AdapterCache`)."""
        self.state.cache = cache

    def watch_engine(self, engine: Any) -> None:
        """Export whether the engine runs and how many requests it holds (an `Engine`)."""
        self.state.engine = engine

    def watch_job_queue(self, store: Any, capacity: int) -> None:
        """Export the shared fine-tune queue's depth (read from `store` at each scrape) and capacity."""
        self.state.queue = _QueueProbe(store, capacity)

    def watch_runner(self, runner: Any) -> None:
        """Export whether this process's fine-tune runner is alive and the jobs it is training."""
        self.state.runner = runner

    async def refresh(self) -> None:
        """Read the state that needs I/O (the queue depth) now, instead of at the previous scrape."""
        if self.state.queue is not None:
            await self.state.queue.refresh()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JobMetrics:
    """What server/jobs.py reports; does nothing without a `Metrics` (a `mta worker` has none)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._m = metrics

    def watch_queue(self, store: Any, capacity: int) -> None:
        if self._m is not None:
            self._m.watch_job_queue(store, capacity)

    def watch_runner(self, runner: Any) -> None:
        if self._m is not None:
            self._m.watch_runner(runner)

    def submitted(self) -> None:
        if self._m is not None:
            self._m.jobs_submitted.inc()

    def started(self, job_id: str) -> None:
        if self._m is not None:
            self._m.jobs_started.inc()
            self._m.state.running_jobs.add(job_id)

    def finished(self, job_id: str, status: str) -> None:
        if self._m is not None:
            self._m.jobs_finished.labels(status=status).inc()
            self._m.state.running_jobs.discard(job_id)

    def interrupted(self, job_id: str) -> None:
        """A running job found with a dead runner, now failed."""
        if self._m is not None:
            self._m.jobs_interrupted.inc()
            self.finished(job_id, "failed")


class _QueueProbe:
    """The job queue's depth, read from the store by a task each scrape starts (the collector is
    synchronous, the store asynchronous): a scrape reports what the previous scrape's read found.
    No value (no sample) before the first read and while the store does not answer."""

    def __init__(self, store: Any, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self.depth: int | None = None
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the server's event loop (e.g. a test rendering directly)
            return
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self.refresh(), name="mta-metrics-queue-depth")

    async def refresh(self) -> None:
        try:
            self.depth = int(await asyncio.wait_for(self.store.queued_count(), _QUEUE_READ_TIMEOUT))
        except Exception as e:  # noqa: BLE001 - the store is down or slow: unknown, not a stale number
            self.depth = None
            log.debug("metrics: cannot read the fine-tune queue depth: %s", e)


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root`; files removed while it walks are skipped."""
    total, pending = 0, [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def _read(obj: Any, read: Callable[[Any], float | None]) -> float | None:
    """`read(obj)`, or None (no sample) when there is no `obj` or reading it fails: a metric must
    never fail a scrape."""
    if obj is None:
        return None
    try:
        return read(obj)
    except Exception as e:  # noqa: BLE001
        log.debug("metrics: cannot read %s: %s", type(obj).__name__, e)
        return None


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], value)
    return family


class _StateCollector(Collector):
    """Gauges read from live objects at scrape time; each family is always exported (samples only
    for what is watched), so the names a dashboard queries exist from the first scrape."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.engine: Any = None
        self.runner: Any = None
        self.queue: _QueueProbe | None = None
        self.running_jobs: set[str] = set()

    def describe(self) -> list[Metric]:
        return list(self._families(live=False))

    def collect(self) -> Iterator[Metric]:
        if self.queue is not None:
            self.queue.poke()
        return self._families(live=True)

    def _families(self, live: bool) -> Iterator[Metric]:
        cache = self.cache if live else None
        free = _read(cache, lambda c: shutil.disk_usage(c.root).free)
        yield _gauge(
            "mta_adapter_cache_bytes",
            "Bytes of materialized adapters in the adapter cache directory (evicted ones still in use included)",
            _read(cache, lambda c: _tree_bytes(Path(c.root))),
        )
        yield _gauge("mta_adapter_cache_entries", "Adapters in the adapter cache", _read(cache, len))
        yield _gauge(
            "mta_adapter_cache_capacity",
            "Adapters the cache keeps before evicting (MTA_ADAPTER_CACHE_SIZE)",
            _read(cache, lambda c: c.capacity),
        )
        yield _gauge(
            "mta_adapter_cache_filesystem_free_bytes",
            "Free bytes on the adapter cache's filesystem (a full one is a 503 adapter_cache_full)",
            free,
        )
        evictions = CounterMetricFamily("mta_adapter_cache_evictions", "Adapters evicted from the cache (LRU)")
        if (evicted := _read(cache, lambda c: c.stats.evictions)) is not None:
            evictions.add_metric([], evicted)
        yield evictions

        engine = self.engine if live else None
        yield _gauge("mta_engine_up", "The vLLM engine runs (1) or has died (0)", _read(engine, lambda e: int(e.ready)))
        yield _gauge(
            "mta_engine_requests",
            "Requests in the vLLM engine, running or waiting to be scheduled",
            _read(engine, _engine_requests),
        )
        yield _gauge(
            "mta_engine_max_num_seqs",
            "Requests the engine runs at once (MTA_MAX_NUM_SEQS); more wait",
            _read(engine, lambda e: e.settings.max_num_seqs),
        )
        lora_path = GaugeMetricFamily(
            "mta_lora_path_info",
            "The LoRA ops the engine runs (value 1): kernel (C++ decode kernel), grouped-ops, or stock (vLLM's);"
            " note: why the fast ops are not used although asked for (an untested vLLM), else empty",
            labels=["path", "note"],
        )
        if (path := _read(engine, lambda e: e.lora_path)) is not None:
            lora_path.add_metric([path, _read(engine, lambda e: e.lora_path_note) or ""], 1)
        yield lora_path

        queue = self.queue if live else None
        yield _gauge(
            "mta_finetune_queue_depth",
            "Fine-tune jobs waiting in the shared queue, as of the previous scrape (every replica reports"
            " the same queue)",
            _read(queue, lambda q: q.depth),
        )
        yield _gauge(
            "mta_finetune_queue_capacity",
            "Fine-tune jobs the queue holds before submissions get 429 (MTA_FINETUNE_QUEUE_SIZE)",
            _read(queue, lambda q: q.capacity),
        )

        runner = self.runner if live else None
        yield _gauge(
            "mta_finetune_runner_up",
            "The embedded fine-tune runner is alive and making progress (1), or dead or wedged (0), as /readyz",
            _read(runner, lambda r: int(bool(r.health()["ok"]))),
        )
        yield _gauge(
            "mta_finetune_jobs_running",
            "Fine-tune jobs this process's runner is training",
            _read(runner, lambda _: len(self.running_jobs)),
        )


def _engine_requests(engine: Any) -> int | None:
    """vLLM's count of unfinished requests (`AsyncLLM.get_num_unfinished_requests`); None if the
    engine is not running."""
    llm = getattr(engine, "_llm", None)
    return None if llm is None else int(llm.get_num_unfinished_requests())

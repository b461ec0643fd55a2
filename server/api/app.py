"""The FastAPI app: resources created in the lifespan, thin routers, one error envelope."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.adapter_cache import AdapterCache
from server.api.deps import Services
from server.api.errors import PayloadTooLarge, error_response, error_responses, install_error_handlers
from server.api.routes import admin, finetune, generate, health, openai_compat, users
from server.bank.registry import BankRegistry
from server.defaults import resolve_bank_path, resolve_model
from server.engine import Engine
from server.generation import Generator
from server.jobs import JobRunner, JobService
from server.metrics import Metrics
from server.personalize import Personalizer
from server.settings import Settings
from server.store import open_store

log = logging.getLogger(__name__)


async def build_services(settings: Settings) -> tuple[Services, JobRunner | None]:
    """Everything the routes need, in dependency order; the engine last (slowest)."""
    from transformers import AutoTokenizer

    model_path, model_id = resolve_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    metrics = Metrics()
    store = open_store(settings.resolved_store_url)
    await store.ping()
    banks = BankRegistry(settings, model_id, model_path)
    engine = Engine(settings, model_path, model_id)
    cache = AdapterCache(
        settings.adapter_cache_dir,
        settings.adapter_cache_size,
        settings.adapter_cache_max_bytes,
        unload=engine.remove_lora,
    )
    metrics.watch_adapter_cache(cache)  # read at each scrape
    metrics.watch_engine(engine)
    personalizer = Personalizer(settings, store, banks, cache, metrics)
    try:
        await personalizer.swap_bank(resolve_bank_path(settings, model_path, model_id))  # a broken bank fails fast
        engine.start()
    except BaseException:
        cache.close()  # this process exits: leave no directory behind
        raise
    generator = Generator(settings, engine, personalizer, tokenizer, metrics)
    jobs = JobService(settings, store, personalizer)
    runner = JobRunner(settings, store, personalizer, model_path) if settings.finetune_runner == "inprocess" else None
    services = Services(settings, store, banks, cache, engine, personalizer, generator, jobs, metrics, runner)
    return services, runner


class StreamedBodyLimit:
    """413 once a body sent without Content-Length (chunked) passes `max_bytes` while it is read;
    a declared Content-Length is checked before any of the body is read (`limits_and_metrics`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


ENGINE_DIED_EXIT_CODE = 4


def _exit_for_restart(app: FastAPI) -> None:
    """Shut down gracefully; `mta serve` then exits with ENGINE_DIED_EXIT_CODE (under another ASGI
    server, without `stop_server`, SIGTERM stops it the way an operator would)."""
    app.state.exit_code = ENGINE_DIED_EXIT_CODE
    stop = getattr(app.state, "stop_server", None)
    stop() if stop is not None else os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services, runner = await build_services(settings)
        except Exception as e:
            log.error("mta serve cannot start: %s", e)  # uvicorn then exits with status 3
            raise
        app.state.services = services
        stop = asyncio.Event()
        runner_task = None
        if runner is not None:  # embedded default: fine-tunes run in this process
            if failed := await runner.recover(all_running=True):
                log.warning("%d fine-tune job(s) interrupted by the last shutdown were marked failed", failed)
            runner_task = runner.start(stop)
        watchdog = asyncio.create_task(services.engine.watch(lambda: _exit_for_restart(app)))
        follower = asyncio.create_task(services.personalizer.follow_changes())
        log.info("ready: model %s, bank %s", services.engine.model_id, services.banks.current.version)
        try:
            yield
        finally:
            stop.set()
            watchdog.cancel()
            follower.cancel()
            if runner is not None and runner_task is not None:
                runner.interrupt()
                try:
                    await asyncio.wait_for(runner_task, timeout=30)
                except (TimeoutError, asyncio.CancelledError):
                    log.warning("fine-tune runner did not stop in time")
            services.engine.shutdown()
            services.cache.close()  # this server's adapter directory only (the root may be shared)
            await services.store.close()

    app = FastAPI(
        title="MTA personalization server",
        version="0.1.0",
        description="Merge-then-Adapt: per-user fused meta-LoRAs served by vLLM multi-LoRA.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operation ids: the route functions' names
        responses=error_responses(413, 500),  # any route: a declared Content-Length over the limit, a bug
    )
    install_error_handlers(app)
    # Inside `limits_and_metrics` (added later = outer): its receive wrapper would turn the 413 into a 400.
    app.add_middleware(StreamedBodyLimit, max_bytes=settings.max_request_bytes)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_request_bytes):
            return error_response(413, "payload_too_large", f"request body over {settings.max_request_bytes} bytes")
        start = time.perf_counter()
        response = await call_next(request)
        services: Services | None = getattr(request.app.state, "services", None)
        if services is not None:
            route = request.scope.get("route")
            name = getattr(route, "path", "unmatched")
            services.metrics.requests.labels(route=name, status=str(response.status_code)).inc()
            services.metrics.latency.labels(route=name).observe(time.perf_counter() - start)
        return response

    for module in (generate, openai_compat, users, finetune, admin, health):
        app.include_router(module.router)
    return app

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Response

from server.api.deps import ServicesDep
from server.api.errors import error_response, error_responses
from server.api.schemas import HealthView, ReadyView
from server.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthView)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyView, responses=error_responses(503))
async def readyz(services: ServicesDep):
    """Ready only when the engine runs, a bank is loaded, the store answers and the embedded
    fine-tune runner (if any) is alive and not wedged."""
    problems = []
    if not services.engine.ready:
        problems.append("engine not running")
    if not services.banks.loaded:
        problems.append("no bank loaded")
    try:
        await services.store.ping()
    except StoreUnavailable as e:
        problems.append(str(e))
    runner = {"mode": "worker"} if services.runner is None else {"mode": "inprocess", **services.runner.health()}
    if not runner.get("ok", True):
        problems.append(runner["problem"])
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return {
        "status": "ready",
        "bank_version": services.banks.current.version,
        "model": services.engine.model_id,
        "lora_path": services.engine.lora_path,
        "lora_path_note": services.engine.lora_path_note,
        "lora_slots": dataclasses.asdict(services.engine.lora_slots),
        "finetune_runner": runner,
    }


# `response_class=Response` (no media type of its own): the schema lists text/plain only, and the
# error statuses every route has stay application/json.
PROMETHEUS_TEXT = {
    200: {
        "description": "Prometheus text exposition format 0.0.4.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

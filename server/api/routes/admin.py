"""Bank administration behind the bearer admin token."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from server.api.deps import AdminDep, ServicesDep
from server.api.errors import error_responses
from server.api.schemas import BankView, ReloadRequest, ReloadView
from server.stacking import stack_config

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=error_responses(401, 403))


@router.get("/bank", response_model=BankView)
async def get_bank(services: ServicesDep) -> dict:
    served = services.banks.current
    cache = services.cache
    recipe = stack_config(services.settings, bank=served.bank.manifest.stacking)
    return {
        **served.bank.summary(),
        "finetune_defaults": {"rank": recipe.rank, "learning_rate": recipe.learning_rate, "epochs": recipe.epochs},
        "top_k": served.top_k,
        "fusion_mode": served.mode,
        "adapter_cache": {
            "entries": len(cache),
            "capacity": cache.capacity,
            "bytes": cache.bytes,
            "max_bytes": cache.max_bytes,
            "hits": cache.stats.hits,
            "misses": cache.stats.misses,
            "evictions": cache.stats.evictions,
        },
    }


@router.post("/bank/reload", response_model=ReloadView, responses=error_responses(400, 422))
async def reload_bank(services: ServicesDep, body: ReloadRequest | None = None) -> dict:
    """Load a bank beside the current one and swap; a broken bank is refused and the old one keeps serving."""
    path = Path(body.path) if body and body.path else services.banks.current.bank.path
    swap = await services.personalizer.swap_bank(path)
    old, new = swap.old, swap.new
    return {
        "previous_version": old.version if old else None,
        "bank_version": new.version,
        "path": str(new.bank.path),
        "anchors": len(new.bank.manifest.anchors),
        "invalidated_adapters": swap.dropped_adapters,
    }

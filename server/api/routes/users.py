"""User profiles: the only per-user state MTA needs for fusion."""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from server.api.deps import ServicesDep, UserIdPath
from server.api.errors import error_responses
from server.api.links import USER_LINKS
from server.api.schemas import AppendItemsView, ProfileRequest, UserExport, UserView
from server.errors import NotFound
from server.jobs import public_view
from server.personalize import UserContext
from server.stacking import STACKED_BLOB, StackedBlob, StackedMeta

router = APIRouter(prefix="/users", tags=["users"])


def _stacked_view(stacked: StackedBlob | StackedMeta) -> dict:
    """A stored stacked LoRA's metadata (never its tensors)."""
    return {"version": stacked.version, "bank_version": stacked.bank_version, "job_id": stacked.job_id, "bytes": stacked.size}


def _view(ctx: UserContext) -> dict:
    assert ctx.record is not None and ctx.plan is not None
    weights = dict(ctx.plan.anchors)
    stacked = ctx.stacked
    profile_bytes = len(json.dumps(ctx.record.items).encode())
    embedding_bytes = ctx.record.embedding.nbytes if ctx.record.embedding is not None else 0
    return {
        "user_id": ctx.user_id,
        "profile_items": len(ctx.record.items),
        "profile_version": ctx.record.profile_version,
        "updated_at": ctx.record.updated_at,
        "bank_version": ctx.served.version,
        "fusion_mode": ctx.plan.mode,
        "anchors": [{"id": a, "similarity": round(s, 6), "weight": weights.get(a, 0.0)} for a, s in ctx.plan.retrieved],
        "stacked": {**_stacked_view(stacked), "stale": ctx.stacked_stale, "error": ctx.stacked_error} if stacked else None,
        "stored_bytes": {
            "profile": profile_bytes,
            "embedding": embedding_bytes,
            "stacked_lora": stacked.size if stacked else 0,
            "total": profile_bytes + embedding_bytes + (stacked.size if stacked else 0),
        },
    }


@router.put("/{user_id}/profile", response_model=UserView, responses={200: USER_LINKS, **error_responses(400, 422, 503)})
async def put_profile(body: ProfileRequest, services: ServicesDep, user_id: str = UserIdPath):
    return _view(await services.personalizer.put_profile(user_id, body.items))


@router.post("/{user_id}/items", response_model=AppendItemsView, responses={200: USER_LINKS, **error_responses(400, 409, 422, 503)})
async def append_items(body: ProfileRequest, services: ServicesDep, user_id: str = UserIdPath):
    """Append history items (creates the profile if absent); keeps the newest MTA_MAX_PROFILE_ITEMS."""
    ctx, dropped = await services.personalizer.append_items(user_id, body.items)
    return {
        **_view(ctx),
        "items_added": len(body.items),
        "items_dropped": dropped,
        "max_profile_items": services.personalizer.settings.max_profile_items,
    }


@router.get("/{user_id}", response_model=UserView, responses=error_responses(404, 422, 503))
async def get_user(services: ServicesDep, user_id: str = UserIdPath):
    ctx = await services.personalizer.context(user_id)
    if ctx.record is None:
        raise NotFound(f"user {user_id!r} not found")
    return _view(ctx)


@router.get("/{user_id}/export", response_model=UserExport, responses=error_responses(404, 422, 503))
async def export_user(services: ServicesDep, user_id: str = UserIdPath) -> dict:
    """Everything stored about the user (for an access request): the profile items, the embedding
    model and profile version, the stacked LoRA's metadata (not its tensors) and the user's jobs
    (their public view, without training examples)."""
    store = services.personalizer.store
    record = await store.get_user(user_id)
    if record is None:
        raise NotFound(f"user {user_id!r} not found")
    blob = await store.get_blob(user_id, STACKED_BLOB)
    stacked = StackedBlob.parse(*blob) if blob else None
    jobs = await store.list_jobs(user_id=user_id)
    return {
        "user_id": user_id,
        "profile": {
            "items": record.items,
            "profile_version": record.profile_version,
            "updated_at": record.updated_at,
            "embedding_model": record.embedding_model,
        },
        "stacked": _stacked_view(stacked) if stacked else None,
        "jobs": [public_view(j) for j in jobs],
    }


@router.delete("/{user_id}", status_code=204, responses=error_responses(404, 422, 503))
async def delete_user(services: ServicesDep, user_id: str = UserIdPath) -> Response:
    await services.personalizer.delete_user(user_id)
    return Response(status_code=204)

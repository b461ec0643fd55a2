"""User profiles: the only per-user state MTA needs for fusion."""

from __future__ import annotations

import json

from fastapi import APIRouter, Path, Response

from server.api.deps import ServicesDep
from server.api.schemas import USER_ID_PATTERN, ProfileRequest, UserView
from server.errors import NotFound
from server.personalize import UserContext

router = APIRouter(prefix="/users", tags=["users"])
UserIdPath = Path(pattern=USER_ID_PATTERN, description="Letters, digits and _.:@- (max 128).")


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
        "stacked": (
            {
                "version": stacked.version,
                "bank_version": stacked.bank_version,
                "stale": ctx.stacked_stale,
                "job_id": stacked.job_id,
                "bytes": len(stacked.data),
            }
            if stacked
            else None
        ),
        "stored_bytes": {
            "profile": profile_bytes,
            "embedding": embedding_bytes,
            "stacked_lora": len(stacked.data) if stacked else 0,
            "total": profile_bytes + embedding_bytes + (len(stacked.data) if stacked else 0),
        },
    }


@router.put("/{user_id}/profile", response_model=UserView)
async def put_profile(body: ProfileRequest, services: ServicesDep, user_id: str = UserIdPath):
    return _view(await services.personalizer.put_profile(user_id, body.items))


@router.get("/{user_id}", response_model=UserView)
async def get_user(services: ServicesDep, user_id: str = UserIdPath):
    ctx = await services.personalizer.context(user_id)
    if ctx.record is None:
        raise NotFound(f"user {user_id!r} not found")
    return _view(ctx)


@router.delete("/{user_id}", status_code=204)
async def delete_user(services: ServicesDep, user_id: str = UserIdPath) -> Response:
    await services.personalizer.delete_user(user_id)
    return Response(status_code=204)

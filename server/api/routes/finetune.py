"""Few-shot personalization (MTA stage 3): fine-tune jobs and the stored stacked LoRA."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response

from server.api.deps import ServicesDep, UserIdPath
from server.api.errors import error_responses
from server.api.links import JOB_LINKS
from server.api.schemas import FinetuneRequest, JobView
from server.jobs import FinetuneParams

router = APIRouter(tags=["finetune"])


@router.post(
    "/users/{user_id}/finetune", status_code=202, response_model=JobView,
    responses={202: JOB_LINKS, **error_responses(400, 404, 409, 422, 429, 503)},
)  # fmt: skip
async def finetune(body: FinetuneRequest, services: ServicesDep, response: Response, user_id: str = UserIdPath) -> dict:
    s = services.settings
    params = FinetuneParams(
        epochs=body.epochs or s.finetune_epochs,
        rank=body.rank or s.finetune_rank,
        learning_rate=body.learning_rate or s.finetune_learning_rate,
    )
    pairs = [(e.input, e.output) for e in body.examples]
    job = await services.jobs.submit(user_id, pairs, params, body.add_to_profile)
    response.headers["Location"] = f"/jobs/{job['job_id']}"
    return job


@router.get("/jobs/{job_id}", response_model=JobView, responses=error_responses(404, 422, 503))
async def get_job(services: ServicesDep, job_id: str = Path(pattern=r"^ft-[0-9a-f]{16}$")) -> dict:
    return await services.jobs.get(job_id)


@router.delete("/users/{user_id}/stacked", status_code=204, responses=error_responses(404, 422, 503))
async def delete_stacked(services: ServicesDep, user_id: str = UserIdPath) -> Response:
    await services.personalizer.delete_stacked(user_id)
    return Response(status_code=204)

"""Few-shot personalization (MTA stage 3): fine-tune jobs and the stored stacked LoRA."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response

from server.api.deps import ServicesDep, UserIdPath
from server.api.errors import error_responses
from server.api.links import JOB_LINKS
from server.api.schemas import FinetuneRequest, JobView
from server.jobs import FinetuneParams
from server.stacking import stack_config

router = APIRouter(tags=["finetune"])


@router.post(
    "/users/{user_id}/finetune", status_code=202, response_model=JobView,
    responses={202: JOB_LINKS, **error_responses(400, 404, 409, 422, 429, 503)},
)  # fmt: skip
async def finetune(body: FinetuneRequest, services: ServicesDep, response: Response, user_id: str = UserIdPath) -> dict:
    recipe = stack_config(  # the request's values, else the settings' or the bank's recorded choice
        services.settings, rank=body.rank, learning_rate=body.learning_rate, epochs=body.epochs,
        bank=services.banks.current.bank.manifest.stacking,
    )  # fmt: skip
    params = FinetuneParams(epochs=recipe.epochs, rank=recipe.rank, learning_rate=recipe.learning_rate)
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

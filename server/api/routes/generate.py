"""POST /generate: one user's personalized completion, optionally streamed (server-sent events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from server.api.deps import ServicesDep
from server.api.schemas import GenerateRequest, GenerateResponse
from server.api.streaming import GENERATION_RESPONSES, primed, sse
from server.generation import GenerationResult

router = APIRouter(tags=["generate"])


def server_timing(result: GenerationResult) -> str:
    """The `Server-Timing` header (W3C): the server's own work before the engine ran the request."""
    return f'mta;dur={1000 * (result.overhead_seconds or 0.0):.3f};desc="request to engine submit"'

def _body(result: GenerationResult) -> dict:
    return {
        "id": result.request_id,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        **result.personalization(),
        "usage": result.usage(),
    }


@router.post("/generate", response_model=GenerateResponse, responses=GENERATION_RESPONSES)
async def generate(req: GenerateRequest, services: ServicesDep, response: Response):
    inp = req.to_input()
    if not req.stream:
        result = await services.generator.generate(inp)
        response.headers["Server-Timing"] = server_timing(result)
        return _body(result)

    async def events() -> AsyncIterator[str]:
        async for result, delta in services.generator.stream(inp):
            if delta is None:
                yield sse({"done": True, **_body(result)})
            elif delta.text or delta.token_ids:
                yield sse({"text": delta.text, "token_ids": delta.token_ids})
            else:
                yield ": started\n\n"  # a comment: the request is admitted
        yield sse("[DONE]")

    return StreamingResponse(await primed(events()), media_type="text/event-stream")

"""POST /generate: one user's personalized completion, optionally streamed (server-sent events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.api.deps import ServicesDep
from server.api.errors import error_responses
from server.api.schemas import GenerateRequest, GenerateResponse
from server.generation import GenerationResult

router = APIRouter(tags=["generate"])

# One server-sent event (`itemSchema`, as FastAPI documents its own event streams): `data` holds a
# JSON object, or `[DONE]` closing the stream.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
# A completion route's statuses: JSON, or events with `stream: true`; 404 for a user without a
# profile under MTA_UNKNOWN_USER=404; 503 when the store, the engine or the adapter cache's disk fails.
GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events instead.",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    },
    **error_responses(400, 404, 422, 503),
}


def _body(result: GenerationResult) -> dict:
    return {
        "id": result.request_id,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        **result.personalization(),
        "usage": result.usage(),
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def primed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Start the stream before the response does, so bad input still gets a 4xx, not a broken 200."""
    first = await anext(events)

    async def rest() -> AsyncIterator[str]:
        yield first
        async for e in events:
            yield e

    return rest()


@router.post("/generate", response_model=GenerateResponse, responses=GENERATION_RESPONSES)
async def generate(req: GenerateRequest, services: ServicesDep):
    inp = req.to_input()
    if not req.stream:
        return _body(await services.generator.generate(inp))

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

"""What the completion routes share (`/generate`, `/v1/completions`, `/v1/chat/completions`):
server-sent events, and the statuses and content types their schema documents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from server.api.errors import error_responses

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

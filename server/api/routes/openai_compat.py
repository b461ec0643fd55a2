"""OpenAI-compatible completions; the standard `user` field selects the user's adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.api.deps import ServicesDep
from server.api.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from server.api.streaming import GENERATION_RESPONSES, primed, sse
from server.generation import GenerationInput, GenerationResult

router = APIRouter(prefix="/v1", tags=["openai"])


def _finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason or "", reason) if reason else None


def _chunk(result: GenerationResult, model: str, chat: bool, text: str, finish: str | None, first: bool) -> dict:
    if chat:
        delta: dict = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta if (text or first) else {}, "finish_reason": _finish(finish)}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}
        obj = "text_completion"
    return {"id": result.request_id, "object": obj, "created": result.created, "model": model, "choices": [choice]}


async def _respond(services, inp: GenerationInput, model: str | None, stream: bool, chat: bool):
    model = model or services.engine.model_id
    if not stream:
        r = await services.generator.generate(inp)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": _finish(r.finish_reason)}
        else:
            choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": _finish(r.finish_reason)}
        return {
            "id": r.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": r.created,
            "model": model,
            "choices": [choice],
            "usage": r.usage(),
            "personalization": r.personalization(),
        }

    async def events() -> AsyncIterator[str]:
        first = True
        async for result, delta in services.generator.stream(inp):
            if delta is None:
                final = _chunk(result, model, chat, "", None, False)
                final["choices"] = []
                final["usage"] = result.usage()
                final["personalization"] = result.personalization()
                yield sse(final)
                continue
            yield sse(_chunk(result, model, chat, delta.text, delta.finish_reason, first))
            first = False
        yield sse("[DONE]")

    return StreamingResponse(await primed(events()), media_type="text/event-stream")


@router.post("/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES)
async def completions(req: CompletionRequest, services: ServicesDep):
    return await _respond(services, req.to_input(), req.model, req.stream, chat=False)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, services: ServicesDep):
    return await _respond(services, req.to_input(), req.model, req.stream, chat=True)


@router.get("/models", response_model=ModelList)
async def models(services: ServicesDep) -> dict:
    return {"object": "list", "data": [{"id": services.engine.model_id, "object": "model", "owned_by": "mta"}]}

"""Generation for a user: prompt building, the user's adapter, and the engine, for every API flavour."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from server.engine import Completion, Engine
from server.errors import InvalidInput
from server.metrics import Metrics
from server.personalize import AdapterLease, Personalizer, UserContext
from server.prompts import (
    ProfileIndex,
    PromptSplicer,
    chat_prompt,
    count_tokens,
    last_user_turn,
    truncate_tokens,
    user_content,
    with_history_item,
)
from server.settings import Settings

# Prompts up to this many characters (request text + the longest history item) are built on the
# event loop: about 1 us per character to tokenize, less than a worker thread's hop below it.
INLINE_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class GenerationInput:
    """What every endpoint asks for, after its own parsing: exactly one of prompt / messages."""

    user_id: str | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    chat_template: bool = True  # apply the model's chat template to `prompt`
    use_profile: bool | None = None  # BM25 top-1 history item in the prompt; None = settings
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationResult:
    request_id: str
    ctx: UserContext
    lease: AdapterLease | None
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    overhead_seconds: float | None = None  # from the request's start to its engine submit

    def personalization(self) -> dict[str, Any]:
        """The fields every response carries about how it was personalized."""
        plan = self.ctx.plan
        return {
            "user_id": self.ctx.user_id,
            "personalized": plan is not None,
            "anchors": [{"id": a, "weight": w} for a, w in plan.anchors] if plan else [],
            "bank_version": self.ctx.served.version,
            "fusion_mode": plan.mode if plan else None,
            "stacked": self.ctx.serves_stacked,
            "stacked_version": self.ctx.stacked.version if self.ctx.stacked else None,
            "stacked_bank_version": self.ctx.stacked.bank_version if self.ctx.stacked else None,
            "stacked_stale": self.ctx.stacked_stale,
            "stacked_error": self.ctx.stacked_error,
            "adapter": (
                {"lora_int_id": self.lease.lora_int_id, "rank": self.lease.rank, "cache_hit": self.lease.cache_hit}
                if self.lease and plan is not None
                else None
            ),
        }

    def usage(self) -> dict[str, int]:
        done = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}


class Generator:
    def __init__(
        self, settings: Settings, engine: Engine, personalizer: Personalizer, tokenizer: Any, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.personalizer = personalizer
        self.tokenizer = tokenizer
        self.metrics = metrics
        # Prompts are built in worker threads; a Rust tokenizer is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()
        self._splicer = PromptSplicer(tokenizer)  # used under the lock

    async def prompt_ids(self, inp: GenerationInput, ctx: UserContext, max_tokens: int) -> list[int]:
        """`_prompt_ids`, off the event loop when it may be long: tokenizing a long prompt or cutting a
        long history item is CPU work; a short one costs less than the hop to a worker thread."""

        def locked() -> list[int]:
            with self._tokenizer_lock:
                return self._prompt_ids(inp, ctx, max_tokens)

        chars = len(inp.prompt or "") + sum(len(m.get("content") or "") for m in inp.messages or [])
        longest_item = ctx.history_index.longest if ctx.history_index is not None else sum(map(len, ctx.history))
        if chars + longest_item <= INLINE_PROMPT_CHARS and self._tokenizer_lock.acquire(blocking=False):
            try:  # never wait for the lock on the event loop: a thread may be building a long prompt
                return self._prompt_ids(inp, ctx, max_tokens)
            finally:
                self._tokenizer_lock.release()
        return await asyncio.to_thread(locked)

    def _prompt_ids(self, inp: GenerationInput, ctx: UserContext, max_tokens: int) -> list[int]:
        """The prompt's token ids, with the user's BM25 top-1 history item if the profile is used.

        The item is cut to `max_history_tokens`, and further to what the context leaves beside
        the request's own text and `max_tokens`, so that a profile never makes a request fail:
        with no room left the instruction goes alone (and is refused only if it alone does not fit).
        """
        use_profile = self.settings.profile_context if inp.use_profile is None else inp.use_profile
        index = (ctx.history_index or ProfileIndex(ctx.history)) if use_profile else None
        if inp.messages is not None:
            turn = last_user_turn(inp.messages)
            query = inp.messages[turn]["content"] if turn is not None else None
        else:
            assert inp.prompt is not None
            query = inp.prompt

        def build(item: str | None) -> list[int]:
            if inp.messages is not None:
                return chat_prompt(self.tokenizer, with_history_item(inp.messages, item))
            content = user_content(inp.prompt, item)
            if inp.chat_template and getattr(self.tokenizer, "chat_template", None):
                if item is not None and (ids := self._splicer.ids(inp.prompt, item)) is not None:
                    return ids  # the item's tokens from the last time it was used
                return chat_prompt(self.tokenizer, [{"role": "user", "content": content}])
            return list(self.tokenizer(content, add_special_tokens=True)["input_ids"])

        if index is None or not index.history or query is None:
            return build(None)
        top = index.top1_index(query)
        assert top is not None  # the index has history
        item = index.cut(top, self.tokenizer, self.settings.max_history_tokens)
        ids = build(item or None)
        room = self.settings.max_model_len - max_tokens
        while len(ids) > room and item:  # the item shrinks strictly each round
            keep = count_tokens(self.tokenizer, item) - (len(ids) - room)
            item = truncate_tokens(self.tokenizer, item, keep)
            ids = build(item or None)
        return ids

    def _check_limits(self, inp: GenerationInput) -> int:
        s = self.settings
        chars = len(inp.prompt or "") + sum(len(m.get("content") or "") for m in inp.messages or [])
        if chars > s.max_prompt_chars:
            raise InvalidInput(f"prompt has {chars} characters > max_prompt_chars {s.max_prompt_chars}")
        max_tokens = inp.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens:
            raise InvalidInput(f"max_tokens {max_tokens} > the server's limit {s.max_tokens}")
        if inp.min_tokens > max_tokens:
            raise InvalidInput(f"min_tokens {inp.min_tokens} > max_tokens {max_tokens}")
        return max_tokens

    def _sampling_params(self, inp: GenerationInput, max_tokens: int, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                max_tokens=max_tokens,
                min_tokens=inp.min_tokens,
                temperature=inp.temperature,
                top_p=inp.top_p if inp.temperature > 0 else 1.0,
                stop=inp.stop or None,
                seed=inp.seed,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMValidationError as e:  # bad input the API schema let through: a 422, not a 500
            raise InvalidInput(f"invalid sampling parameters: {e}") from e

    async def stream(self, inp: GenerationInput, *, stream: bool = True) -> AsyncIterator[tuple[GenerationResult, Completion | None]]:
        """Yield (result so far, delta) per engine step, then (final result, None).

        The user's adapter lease is held for the life of this generator, so a bank reload or a
        cache eviction never deletes an adapter that a running request still needs.
        """
        started = time.perf_counter()
        max_tokens = self._check_limits(inp)
        if inp.user_id is None:
            ctx = UserContext(None, self.personalizer.banks.current, None, None, [])  # type: ignore[arg-type]
        else:
            ctx = await self.personalizer.context(inp.user_id)
        prompt_ids = await self.prompt_ids(inp, ctx, max_tokens)
        if len(prompt_ids) + max_tokens > self.settings.max_model_len:
            raise InvalidInput(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len"
                f" {self.settings.max_model_len}"
            )
        params = self._sampling_params(inp, max_tokens, stream)
        async with self.personalizer.adapter(ctx) as lease:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(f"mta-{lease.lora_int_id}", lease.lora_int_id, lease.path) if lease else None
            result = GenerationResult(f"gen-{uuid.uuid4().hex}", ctx, lease, len(prompt_ids))
            result.overhead_seconds = time.perf_counter() - started
            kind = "base" if lease is None or ctx.plan is None else "hit" if lease.cache_hit else "miss"
            self.metrics.overhead_seconds.labels(adapter=kind).observe(result.overhead_seconds)
            # Closed (the engine aborts the request) before the lease ends: once the lease ends the
            # adapter may be deleted and unloaded, which a request still in the engine must not see.
            async with aclosing(self.engine.generate(prompt_ids, params, result.request_id, lora)) as deltas:
                async for delta in deltas:
                    result.text += delta.text
                    result.token_ids += delta.token_ids
                    result.finish_reason = delta.finish_reason
                    yield result, delta
        self.metrics.generated_tokens.labels(personalized=str(ctx.personalized).lower()).inc(len(result.token_ids))
        yield result, None

    async def generate(self, inp: GenerationInput) -> GenerationResult:
        result = None
        async for result, _ in self.stream(inp, stream=False):
            pass
        assert result is not None
        return result

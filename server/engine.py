"""The vLLM engine: AsyncLLM embedded in the API process, one LoRARequest per request."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.engine_args import EngineSpec, LoraSlots, served_dtype
from server.errors import Unavailable

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from server.settings import Settings

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine could not start; the server exits with this message."""


@dataclass(frozen=True)
class Completion:
    """One step of a generation: new text and ids since the previous step (or all, when not streaming)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int


class Engine:
    def __init__(self, settings: Settings, model_path: Path, model_id: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self.model_id = model_id
        self._llm = None
        self.lora_path: str | None = None  # which LoRA ops the engine runs (`server.lora_ops.LORA_PATHS`)
        self.lora_path_note: str | None = None  # why the fast ops are not used although asked for
        self.lora_slots: LoraSlots | None = None

    def start(self) -> None:
        """Start vLLM (its engine core runs in a subprocess); raise EngineStartError with the reason."""
        from server.lora_ops import prepare_lora_path, unavailable
        from server.lora_ops.kernel import KernelBuildError

        s = self.settings
        os.environ["MTA_FAST_CPU_LORA_OPS"] = "1" if s.fast_cpu_lora_ops else "0"
        try:  # built here, once: the engine's processes then load it from torch's extensions cache
            self.lora_path = prepare_lora_path(s.device, served_dtype(s, self.model_path), s.fast_cpu_lora_ops)
        except KernelBuildError as e:
            raise EngineStartError(str(e)) from e
        if s.device == "cpu" and s.fast_cpu_lora_ops and (note := unavailable()) is not None:
            self.lora_path_note = note
            log.warning("LoRA path: %s (%s)", self.lora_path, note)
        else:
            log.info("LoRA path: %s", self.lora_path)
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            self.lora_slots = LoraSlots.from_settings(s, self.model_path)
            log.info("LoRA slots: %d (%s)", self.lora_slots.max_loras, self.lora_slots.chosen_by)
            args = EngineSpec.from_settings(s, self.model_path, self.model_id).async_engine_args()
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot serve"
            raise EngineStartError(f"vLLM engine failed to start for model {self.model_path}: {e!r}") from e

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        lora: LoRARequest | None,
    ) -> AsyncIterator[Completion]:
        """Yield completions; with `params.output_kind == DELTA` each carries only the new part."""
        if not self.ready:
            raise Unavailable("the generation engine is not running")
        from vllm.inputs import TokensPrompt

        from vllm.v1.engine.exceptions import EngineDeadError

        assert self._llm is not None
        outputs = self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora)
        try:
            async with aclosing(outputs):  # closed early (a client went away): vLLM aborts the request now
                async for out in outputs:
                    choice = out.outputs[0]
                    yield Completion(
                        text=choice.text,
                        token_ids=list(choice.token_ids),
                        finish_reason=choice.finish_reason,
                        prompt_tokens=len(out.prompt_token_ids or prompt_ids),
                    )
        except EngineDeadError as e:  # the watchdog (`watch`) then stops the server for its supervisor
            raise Unavailable(f"the generation engine died: {e}") from e

    async def watch(self, on_death: Callable[[], None], interval: float = 0.5) -> None:
        """Call `on_death` once when the engine has died: vLLM never restarts a dead engine core,
        so without a new process every later request would fail."""
        while self.ready:
            await asyncio.sleep(interval)
        if self._llm is not None:  # not a shutdown
            log.critical("the vLLM engine died; stopping the server so that its supervisor restarts it")
            on_death()

    async def remove_lora(self, lora_int_id: int) -> None:
        """Drop an adapter whose files the adapter cache deleted: on CPU vLLM keeps the files of the
        adapters it holds memory-mapped, so their tmpfs space is freed only now. Best effort."""
        if self._llm is None:
            return
        try:
            await self._llm.remove_lora(lora_int_id)
        except Exception as e:  # noqa: BLE001 - a dead engine holds nothing; the watchdog handles it
            log.debug("cannot remove LoRA %d from the engine: %s", lora_int_id, e)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

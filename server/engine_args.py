"""vLLM engine arguments, built in one place for the server, `mta eval` and the benchmarks.

Every engine of this project serves LoRA the same way (multi-LoRA on, stats off, the CPU LoRA
path of `server.lora_ops` chosen by the environment); only sizes differ. One factory means a
vLLM upgrade that renames or changes an argument is met once, and the evaluation measures the
engine the server runs. vLLM's CPU backend takes two sizes from the environment instead of its
arguments (KV cache space, thread binding): the factory sets those too, unless the caller has.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.settings import Settings


@dataclass(frozen=True)
class EngineSpec:
    model: str
    dtype: str = "bfloat16"
    seed: int = 0
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: vLLM's default (max_loras)
    served_model_name: str | None = None
    # On the CPU only a start-up check (RAM that must be free); the KV cache is VLLM_CPU_KVCACHE_SPACE.
    gpu_memory_utilization: float = 0.3
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    # Read by vLLM from the environment (not engine arguments), on the CPU only:
    cpu_kvcache_space_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND; "nobind" on a shared machine; None: vLLM's

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path | str, model_id: str) -> EngineSpec:
        """The server's engine, as `Settings` (MTA_*) size it."""
        return cls(
            model=str(model_path),
            served_model_name=model_id,
            dtype=settings.dtype,
            seed=settings.engine_seed,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.resolved_max_cpu_loras,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            cpu_kvcache_space_gb=settings.cpu_kvcache_space_gb,
        )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `vllm.LLM` and `vllm.engine.arg_utils.(Async)EngineArgs`."""
        args = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k not in _ENVIRONMENT}
        return {**args, "enable_lora": True, "disable_log_stats": True}

    def environment(self) -> dict[str, str]:
        """What vLLM reads from the environment; a variable already set (by the operator) wins."""
        wanted = {name: getattr(self, field) for field, name in _ENVIRONMENT.items() if getattr(self, field) is not None}
        return {name: os.environ.get(name, str(value)) for name, value in wanted.items()}

    def offline_llm(self) -> Any:
        """A `vllm.LLM` (the evaluation's and benchmarks' batch engine)."""
        from vllm import LLM

        os.environ.update(self.environment())  # before the engine core process starts
        return LLM(**self.kwargs())

    def async_engine_args(self) -> Any:
        """`AsyncEngineArgs` for the server's `AsyncLLM` (whose engine core starts next)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        os.environ.update(self.environment())
        return AsyncEngineArgs(**self.kwargs())


_ENVIRONMENT = {"cpu_kvcache_space_gb": "VLLM_CPU_KVCACHE_SPACE", "cpu_threads_bind": "VLLM_CPU_OMP_THREADS_BIND"}

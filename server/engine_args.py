"""vLLM engine arguments, built in one place for the server, `mta eval` and the benchmarks.

Every engine of this project serves LoRA the same way (multi-LoRA on, stats off, the CPU LoRA
path of `server.lora_ops` chosen by the environment); only sizes differ. One factory means a
vLLM upgrade that renames or changes an argument is met once, and the evaluation measures the
engine the server runs. vLLM's CPU backend takes two sizes from the environment instead of its
arguments (KV cache space, thread binding): the factory sets those too, unless the caller has.

The LoRA slots (`max_loras`: distinct adapters one engine step batches) are sized from a memory
budget unless set: vLLM preallocates every slot at full `max_lora_rank` for every linear layer
of the model, so what a slot costs is known from the checkpoint before the engine starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters.targets import ModelTargets
from server.settings import Settings


def served_dtype(settings: Settings, model_path: Path) -> str:
    """The dtype vLLM serves in: the setting, or for `auto` the model's own."""
    if settings.dtype != "auto":
        return settings.dtype
    config = json.loads((Path(model_path) / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


@dataclass(frozen=True)
class LoraSlots:
    """vLLM's LoRA sizes as the server chose them, and why (shown in /readyz)."""

    max_loras: int
    max_cpu_loras: int
    slot_bytes: int | None  # None: MTA_MAX_LORAS was set, nothing was sized
    chosen_by: str

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path | str, targets: ModelTargets | None = None) -> LoraSlots:
        """MTA_MAX_LORAS if set, else as many slots as MTA_LORA_MEMORY_MB holds (1..max_num_seqs).

        A slot holds rank `max_lora_rank` A and B for every decoder linear layer, in the served
        dtype; the CPU's grouped LoRA ops keep a packed copy of every slot (docs/performance.md),
        so a slot costs twice that there.
        """
        if settings.max_loras is not None:
            n, slot, why = settings.max_loras, None, "MTA_MAX_LORAS"
        else:
            targets = targets or ModelTargets.from_checkpoint(Path(model_path))
            width = 4 if served_dtype(settings, Path(model_path)) == "float32" else 2
            copies = 2 if settings.device == "cpu" and settings.fast_cpu_lora_ops else 1
            slot = copies * width * settings.max_lora_rank * sum(i + o for i, o in targets.linears.values())
            budget = settings.lora_memory_mb * 2**20
            n = max(1, min(settings.max_num_seqs, budget // slot))
            why = f"MTA_LORA_MEMORY_MB={settings.lora_memory_mb} / {slot / 2**20:.1f} MiB per slot"
            if n == settings.max_num_seqs:
                why += " (capped at MTA_MAX_NUM_SEQS)"
        return cls(n, settings.max_cpu_loras or 4 * n, slot, why)


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
        slots = LoraSlots.from_settings(settings, model_path)
        return cls(
            model=str(model_path),
            served_model_name=model_id,
            dtype=settings.dtype,
            seed=settings.engine_seed,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_loras=slots.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=slots.max_cpu_loras,
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

"""Fast multi-LoRA ops for vLLM's CPU path, installed by a vLLM plugin (see `plugin`)."""

from __future__ import annotations

LORA_PATHS = ("kernel", "grouped-ops", "stock")


def prepare_lora_path(device: str, dtype: str, fast_ops: bool) -> str:
    """Build the kernel if this configuration uses it, and name the LoRA path the engine runs.

    - `kernel`: our grouped ops with the C++ decode kernel (CPU, bf16, kernel built);
    - `grouped-ops`: our grouped ops on torch products (CPU, no kernel here or not bf16);
    - `stock`: vLLM's own ops (on GPU, or `MTA_FAST_CPU_LORA_OPS=0`).
    Raises `kernel.KernelBuildError` when the kernel should build here and does not.
    """
    if device != "cpu" or not fast_ops:
        return "stock"
    from server.lora_ops import kernel

    if dtype == "bfloat16" and kernel.build(strict=True) is not None:
        return "kernel"
    return "grouped-ops"

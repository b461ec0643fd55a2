"""Fast multi-LoRA ops for vLLM's CPU path, selected through a vLLM platform plugin (see `plugin`)."""

from __future__ import annotations

import os

LORA_PATHS = ("kernel", "grouped-ops", "stock")
# The vLLM release series the ops are written against and tested with (pyproject pins 0.32.0):
# they replace parts of its CPU punica wrapper, which another release may change silently.
TESTED_VLLM_SERIES = "0.32."


def untested_vllm() -> str | None:
    """Why the ops must stay out of the installed vLLM (an untested release), or None."""
    import vllm

    if vllm.__version__.startswith(TESTED_VLLM_SERIES):
        return None
    return f"vLLM {vllm.__version__} is untested (the ops are tested on {TESTED_VLLM_SERIES}x): vLLM's own ops run"


def unavailable() -> str | None:
    """Why vLLM's own ops run although ours are asked for: an untested release, or
    VLLM_TARGET_DEVICE=cpu, with which vLLM skips platform plugins. None: ours run."""
    if (why := untested_vllm()) is not None:
        return why
    if os.environ.get("VLLM_TARGET_DEVICE", "").strip().lower() == "cpu":
        return "VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins, so vLLM's own ops run (unset it)"
    return None


def prepare_lora_path(device: str, dtype: str, fast_ops: bool) -> str:
    """Build the kernel if this configuration uses it, and name the LoRA path the engine runs.

    - `kernel`: our grouped ops with the C++ decode kernel (CPU, bf16, kernel built);
    - `grouped-ops`: our grouped ops on torch products (CPU, no kernel here or not bf16);
    - `stock`: vLLM's own ops (on GPU, `MTA_FAST_CPU_LORA_OPS=0`, or `unavailable()`).
    Raises `kernel.KernelBuildError` when the kernel should build here and does not.
    """
    if device != "cpu" or not fast_ops or unavailable() is not None:
        return "stock"
    from server.lora_ops import kernel

    if dtype == "bfloat16" and kernel.build(strict=True) is not None:
        return "kernel"
    return "grouped-ops"

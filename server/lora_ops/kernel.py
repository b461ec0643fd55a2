"""Optional C++ kernel (`gemv.cpp`) for the one-token-per-adapter products of decode steps.

With many adapters, a decode step gives each adapter one token: a batched matrix-vector
product, for which torch's bf16 `bmm` reads the weights at 5-9 GB/s on the benchmark CPU;
the kernel reads them at about twice that (the step is memory-bound: every adapter's
weights are read once). It needs AVX512-BF16 and a C++ compiler; it is compiled with
`torch.utils.cpp_extension` on first use (30-60 s the first time on a machine, then cached
in torch's extensions directory), before that step runs; if it cannot be built, the ops use
`bmm`.

`MTA_LORA_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ENV = "MTA_LORA_CPU_KERNEL"
SOURCE = Path(__file__).with_name("gemv.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]

log = logging.getLogger("vllm.mta_lora_ops")

_module: ModuleType | None = None
_started = False
_lock = threading.Lock()


def _cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags and "avx512bw" in flags and "avx512vl" in flags


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"} and _cpu_supported()


def build() -> ModuleType | None:
    """Compile (or load the cached build) now; None if it cannot be built."""
    global _module
    if _module is None and enabled():
        from torch.utils.cpp_extension import load

        log.info("MTA LoRA decode kernel: building or loading it (the first build on a machine takes 30-60 s)")
        try:
            _module = load("mta_lora_gemv", [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
            log.info("MTA LoRA decode kernel ready (pid %d)", os.getpid())
        except Exception as e:  # noqa: BLE001  (no compiler, headers, ...: any failure means bmm)
            log.warning("MTA LoRA decode kernel unavailable, using torch.bmm: %s", e)
    return _module


def get() -> ModuleType | None:
    """The kernel, built (or loaded from torch's cache) on the first call; None if it cannot be.

    Built synchronously, so a process uses one code path from its first LoRA step on: the
    kernel's bf16 sums differ from `bmm`'s in rounding, and a switch mid-run would change
    greedy outputs.
    """
    global _started
    if not _started:
        with _lock:
            if not _started:
                build()
            _started = True
    return _module


def supports(x: Tensor, weights: Tensor, dst: Tensor) -> bool:
    """Whether the kernel computes x @ weights[s, :out].T into dst (bf16 operands, row-contiguous)."""
    if x.dtype != torch.bfloat16 or weights.dtype != torch.bfloat16 or dst.dtype not in (torch.bfloat16, torch.float32):
        return False
    if x.stride(1) != 1 or weights.stride(2) != 1 or dst.stride(1) != 1:
        return False
    k = x.shape[1]
    return k % 32 == 0 or (k == 16 and weights.stride(1) == 16 and dst.shape[1] % 2 == 0)


def gemv(
    module: ModuleType,
    x: Tensor,
    weights: Tensor,
    rows: Tensor,
    slots: Tensor,
    dst: Tensor,
    scale: float,
    accumulate: bool,
) -> None:
    """dst[rows[j]] (+)= scale * x[rows[j]] @ weights[slots[j], :out].T, summed in float32 and rounded once."""
    module.gemv(x, weights, rows, slots, dst, scale, accumulate)

"""Optional C++ kernel (`gemv.cpp`) for decode steps.

- `lora_linear`: a whole LoRA linear layer (every slice's shrink and expand) for the listed
  tokens in one call, from a packed copy of the layer's weights (`PackedWeights`): one
  sequential read per token, in huge pages. vLLM calls `add_lora_linear` 4 times per layer;
  per call, the torch path's Python and its 2-4 small oneDNN products cost more than the
  arithmetic (see docs/performance.md).
- `gemv`: the one-token-per-adapter products of the six ops. With many adapters, a decode
  step gives each adapter one token: a batched matrix-vector product, for which torch's bf16
  `bmm` reads the weights at 5-9 GB/s on the benchmark CPU; the kernel reads them at about
  twice that (the step is memory-bound: every adapter's weights are read once).

It needs AVX512-BF16 and a C++ compiler; it is compiled with `torch.utils.cpp_extension`
by `mta model prepare` (so by `make run` and in the CPU image) and again, from torch's
extensions cache, when the server starts its engine (`build(strict=True)`). Without
AVX512-BF16 or without a compiler the ops use `bmm`; a compiler that fails is an error, not
a silent fallback to a slower path.

`MTA_LORA_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

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


class KernelBuildError(RuntimeError):
    """The CPU supports the kernel and a compiler is installed, yet the kernel did not build."""


def compiler() -> str | None:
    """The C++ compiler torch's extension builder will run (`CXX`, else `c++`), if installed."""
    return shutil.which(os.environ.get("CXX", "c++"))


def build(*, strict: bool = False) -> ModuleType | None:
    """Compile (or load the cached build) now; None if it cannot be built.

    strict: raise KernelBuildError when it should build here (supported CPU, a compiler) but
    does not, instead of falling back to `bmm`.
    """
    global _module
    if _module is None and enabled():
        from torch.utils.cpp_extension import load

        log.info("MTA LoRA decode kernel: building or loading it (the first build on a machine takes 30-60 s)")
        try:
            _module = load("mta_lora_gemv", [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
            log.info("MTA LoRA decode kernel ready (pid %d)", os.getpid())
        except Exception as e:  # noqa: BLE001  (no compiler, headers, ...)
            if strict and compiler() is not None:
                raise KernelBuildError(f"the MTA LoRA decode kernel failed to build with {compiler()}: {e}") from e
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


def supports_linear(x: Tensor, y: Tensor, lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...]) -> bool:
    """Whether `lora_linear` can do this layer (bf16 throughout, contiguous rows, input width % 32, rank 16 or % 32)."""
    a, b = lora_a[0], lora_b[0]
    if not x.dtype == y.dtype == a.dtype == b.dtype == torch.bfloat16:
        return False
    if x.stride(-1) != 1 or y.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        return False
    r = a.shape[-2]
    return x.shape[-1] % 32 == 0 and (r == 16 or r % 32 == 0)


def lora_linear(
    module: ModuleType,
    x: Tensor,
    y: Tensor,
    lora_a: tuple[Tensor, ...],
    lora_b: tuple[Tensor, ...],
    output_slices: tuple[int, ...],
    plan: Any,
    scale: float,
    paired: bool,
) -> None:
    """y[t, slice i] += bf16(scale * x[t] @ A_i[s].T) @ B_i[s].T for the plan's tokens t with slot s.

    One call for a whole layer: both products of every slice, float32 sums rounded once each
    (the middle one to bf16, as the LoRA buffer of 16-bit models). With `paired`, `lora_b` is
    B pair-interleaved (`pair_b`), which the kernel reads without horizontal sums.
    """
    module.lora_linear(x, y, lora_a, lora_b, output_slices, plan.token_rows, plan.token_slots, scale, paired)


PAIR_TILE = 64  # outputs per tile of `pair_b` (gemv.cpp reads full tiles 64 outputs at a time)


def pair_b(lora_b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """B for `lora_linear(paired=True)`: [slots, (1,) out, r] -> [slots, out * r], pair-interleaved in tiles.

    Tile t (outputs 64t .. 64t + w - 1, w = min(64, out - 64t)) is [r/2, w, 2] with element
    (p, o, e) = B[s, 64t + o, 2p + e]: for each pair of k, the outputs side by side, so one
    dot product gives 16 outputs, and a tile is read in memory order.
    """
    paired = []
    for b in lora_b:
        slots, out, r = b.shape[0], b.shape[-2], b.shape[-1]
        b = b.reshape(slots, out, r // 2, 2)
        full = out - out % PAIR_TILE
        tiles = [b[:, :full].reshape(slots, full // PAIR_TILE, PAIR_TILE, r // 2, 2).permute(0, 1, 3, 2, 4)]
        if full < out:
            tiles.append(b[:, full:].permute(0, 2, 1, 3))
        paired.append(torch.cat([t.reshape(slots, -1) for t in tiles], dim=1))
    return tuple(paired)


ARENA_CHUNK = 64 << 20  # bytes per buffer of `_Arena`


class _Arena:
    """Bump allocation from large buffers advised for huge pages (a buffer lives while any view of it does).

    vLLM allocates each layer's LoRA weights on their own (0.5-2 MB, 4 KiB pages); the decode
    kernel reads them faster from 2 MiB pages (SmolLM2, 32 adapters: 13.7 against 18.4 ms a step).
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._used = 0

    def take(self, module: ModuleType, numel: int, dtype: torch.dtype) -> Tensor:
        nbytes = numel * dtype.itemsize
        if self._buffer is None or self._used + nbytes > self._buffer.numel():
            self._buffer = torch.empty(max(ARENA_CHUNK, nbytes), dtype=torch.uint8)
            module.advise_huge_pages(self._buffer)  # before the first write, which maps the pages
            self._used = 0
        view = self._buffer[self._used : self._used + nbytes].view(dtype)
        self._used += -(-nbytes // 4096) * 4096
        return view


class _PackedEntry:
    def __init__(self, refs: list[weakref.ref], a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> None:
        self.refs, self.a, self.b = refs, a, b
        self.versions: tuple[int, ...] | None = None


class PackedWeights:
    """Each layer's LoRA weights for `lora_linear(paired=True)`, one block per slot, refreshed when vLLM writes.

    A slot's block holds A of every slice ([r, in] each), then B of every slice
    pair-interleaved (`pair_b`), so a token's weights are one sequential read. The copy is
    made on first use and rewritten in place whenever vLLM writes a slot (`set_lora` and
    `reset_lora` write in place, which bumps the tensors' version counters). It doubles the
    memory of the LoRA linear weights.
    """

    def __init__(self) -> None:
        self._arena = _Arena()
        self._entries: dict[tuple[int, ...], _PackedEntry] = {}

    def get(
        self, module: ModuleType, lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None:
        """(A views, paired B views) of the current weights; None for tensors without a version counter."""
        sources = (*lora_a, *lora_b)
        try:
            versions = tuple(t._version for t in sources)
        except RuntimeError:  # inference tensors: their updates cannot be seen
            return None
        key = tuple(map(id, sources))
        entry = self._entries.get(key)
        if entry is None or not all(r() is t for r, t in zip(entry.refs, sources)):
            entry = self._create(module, key, lora_a, lora_b)
        if entry.versions != versions:
            for src, dst in zip(lora_a, entry.a):
                dst.copy_(src.reshape(dst.shape))
            for src, dst in zip(pair_b(lora_b), entry.b):
                dst.copy_(src)
            entry.versions = versions
        return entry.a, entry.b

    def _create(
        self, module: ModuleType, key: tuple[int, ...], lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...]
    ) -> _PackedEntry:
        slots, r, width = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
        sizes = [r * width] * len(lora_a) + [b.shape[-2] * r for b in lora_b]
        block = sum(sizes)
        packed = self._arena.take(module, slots * block, lora_a[0].dtype).view(slots, block)
        views = []
        offset = 0
        for size in sizes:
            views.append(packed[:, offset : offset + size])
            offset += size
        a = tuple(v.unflatten(1, (r, width)) for v in views[: len(lora_a)])
        drop = lambda _ref, key=key: self._entries.pop(key, None)  # forget freed layers
        entry = _PackedEntry([weakref.ref(t, drop) for t in (*lora_a, *lora_b)], a, tuple(views[len(lora_a) :]))
        self._entries[key] = entry
        return entry


packed = PackedWeights()

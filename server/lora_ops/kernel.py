"""Optional C++ kernel (`gemv.cpp`) for decode steps.

- `lora_linear_packed`: a whole LoRA linear layer (every slice's shrink and expand) for the
  listed tokens in one call, from a packed copy of the layer's weights (`PackedWeights`): one
  sequential read per token of only the rank its slot uses, in huge pages (`lora_linear`: the
  same from vLLM's tensors, where no copy can be kept). vLLM calls `add_lora_linear` 4 times per layer;
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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

ENV = "MTA_LORA_CPU_KERNEL"
SOURCE = Path(__file__).with_name("gemv.cpp")
# -fopenmp: `at::parallel_for` (torch's intra-op threads, the libgomp torch loads) splits a layer's tokens.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]

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
            _module = load("mta_lora_gemv", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
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
) -> None:
    """y[t, slice i] += bf16(scale * x[t] @ A_i[s].T) @ B_i[s].T for the plan's tokens t with slot s.

    One call for a whole layer: both products of every slice, float32 sums rounded once each
    (the middle one to bf16, as the LoRA buffer of 16-bit models), from vLLM's own tensors.
    """
    module.lora_linear(x, y, lora_a, lora_b, output_slices, plan.token_rows, plan.token_slots, scale)


def lora_linear_packed(
    module: ModuleType, x: Tensor, y: Tensor, layer: PackedLayer, output_slices: tuple[int, ...], plan: Any, scale: float
) -> None:
    """`lora_linear` from the layer's packed copy (`PackedWeights`): each token reads only its
    slot's used rank of weights, in one sequential run, so a rank-8 adapter in a rank-16 slot
    costs half the memory traffic of a decode step. The same sums, so the same result."""
    if tuple(output_slices) != layer.outs:
        raise ValueError(f"packed for slices {layer.outs}, called with {tuple(output_slices)}")
    module.lora_linear_packed(x, y, layer.block, output_slices, plan.token_rows, plan.token_slots, scale, layer.ranks)


def slot_ranks(lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...]) -> Tensor:
    """Per slot, 1 + the last rank index with a nonzero row of some A or column of some B (0: empty slot).

    vLLM writes an adapter of rank k into the first k rows of A and columns of B of a slot of
    rank `max_lora_rank` and zeroes the rest; the rest then contributes exact zeros.
    """
    used = torch.zeros(lora_a[0].shape[0], lora_a[0].shape[-2], dtype=torch.bool)
    for a in lora_a:  # [slots, (1,) r, in]
        used |= a.reshape(a.shape[0], a.shape[-2], -1).ne(0).any(dim=-1)
    for b in lora_b:  # [slots, (1,) out, r]
        used |= b.reshape(b.shape[0], -1, b.shape[-1]).ne(0).any(dim=-2)
    positions = torch.arange(1, used.shape[1] + 1)
    return (used * positions).amax(dim=1).to(torch.int64).contiguous()


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


@dataclass
class PackedLayer:
    """One layer's LoRA weights as `lora_linear_packed` reads them."""

    block: Tensor  # [slots, r * (slices * in + sum(outs))], bf16, in huge pages
    ranks: Tensor  # [slots] int64: each slot's used rank (`slot_ranks`)
    outs: tuple[int, ...]  # the slices' output sizes


class _PackedEntry:
    def __init__(self, refs: list[weakref.ref], layer: PackedLayer) -> None:
        self.refs, self.layer = refs, layer
        self.versions: tuple[int, ...] | None = None
        self.slot_ids: tuple[int | None, ...] | None = None  # the adapter in each slot when last packed


def pack_slots(lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...], k: int) -> Tensor:
    """Slots' weights at rank k as `lora_linear_packed` reads them: [slots, k * (slices * in + sum(outs))].

    Every slice's A[:k] ([k, in]), then every slice's B[:, :k] paired (`pair_b`).
    """
    slots = lora_a[0].shape[0]
    parts = [a.reshape(slots, a.shape[-2], a.shape[-1])[:, :k].reshape(slots, -1) for a in lora_a]
    parts += pair_b(tuple(b[..., :k] for b in lora_b))
    return torch.cat(parts, dim=1)


class PackedWeights:
    """Each layer's LoRA weights for `lora_linear_packed`, one block per slot, refreshed when vLLM writes.

    The copy is made on first use and rewritten whenever vLLM writes a slot (`set_lora` and
    `reset_lora` write in place, which bumps the tensors' version counters). Only the slots
    whose adapter changed are repacked when the caller says which adapter each slot holds
    (`slot_ids`, vLLM's `lora_index_to_id`; adapter ids are never reused for other weights), so
    loading one adapter costs one slot's copy, not the whole layer's (SmolLM2, 32 slots: about
    20 against 700 ms); without it, or when no slot's adapter changed, every slot is.
    A slot is packed at its used rank k rounded up to even (`slot_ranks`: vLLM pads an adapter
    of lower rank with zeros; `pack_slots`), so a token's weights are one sequential read of
    only what it uses. It doubles the memory of the LoRA linear weights.
    """

    def __init__(self) -> None:
        self._arena = _Arena()
        self._entries: dict[tuple[int, ...], _PackedEntry] = {}
        self.slots_packed = 0  # for tests and profiles

    def get(
        self,
        module: ModuleType,
        lora_a: tuple[Tensor, ...],
        lora_b: tuple[Tensor, ...],
        slot_ids: tuple[int | None, ...] | None = None,
    ) -> PackedLayer | None:
        """The current weights, packed; None for tensors without a version counter."""
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
            slots = lora_a[0].shape[0]
            changed = list(range(slots))
            if slot_ids is not None and entry.slot_ids is not None and len(slot_ids) == len(entry.slot_ids) == slots:
                changed = [s for s in changed if slot_ids[s] != entry.slot_ids[s]] or changed
            self._pack(entry.layer, lora_a, lora_b, torch.tensor(changed))
            entry.versions, entry.slot_ids = versions, slot_ids
        return entry.layer

    def _pack(self, layer: PackedLayer, lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...], slots: Tensor) -> None:
        a = tuple(t.index_select(0, slots) for t in lora_a)  # the slots' weights, copied once
        b = tuple(t.index_select(0, slots) for t in lora_b)
        ranks = slot_ranks(a, b)
        layer.ranks[slots] = ranks
        layout = ranks + ranks % 2
        for k in layout.unique().tolist():
            if k:
                same = layout == k  # usually every slot: then no second copy
                pick = (lambda ts: ts) if bool(same.all()) else (lambda ts: tuple(t[same] for t in ts))  # noqa: B023
                rows = pack_slots(pick(a), pick(b), k)
                layer.block[slots[same], : rows.shape[1]] = rows
        self.slots_packed += len(slots)

    def _create(
        self, module: ModuleType, key: tuple[int, ...], lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...]
    ) -> _PackedEntry:
        slots, r, width = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
        outs = tuple(b.shape[-2] for b in lora_b)
        numel = r * (len(lora_a) * width + sum(outs))
        block = self._arena.take(module, slots * numel, lora_a[0].dtype).view(slots, numel)
        layer = PackedLayer(block, torch.zeros(slots, dtype=torch.int64), outs)
        drop = lambda _ref, key=key: self._entries.pop(key, None)  # forget freed layers
        entry = _PackedEntry([weakref.ref(t, drop) for t in (*lora_a, *lora_b)], layer)
        self._entries[key] = entry
        return entry


packed = PackedWeights()

"""`MtaPunicaWrapperCPU`: vLLM's CPU punica wrapper on the project's ops.

vLLM's LoRA layers call a punica wrapper, which the platform names (`cpu_platform`). This
subclass of vLLM's `PunicaWrapperCPU` runs the grouped ops of `ops` where vLLM's calls its
per-slice torch ops, and does two whole-layer methods with less work. vLLM's calls one op per
slice and direction (qkv: 3 shrinks and 3 expands), each through several Python layers, and
always runs the LM-head (logits) LoRA, even when no loaded adapter has LM-head weights. Ours
keep vLLM's semantics:

- `add_lora_linear`: for decode steps (and prompts of many adapters, see `ops._Plan`) of a
  bf16 model, one call of the C++ kernel for the whole layer (`kernel.lora_linear_packed`:
  every shrink and expand, per token, from a packed copy of the weights that holds only the
  rank each slot's adapter uses). Otherwise one shrink for
  all slices of a layer (their A matrices concatenated once per weight update, see
  `_derived`) and a 16-bit LoRA buffer for 16-bit models (vLLM's is float32, but its expand
  casts it back to the 16-bit dtype first, and our shrink computes 16-bit products anyway:
  the result is the same). The step's plan is kept on the wrapper until vLLM updates its
  metadata.
- `add_lora_logits`: tokens whose slot has no LM-head weights (an all-zero A, as vLLM
  leaves a slot whose adapter does not target the LM head) get no LM-head work; with no such
  token, nothing runs. Otherwise as vLLM, on the remaining tokens.

Derived tensors (the concatenated A, the slots with LM-head weights) are cached per source
tensor and recomputed when vLLM writes a slot: every in-place write bumps the tensor's
version counter (`Tensor._version`, shared by its views, which `set_lora`/`reset_lora`
write through).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from server.lora_ops import kernel
from server.lora_ops.ops import (
    _NARROW,
    OPS,
    _expand_slice,
    _Plan,
    _segment_plan,
    _shrink,
    _token_plan,
    bgmv_expand,
    bgmv_shrink,
)
from server.lora_ops.plugin import stats


class _Derived:
    """`fn(sources)` computed once per version of the source tensors (None if they have no version counter)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[list[weakref.ref], tuple[int, ...], Any]] = {}

    def get(self, sources: tuple[Tensor, ...], fn: Callable[[tuple[Tensor, ...]], Any]) -> Any:
        try:
            versions = tuple(t._version for t in sources)
        except RuntimeError:  # inference tensors carry no version counter: cannot tell when they change
            return None
        key = (id(fn), *map(id, sources))
        entry = self._entries.get(key)
        if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], sources)):
            return entry[2]
        value = fn(sources)
        drop = lambda _ref, key=key: self._entries.pop(key, None)  # forget freed tensors
        self._entries[key] = ([weakref.ref(t, drop) for t in sources], versions, value)
        return value


_derived = _Derived()


def _concat_a(lora_a_stacked: tuple[Tensor, ...]) -> Tensor:
    # [slots, (1,) r, in] per slice -> [slots, n*r, in]
    return torch.cat([a.squeeze(1) if a.dim() == 4 else a for a in lora_a_stacked], dim=1)


def _slots_with_weights(lora_a_stacked: tuple[Tensor, ...]) -> list[bool]:
    (a,) = lora_a_stacked
    return a.flatten(1).ne(0).any(dim=1).tolist()


def _metadata_key(wrapper: Any) -> tuple | None:
    """Identifies the wrapper's step metadata: vLLM rewrites its index tensors in place once per step.

    In-place writes bump a tensor's version counter, so the key changes whenever
    `update_metadata` runs. None when it cannot be told (no such attributes, inference tensors).
    """
    try:
        tensors = (wrapper._token_lora_indices, wrapper._seq_lengths, wrapper._lora_indices_per_batch)
        return (
            wrapper.is_prefill,
            wrapper.no_lora,
            wrapper.batch_size,
            wrapper.indices_len[0],
            *map(id, tensors),
            *(t._version for t in tensors),
        )
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def _layer_plan(wrapper: Any) -> _Plan | None:
    """The plan for the wrapper's current step (None: no token has an adapter in this prefill).

    Kept on the wrapper until its metadata changes: the step's 120+ layer calls (SmolLM2: 30
    layers x 4) then skip reading the index tensors back and looking the plan up.
    """
    key = _metadata_key(wrapper)
    cached = wrapper.__dict__.get(_PLAN_ATTR)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    plan = _step_plan(wrapper)
    if key is not None:
        wrapper.__dict__[_PLAN_ATTR] = (key, plan)
    return plan


_PLAN_ATTR = "_mta_lora_plan"


def _step_plan(wrapper: Any) -> _Plan | None:
    if not wrapper.is_prefill:
        return _token_plan(wrapper.token_lora_indices)
    if wrapper.no_lora:
        return None
    _starts, seq_lengths, lora_indices, *_ = wrapper.prefill_metadata
    return _segment_plan(seq_lengths, lora_indices)


class MtaPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's `PunicaWrapperCPU` with the project's ops (the platform plugin selects it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats = stats()
        self._slot_ids: tuple[int | None, ...] | None = None

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any) -> None:
        """vLLM's, keeping which adapter each slot holds: the packed weights then repack only the
        slots whose adapter changed (`kernel.PackedWeights`)."""
        self._slot_ids = tuple(lora_index_to_id)
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)

    def _op(self, name: str) -> Callable[..., Any]:
        self._stats.hit(name)
        return OPS[name]

    # vLLM's per-slice paths (`add_shrink`, `add_expand`, `add_lora_embedding`, and
    # `add_lora_linear` with buffers) call these: the same calls as vLLM's, on our ops.

    def _shrink_prefill(self, y: Tensor, x: Tensor, w_t_all: Tensor, scale: float) -> None:
        if not self.no_lora:
            self._op("sgmv_shrink")(x, w_t_all, y, *self.prefill_metadata, scale)

    def _shrink_decode(self, y: Tensor, x: Tensor, w_t_all: Tensor, scale: float) -> None:
        self._op("bgmv_shrink")(x, w_t_all, y, self.token_lora_indices, scale)

    def _expand_prefill(self, y: Tensor, x: Tensor, w_t_all: Tensor, add_inputs: bool) -> None:
        if not self.no_lora:
            self._op("sgmv_expand")(x, w_t_all, y, *self.prefill_metadata, add_inputs)

    def _expand_decode(self, y: Tensor, x: Tensor, w_t_all: Tensor, add_inputs: bool) -> None:
        self._op("bgmv_expand")(x, w_t_all, y, self.token_lora_indices, add_inputs)

    def _expand_slice_prefill(
        self, y: Tensor, x: Tensor, w_t_all: Tensor, y_offset: int, y_slice_size: int, add_inputs: bool
    ) -> None:
        if not self.no_lora:
            self._op("sgmv_expand_slice")(x, w_t_all, y, *self.prefill_metadata, y_offset, y_slice_size, add_inputs)

    def _expand_slice_decode(
        self, y: Tensor, x: Tensor, w_t_all: Tensor, y_offset: int, y_slice_size: int, add_inputs: bool
    ) -> None:
        self._op("bgmv_expand_slice")(x, w_t_all, y, self.token_lora_indices, y_offset, y_slice_size, add_inputs)

    def apply_lora_full_linear(
        self, y: Tensor, x: Tensor, weight_stacked: Tensor, bias_stacked: Tensor, module_enabled: Tensor
    ) -> None:
        adapter_y = torch.zeros((x.size(0), weight_stacked.size(-2)), dtype=torch.float32, device=x.device)
        self._op("bgmv_shrink")(x, weight_stacked, adapter_y, self.sampler_indices, 1.0)
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))

    # The whole-layer methods.

    def add_lora_linear(
        self,
        y: Tensor,
        x: Tensor,
        lora_a_stacked: tuple[Tensor, ...],
        lora_b_stacked: tuple[Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """y[:, slice i] += (x @ A_i[slot].T * scale) @ B_i[slot].T."""
        self._stats.hit("add_lora_linear")
        if buffer is not None:  # the caller reads the per-slice buffers: vLLM's way (on our per-slice ops)
            super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        plan = _layer_plan(self)
        if plan is None:
            return
        x = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if (
            plan.token_rows is not None
            and x.shape[0] == plan.num_tokens
            and kernel.supports_linear(x, y2, lora_a_stacked, lora_b_stacked)
            and (module := kernel.get()) is not None
        ):  # a decode step: the whole layer (every shrink and expand) in one native call
            if plan.token_rows.numel():
                if (packed := kernel.packed.get(module, lora_a_stacked, lora_b_stacked, self._slot_ids)) is not None:
                    kernel.lora_linear_packed(module, x, y2, packed, output_slices, plan, scale)
                else:
                    kernel.lora_linear(module, x, y2, lora_a_stacked, lora_b_stacked, output_slices, plan, scale)
            return
        r = lora_a_stacked[0].shape[-2]
        narrow = x.dtype in _NARROW and scale == 1.0 and all(a.dtype == x.dtype for a in lora_a_stacked)
        buf = x.new_empty(x.shape[0], r * len(lora_a_stacked), dtype=x.dtype if narrow else torch.float32)
        fused = lora_a_stacked[0] if len(lora_a_stacked) == 1 else _derived.get(lora_a_stacked, _concat_a)
        if fused is not None:
            _shrink(x, fused, buf, plan, scale)
        else:
            for i, a in enumerate(lora_a_stacked):
                _shrink(x, a, buf[:, i * r : (i + 1) * r], plan, scale)
        offset = 0
        for i, (b, size) in enumerate(zip(lora_b_stacked, output_slices)):
            _expand_slice(buf[:, i * r : (i + 1) * r], b, y2, plan, offset, size, add_inputs=True)
            offset += size

    def add_lora_logits(
        self,
        y: Tensor,
        x: Tensor,
        lora_a_stacked: Tensor,
        lora_b_stacked: Tensor,
        scale: float,
        *,
        buffer: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """vLLM's, skipping tokens whose slot has no LM-head weights."""
        self._stats.hit("add_lora_logits")
        indices = self.sampler_indices
        active = _derived.get((lora_a_stacked,), _slots_with_weights)
        if active is not None:
            wanted = indices.tolist()
            kept = [s if s >= 0 and active[s] else -1 for s in wanted]
            if all(s < 0 for s in kept):
                return
            if kept != wanted:
                indices = torch.tensor(kept, dtype=indices.dtype)
        y2 = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        bgmv_shrink(x, lora_a_stacked, buffer, indices, scale)
        bgmv_expand(buffer, lora_b_stacked, y2, indices, add_inputs=True)

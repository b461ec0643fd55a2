"""Multi-LoRA matrix products for vLLM's CPU path, grouped by adapter instead of per token.

Drop-in replacements for the six ops in `vllm.lora.ops.torch_ops` (same signatures, same
results). vLLM's versions gather a full copy of the adapter matrix for every token
(`weights[indices]`, [tokens, out, in]) and then do a per-token product. These do one matrix
product per run of tokens that share an adapter (prefill, or one adapter for the whole
batch), or, when there are many short runs (decode with many adapters), one batched product
over the tokens grouped by adapter slot and padded to the largest group.

Shared conventions (as in vLLM):
- `weights` is [num_slots, 1, out, in] or [num_slots, out, in]; `weights[s]` maps a token's
  `in` features to `out` features (x @ weights[s].T).
- Products are computed in the output's dtype (inputs and weights cast to it), with one
  exception: a shrink of 16-bit inputs by 16-bit weights of the same dtype into a float32
  output (vLLM's LoRA buffer) is computed in that 16-bit dtype (float32 accumulation) and
  then widened. vLLM computes it in float32, but the expand that reads the buffer casts it
  back to that 16-bit dtype first, so the layer's output is the same up to summation order;
  it avoids widening the weights on every call, the main cost of a float32 shrink on CPU.
  With float32 models (and tests) every product is float32 as in vLLM.
- A negative slot means "no adapter": the token gets a zero LoRA contribution. vLLM's torch
  ops index `weights[-1]` (the last slot) for it, which agrees while that slot is empty;
  vLLM's GPU kernels skip such tokens, as these ops do.
- sgmv ops describe tokens as consecutive segments: `seq_len_tensor[i]` tokens use slot
  `lora_indices_tensor[i]`; the other segment arguments are accepted and unused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Up to this many runs of same-slot tokens are done as one product per run (no rows are
# copied). More runs go to one batched product (fewer, larger ops: on a busy CPU each op
# costs far more than its arithmetic), unless padding the slot groups to the largest one
# would more than double the rows.
MAX_LOOP_RUNS = 2
MAX_PADDING_FACTOR = 2.0
_NARROW = (torch.bfloat16, torch.float16)


@dataclass
class _Layout:
    """Tokens grouped by slot for the batched product: G groups of m rows.

    Group g holds the tokens of slot `first_slot + g` (a contiguous slot range: the weights
    are read in place) or of `slots[g]` (weights gathered). Padded row p = g*m + k is the
    k-th token of group g and `gather[p]` (None: p) its row in x; padding repeats a real row.
    Without padding (`exact`), padded row p goes straight back to row `gather[p]`; otherwise
    adapted token `rows[j]` (None: j) takes padded row `place[j]`.
    """

    first_slot: int | None
    slots: Tensor | None  # [G] when the weights are gathered
    groups: int
    m: int
    gather: Tensor | None  # [G*m]
    exact: bool
    place: Tensor | None  # [T_adapted], only when not exact
    rows: Tensor | None  # [T_adapted], when not exact and some tokens have no adapter


@dataclass
class _Plan:
    """Which tokens use which slot, for one index pattern (shared by every layer of a step)."""

    num_tokens: int
    runs: list[tuple[int, int, int]]  # (slot, start, end): maximal runs of one slot; slot -1 = none
    slots: list[int]  # distinct slots >= 0, ascending
    has_unadapted: bool  # some token has a negative slot
    use_loop: bool  # one product per run; else one batched product
    _layout: _Layout | None = field(default=None, repr=False)

    def layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _make_layout(self)
        return self._layout


def _make_plan(run_slots: list[int], run_lengths: list[int]) -> _Plan:
    runs: list[tuple[int, int, int]] = []
    start = 0
    for slot, length in zip(run_slots, run_lengths):
        if length <= 0:
            continue
        slot = slot if slot >= 0 else -1
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], start + length)
        else:
            runs.append((slot, start, start + length))
        start += length
    counts: dict[int, int] = {}
    for slot, begin, end in runs:
        if slot >= 0:
            counts[slot] = counts.get(slot, 0) + end - begin
    padding = len(counts) * max(counts.values()) / sum(counts.values()) if counts else 1.0
    use_loop = len(runs) <= MAX_LOOP_RUNS or padding > MAX_PADDING_FACTOR
    return _Plan(start, runs, sorted(counts), any(s < 0 for s, _, _ in runs), use_loop)


def _make_layout(plan: _Plan) -> _Layout:
    members: dict[int, list[int]] = {s: [] for s in plan.slots}
    for slot, start, end in plan.runs:
        if slot >= 0:
            members[slot].extend(range(start, end))
    m = max(len(rows) for rows in members.values())
    first, last = plan.slots[0], plan.slots[-1]
    # A contiguous slot range is read in place; unused slots inside it only cost padding.
    in_place = last - first + 1 <= 2 * len(plan.slots)
    group_slots = list(range(first, last + 1)) if in_place else plan.slots
    gather: list[int] = []
    place_of: dict[int, int] = {}
    for g, slot in enumerate(group_slots):
        rows = members.get(slot, [])
        for k, row in enumerate(rows):
            place_of[row] = g * m + k
        gather.extend(rows + [rows[0] if rows else 0] * (m - len(rows)))
    exact = len(place_of) == len(gather)
    adapted = sorted(place_of)
    place = [place_of[r] for r in adapted]

    def index(values: list[int]) -> Tensor | None:
        return None if values == list(range(len(values))) else torch.tensor(values, dtype=torch.long)

    return _Layout(
        first_slot=first if in_place else None,
        slots=None if in_place else torch.tensor(plan.slots, dtype=torch.long),
        groups=len(group_slots),
        m=m,
        gather=index(gather) if len(gather) == plan.num_tokens else torch.tensor(gather, dtype=torch.long),
        exact=exact,
        place=None if exact else torch.tensor(place, dtype=torch.long),
        rows=torch.tensor(adapted, dtype=torch.long) if plan.has_unadapted and not exact else None,
    )


class _PlanCache:
    """The last few plans: every layer and slice of a model step reuses the step's plan."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    def get(self, run_slots: list[int], run_lengths: list[int] | None) -> _Plan:
        key = (tuple(run_slots), None if run_lengths is None else tuple(run_lengths))
        plan = self._plans.get(key)
        if plan is None:
            plan = _make_plan(run_slots, run_lengths if run_lengths is not None else [1] * len(run_slots))
            self._plans[key] = plan
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan


_plans = _PlanCache()


def _token_plan(lora_indices_tensor: Tensor) -> _Plan:
    return _plans.get(lora_indices_tensor.tolist(), None)


def _segment_plan(seq_len_tensor: Tensor, lora_indices_tensor: Tensor) -> _Plan:
    return _plans.get(lora_indices_tensor.tolist(), seq_len_tensor.tolist())


def _as_3d(weights: Tensor) -> Tensor:
    # [slots, 1, out, in] -> [slots, out, in]
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _store(dst: Tensor, y: Tensor, scale: float, accumulate: bool, rows: Tensor | None = None) -> None:
    """dst (+)= y * scale, in dst's dtype; with `rows`, only those rows of dst get y (others 0 / kept)."""
    if scale != 1.0:
        y = y.to(dst.dtype) * scale
    if rows is not None:
        if not accumulate:
            dst.zero_()
        dst.index_add_(0, rows, y.to(dst.dtype))
    elif accumulate:
        dst.add_(y)
    else:
        dst.copy_(y)


def _lora_product(x: Tensor, weights: Tensor, dst: Tensor, plan: _Plan, *, scale: float, accumulate: bool) -> None:
    """Write the per-token LoRA product into `dst` in place.

    Semantics:
        for t in range(T):
            y_t = x[t] @ weights[slot[t]].T * scale  if slot[t] >= 0 else 0
            dst[t] = dst[t] + y_t  if accumulate else y_t

    x: [T, in] in the compute dtype; weights: [slots, out', in] with out' >= out (the slots
    used are cast to x's dtype); dst: [T, out], a view, in the compute dtype or wider.
    """
    out = dst.shape[1]
    if plan.use_loop:
        for slot, start, end in plan.runs:
            if slot < 0:
                if not accumulate:
                    dst[start:end].zero_()
                continue
            w = weights[slot, :out].to(x.dtype)  # [out, in]
            if x.dtype == dst.dtype:
                dst[start:end].addmm_(x[start:end], w.t(), beta=1 if accumulate else 0, alpha=scale)
            else:
                _store(dst[start:end], x[start:end] @ w.t(), scale, accumulate)
        return

    lay = plan.layout()
    if lay.first_slot is not None:
        w = weights[lay.first_slot : lay.first_slot + lay.groups, :out]  # [G, out, in], a view
    else:
        w = weights.index_select(0, lay.slots)[:, :out]
    w = w.to(x.dtype)
    xp = x if lay.gather is None else x.index_select(0, lay.gather)  # [G*m, in]
    yp = torch.bmm(xp.view(lay.groups, lay.m, -1), w.transpose(1, 2)).view(-1, out)  # [G*m, out]
    if not lay.exact:
        _store(dst, yp.index_select(0, lay.place), scale, accumulate, lay.rows)
    elif lay.gather is None:
        _store(dst, yp, scale, accumulate)
    else:  # padded row p is token gather[p]: scatter straight back
        yp = yp.to(dst.dtype)
        if scale != 1.0:
            yp = yp * scale
        if accumulate:
            dst.index_add_(0, lay.gather, yp)
        else:
            if plan.has_unadapted:
                dst.zero_()
            dst.index_copy_(0, lay.gather, yp)


def _compute_dtype(inputs: Tensor, weights: Tensor, output: Tensor) -> torch.dtype:
    if output.dtype == torch.float32 and inputs.dtype in _NARROW and weights.dtype == inputs.dtype:
        return inputs.dtype
    return output.dtype


def _checked_rows(plan: _Plan, inputs: Tensor) -> None:
    if inputs.shape[0] != plan.num_tokens:
        raise ValueError(f"LoRA op got {inputs.shape[0]} input rows for {plan.num_tokens} token indices")


def _shrink(inputs: Tensor, weights: Tensor, output: Tensor, plan: _Plan, scaling: float) -> None:
    # inputs [T, in], weights [slots, (1,) r, in], output [T, >= r]
    _checked_rows(plan, inputs)
    weights = _as_3d(weights)
    x = inputs.to(_compute_dtype(inputs, weights, output))
    r = weights.shape[1]
    if output.shape[0] == plan.num_tokens:
        _lora_product(x, weights, output[:, :r], plan, scale=scaling, accumulate=False)
    else:  # row counts differ: compute, then let torch broadcast (or refuse) as vLLM's op does
        tmp = output.new_empty(plan.num_tokens, r)
        _lora_product(x, weights, tmp, plan, scale=scaling, accumulate=False)
        output[:, :r] = tmp


def _expand(inputs: Tensor, weights: Tensor, output: Tensor, plan: _Plan, add_inputs: bool) -> None:
    # inputs [T, r], weights [slots, (1,) out, r], output [Y, C]; columns beyond min(out, C) untouched
    _checked_rows(plan, inputs)
    weights = _as_3d(weights)
    x = inputs.to(output.dtype)
    common = min(weights.shape[1], output.shape[1])
    if output.shape[0] == plan.num_tokens:
        _lora_product(x, weights, output[:, :common], plan, scale=1.0, accumulate=add_inputs)
        return
    tmp = output.new_empty(plan.num_tokens, common)
    _lora_product(x, weights, tmp, plan, scale=1.0, accumulate=False)
    # vLLM: one token row feeds every output row; extra token rows are dropped.
    tmp = tmp[:1] if plan.num_tokens == 1 else tmp[: output.shape[0]]
    if add_inputs:
        output[:, :common] += tmp
    else:
        output[:, :common] = tmp


def _expand_slice(
    inputs: Tensor, weights: Tensor, output: Tensor, plan: _Plan, slice_offset: int, slice_size: int, add_inputs: bool
) -> None:
    # inputs [T, r], weights [slots, (1,) slice_size, r], output [T, >= slice_offset + slice_size]
    _checked_rows(plan, inputs)
    weights = _as_3d(weights)
    x = inputs.to(output.dtype)
    dst = output[:, slice_offset : slice_offset + slice_size]
    if dst.shape == (plan.num_tokens, weights.shape[1]):
        _lora_product(x, weights, dst, plan, scale=1.0, accumulate=add_inputs)
        return
    tmp = output.new_empty(plan.num_tokens, weights.shape[1])
    _lora_product(x, weights, tmp, plan, scale=1.0, accumulate=False)
    if add_inputs:
        dst += tmp
    else:
        dst[:] = tmp


# --- the six ops, with vLLM's signatures ------------------------------------------------


def bgmv_shrink(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    scaling: float = 1.0,
) -> None:
    """Per-token LoRA A product.

    Semantics: for t in range(T): output[t, :r] = scaling * inputs[t] @ W[idx[t]].T  (0 if idx[t] < 0)

    inputs [T, in]; lora_b_weights W [slots, (1,) r, in] (vLLM's name); output [T, >= r]; idx [T].
    """
    _shrink(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), scaling)


def bgmv_expand(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    add_inputs: bool = True,
) -> None:
    """Per-token LoRA B product into the leading columns of the output.

    Semantics: c = min(out, C); for t: y_t = inputs[t] @ W[idx[t]][:c].T  (0 if idx[t] < 0);
        output[t, :c] = output[t, :c] + y_t if add_inputs else y_t
    (one token and several output rows: its y_t goes to every row; extra tokens are dropped)

    inputs [T, r]; W [slots, (1,) out, r]; output [Y, C]; idx [T].
    """
    _expand(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    lora_indices_tensor: Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """Per-token LoRA B product into a column slice of the output.

    Semantics: for t: y_t = inputs[t] @ W[idx[t]].T  (0 if idx[t] < 0);
        output[t, o:o+s] = output[t, o:o+s] + y_t if add_inputs else y_t   (o = slice_offset, s = slice_size)

    inputs [T, r]; W [slots, (1,) s, r]; output [T, >= o + s]; idx [T].
    """
    plan = _token_plan(lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


def sgmv_shrink(
    inputs: Tensor,
    lora_a_weights: Tensor,
    output_tensor: Tensor,
    b_seq_start_loc: Tensor,
    seq_len_tensor: Tensor,
    lora_indices_tensor: Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """`bgmv_shrink` with tokens given as segments (segment i: seq_len[i] tokens on slot idx[i])."""
    _shrink(inputs, lora_a_weights, output_tensor, _segment_plan(seq_len_tensor, lora_indices_tensor), scaling)


def sgmv_expand(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    b_seq_start_loc: Tensor,
    seq_len_tensor: Tensor,
    lora_indices_tensor: Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """`bgmv_expand` with tokens given as segments."""
    _expand(inputs, lora_b_weights, output_tensor, _segment_plan(seq_len_tensor, lora_indices_tensor), add_inputs)


def sgmv_expand_slice(
    inputs: Tensor,
    lora_b_weights: Tensor,
    output_tensor: Tensor,
    b_seq_start_loc: Tensor,
    seq_len_tensor: Tensor,
    lora_indices_tensor: Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """`bgmv_expand_slice` with tokens given as segments."""
    plan = _segment_plan(seq_len_tensor, lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}

"""Multi-LoRA matrix products for vLLM's CPU path, grouped by adapter instead of per token.

Drop-in replacements for the six ops in `vllm.lora.ops.torch_ops` (same signatures, same
results). vLLM's versions gather a full copy of the adapter matrix for every token
(`weights[indices]`, [tokens, out, in]) and then do a per-token product. These do one matrix
product per run of tokens that share an adapter when there are one or two runs (prefill of
one request, or one adapter for the whole batch) and for every long run (a prefill chunk);
the remaining tokens (decode tokens of many requests with their own adapters) are grouped
by adapter slot and done as one batched product padded to the largest group, or, when
each adapter has one token, by a C++ kernel (`kernel`) that reads each adapter's weights
once. That is a fixed handful of ops per call however many adapters, which matters on CPU,
where each op costs far more than its arithmetic here. The grouping is computed once per
index pattern and reused by every layer of the step.

Shared conventions (as in vLLM):
- `weights` is [num_slots, 1, out, in] or [num_slots, out, in]; `weights[s]` maps a token's
  `in` features to `out` features (x @ weights[s].T).
- Products are computed in the output's dtype (inputs and weights cast to it), with one
  exception: a shrink of 16-bit inputs by 16-bit weights of the same dtype into a float32
  output (vLLM's LoRA buffer) is computed in that 16-bit dtype (float32 accumulation) and
  then widened. vLLM computes it in float32, but the expand that reads the buffer casts it
  back to that 16-bit dtype first, so the layer's output is the same up to summation order;
  it saves widening the inputs and weights on every call (the 16-bit product is faster too).
  With float32 models (and tests) every product is float32 as in vLLM.
- A negative slot means "no adapter": the token gets a zero LoRA contribution. vLLM's torch
  ops index `weights[-1]` (the last slot) for it, which agrees while that slot is empty;
  vLLM's GPU kernels skip such tokens, as these ops do.
- sgmv ops describe tokens as consecutive segments: `seq_len_tensor[i]` tokens use slot
  `lora_indices_tensor[i]`; the other segment arguments are accepted and unused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from server.lora_ops import kernel

# Up to this many runs of same-slot tokens are done as one product per run (in place, no
# rows copied). With more, runs of at least MIN_LOOP_RUN tokens (prefill chunks) are still
# one in-place product each, and the other slots are grouped into tiers of similar token
# counts (the smallest at least 1/TIER_RATIO of the largest): each tier is one batched
# product over its slots' tokens, padded to its largest group; a tier of one contiguous
# run is done in place. Decode tokens with many adapters are one tier.
# MIN_LOOP_RUN by measurement (30 layers of SmolLM2-135M, 32 slots, one thread): with 16-18
# prompts of ~231 tokens in a 4096-token step, looping over the runs took 0.7 s against
# 1.0-1.8 s for padded tiers (gathers, padding, index_copy_); below ~96 tokens a run's
# product no longer outweighs the per-call cost and the tiers win (32 runs of 64: 0.43 s
# batched against 0.72 s looped).
# Every token is in exactly one piece, so the pieces write disjoint rows. Results go back with
# gathers (`index_select`) and `index_copy_`, never `index_add_`: on CPU, `index_add_` into a
# 16-bit tensor is several times slower than the product itself (it was most of the cost of
# prefill with many adapters).
# With the C++ kernel, `MtaPunicaWrapperCPU.add_lora_linear` does a whole layer in one call per token for
# steps of at most FUSED_MAX_TOKENS tokens (decode steps), and for steps whose adapted runs
# are all shorter than FUSED_MAX_RUN tokens (prompts of ordinary length, of one or many
# adapters): see `_Plan`. The kernel splits the tokens over torch's threads and reads only
# the rank a slot uses; a run's product uses the slot's full rank. By measurement (30 layers
# of SmolLM2, 32 slots, rank-8 adapters in rank-16 slots unless said, two threads, 5 Dec):
# 18 prompts of 228 tokens with their own adapters 198 against 514 ms (rank 16: 327 against
# 479), 32 of 128 tokens 199 against 538 ms, one prompt of 300 tokens 21 against 38 ms (rank
# 16), 2 of 600 tokens 47 against 88 ms; one prompt of 1216 tokens (rank 16) 83 against 57 ms
# (one thread: 176 against 91), so long prefill chunks stay with one product per run.
MAX_LOOP_RUNS = 2
FUSED_MAX_TOKENS = 64
FUSED_MAX_RUN = 512
MIN_LOOP_RUN = 96
TIER_RATIO = 2
_NARROW = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Run:
    """Rows start:end all use `slot`: one product, written in place."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class _Tier:
    """Slots whose tokens are done as one batched product: G groups of m rows.

    Group g holds the tokens of slot `first_slot + g` (a contiguous slot range: the weights
    are read in place; slots in the range without tokens are all padding) or of `slots[g]`
    (weights gathered). Padded row p = g*m + k is the k-th token of group g and `gather[p]`
    its row in x (None: p); padding rows repeat some row and their products are dropped.
    The tier's tokens, ascending, are `rows` (None: every token of the step), and token
    `rows[j]` takes padded product row `place[j]` (None: j). When every group is one token
    (decode), `token_rows` and `token_slots` list the tokens (ascending) and their slots for
    the C++ kernel (see `kernel`).
    """

    first_slot: int | None
    slots: Tensor | None  # [G] when the weights are gathered
    groups: int
    m: int
    gather: Tensor | None  # [G*m]
    place: Tensor | None  # [n]
    rows: Tensor | None  # [n]
    token_rows: Tensor | None = None  # [n], m == 1 only
    token_slots: Tensor | None = None  # [n], m == 1 only


@dataclass(frozen=True)
class _Plan:
    """How to compute one index pattern (shared by every layer and slice of an engine step).

    For decode-sized steps and steps of many short runs (see FUSED_MAX_TOKENS), `token_rows`
    and `token_slots` list the tokens with an adapter and their slots, for the kernel's
    whole-layer call (`MtaPunicaWrapperCPU.add_lora_linear`); the pieces serve the six ops.
    """

    num_tokens: int
    pieces: tuple[_Run | _Tier, ...]  # disjoint sets of tokens
    covers: bool  # every token has an adapter: the pieces write every row (overwriting needs no zeroing)
    token_rows: Tensor | None = None  # [n]
    token_slots: Tensor | None = None  # [n]


def _make_plan(run_slots: list[int], run_lengths: list[int]) -> _Plan:
    runs = _merged_runs(run_slots, run_lengths)
    plan = _make_pieces(runs)
    short_runs = all(r.end - r.start < FUSED_MAX_RUN for r in runs if r.slot >= 0)
    if plan.num_tokens > FUSED_MAX_TOKENS and not short_runs:
        return plan
    adapted = [r for r in runs if r.slot >= 0]
    return replace(
        plan,
        token_rows=torch.tensor([t for r in adapted for t in range(r.start, r.end)], dtype=torch.long),
        token_slots=torch.tensor([r.slot for r in adapted for _ in range(r.start, r.end)], dtype=torch.long),
    )


def _merged_runs(run_slots: list[int], run_lengths: list[int]) -> list[_Run]:
    """Maximal runs of same-slot tokens (slot -1: no adapter), in token order."""
    runs: list[_Run] = []
    start = 0
    for slot, length in zip(run_slots, run_lengths):
        if length <= 0:
            continue
        slot = slot if slot >= 0 else -1
        if runs and runs[-1].slot == slot:
            runs[-1] = _Run(slot, runs[-1].start, start + length)
        else:
            runs.append(_Run(slot, start, start + length))
        start += length
    return runs


def _make_pieces(runs: list[_Run]) -> _Plan:
    start = runs[-1].end if runs else 0
    adapted = [r for r in runs if r.slot >= 0]
    if len(runs) <= MAX_LOOP_RUNS:
        return _Plan(start, tuple(adapted), covers=len(adapted) == len(runs))
    pieces: list[_Run | _Tier] = [r for r in adapted if r.end - r.start >= MIN_LOOP_RUN]
    members: dict[int, list[int]] = {}
    for run in adapted:
        if run.end - run.start < MIN_LOOP_RUN:
            members.setdefault(run.slot, []).extend(range(run.start, run.end))
    by_size = sorted(members, key=lambda slot: -len(members[slot]))
    i = 0
    while i < len(by_size):
        j = i + 1
        while j < len(by_size) and len(members[by_size[j]]) * TIER_RATIO >= len(members[by_size[i]]):
            j += 1
        pieces.append(_make_piece({slot: members[slot] for slot in by_size[i:j]}, start))
        i = j
    return _Plan(start, tuple(pieces), covers=len(adapted) == len(runs))


def _make_piece(members: dict[int, list[int]], num_tokens: int) -> _Run | _Tier:
    if len(members) == 1:
        ((slot, rows),) = members.items()
        if rows[-1] - rows[0] == len(rows) - 1:
            return _Run(slot, rows[0], rows[-1] + 1)
    slots = sorted(members)
    m = max(len(rows) for rows in members.values())
    in_place = slots[-1] - slots[0] + 1 <= 2 * len(slots)
    group_slots = range(slots[0], slots[-1] + 1) if in_place else slots
    gather: list[int] = []
    place_of: dict[int, int] = {}
    for slot in group_slots:
        rows = members.get(slot, [])
        place_of.update((row, len(gather) + k) for k, row in enumerate(rows))
        gather.extend(rows + [rows[0] if rows else 0] * (m - len(rows)))
    rows = sorted(place_of)
    place = [place_of[row] for row in rows]
    slot_of = {row: slot for slot, slot_rows in members.items() for row in slot_rows}

    def index(values: list[int], identity_len: int) -> Tensor | None:
        return None if values == list(range(identity_len)) else torch.tensor(values, dtype=torch.long)

    return _Tier(
        first_slot=slots[0] if in_place else None,
        slots=None if in_place else torch.tensor(slots, dtype=torch.long),
        groups=len(group_slots),
        m=m,
        gather=index(gather, num_tokens),
        place=index(place, len(gather)),
        rows=index(rows, num_tokens),
        token_rows=torch.tensor(rows, dtype=torch.long) if m == 1 else None,
        token_slots=torch.tensor([slot_of[row] for row in rows], dtype=torch.long) if m == 1 else None,
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
            plan = _make_plan(
                run_slots,
                run_lengths if run_lengths is not None else [1] * len(run_slots),
            )
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


def _lora_product(
    x: Tensor,
    weights: Tensor,
    dst: Tensor,
    plan: _Plan,
    *,
    scale: float,
    accumulate: bool,
) -> None:
    """Write the per-token LoRA product into `dst` in place.

    Semantics:
        for t in range(T):
            y_t = x[t] @ weights[slot[t]].T * scale  if slot[t] >= 0 else 0
            dst[t] = dst[t] + y_t  if accumulate else y_t

    x: [T, in] in the compute dtype; weights: [slots, out', in] with out' >= out (the slots
    used are cast to x's dtype); dst: [T, out], a view, in the compute dtype or wider.
    """
    if not accumulate and not plan.covers:
        dst.zero_()  # rows without an adapter get 0; the pieces overwrite their own rows
    for piece in plan.pieces:
        if isinstance(piece, _Run):
            _run_product(x, weights, dst, piece, scale, accumulate)
        else:
            _tier_product(x, weights, dst, piece, scale, accumulate)


def _run_product(x: Tensor, weights: Tensor, dst: Tensor, run: _Run, scale: float, accumulate: bool) -> None:
    rows = dst[run.start : run.end]  # [n, out]
    w = weights[run.slot, : dst.shape[1]].to(x.dtype)  # [out, in]
    if x.dtype == dst.dtype:
        rows.addmm_(x[run.start : run.end], w.t(), beta=1 if accumulate else 0, alpha=scale)
        return
    y = x[run.start : run.end] @ w.t()  # narrow shrink into a float32 buffer: widen after
    if scale != 1.0:
        y = y.to(dst.dtype) * scale
    if accumulate:
        rows.add_(y)
    else:
        rows.copy_(y)


def _tier_product(x: Tensor, weights: Tensor, dst: Tensor, tier: _Tier, scale: float, accumulate: bool) -> None:
    # for the tier's tokens t: dst[t] (+)= (x[t] @ weights[slot of t].T) * scale
    module = kernel.get() if tier.token_rows is not None and kernel.supports(x, weights, dst) else None
    if module is not None:  # one token per slot: the kernel reads each slot's weights once, in place
        kernel.gemv(
            module,
            x,
            weights,
            tier.token_rows,
            tier.token_slots,
            dst,
            scale,
            accumulate,
        )
        return
    y = _tier_bmm(x, weights, tier, dst.shape[1]).to(dst.dtype)  # [n, out], token order
    if scale != 1.0:
        y = y * scale
    if tier.rows is None:  # the tier is every token of the step
        if accumulate:
            dst.add_(y)
        else:
            dst.copy_(y)
    elif accumulate:  # rows are distinct: read, add, write back (index_add_ is slow on CPU)
        dst.index_copy_(0, tier.rows, dst.index_select(0, tier.rows).add_(y))
    else:
        dst.index_copy_(0, tier.rows, y)


def _tier_bmm(x: Tensor, weights: Tensor, tier: _Tier, out: int) -> Tensor:
    """The tier's products in token order, [n, out], as one batched product over its padded groups."""
    if tier.first_slot is not None:
        w = weights[tier.first_slot : tier.first_slot + tier.groups, :out]  # [G, out, in], a view
    else:
        w = weights.index_select(0, tier.slots)[:, :out]
    w = w.to(x.dtype)
    xp = x if tier.gather is None else x.index_select(0, tier.gather)  # [G*m, in]; x is only read
    yp = torch.bmm(xp.view(tier.groups, tier.m, -1), w.transpose(1, 2)).view(-1, out)  # [G*m, out]
    return yp if tier.place is None else yp.index_select(0, tier.place)


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
    inputs: Tensor,
    weights: Tensor,
    output: Tensor,
    plan: _Plan,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool,
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
    _expand(
        inputs,
        lora_b_weights,
        output_tensor,
        _token_plan(lora_indices_tensor),
        add_inputs,
    )


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
    _expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        plan,
        slice_offset,
        slice_size,
        add_inputs,
    )


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
    _shrink(
        inputs,
        lora_a_weights,
        output_tensor,
        _segment_plan(seq_len_tensor, lora_indices_tensor),
        scaling,
    )


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
    _expand(
        inputs,
        lora_b_weights,
        output_tensor,
        _segment_plan(seq_len_tensor, lora_indices_tensor),
        add_inputs,
    )


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
    _expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        plan,
        slice_offset,
        slice_size,
        add_inputs,
    )


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}

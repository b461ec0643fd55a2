"""LoRA adapter math: fuse anchor meta-LoRAs, stack a user's LoRA, fold scalings.

Pure tensor-to-tensor functions (torch only), shared by the server, the trainer,
the evaluator and the benchmarks. A LoRA here is what one PEFT adapter holds for
`nn.Linear` modules: per module `delta_W = scaling * B @ A`.

vLLM serves exactly one adapter per request, so every combination below yields one
plain LoRA (one uniform rank, scaling folded to 1.0) that PEFT and vLLM load as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor


def get_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class LoraWeights:
    """The tensors of one LoRA adapter, keyed by module name.

    Module names are the base model's, e.g. `model.layers.0.self_attn.q_proj`
    (PEFT's `base_model.model.` prefix and `.lora_A.weight` suffix stripped).
    Tensors are shared, never copied: treat instances as immutable.

    Semantics: for m in modules: W[m] += scaling * b[m] @ a[m]
    """

    a: dict[str, Tensor]  # module -> A [r, in]
    b: dict[str, Tensor]  # module -> B [out, r]
    scaling: float
    # Set by `flatten`/`from_flat` only: the one buffer that `a` and `b` are views of.
    flat: FlatBuffer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = _structure_problems(self.a, self.b) if self.flat is None else self.flat.problems(self.a, self.b)
        if problems:
            raise ValueError("invalid LoRA weights: " + "; ".join(problems))

    @classmethod
    def from_flat(cls, layout: FlatLayout, data: Tensor, scaling: float) -> LoraWeights:
        """The LoRA whose tensors are `data` (1-D, placed by `layout`), as views: nothing is copied."""
        a, b = layout.views(data)
        return cls(a=a, b=b, scaling=scaling, flat=FlatBuffer(layout, data))

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[0]

    @property
    def modules(self) -> list[str]:
        return sorted(self.a)

    @property
    def target_modules(self) -> list[str]:
        """Last name components, the form PEFT's `target_modules` takes."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.a})

    def delta(self, module: str) -> Tensor:
        """The weight update of `module`: `scaling * B @ A`, shape [out, in]."""
        return self.scaling * (self.b[module].float() @ self.a[module].float())


@dataclass(frozen=True)
class FlatLayout:
    """Where a LoRA's tensors sit in one flat buffer: every A, then every B, each grouped by shape.

    A bank's anchors share one layout, so a `linear` fusion is a few operations over whole
    buffers instead of several per module (~420 tensors for an all-linear adapter), and the
    fused buffer goes to the adapter file without a Python call per tensor (the writer slices
    it in the file's order). Grouping by shape makes the per-module views one `split` per
    group instead of a `view` call per tensor.
    """

    modules: tuple[str, ...]  # sorted
    a_shapes: tuple[tuple[int, int], ...]  # [r, in] per module
    b_shapes: tuple[tuple[int, int], ...]  # [out, r] per module

    @classmethod
    def of(cls, lora: LoraWeights) -> FlatLayout:
        modules = tuple(lora.modules)
        return cls(
            modules=modules,
            a_shapes=tuple((lora.a[m].shape[0], lora.a[m].shape[1]) for m in modules),
            b_shapes=tuple((lora.b[m].shape[0], lora.b[m].shape[1]) for m in modules),
        )

    @cached_property
    def groups(self) -> list[tuple[int, tuple[int, int], tuple[int, ...]]]:
        """(0 for A or 1 for B, shape, module indices) of each group, in buffer order."""
        groups = []
        for side, shapes in enumerate((self.a_shapes, self.b_shapes)):
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, shape in enumerate(shapes):
                by_shape.setdefault(shape, []).append(i)
            groups += [(side, shape, tuple(ix)) for shape, ix in sorted(by_shape.items())]
        return groups

    @cached_property
    def offsets(self) -> tuple[list[int], list[int]]:
        """Element offset of each module's A, and of each module's B, in the buffer."""
        offsets: tuple[list[int], list[int]] = ([0] * len(self.modules), [0] * len(self.modules))
        position = 0
        for side, (rows, cols), ix in self.groups:
            for i in ix:
                offsets[side][i] = position
                position += rows * cols
        return offsets

    @cached_property
    def a_numel(self) -> int:
        """Elements of the A part; the B part follows."""
        return sum(r * c for r, c in self.a_shapes)

    @cached_property
    def numel(self) -> int:
        return self.a_numel + sum(r * c for r, c in self.b_shapes)

    def views(self, data: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The A and B tensors of the 1-D buffer `data`, as views keyed by module (sorted)."""
        found: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        position = 0
        for side, (rows, cols), ix in self.groups:
            n = len(ix) * rows * cols
            block = data[position : position + n].view(len(ix) * rows, cols)
            parts = block.split(rows) if rows else [block] * len(ix)
            found[side].update(zip((self.modules[i] for i in ix), parts))
            position += n
        return {m: found[0][m] for m in self.modules}, {m: found[1][m] for m in self.modules}


@dataclass(frozen=True, eq=False)
class FlatBuffer:
    """One contiguous 1-D buffer holding all tensors of a LoRA, placed by `layout`."""

    layout: FlatLayout
    data: Tensor

    def problems(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
        """Cheap checks that `a` and `b` are this buffer's views (the layout vouches for shapes)."""
        layout, data = self.layout, self.data
        if data.ndim != 1 or not data.is_contiguous() or data.numel() != layout.numel:
            return [f"flat buffer of shape {tuple(data.shape)} does not hold {layout.numel} elements"]
        if a.keys() != set(layout.modules) or b.keys() != a.keys():
            return ["flat buffer's modules differ from the tensors'"]
        (a_offsets, b_offsets), size = layout.offsets, data.element_size()
        first, last = layout.modules[0], layout.modules[-1]
        if (
            a[first].data_ptr() != data.data_ptr() + a_offsets[0] * size
            or b[last].data_ptr() != data.data_ptr() + b_offsets[-1] * size
        ):
            return ["tensors are not views of the flat buffer"]
        return []


def flatten(lora: LoraWeights, layout: FlatLayout | None = None, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """`lora` with its tensors copied into one buffer placed by `layout` (default: its own).

    Pass one layout for all anchors of a bank so that `linear` fusion takes the flat path.

    Semantics: the same LoRA (cast to `dtype`); only where its tensors live changes.
    """
    if layout is None:
        layout = FlatLayout.of(lora)
    elif layout != FlatLayout.of(lora):
        raise ValueError("the layout's modules or shapes are not the LoRA's")
    flat = LoraWeights.from_flat(layout, torch.empty(layout.numel, dtype=dtype), lora.scaling)
    _copy_modules(flat, lora)
    return flat


def _copy_modules(dst: LoraWeights, src: LoraWeights) -> None:
    """Copy (and cast) every tensor of `src` into the same module's tensor of `dst`, in one call.

    Tensors larger than _CHUNK are copied in chunks, so that no copy is split across threads.
    """
    targets: list[Tensor] = []
    sources: list[Tensor] = []
    for side_dst, side_src in ((dst.a, src.a), (dst.b, src.b)):
        for m, t in side_dst.items():
            if t.numel() > _CHUNK:  # views of a flat buffer: contiguous
                targets += t.view(-1).split(_CHUNK)
                sources += side_src[m].reshape(-1).split(_CHUNK)
            else:
                targets.append(t)
                sources.append(side_src[m])
    torch._foreach_copy_(targets, sources)


def _structure_problems(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    if not a:
        return ["no modules"]
    if a.keys() != b.keys():
        return [f"modules without a pair: {sorted(a.keys() ^ b.keys())}"]
    problems = [
        f"{m}: A {tuple(a[m].shape)} and B {tuple(b[m].shape)} are not [r, in] and [out, r]"
        for m in sorted(a)
        if a[m].ndim != 2 or b[m].ndim != 2 or a[m].shape[0] != b[m].shape[1]
    ]
    ranks = {a[m].shape[0] for m in a}
    if not problems and len(ranks) > 1:
        problems.append(f"modules have different ranks {sorted(ranks)}")
    return problems


def fold_scaling(lora: LoraWeights) -> LoraWeights:
    """Move the scaling into B, so the adapter can be saved with `lora_alpha = r`.

    Returns `lora` itself when its scaling is already 1.0 (nothing to copy on the
    per-request path).

    Semantics: B' = scaling * B; scaling' = 1
    """
    if lora.scaling == 1.0:
        return lora
    return LoraWeights(
        a={m: t.float() for m, t in lora.a.items()},
        b={m: t.float() * lora.scaling for m, t in lora.b.items()},
        scaling=1.0,
    )


class FusionError(ValueError):
    """A fusion plan that cannot produce a correct adapter; lists every problem."""


def check_fusion_plan(
    loras: Sequence[LoraWeights],
    weights: Sequence[float],
    mode: str,
    max_rank: int | None = None,
    stacked: LoraWeights | None = None,
    shared: LoraWeights | None = None,
    residual_scale: float = 1.0,
) -> int:
    """Validate a fusion (plus optional shared and stacked LoRAs) before combining anything.

    Returns the rank of the resulting adapter; raises one FusionError naming all
    problems, so a bad plan never silently yields a wrong adapter.
    """
    problems = _weight_problems(loras, weights)
    if mode not in FUSERS:
        problems.append(f"unknown fusion mode {mode!r} (known: {sorted(FUSERS)})")
    elif loras and mode == "linear":
        problems += _linear_problems(loras)
    if not (math.isfinite(residual_scale) and 0 <= residual_scale <= 1):
        problems.append(f"residual_scale must be in [0, 1], got {residual_scale}")
    elif residual_scale == 0 and shared is None:
        problems.append("residual_scale 0 without a shared LoRA leaves nothing to serve")
    problems += _shape_problems([lora for lora in (shared, *loras, stacked) if lora is not None])
    fused = _planned_rank(loras, mode) if residual_scale > 0 else 0
    rank = fused + sum(lora.rank for lora in (shared, stacked) if lora is not None)
    if max_rank is not None and rank > max_rank:
        problems.append(f"resulting rank {rank} exceeds max_rank {max_rank}")
    if problems:
        raise FusionError("invalid fusion plan: " + "; ".join(problems))
    return rank


def _planned_rank(loras: Sequence[LoraWeights], mode: str) -> int:
    if not loras:
        return 0
    return loras[0].rank if mode == "linear" else sum(lora.rank for lora in loras)


def _weight_problems(loras: Sequence[LoraWeights], weights: Sequence[float]) -> list[str]:
    problems = []
    if not loras:
        problems.append("no LoRAs to fuse")
    if len(loras) != len(weights):
        problems.append(f"{len(loras)} LoRAs but {len(weights)} weights")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        problems.append(f"weights must be finite and >= 0, got {bad}")
    return problems


def _linear_problems(loras: Sequence[LoraWeights]) -> list[str]:
    """`linear` averages A and B element-wise, so ranks and modules must line up."""
    problems = []
    ranks = [lora.rank for lora in loras]
    if len(set(ranks)) > 1:
        problems.append(f"linear fusion needs equal ranks, got {ranks}")
    if any(lora.a.keys() != loras[0].a.keys() for lora in loras):
        problems.append("linear fusion needs equal module sets")
    return problems


def _shape_problems(loras: Sequence[LoraWeights]) -> list[str]:
    """Every LoRA touching a module must agree on its (in, out) features."""
    first = loras[0].flat if loras else None
    if first is not None and all(lora.flat is not None and lora.flat.layout is first.layout for lora in loras):
        return []  # one layout: one shape per module (a bank's anchors, checked when loaded)
    shapes: dict[str, set[tuple[int, int]]] = {}
    for lora in loras:
        for m in lora.a:
            shapes.setdefault(m, set()).add((lora.a[m].shape[1], lora.b[m].shape[0]))
    return [
        f"{m}: LoRAs disagree on (in, out) features {sorted(s)}"
        for m, s in sorted(shapes.items())
        if len(s) > 1
    ]


def fuse_linear(loras: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    """The paper's fusion: weighted sums of the A and of the B tensors, same rank.

    An approximation (cross terms w_i w_j B_i A_j) that is meaningful only when the
    LoRAs share an initialization; with equal scalings s it is exactly the paper's
    `s * (sum_i w_i B_i) @ (sum_i w_i A_i)`.

    Semantics: A = sum_i w_i A_i; B = sum_i w_i s_i B_i; scaling = 1
    """
    check_fusion_plan(loras, weights, "linear")
    return _linear_sum(loras, weights)


def _linear_sum(
    loras: Sequence[LoraWeights], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> LoraWeights:
    """The float32 weighted sums of `fuse_linear`, rounded once to `dtype`.

    Anchors in one flat layout (a bank's) are summed buffer-wide, straight into the result's
    buffer; others module by module. Both give the same bits.
    """
    b_weights = [w * lora.scaling for lora, w in zip(loras, weights)]
    flat = _shared_flat(loras)
    if flat is not None:
        layout, buffers = flat
        data, n = torch.empty(layout.numel, dtype=dtype), layout.a_numel
        _weighted_sum_into(data[:n], [t[:n] for t in buffers], weights)  # every A
        _weighted_sum_into(data[n:], [t[n:] for t in buffers], b_weights)  # every B
        return LoraWeights.from_flat(layout, data, 1.0)
    modules = list(loras[0].a)
    a = _weighted_sum([[lora.a[m] for m in modules] for lora in loras], weights)  # [r, in] each
    b = _weighted_sum([[lora.b[m] for m in modules] for lora in loras], b_weights)  # [out, r] each
    return _in_dtype(LoraWeights(a=dict(zip(modules, a)), b=dict(zip(modules, b)), scaling=1.0), dtype)


def _in_dtype(lora: LoraWeights, dtype: torch.dtype) -> LoraWeights:
    """`lora` (float32) rounded once to `dtype`, into one flat buffer that the writer sends as is."""
    return lora if dtype == torch.float32 else flatten(lora, dtype=dtype)


def _shared_flat(loras: Sequence[LoraWeights]) -> tuple[FlatLayout, list[Tensor]] | None:
    """The layout and float32 buffers of `loras` if all are flat in one layout, else None."""
    layout = loras[0].flat.layout if loras[0].flat is not None else None
    buffers = []
    for lora in loras:
        if lora.flat is None or lora.flat.data.dtype != torch.float32:
            return None
        if lora.flat.layout is not layout and lora.flat.layout != layout:
            return None
        buffers.append(lora.flat.data)
    return (layout, buffers) if layout is not None else None


def _weighted_sum(terms: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> list[Tensor]:
    """sum_i weights[i] * terms[i], element-wise over lists of float32 tensors.

    One `torch._foreach_*` call per term over all modules: a Python loop over ~200 modules
    costs several times the arithmetic of a fusion (the server does one per cache miss).
    """
    total = torch._foreach_mul([t.float() for t in terms[0]], weights[0])
    for tensors, w in zip(terms[1:], weights[1:]):
        torch._foreach_add_(total, [t.float() for t in tensors], alpha=w)
    return total


# Elements per operation: under ATen's parallel grain (32768), so each op runs on the calling
# thread. A whole-buffer op is split across OpenMP threads, and on a busy machine (vLLM, other
# processes) one of them waits for a core: 12 ms to 0.2 s instead of 1.5 ms (measured on 2 cores).
_CHUNK = 32704  # a multiple of 64 elements
_GROUP = 16  # chunks per pass: ~2 MB of float32 sums stay in the L2 cache before the cast


def _weighted_sum_into(out: Tensor, terms: Sequence[Tensor], weights: Sequence[float]) -> None:
    """out = sum_i weights[i] * terms[i] over 1-D float32 tensors, rounded once to out's dtype.

    The same operations per element as `_weighted_sum` (mul, then add with alpha), so the
    same bits wherever chunks cut tensors (ATen's vector and scalar loops both fuse the
    multiply-add; the tests check it), in chunks: one `torch._foreach_*` call per term and
    group of chunks.
    """
    outs = out.split(_CHUNK)
    parts = [t.split(_CHUNK) for t in terms]
    for g in range(0, len(outs), _GROUP):
        total = torch._foreach_mul(parts[0][g : g + _GROUP], weights[0])
        for chunks, w in zip(parts[1:], weights[1:]):
            torch._foreach_add_(total, chunks[g : g + _GROUP], alpha=w)
        torch._foreach_copy_(outs[g : g + _GROUP], total)


def fuse_cat(loras: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    """Exact fusion: concatenate along the rank axis (rank = sum of ranks).

    Equals PEFT's `add_weighted_adapter(combination_type="cat")` (unless PEFT's first
    adapter is rsLoRA: PEFT 0.21 then serves its result scaled by sqrt(rank)).

    Semantics: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]; B = [B_1, B_2, ...];
    so B @ A = sum_i w_i s_i B_i @ A_i; scaling = 1
    """
    check_fusion_plan(loras, weights, "cat")
    return _concat_rank(loras, weights)


def stack(fused: LoraWeights, stacked: LoraWeights) -> LoraWeights:
    """Add a user's stacked LoRA onto a fused one as one adapter (rank = sum).

    The rank limit is the caller's: `check_fusion_plan(..., max_rank, stacked=...)`.

    Semantics: B @ A = fused.delta + s_u B_u @ A_u; scaling = 1
    """
    problems = _shape_problems([fused, stacked])
    if problems:
        raise FusionError("cannot stack: " + "; ".join(problems))
    return _concat_rank([fused, stacked], [1.0, 1.0])


def _concat_rank(loras: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    """Concatenate LoRAs along the rank axis over the union of their modules.

    A LoRA without a module contributes zero rows/columns of its rank there, so
    every module of the result has the same rank (one adapter needs one r). `fuse` casts the
    result into one flat buffer afterwards (`_in_dtype`); concatenating straight into a flat
    buffer is slower: a fresh float32 buffer of 44 MB (top-4 + stacking) is mmap-ed, and the
    page faults cost more than the copies.
    """
    modules = sorted(set().union(*(lora.a for lora in loras)))
    features = {m: _features(loras, m) for m in modules}
    a_parts = [
        torch._foreach_mul([_a_or_zeros(lora, m, features[m]) for m in modules], w * lora.scaling)
        for lora, w in zip(loras, weights)
    ]  # per LoRA, [r_i, in] per module
    b_parts = [[_b_or_zeros(lora, m, features[m]) for m in modules] for lora in loras]  # [out, r_i]
    a = {m: torch.cat([part[i] for part in a_parts]) for i, m in enumerate(modules)}  # [sum r_i, in]
    b = {m: torch.cat([part[i] for part in b_parts], dim=1) for i, m in enumerate(modules)}  # [out, sum r_i]
    return LoraWeights(a=a, b=b, scaling=1.0)


def _a_or_zeros(lora: LoraWeights, module: str, features: tuple[int, int]) -> Tensor:
    return lora.a[module].float() if module in lora.a else torch.zeros(lora.rank, features[0])


def _b_or_zeros(lora: LoraWeights, module: str, features: tuple[int, int]) -> Tensor:
    return lora.b[module].float() if module in lora.b else torch.zeros(features[1], lora.rank)


def _features(loras: Sequence[LoraWeights], module: str) -> tuple[int, int]:
    """(in, out) features of `module`, from the first LoRA that has it."""
    lora = next(lora for lora in loras if module in lora.a)
    return lora.a[module].shape[1], lora.b[module].shape[0]


FUSERS: dict[str, Callable[[Sequence[LoraWeights], Sequence[float]], LoraWeights]] = {
    "linear": fuse_linear,
    "cat": fuse_cat,
}


def fuse(
    mode: str,
    loras: Sequence[LoraWeights],
    weights: Sequence[float],
    stacked: LoraWeights | None = None,
    max_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    shared: LoraWeights | None = None,
    residual_scale: float = 1.0,
) -> LoraWeights:
    """Fuse `loras` by the named mode (a key of FUSERS), between an optional shared LoRA under
    them and an optional stacked LoRA on top, as one adapter.

    The server's per-user path: the plan is checked once, and everything past the fusion is
    one concatenation along the rank axis. `shared` is a bank's task LoRA when its anchors are
    residuals over it (`--init task`); `residual_scale` scales the fused residuals' delta
    (0 drops them: the shared LoRA alone). Computed in float32 and rounded once to `dtype`
    (the serving dtype the adapter is written in).

    Semantics: B @ A = shared.delta + residual_scale * FUSERS[mode](loras, weights).delta
    + stacked.delta
    """
    check_fusion_plan(loras, weights, mode, max_rank, stacked=stacked, shared=shared, residual_scale=residual_scale)
    alone = shared is None and stacked is None and residual_scale == 1.0
    parts: list[tuple[LoraWeights, float]] = [(shared, 1.0)] if shared is not None else []
    if residual_scale > 0 and mode == "linear":
        fused = _linear_sum(loras, weights, dtype if alone else torch.float32)
        if alone:
            return fused
        parts.append((fused, residual_scale))
    elif residual_scale > 0:
        parts += [(lora, w * residual_scale) for lora, w in zip(loras, weights)]
    if stacked is not None:
        parts.append((stacked, 1.0))
    return _in_dtype(_concat_rank([p for p, _ in parts], [w for _, w in parts]), dtype)

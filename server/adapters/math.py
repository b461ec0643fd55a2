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
from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        problems = _structure_problems(self.a, self.b)
        if problems:
            raise ValueError("invalid LoRA weights: " + "; ".join(problems))

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
) -> int:
    """Validate a fusion (plus optional stacking) before combining anything.

    Returns the rank of the resulting adapter; raises one FusionError naming all
    problems, so a bad plan never silently yields a wrong adapter.
    """
    problems = _weight_problems(loras, weights)
    if mode not in FUSERS:
        problems.append(f"unknown fusion mode {mode!r} (known: {sorted(FUSERS)})")
    elif loras and mode == "linear":
        problems += _linear_problems(loras)
    problems += _shape_problems([*loras, stacked] if stacked else loras)
    rank = _planned_rank(loras, mode) + (stacked.rank if stacked else 0)
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


def _linear_sum(loras: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    modules = list(loras[0].a)
    a = _weighted_sum([[lora.a[m] for m in modules] for lora in loras], weights)  # [r, in] each
    b_weights = [w * lora.scaling for lora, w in zip(loras, weights)]
    b = _weighted_sum([[lora.b[m] for m in modules] for lora in loras], b_weights)  # [out, r] each
    return LoraWeights(a=dict(zip(modules, a)), b=dict(zip(modules, b)), scaling=1.0)


def _weighted_sum(terms: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> list[Tensor]:
    """sum_i weights[i] * terms[i], element-wise over lists of float32 tensors.

    One `torch._foreach_*` call per term over all modules: a Python loop over ~200 modules
    costs several times the arithmetic of a fusion (the server does one per cache miss).
    """
    total = torch._foreach_mul([t.float() for t in terms[0]], weights[0])
    for tensors, w in zip(terms[1:], weights[1:]):
        torch._foreach_add_(total, [t.float() for t in tensors], alpha=w)
    return total


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
    every module of the result has the same rank (one adapter needs one r).
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
) -> LoraWeights:
    """Fuse `loras` by the named mode (a key of FUSERS), with a stacked LoRA on top if given.

    The server's per-user path: the plan is checked once, and `cat` plus stacking is one
    concatenation. Same result as `stack(FUSERS[mode](loras, weights), stacked)`.
    """
    check_fusion_plan(loras, weights, mode, max_rank, stacked=stacked)
    if mode == "linear":
        loras, weights = [_linear_sum(loras, weights)], [1.0]
    if stacked is None:
        return loras[0] if mode == "linear" else _concat_rank(loras, weights)
    return _concat_rank([*loras, stacked], [*weights, 1.0])

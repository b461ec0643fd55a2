"""Choose a bank's fusion defaults on its own anchor pool (never on the users it is evaluated on).

Leave-one-cluster-out: every anchor-pool user with validation items plays a new user. It is
embedded from its training items, its own cluster's anchor is left out of the retrieval
(that meta-LoRA was trained on the user's data), the remaining anchors are fused as the
server would fuse them for each candidate (mode, top_k, residual scale), and the candidate
is scored by the mean answer loss on the user's validation items (held out of every
training). A candidate whose served rank would leave no room for a stacked LoRA
(`max_fused_rank`) is scored but not chosen.

The rule (fixed before it was applied to any bank evaluated with it, see docs/results.md):
in a bank with a shared task LoRA, a candidate must beat the shared LoRA alone (residual
scale 0) beyond the pool's noise: the 95% interval of its paired per-user loss difference
(users resampled with replacement) lies below zero. Of those, the lowest mean loss wins;
if none does, the bank serves the shared LoRA alone. A small pool (LaMP-4: 10 users) spans
its whole grid within noise, and picking its lowest mean there is picking noise. Without a
shared LoRA the lowest mean wins. Ties go to the earlier candidate (the smaller scale).

A `reference` LoRA that the bank does not serve (an `--init continue` bank's task LoRA) is
scored on the same users and every candidate's paired interval against it is recorded
(`vs_reference`): what fusing buys over the task LoRA, on the pool, without changing the choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.adapters import LoraWeights, fuse
from server.bank.loader import fused_rank
from server.bank.manifest import FusionDefaults
from server.fusion import anchor_weights
from server.lamp_data import User
from server.settings import Settings
from server.tasks import Task
from server.training import Example, mean_losses

# The candidates: top-k for `linear` (the paper's mode), `cat` at top-2 for comparison, and
# the residual scales (0 = the shared LoRA alone; only banks with one).
LINEAR_TOP_K = (1, 2, 4)
CAT_TOP_K = (2,)
RESIDUAL_SCALES = (0.0, 0.25, 0.5, 1.0)
WEIGHT_ROUND_STEP = Settings.model_fields["weight_round_step"].default  # as the server rounds
RULE = "beats the shared LoRA alone beyond noise (95% paired user-bootstrap interval < 0), then lowest mean"
RESAMPLES = 1000


def candidates(n_anchors: int, has_shared: bool, base: FusionDefaults) -> list[FusionDefaults]:
    """Every (mode, top_k, residual scale) to score; one candidate for scale 0 (all fuse to the shared LoRA)."""
    out = [base.model_copy(update={"residual_scale": 0.0})] if has_shared else []
    grid = [("linear", k) for k in LINEAR_TOP_K] + [("cat", k) for k in CAT_TOP_K]
    for scale in (s for s in RESIDUAL_SCALES if s > 0):
        for mode, k in grid:
            if k <= n_anchors and not (mode == "cat" and k == 1):
                out.append(FusionDefaults(mode=mode, top_k=k, residual_scale=scale))
    return out


def _neighbours(embedding: np.ndarray, anchors: Mapping[str, tuple[np.ndarray, LoraWeights]], own: str, k: int):
    """The k most similar anchors other than `own`: (ids, cosine similarities), most similar first."""
    ids = [a for a in anchors if a != own]
    sims = np.array([float(np.dot(embedding, anchors[a][0])) for a in ids])
    order = np.argsort(-sims, kind="stable")[:k]
    return [ids[i] for i in order], [float(sims[i]) for i in order]


def fused_without_own(
    embedding: np.ndarray,
    anchors: Mapping[str, tuple[np.ndarray, LoraWeights]],
    own: str,
    defaults: FusionDefaults,
    shared: LoraWeights | None,
) -> LoraWeights:
    """An anchor-pool user's fused adapter under `defaults`, as the server would fuse it, with its
    own cluster's anchor left out (that meta-LoRA saw the user's data)."""
    ids, sims = _neighbours(embedding, anchors, own, defaults.top_k)
    weights = anchor_weights(sims, None, WEIGHT_ROUND_STEP)
    kept = [(a, w) for a, w in zip(ids, weights) if w > 0]
    return fuse(
        defaults.mode, [anchors[a][1] for a, _ in kept], [w for _, w in kept],
        shared=shared, residual_scale=defaults.residual_scale,
    )  # fmt: skip


def choose_fusion(
    embedder: Any,
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    users: Sequence[tuple[User, Sequence[Example], str]],
    anchors: Mapping[str, tuple[np.ndarray, LoraWeights]],
    shared: LoraWeights | None,
    base: FusionDefaults,
    reference: LoraWeights | None = None,
    max_fused_rank: int,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every candidate on the anchor pool; returns the manifest record, with `chosen`.

    `users`: (the user with its training items, its validation examples, its cluster's anchor
    id); `anchors`: anchor id -> (embedding, meta-LoRA).
    """
    from tqdm.auto import tqdm

    users = [u for u in users if u[1]]
    grid = candidates(len(anchors) - 1, shared is not None, base)
    ranks = {a: lora.rank for a, (_, lora) in anchors.items()}
    shared_rank = shared.rank if shared is not None else 0
    losses = np.zeros((len(grid), len(users)))
    reference_losses = np.zeros(len(users))
    for j, (user, validation, own) in enumerate(tqdm(users, desc="fusion defaults", unit="user", disable=not progress)):
        embedding = embedder.embed_user([task.render(item) for item in user.profile])
        jobs = []
        for c in grid:
            jobs.append((validation, fused_without_own(embedding, anchors, own, c, shared)))
        if reference is not None:
            jobs.append((validation, reference))
        scored = mean_losses(model, tokenizer, jobs, max_length=max_length)
        losses[:, j] = scored[: len(grid)]
        if reference is not None:
            reference_losses[j] = scored[-1]
    served = [fused_rank(list(ranks.values()), c.mode, c.top_k, shared_rank, c.residual_scale) for c in grid]
    best, intervals = choose(losses, [r <= max_fused_rank for r in served], baseline=0 if shared is not None else None)
    rows = []
    for i, c in enumerate(grid):
        row = {**c.model_dump(), "validation_loss": round(float(losses[i].mean()), 4), "served_rank": served[i]}
        if intervals[i] is not None:
            row["vs_shared"] = [round(v, 4) for v in intervals[i]]
        if reference is not None:
            row["vs_reference"] = [round(v, 4) for v in paired_interval(losses[i] - reference_losses)]
        rows.append(row)
    record = {
        "criterion": "mean over anchor-pool users of the answer loss on their validation items; "
        "each user's own cluster's anchor left out of the retrieval",
        "rule": RULE if shared is not None else "lowest mean",
        "users": len(users),
        "user_ids": [str(u.user_id) for u, _, _ in users],
        "user_losses": [[round(float(v), 5) for v in row] for row in losses],
        "grid": rows,
        "chosen": grid[best].model_dump(),
    }
    if reference is not None:
        record["reference"] = {
            "lora": "the task LoRA the meta-LoRAs continue (not served)",
            "validation_loss": round(float(reference_losses.mean()), 4),
            "user_losses": [round(float(v), 5) for v in reference_losses],
        }
    return record


def paired_interval(differences: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the per-user differences' mean, users resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return float(differences.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def choose(
    losses: np.ndarray, eligible: Sequence[bool], *, baseline: int | None
) -> tuple[int, list[tuple[float, float, float] | None]]:
    """The chosen row of `losses` (candidates x users) under the module's rule, and each row's interval vs `baseline`.

    `baseline`: the row of the shared LoRA alone (None: no shared LoRA, the lowest mean wins).
    """
    if not any(eligible):
        raise ValueError("no fusion candidate fits max_fused_rank")
    mean = losses.mean(axis=1)
    lowest = lambda rows: min(rows, key=lambda i: (mean[i], i))  # noqa: E731
    if baseline is None:
        return lowest([i for i, ok in enumerate(eligible) if ok]), [None] * len(losses)
    intervals = [None if i == baseline else paired_interval(losses[i] - losses[baseline]) for i in range(len(losses))]
    better = [i for i, ok in enumerate(eligible) if ok and intervals[i] is not None and intervals[i][2] < 0]
    return (lowest(better) if better else baseline), intervals

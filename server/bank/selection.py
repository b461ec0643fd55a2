"""Choose a bank's fusion defaults on its own anchor pool (never on the users it is evaluated on).

Leave-one-cluster-out: every anchor-pool user with validation items plays a new user. It is
embedded from its training items, its own cluster's anchor is left out of the retrieval
(that meta-LoRA was trained on the user's data), the remaining anchors are fused as the
server would fuse them for each candidate (mode, top_k, residual scale), and the candidate
is scored by the mean answer loss on the user's validation items (held out of every
training). The lowest mean over users wins; ties go to the earlier candidate, which is the
smaller residual scale. A candidate whose served rank would leave no room for a stacked
LoRA (`max_fused_rank`) is scored but not chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.adapters import LoraWeights, fuse
from server.bank.build import User
from server.bank.loader import fused_rank
from server.bank.manifest import FusionDefaults
from server.fusion import anchor_weights
from server.settings import Settings
from server.tasks import Task
from server.training import Example, mean_losses

# The candidates: top-k for `linear` (the paper's mode), `cat` at top-2 for comparison, and
# the residual scales (0 = the shared LoRA alone; only banks with one).
LINEAR_TOP_K = (1, 2, 4)
CAT_TOP_K = (2,)
RESIDUAL_SCALES = (0.0, 0.25, 0.5, 1.0)
WEIGHT_ROUND_STEP = Settings.model_fields["weight_round_step"].default  # as the server rounds


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
    for j, (user, validation, own) in enumerate(tqdm(users, desc="fusion defaults", unit="user", disable=not progress)):
        embedding = embedder.embed_user([task.render(item) for item in user.profile])
        jobs = []
        for c in grid:
            ids, sims = _neighbours(embedding, anchors, own, c.top_k)
            weights = anchor_weights(sims, None, WEIGHT_ROUND_STEP)
            kept = [(a, w) for a, w in zip(ids, weights) if w > 0]
            adapter = fuse(
                c.mode, [anchors[a][1] for a, _ in kept], [w for _, w in kept],
                shared=shared, residual_scale=c.residual_scale,
            )  # fmt: skip
            jobs.append((validation, adapter))
        losses[:, j] = mean_losses(model, tokenizer, jobs, max_length=max_length)
    mean = losses.mean(axis=1)
    rows = []
    for c, loss in zip(grid, mean):
        rank = fused_rank(list(ranks.values()), c.mode, c.top_k, shared_rank, c.residual_scale)
        rows.append({**c.model_dump(), "validation_loss": round(float(loss), 4), "served_rank": rank})
    eligible = [i for i, r in enumerate(rows) if r["served_rank"] <= max_fused_rank]
    if not eligible:
        raise ValueError(f"no fusion candidate fits max_fused_rank {max_fused_rank}: {rows}")
    best = min(eligible, key=lambda i: (mean[i], i))
    return {
        "criterion": "mean over anchor-pool users of the answer loss on their validation items; "
        "each user's own cluster's anchor left out of the retrieval",
        "users": len(users),
        "grid": rows,
        "chosen": grid[best].model_dump(),
    }

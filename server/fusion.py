"""MTA stage 2: retrieve a user's nearest anchors and fuse their meta-LoRAs into one adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.adapter_cache import AdapterKey
from server.adapters import LoraWeights, fuse, save_adapter
from server.bank.loader import Bank


def anchor_weights(similarities: list[float], temperature: float | None = None, round_step: float = 0.0) -> list[float]:
    """Fusion weights from cosine similarities, summing to 1.

    Semantics: w_i = s_i / sum(s) over positive similarities (the paper's normalisation), or
    softmax(s / temperature); then rounded to `round_step` and renormalised, so users with
    near-identical neighbourhoods share one cache key. Rounding never zeroes the top anchor.
    """
    s = np.asarray(similarities, dtype=np.float64)
    if temperature:
        w = np.exp((s - s.max()) / temperature)
    else:
        w = np.clip(s, 0.0, None)
        if w.sum() <= 0:
            w = np.ones_like(s)
    w = w / w.sum()
    if round_step > 0:
        rounded = np.round(w / round_step) * round_step
        if rounded.sum() <= 0:
            rounded[int(np.argmax(w))] = 1.0
        w = rounded / rounded.sum()
    return [round(float(x), 6) for x in w]


@dataclass(frozen=True)
class FusionPlan:
    """Which anchors, with which weights, fused how: everything the adapter depends on."""

    bank_version: str
    bank_uid: str  # identifies this load of the bank (reloading the same version gets a new uid)
    mode: str
    anchors: tuple[tuple[str, float], ...]  # (anchor id, weight), most similar first, weight > 0
    retrieved: tuple[tuple[str, float], ...]  # (anchor id, cosine similarity) of all top-k, weight 0 included
    shared_only: bool = False  # the bank serves its shared LoRA alone (residual scale 0): anchors add nothing

    def key(
        self, stacked_version: int | None = None, *, user_id: str | None = None, stacked_digest: str | None = None
    ) -> AdapterKey:
        """The fused adapter's key (shared by a neighbourhood; by every user when only the shared
        LoRA is served, so it takes one cache entry and one engine slot); with a stacked LoRA, the user's own."""
        anchors, mode = ((), "shared") if self.shared_only else (self.anchors, self.mode)
        return AdapterKey(self.bank_uid, anchors, mode, stacked_version, user_id, stacked_digest)


def plan_fusion(
    bank: Bank,
    embedding: np.ndarray,
    *,
    bank_uid: str,
    top_k: int,
    mode: str,
    temperature: float | None = None,
    round_step: float = 0.0,
) -> FusionPlan:
    hits = bank.index.search(embedding, top_k)
    weights = anchor_weights([s for _, s in hits], temperature, round_step)
    return FusionPlan(
        bank_version=bank.version,
        bank_uid=bank_uid,
        mode=mode,
        anchors=tuple((a, w) for (a, _), w in zip(hits, weights) if w > 0),
        retrieved=tuple(hits),
        shared_only=bank.shared is not None and bank.residual_scale == 0,
    )


def build_adapter(
    bank: Bank,
    plan: FusionPlan,
    max_rank: int,
    stacked: LoraWeights | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraWeights:
    """The one adapter vLLM serves for this plan: the bank's shared LoRA if it has one, the fused
    anchors (times the bank's residual scale), and the stacked LoRA if any.

    Summed in float32; `dtype` is the tensors' (the serving dtype when it is to be written).
    The residual scale is fixed per bank load (`bank_uid`), so the plan's cache key covers it.
    """
    loras = [bank.loras[a] for a, _ in plan.anchors]
    weights = [w for _, w in plan.anchors]
    return fuse(
        plan.mode, loras, weights, stacked=stacked, max_rank=max_rank, dtype=dtype,
        shared=bank.shared, residual_scale=bank.residual_scale,
    )  # fmt: skip


def materialize(
    bank: Bank,
    plan: FusionPlan,
    path: Path,
    max_rank: int,
    stacked: LoraWeights | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Write the plan's adapter as a PEFT directory at `path`; returns its rank.

    The fusion rounds straight to `dtype` (chunk by chunk, for `linear`), so no float32 copy
    of the whole adapter is made only to be cast on the way to the file.
    """
    lora = build_adapter(bank, plan, max_rank, stacked, dtype)
    save_adapter(lora, path, base_model_name_or_path=bank.manifest.base_model, dtype=dtype)
    return lora.rank

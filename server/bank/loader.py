"""Load a bank directory and validate all of it before it serves a single request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from server.adapters import (
    AdapterFormatError,
    FlatLayout,
    LoraWeights,
    flatten,
    load_adapter,
)
from server.adapters.targets import ModelTargets
from server.bank.index import AnchorIndex
from server.bank.manifest import MANIFEST_FILE, BankManifest


class BankError(ValueError):
    """A bank that cannot be served; the message lists every problem found."""


@dataclass(frozen=True)
class Bank:
    path: Path
    manifest: BankManifest
    loras: dict[str, LoraWeights]  # anchor id -> meta-LoRA (scaling not folded)
    index: AnchorIndex
    shared: LoraWeights | None = None  # the LoRA under every anchor's residual (manifest.shared_lora)
    residual_scale: float = 1.0  # the fused residuals' factor: the server's override or the bank default

    @property
    def version(self) -> str:
        return self.manifest.bank_version

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "bank_version": m.bank_version,
            "name": m.name,
            "description": m.description,
            "random": m.random,
            "path": str(self.path),
            "base_model": m.base_model,
            "embedding_model": m.embedding_model.model_dump(),
            "fusion": {**m.fusion.model_dump(), "residual_scale": self.residual_scale},
            "shared_lora": m.shared_lora.model_dump(include={"rank", "target_modules"}) if m.shared_lora else None,
            "task": m.task.model_dump(),
            "stacking": m.stacking.model_dump() if m.stacking else None,
            "anchors": [a.model_dump(include={"id", "cluster_size", "rank"}) for a in m.anchors],
        }


def flatten_anchors(loras: dict[str, LoraWeights]) -> dict[str, LoraWeights]:
    """Each anchor in one float32 buffer; anchors with the same modules and shapes share a layout.

    `linear` fusion of anchors that share a layout is a few whole-buffer operations (see
    `server.adapters.math.FlatLayout`); the tensors stay reachable by module as before.
    """
    layouts: dict[FlatLayout, FlatLayout] = {}
    flat = {}
    for anchor, lora in loras.items():
        layout = FlatLayout.of(lora)
        layout = layouts.setdefault(layout, layout)
        flat[anchor] = flatten(lora, layout)
    return flat


def fused_rank(ranks: list[int], mode: str, top_k: int, shared_rank: int = 0, residual_scale: float = 1.0) -> int:
    """Largest rank a fused adapter can have: linear keeps the anchors' rank, cat adds the top-k ranks;
    a shared LoRA adds its rank, and residual_scale 0 drops the anchors'."""
    ranks = sorted(ranks, reverse=True)
    anchors = (ranks[0] if mode == "linear" else sum(ranks[:top_k])) if residual_scale > 0 else 0
    return shared_rank + anchors


def read_manifest(path: Path) -> BankManifest:
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise BankError(f"bank {path}: not a directory")
    if not file.is_file():
        raise BankError(f"bank {path}: missing {MANIFEST_FILE}")
    try:
        return BankManifest.model_validate(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise BankError(f"bank {path}: {MANIFEST_FILE} is not valid JSON: {e}") from e
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors())
        raise BankError(f"bank {path}: invalid {MANIFEST_FILE}: {problems}") from e


def load_bank(
    path: Path,
    *,
    model_id: str,
    targets: ModelTargets,
    embedding_dim: int,
    max_lora_rank: int,
    fusion_mode: str | None = None,
    top_k: int | None = None,
    residual_scale: float | None = None,
) -> Bank:
    """Read and validate a bank for the served model (`targets`: its linear layers); raise
    BankError naming every problem.

    `fusion_mode`/`top_k`/`residual_scale` are the server's overrides of the bank defaults: the
    ranks must fit vLLM's `max_lora_rank` after fusion (cat adds ranks, linear keeps one, a
    shared LoRA adds its own) plus no stacking.
    """
    path = Path(path).resolve()
    manifest = read_manifest(path)
    problems: list[str] = []

    if manifest.base_model != model_id:
        problems.append(f"bank was built for base model {manifest.base_model!r}, the server serves {model_id!r}")
    if manifest.embedding_model.dim != embedding_dim:
        problems.append(
            f"manifest embedding dim {manifest.embedding_model.dim} != embedding model output dim {embedding_dim}"
        )

    emb_file = path / manifest.embeddings_file
    embeddings = None
    if not emb_file.is_file():
        problems.append(f"missing anchor embeddings file {manifest.embeddings_file}")
    else:
        try:
            embeddings = np.load(emb_file, allow_pickle=False)
        except (ValueError, OSError) as e:
            problems.append(f"cannot read {manifest.embeddings_file}: {e}")
        if embeddings is not None:
            expected = (len(manifest.anchors), manifest.embedding_model.dim)
            if embeddings.shape != expected:
                problems.append(f"{manifest.embeddings_file} has shape {embeddings.shape}, expected {expected}")
            elif not np.isfinite(embeddings).all() or (np.linalg.norm(embeddings, axis=1) == 0).any():
                problems.append(f"{manifest.embeddings_file} has non-finite or all-zero rows")

    loras: dict[str, LoraWeights] = {}
    for spec in manifest.anchors:
        try:
            lora = load_adapter(path / spec.lora_path)
        except (AdapterFormatError, OSError) as e:
            problems.append(f"anchor {spec.id}: {e}")
            continue
        if lora.rank != spec.rank:
            problems.append(f"anchor {spec.id}: adapter rank {lora.rank} != manifest rank {spec.rank}")
        if sorted(lora.target_modules) != sorted(spec.target_modules):
            problems.append(
                f"anchor {spec.id}: adapter targets {lora.target_modules} != manifest {sorted(spec.target_modules)}"
            )
        problems += targets.problems(f"anchor {spec.id}", lora)
        loras[spec.id] = lora

    shared = None
    if (spec := manifest.shared_lora) is not None:
        try:
            shared = load_adapter(path / spec.lora_path)
        except (AdapterFormatError, OSError) as e:
            problems.append(f"shared LoRA: {e}")
        else:
            if shared.rank != spec.rank:
                problems.append(f"shared LoRA: adapter rank {shared.rank} != manifest rank {spec.rank}")
            problems += targets.problems("shared LoRA", shared)

    scale = manifest.fusion.residual_scale if residual_scale is None else residual_scale
    if scale == 0 and manifest.shared_lora is None:
        problems.append("residual_scale 0 needs a bank with a shared LoRA (it would serve nothing)")
    mode = fusion_mode or manifest.fusion.mode
    k = min(top_k or manifest.fusion.top_k, len(manifest.anchors))
    ranks = [a.rank for a in manifest.anchors]
    if mode == "linear":
        if len(set(ranks)) > 1:
            problems.append(f"linear fusion needs one rank for all anchors, the bank has ranks {sorted(set(ranks))}")
        if len({tuple(sorted(a.target_modules)) for a in manifest.anchors}) > 1:
            problems.append("linear fusion needs the same target modules for all anchors")
    shared_rank = manifest.shared_lora.rank if manifest.shared_lora else 0
    if (rank := fused_rank(ranks, mode, k, shared_rank, scale)) > max_lora_rank:
        problems.append(
            f"{mode} fusion of top-{k} anchors gives rank {rank} > max_lora_rank {max_lora_rank}"
            " (raise MTA_MAX_LORA_RANK or lower MTA_TOP_K)"
        )

    if problems:
        raise BankError(f"bank {path} refused: " + "; ".join(problems))
    assert embeddings is not None
    return Bank(
        path=path,
        manifest=manifest,
        loras=flatten_anchors(loras),
        index=AnchorIndex([a.id for a in manifest.anchors], embeddings),
        shared=shared,
        residual_scale=scale,
    )

"""Banks with RANDOM meta-LoRAs: test fixtures and the stand-in demo bank until a trained one ships.

A random bank exercises the whole serving path (retrieval, fusion, vLLM multi-LoRA) but does
not personalize anything useful; its manifest says so (`"random": true`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from server.adapters import LoraWeights, get_scaling, save_adapter
from server.adapters.targets import ModelTargets
from server.bank.manifest import EMBEDDINGS_FILE, MANIFEST_FILE, AnchorSpec, BankManifest, EmbeddingSpec, FusionDefaults, TaskSpec

LAMP_MOVIES = Path(__file__).resolve().parents[2] / "bank_artifacts" / "data" / "movie_tagging.json"


def random_lora(
    targets: ModelTargets,
    *,
    rank: int,
    target_modules: Sequence[str] | None = None,
    lora_alpha: float | None = None,
    a_seed: int = 0,
    b_seed: int = 1,
    b_std: float = 0.02,
) -> LoraWeights:
    """A LoRA with PEFT-style A init (shared `a_seed`, as MTA banks share one init) and random B,
    on the model's linear layers of the `target_modules` kinds (every one by default)."""
    ga, gb = torch.Generator().manual_seed(a_seed), torch.Generator().manual_seed(b_seed)
    a, b = {}, {}
    for name, (fan_in, fan_out) in targets.select(target_modules).items():
        a[name] = (torch.rand(rank, fan_in, generator=ga) * 2 - 1) / fan_in**0.5  # [r, in]
        b[name] = torch.randn(fan_out, rank, generator=gb) * b_std  # [out, r]
    return LoraWeights(a=a, b=b, scaling=get_scaling(lora_alpha or 2 * rank, rank))


def write_random_bank(
    out: Path,
    *,
    targets: ModelTargets,
    model_id: str,
    anchor_ids: Sequence[str],
    anchor_embeddings: np.ndarray,
    embedding_model: str,
    rank: int = 8,
    target_modules: Sequence[str] | None = None,
    b_std: float = 0.02,
    seed: int = 0,
    fusion: FusionDefaults = FusionDefaults(),
    task: TaskSpec = TaskSpec(),
    name: str = "random",
    bank_version: str | None = None,
    description: str = "RANDOM meta-LoRAs (not trained): exercises serving, does not personalize.",
) -> Path:
    """Write a complete bank directory atomically (temp dir, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        anchors = []
        for i, anchor_id in enumerate(anchor_ids):
            lora = random_lora(
                targets, rank=rank, target_modules=target_modules, a_seed=seed, b_seed=seed + 1 + i, b_std=b_std
            )
            save_adapter(lora, tmp / "loras" / anchor_id, base_model_name_or_path=model_id)
            anchors.append(
                AnchorSpec(id=anchor_id, cluster_size=1, rank=rank, target_modules=lora.target_modules, lora_path=f"loras/{anchor_id}")
            )
        np.save(tmp / EMBEDDINGS_FILE, np.asarray(anchor_embeddings, dtype=np.float32))
        manifest = BankManifest(
            bank_version=bank_version or f"{name}-seed{seed}",
            name=name,
            description=description,
            random=True,
            base_model=model_id,
            embedding_model=EmbeddingSpec(name=embedding_model, dim=int(anchor_embeddings.shape[1])),
            fusion=fusion,
            task=task,
            lora_init_seed=seed,
            anchors=anchors,
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_random_demo_bank(out: Path, *, model_path: Path, model_id: str, n_anchors: int = 8) -> Path:
    """Anchors = real LaMP-2M users (embedded with MiniLM), meta-LoRAs random: a labelled stand-in."""
    from server.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, resolve_embedding_model
    from server.prompts import render_item

    template = "Description: {description} Tag: {tag}"
    users = json.loads(LAMP_MOVIES.read_text())[:n_anchors]
    embedder = Embedder(resolve_embedding_model(DEFAULT_EMBEDDING_MODEL))
    embeddings = np.stack([embedder.embed_user([render_item(i, template) for i in u["profile"]]) for u in users])
    return write_random_bank(
        out,
        targets=ModelTargets.from_config(json.loads((model_path / "config.json").read_text())),
        model_id=model_id,
        anchor_ids=[f"lamp2m-{u['user_id']}" for u in users],
        anchor_embeddings=embeddings,
        embedding_model=DEFAULT_EMBEDDING_MODEL,
        rank=8,
        b_std=0.01,
        task=TaskSpec(name="movie_tagging", history_template=template),
        name="random-demo",
        description="RANDOM demo bank: anchors are real LaMP-2M users, meta-LoRAs are random (not trained).",
    )

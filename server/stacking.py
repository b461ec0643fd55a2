"""MTA stage 3: a user's ultra-low-rank stacked LoRA, trained on few examples over the fused adapter.

Only this small LoRA is stored per user (as safetensors bytes in the user store). It is
served by concatenating it onto the user's fused adapter (one adapter per request).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from server.adapters import LoraWeights, adapter_from_bytes, adapter_metadata, adapter_to_bytes
from server.adapters.targets import ModelTargets
from server.prompts import retrieve_top1, user_content
from server.settings import Settings
from server.training import Example, TrainConfig, TrainResult, train_lora

STACKED_BLOB = "stacked"


@dataclass(frozen=True)
class StackedBlob:
    """A stored stacked LoRA: its store version, what it was trained against, and its bytes."""

    version: int
    bank_version: str
    job_id: str
    data: bytes

    @classmethod
    def parse(cls, version: int, data: bytes) -> StackedBlob:
        """Never raises: unreadable bytes surface in `problems`, so a corrupt blob fails no request."""
        try:
            meta = adapter_metadata(data)
        except ValueError:
            meta = {}
        return cls(version, meta.get("bank_version", ""), meta.get("job_id", ""), data)

    @property
    def size(self) -> int:
        return len(self.data)

    def lora(self) -> LoraWeights:
        return adapter_from_bytes(self.data)

    def problems(self, targets: ModelTargets) -> list[str]:
        """Why vLLM could not serve it on this model (unreadable bytes, unknown modules, wrong
        shapes); empty if it can."""
        try:
            lora = self.lora()
        except ValueError as e:
            return [str(e)]
        return targets.problems("stacked LoRA", lora)

    @cached_property
    def digest(self) -> str:
        """Of the bytes: the adapter cache keys a stacked adapter by content, as a store that loses
        writes (Redis) may issue a version twice."""
        return hashlib.sha256(self.data).hexdigest()

    def meta(self, targets: ModelTargets) -> StackedMeta:
        """What a request needs to know of it, without the bytes (checked against the model once)."""
        problems = self.problems(targets)
        return StackedMeta(self.version, self.bank_version, self.job_id, self.size, self.digest, "; ".join(problems) or None)


@dataclass(frozen=True)
class StackedMeta:
    """A stored stacked LoRA as a request sees it: kept per user instead of its megabytes, which
    are read again only to build the adapter (a cache miss)."""

    version: int
    bank_version: str
    job_id: str
    size: int
    digest: str
    error: str | None  # why the model cannot take it (unreadable, other layers); None: servable


def stacked_to_bytes(
    lora: LoraWeights, *, bank_version: str, job_id: str, dtype: torch.dtype = torch.float32
) -> bytes:
    """Stored in the serving dtype (`serving_dtype`): the served adapter is the same, the bytes half."""
    return adapter_to_bytes(lora, extra={"bank_version": bank_version, "job_id": job_id}, dtype=dtype)


def stack_config(
    settings: Settings, *, rank: int | None = None, learning_rate: float | None = None, epochs: int | None = None
) -> TrainConfig:
    """The stacked LoRA's recipe: the server's fine-tune defaults (`MTA_FINETUNE_*`), which
    `mta eval`'s `mta_stack` trains with too; a request may override rank, lr and epochs.

    alpha = 2 x rank, as every other LoRA of the project; lr 5e-4 was chosen over 2e-4 and 1e-3 on
    the demo bank's anchor pool (scripts/choose_stacking_recipe.py, docs/results.md); the paper's
    one step at 5e-5 does not move a rank-2 LoRA.
    """
    rank = rank or settings.finetune_rank
    return TrainConfig(
        rank=rank,
        alpha=2 * rank,
        learning_rate=learning_rate or settings.finetune_learning_rate,
        epochs=epochs or settings.finetune_epochs,
        batch_size=settings.finetune_batch_size,
        seed=settings.finetune_seed,
    )


def training_examples(pairs: Sequence[tuple[str, str]], history: Sequence[str], rendered: Sequence[str]) -> list[Example]:
    """(input, output) pairs as MTA prompts: each carries the BM25 top-1 profile item.

    `rendered[i]` is pair i as a profile item would render; it is left out of pair i's
    retrieval so an example added to the profile never retrieves its own answer.
    """
    out = []
    for (instruction, answer), own in zip(pairs, rendered):
        others = [h for h in history if h != own]
        out.append(Example(prompt=user_content(instruction, retrieve_top1(others, instruction)), answer=answer))
    return out


def train_stacked(
    model: Any,
    tokenizer: Any,
    fused: LoraWeights,
    examples: Sequence[Example],
    config: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Freeze base + fused adapter and train a new LoRA on top (the paper's LoRA stacking)."""
    return train_lora(model, tokenizer, examples, config, base_adapter=fused, progress=progress)

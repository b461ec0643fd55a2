"""MTA stage 3: a user's ultra-low-rank stacked LoRA, trained on few examples over the fused adapter.

Only this small LoRA is stored per user (as safetensors bytes in the user store). It is
served by concatenating it onto the user's fused adapter (one adapter per request).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from server.adapters import LoraWeights, adapter_from_bytes, adapter_metadata, adapter_to_bytes
from server.adapters.targets import ModelTargets
from server.bank.manifest import StackingDefaults
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


RECIPE_FIELDS = ("rank", "learning_rate", "epochs")  # what a request, the settings or a bank may set
# alpha = 2 x rank, as every other LoRA of the project; lr 5e-4 was chosen over 2e-4 and 1e-3 on the
# demo bank's anchor pool (docs/results.md); the paper's one step at 5e-5 does not move a rank-2 LoRA.
DEFAULT_RECIPE = {"rank": 2, "learning_rate": 5e-4, "epochs": 3}
# The per-user LoRA MTA is measured against (OPPU): rank 8 over the task LoRA, 4x a rank-2 stack's bytes.
OPPU_TRAIN = TrainConfig(rank=8, alpha=16, epochs=3, batch_size=2)


def stack_config(
    settings: Settings,
    *,
    rank: int | None = None,
    learning_rate: float | None = None,
    epochs: int | None = None,
    bank: StackingDefaults | None = None,
) -> TrainConfig:
    """The stacked LoRA's recipe, which the server's fine-tunes and `mta eval`'s `mta_stack` share.

    Each of rank, lr and epochs comes from the request if it gives one, else from `MTA_FINETUNE_*`
    if set, else from the recipe the bank's anchor pool chose (`bank`, if it records one), else
    from `DEFAULT_RECIPE`.
    """
    given = {k: v for k, v in zip(RECIPE_FIELDS, (rank, learning_rate, epochs)) if v is not None}
    configured = {k: v for k in RECIPE_FIELDS if (v := getattr(settings, f"finetune_{k}")) is not None}
    recipe = {**DEFAULT_RECIPE, **configured, **given}
    default = TrainConfig(
        rank=recipe["rank"],
        alpha=2 * recipe["rank"],
        learning_rate=recipe["learning_rate"],
        epochs=recipe["epochs"],
        batch_size=settings.finetune_batch_size,
        seed=settings.finetune_seed,
    )
    return with_bank_recipe(default, bank, keep=set(given) | set(configured))


def with_bank_recipe(config: TrainConfig, bank: StackingDefaults | None, *, keep: Collection[str] = ()) -> TrainConfig:
    """`config` with the bank's recorded recipe in every field of `RECIPE_FIELDS` not in `keep`."""
    if bank is None:
        return config
    values = {k: getattr(bank, k) for k in RECIPE_FIELDS if k not in keep}
    return dataclasses.replace(config, **values, alpha=2 * values.get("rank", config.rank))


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

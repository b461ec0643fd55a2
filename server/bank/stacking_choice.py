"""The stacked LoRA's default recipe, chosen on a bank's own anchor pool (`--stacking-lrs`).

A task's best learning rate for the per-user stacked LoRA is not another task's: a bank records
the one its anchor pool chose, and the server's fine-tunes and `mta eval`'s `mta_stack` train
with it (`server.stacking.stack_config`). Every anchor-pool user plays a new user as `mta eval`
treats a held-out one: its first `few_shot` training items are its fine-tune set (they embed it,
and their leave-one-out examples train it), its fused adapter follows the bank's chosen fusion
defaults with its own cluster's anchor left out (that meta-LoRA saw its data), a stacked LoRA is
trained over it at each candidate learning rate, and each candidate is scored by the answer
loss on the user's validation items, with the few-shot items as the prompts' history. It runs
before any refit, so the validation items are held out of every LoRA it scores. An OPPU-style
LoRA (rank 8 over the shared task LoRA, `mta eval`'s `oppu`) is scored beside them for reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.adapters import LoraWeights, stack
from server.bank.manifest import FusionDefaults, StackingDefaults
from server.bank.selection import fused_without_own, paired_interval
from server.lamp_data import User, heldout_examples, leave_one_out_examples
from server.stacking import OPPU_TRAIN
from server.tasks import Task
from server.training import TrainConfig, mean_losses, train_lora

RULE = "lowest mean validation loss over the anchor-pool users"
FEW_SHOT = 5  # `mta eval --few-shot`'s default: the size of a new user's fine-tune set


def choose_stacking(
    embedder: Any,
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    users: Sequence[tuple[User, Sequence[dict[str, Any]], str]],
    anchors: Mapping[str, tuple[np.ndarray, LoraWeights]],
    shared: LoraWeights | None,
    fusion: FusionDefaults,
    base: TrainConfig,
    learning_rates: Sequence[float],
    max_users: int = 0,
    few_shot: int = FEW_SHOT,
    progress: bool = True,
) -> dict[str, Any]:
    """The manifest's `extra.stacking_selection` record; its `chosen` is a `StackingDefaults`.

    `users`: (the user with its training items, its validation items, its cluster's anchor id);
    `base`: the recipe whose learning rate is chosen (rank, epochs, batch size, targets);
    `max_users`: only the first N of `users` (0 = all), each costing a training per learning rate.
    """
    from tqdm.auto import tqdm

    if not learning_rates:
        raise ValueError("no learning rate to choose from")
    names = ["fused adapter alone", *(f"lr {lr:g}" for lr in learning_rates)]
    if shared is not None:
        names.append("oppu (rank 8 over the shared task LoRA)")
    losses: list[list[float]] = []
    user_ids = []
    chosen_from = users[:max_users] if max_users else users
    for user, val_items, own in tqdm(chosen_from, desc="stacking recipe", unit="user", disable=not progress):
        few = User(user.user_id, user.profile[:few_shot])
        validation = heldout_examples(few, tuple(val_items), task)
        examples = leave_one_out_examples(few, task)
        if not validation or not examples:
            continue
        embedding = embedder.embed_user([task.render(item) for item in few.profile])
        fused = fused_without_own(embedding, anchors, own, fusion, shared)
        jobs = [(validation, fused)]
        for lr in learning_rates:
            lora = train_lora(model, tokenizer, examples, dataclasses.replace(base, learning_rate=lr), base_adapter=fused).lora
            jobs.append((validation, stack(fused, lora)))
        if shared is not None:
            oppu = train_lora(model, tokenizer, examples, dataclasses.replace(OPPU_TRAIN, target_modules=base.target_modules), base_adapter=shared).lora
            jobs.append((validation, stack(shared, oppu)))
        losses.append(mean_losses(model, tokenizer, jobs, max_length=base.max_length))
        user_ids.append(str(user.user_id))
    if not losses:
        raise ValueError("no anchor-pool user has both few-shot examples and validation items")
    table = np.array(losses).T  # candidates x users
    mean = table.mean(axis=1)
    best = min(range(len(learning_rates)), key=lambda i: (mean[i + 1], i))
    chosen = StackingDefaults(rank=base.rank, learning_rate=learning_rates[best], epochs=base.epochs)
    rows = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"candidate": name, "validation_loss": round(float(mean[i]), 4)}
        if i:  # paired against the fused adapter alone, users resampled
            row["vs_fused"] = [round(v, 4) for v in paired_interval(table[i] - table[0])]
        rows.append(row)
    return {
        "criterion": f"mean over anchor-pool users of the answer loss on their validation items; each user's "
        f"stacked LoRA trained on its first {few_shot} training items over its fused adapter (its own cluster's "
        "anchor left out), before any refit",
        "rule": RULE,
        "learning_rates": list(learning_rates),
        "recipe": {k: v for k, v in dataclasses.asdict(base).items() if k != "target_modules"},
        "few_shot": few_shot,
        "users": len(user_ids),
        "user_ids": user_ids,
        "user_losses": [[round(float(v), 5) for v in row] for row in table],
        "table": rows,
        "chosen": chosen.model_dump(),
        "max_users": max_users or None,  # `mta eval --folds 2` rebuilds with it
    }

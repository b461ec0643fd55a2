"""Who is evaluated on what: held-out users, their few-shot sets and their evaluation points.

Each held-out user's first `n_few_shot` profile items are the few-shot set (what the user
sent: MTA's stacking data, OPPU's training data, the BM25 retrieval pool and the profile
embedded for fusion); the rest of the profile plus the LaMP query are the evaluation points.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.lamp_data import DataError, User, leave_one_out_examples, load_users, split_users
from server.prompts import retrieve_top1, user_content
from server.tasks import Task
from server.training import Example


@dataclass(frozen=True)
class Point:
    instruction: str
    gold: str
    context: str | None  # BM25 top-1 item of the user's few-shot set


@dataclass(frozen=True)
class EvalUser:
    user_id: int | str
    few_shot: tuple[dict[str, Any], ...]
    points: tuple[Point, ...]

    def rendered_few_shot(self, task: Task) -> list[str]:
        return [task.render(item) for item in self.few_shot]

    def training_examples(self, task: Task) -> list[Example]:
        """The few-shot items as leave-one-out examples, exactly as banks and fine-tunes build them."""
        return leave_one_out_examples(User(self.user_id, self.few_shot), task)

    def prompt(self, point: Point, *, with_context: bool) -> str:
        """The user turn (the chat template is applied at generation)."""
        return user_content(point.instruction, point.context if with_context else None)

    def majority_label(self, task: Task) -> str:
        """The user's most frequent few-shot answer (first seen wins ties)."""
        return Counter(task.answer(item) for item in self.few_shot).most_common(1)[0][0]

    def copy_retrieved(self, point: Point, task: Task) -> str:
        """The answer of the few-shot item BM25 retrieves for the point."""
        rendered = self.rendered_few_shot(task)
        return task.answer(self.few_shot[rendered.index(point.context)]) if point.context in rendered else ""


def eval_users(users: Sequence[User], queries: dict[Any, list[dict]], task: Task, n_few_shot: int) -> list[EvalUser]:
    """Few-shot set and points per user; users with no point beyond the few-shot set are skipped."""
    out = []
    for user in users:
        few, rest = user.profile[:n_few_shot], user.profile[n_few_shot:]
        history = [task.render(item) for item in few]
        pairs = [(task.instruction(item), task.answer(item)) for item in rest]
        pairs += [(q["input"], str(q["gold"])) for q in queries.get(user.user_id, []) if "gold" in q]
        if few and pairs:
            points = tuple(Point(i, g, retrieve_top1(history, i)) for i, g in pairs)
            out.append(EvalUser(user.user_id, tuple(few), points))
    return out


def read_queries(path: Path) -> dict[Any, list[dict]]:
    """user_id -> LaMP query records (with `gold`, as in the dev files)."""
    return {r["user_id"]: list(r.get("query", [])) for r in json.loads(Path(path).read_text())}


def split_from_manifest(users: Sequence[User], extra: dict[str, Any], holdout_fraction: float) -> tuple[list[User], list[User]]:
    """(anchor pool, held-out users): the bank's recorded split when it has one, else a fresh split.

    Evaluating a user the bank was trained on would leak, so a recorded split is always used.
    """
    split = extra.get("split") or {}
    if "held_out" in split:
        held_ids = {str(u) for u in split["held_out"]}
        pool_ids = {str(u) for u in split.get("anchor_pool", [])}
        held = [u for u in users if str(u.user_id) in held_ids]
        pool = [u for u in users if str(u.user_id) in pool_ids]
        if not held:
            raise DataError("none of the bank's held-out users is in the data file: wrong --data for this bank?")
        return pool, held
    return split_users(users, holdout_fraction)


def load_task_users(path: Path, task: Task) -> tuple[list[User], dict[Any, list[dict]]]:
    return load_users(path, task), read_queries(path)

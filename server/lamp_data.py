"""LaMP user files: users and their history items, the user and item splits, training examples.

The bank builder and the evaluation read the same files the same way: a split or an example
built differently in one of them would make the evaluation measure another protocol than the
bank was built with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.prompts import retrieve_top1, user_content
from server.tasks import Task
from server.training import Example


class DataError(ValueError):
    """A data file that cannot be used (unreadable, not LaMP, a bad record); the message says where."""


@dataclass(frozen=True)
class User:
    user_id: int | str
    profile: tuple[dict[str, Any], ...]

    @property
    def sort_key(self) -> tuple[int, int | str]:
        return user_sort_key(self.user_id)


def user_sort_key(user_id: int | str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then string ids in string order."""
    return (0, user_id) if isinstance(user_id, int) else (1, user_id)


def _record_problem(record: Any, task: Task) -> str | None:
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object {{user_id, profile, query}}"
    uid = record.get("user_id")
    if isinstance(uid, bool) or not isinstance(uid, (int, str)) or (isinstance(uid, str) and not uid.strip()):
        return f"has no valid user_id (got {uid!r})"
    profile = record.get("profile")
    if not isinstance(profile, list) or not profile:
        return "has no profile (a non-empty list of history items)"
    for j, item in enumerate(profile):
        if not isinstance(item, dict):
            return f"profile[{j}] is a {type(item).__name__}, not an object"
        missing = [f for f in task.item_fields if f not in item]
        if missing:
            return f"profile[{j}] lacks field(s) {missing} needed by task {task.name!r} (has {sorted(item)})"
        empty = [f for f in task.item_fields if not isinstance(item[f], (str, int, float)) or not str(item[f]).strip()]
        if empty:
            return f"profile[{j}] has empty or non-text field(s) {empty}"
    query = record.get("query", [])
    if not isinstance(query, list) or any(not isinstance(q, dict) or "input" not in q for q in query):
        return "has a query that is not a list of objects with an 'input'"
    return None


def read_json(path: Path) -> Any:
    """A JSON file's content; DataError saying why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON: {e}") from e


def load_users(path: str | os.PathLike[str], task: Task) -> list[User]:
    """Read a LaMP per-user file; raise DataError naming the first bad record."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(
            f"{path} is not a LaMP user file: expected a non-empty JSON list of "
            f"{{user_id, profile, query}} objects, got {type(data).__name__}{' (empty)' if data == [] else ''}"
        )
    users, seen = [], set()
    for i, record in enumerate(data):
        problem = _record_problem(record, task)
        if problem is None and record["user_id"] in seen:
            problem = "repeats a user_id of an earlier record"
        if problem is not None:
            uid = record.get("user_id") if isinstance(record, dict) else None
            raise DataError(f"{path} is not a valid LaMP user file: record {i} (user_id {uid!r}) {problem}")
        seen.add(record["user_id"])
        users.append(User(record["user_id"], tuple(record["profile"])))
    return users


def split_users(users: Sequence[User], holdout_fraction: float) -> tuple[list[User], list[User]]:
    """(anchor pool, held-out users), each sorted by user id.

    Users are ordered by sha256(str(user_id)); the first round(holdout_fraction * n) are
    held out. Depends only on the ids and the fraction.
    """
    if not 0 <= holdout_fraction < 1:
        raise DataError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    ordered = sorted(users, key=lambda u: hashlib.sha256(str(u.user_id).encode()).hexdigest())
    n_held = round(holdout_fraction * len(users))
    held, pool = ordered[:n_held], ordered[n_held:]
    return sorted(pool, key=lambda u: u.sort_key), sorted(held, key=lambda u: u.sort_key)


def split_items(user: User, n_validation: int) -> tuple[User, tuple[dict[str, Any], ...]]:
    """(the user with its training items, its validation items): the last `n_validation` items.

    A user keeps at least two training items (one leave-one-out example needs another item
    as context); a shorter history gives no validation items.
    """
    if n_validation <= 0 or len(user.profile) < n_validation + 2:
        return user, ()
    return User(user.user_id, user.profile[:-n_validation]), user.profile[-n_validation:]


def heldout_examples(user: User, items: Sequence[Mapping[str, Any]], task: Task) -> list[Example]:
    """`items` as examples whose prompt carries the BM25 top-1 of `user`'s items: how an unseen item is served."""
    history = [task.render(item) for item in user.profile]
    return [_example(item, history, task) for item in items]


def _example(item: Mapping[str, Any], history: Sequence[str], task: Task) -> Example:
    instruction = task.instruction(item)
    return Example(prompt=user_content(instruction, retrieve_top1(history, instruction)), answer=task.answer(item))


def leave_one_out_examples(user: User, task: Task) -> list[Example]:
    """One example per history item: its instruction, with the BM25 top-1 OTHER item as context."""
    history = [task.render(item) for item in user.profile]
    return [_example(item, history[:i] + history[i + 1 :], task) for i, item in enumerate(user.profile)]

"""LaMP's metrics and user-level bootstrap intervals (pure functions, no model).

A user's evaluation points are correlated (one taste, one writing style), so intervals
resample users, not points.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server.tasks import MetricKind

METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "generation": ("rouge1", "rougeL"),
    "rating": ("mae", "rmse"),
}
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "rouge1": True, "rougeL": True, "mae": False, "rmse": False}

_EDGES = re.compile(r"^[\s\"'`.,;:!]+|[\s\"'`.,;:!]+$")


@functools.lru_cache(maxsize=1 << 16)
def normalize_label(text: str) -> str:
    """A generated label as LaMP compares it: the first line, lower case, quotes and end punctuation off."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _EDGES.sub("", first).lower()


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    return float(np.mean([normalize_label(p) == normalize_label(g) for p, g in zip(preds, golds)])) if golds else 0.0


def macro_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Macro-F1 over the task's label set (LaMP-2M: the 15 tags); an off-list answer is wrong for every label.

    sklearn's `f1_score(labels=..., average="macro", zero_division=0)` (the tests compare the two),
    counted directly: the bootstrap calls this a thousand times per method and sklearn's input
    checks were most of the scoring time.
    """
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for p, g in zip(preds, golds):
        p, g = normalize_label(p), normalize_label(g)
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    per_label = [2 * tp[x] / d if (d := 2 * tp[x] + fp[x] + fn[x]) else 0.0 for x in map(normalize_label, labels)]
    return sum(per_label) / len(per_label) if per_label else 0.0


def rouge(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measures with Porter stemming (LaMP-4/5)."""
    pairs = [_rouge_pair(p, g) for p, g in zip(preds, golds)]
    return {k: float(np.mean([pair[i] for pair in pairs])) if pairs else 0.0 for i, k in enumerate(("rouge1", "rougeL"))}


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@functools.lru_cache(maxsize=1 << 16)
def _rouge_pair(pred: str, gold: str) -> tuple[float, float]:
    """Cached per point: the bootstrap rescores the same points a thousand times."""
    s = _rouge_scorer().score(gold, pred)
    return s["rouge1"].fmeasure, s["rougeL"].fmeasure


def parse_rating(text: str, lo: float = 1.0, hi: float = 5.0) -> float | None:
    """The first number in the output, clipped to the scale; None when there is none."""
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    return None if m is None else min(max(float(m.group()), lo), hi)


def rating_errors(preds: Sequence[str], golds: Sequence[str], lo: float = 1.0, hi: float = 5.0) -> dict[str, float]:
    """MAE and RMSE (LaMP-3); an output with no number counts as the farthest end of the scale."""
    errors = []
    for p, g in zip(preds, golds):
        gold = float(g)
        guess = parse_rating(p, lo, hi)
        if guess is None:
            guess = lo if gold - lo >= hi - gold else hi
        errors.append(guess - gold)
    e = np.asarray(errors, dtype=np.float64)
    if not e.size:
        return {"mae": 0.0, "rmse": 0.0}
    return {"mae": float(np.abs(e).mean()), "rmse": float(math.sqrt((e**2).mean()))}


def score(kind: MetricKind, preds: Sequence[str], golds: Sequence[str], labels: Sequence[str] = ()) -> dict[str, float]:
    """Every metric of the task kind over the given points."""
    if kind == "classification":
        return {"accuracy": accuracy(preds, golds), "f1": macro_f1(preds, golds, labels)}
    if kind == "generation":
        return rouge(preds, golds)
    return rating_errors(preds, golds)


def bootstrap_ci(
    per_user: Sequence[tuple[Sequence[str], Sequence[str]]],
    metric: Callable[[list[str], list[str]], dict[str, float]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every metric, resampling users with replacement."""
    rng = np.random.default_rng(seed)
    n = len(per_user)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        preds: list[str] = []
        golds: list[str] = []
        for i in rng.integers(0, n, size=n):
            preds.extend(per_user[i][0])
            golds.extend(per_user[i][1])
        for k, v in metric(preds, golds).items():
            samples.setdefault(k, []).append(v)
    tail = (1 - level) / 2 * 100
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in samples.items()}


def paired_difference(
    first: Sequence[tuple[Sequence[str], Sequence[str]]],
    second: Sequence[tuple[Sequence[str], Sequence[str]]],
    metric: Callable[[list[str], list[str]], dict[str, float]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float, float]]:
    """Per metric: (first - second, interval low, high), both methods scored on the SAME resampled users.

    Two methods' own intervals overlap far more than their difference varies (the users' difficulty
    moves both): pairing is what tells "level" from "ahead" on a few dozen users.
    """
    if len(first) != len(second):
        raise ValueError(f"paired methods need the same users: {len(first)} vs {len(second)}")

    def scored(per_user: Sequence[tuple[Sequence[str], Sequence[str]]], users: Sequence[int]) -> dict[str, float]:
        return metric([p for i in users for p in per_user[i][0]], [g for i in users for g in per_user[i][1]])

    everyone = range(len(first))
    point_a, point_b = scored(first, everyone), scored(second, everyone)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point_a}
    for _ in range(resamples):
        users = rng.integers(0, len(first), size=len(first))
        a, b = scored(first, users), scored(second, users)
        for k in samples:
            samples[k].append(a[k] - b[k])
    tail = (1 - level) / 2 * 100
    return {
        k: (point_a[k] - point_b[k], float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for k, v in samples.items()
    }

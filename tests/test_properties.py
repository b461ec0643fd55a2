"""Property tests (hypothesis): the adapter math's laws on arbitrary shapes, ranks, scalings and
weights, and store round trips of arbitrary profiles, so the hand-picked cases in
test_adapter_math.py and test_store.py are not the only inputs these ever see.

Kept fast: small tensors, few examples, no deadline (the machine is shared).
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.adapters import (
    FusionError,
    LoraWeights,
    check_fusion_plan,
    flatten,
    fuse,
    fuse_cat,
    fuse_linear,
    stack,
)
from server.api.schemas import USER_ID_PATTERN, ProfileRequest
from server.fusion import anchor_weights
from server.settings import Settings
from server.store import RedisUserStore, SQLiteUserStore, UserStore

# `redis_url` (session scope) comes from tests/conftest.py; importing it here too would start a
# second redis-server.
from .redis_server import redis_key_prefix  # noqa: F401

FAST = settings(max_examples=40, deadline=None, database=None, derandomize=True)
# Float32 sums in different orders: equal up to rounding.
TOL = {"rtol": 1e-5, "atol": 1e-5}

# --- adapter math ------------------------------------------------------------------------

# A tiny "model": module name -> (in, out) features. LoRAs on it touch a non-empty subset.
MODULES = [f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")]


@dataclass(frozen=True)
class Model:
    features: dict[str, tuple[int, int]]


@st.composite
def models(draw: st.DrawFn) -> Model:
    dims = st.integers(1, 6)
    return Model({m: (draw(dims), draw(dims)) for m in MODULES})


@st.composite
def loras(draw: st.DrawFn, model: Model, rank: int | None = None, modules: list[str] | None = None) -> LoraWeights:
    """A random LoRA on `model` (tensors from a drawn seed: cheap to generate and to shrink)."""
    r = rank if rank is not None else draw(st.integers(1, 4))
    chosen = modules if modules is not None else draw(st.lists(st.sampled_from(MODULES), min_size=1, unique=True))
    scaling = draw(st.floats(0.05, 4.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    a = {m: torch.randn(r, model.features[m][0], generator=g) for m in chosen}
    b = {m: torch.randn(model.features[m][1], r, generator=g) for m in chosen}
    return LoraWeights(a=a, b=b, scaling=scaling)


def weights(n: int) -> st.SearchStrategy[list[float]]:
    """n fusion weights, finite and >= 0 (not necessarily normalised: the math must not care)."""
    return st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)


def delta_or_zeros(lora: LoraWeights, module: str, model: Model) -> torch.Tensor:
    fan_in, fan_out = model.features[module]
    return lora.delta(module) if module in lora.a else torch.zeros(fan_out, fan_in)


@st.composite
def cat_plans(draw: st.DrawFn) -> tuple[Model, list[LoraWeights], list[float]]:
    model = draw(models())
    anchors = draw(st.lists(loras(model), min_size=1, max_size=4))
    return model, anchors, draw(weights(len(anchors)))


@st.composite
def linear_plans(draw: st.DrawFn) -> tuple[Model, list[LoraWeights], list[float]]:
    """Anchors as a bank has them for `linear`: one rank, one module set."""
    model = draw(models())
    rank = draw(st.integers(1, 4))
    modules = draw(st.lists(st.sampled_from(MODULES), min_size=1, unique=True))
    anchors = draw(st.lists(loras(model, rank, modules), min_size=1, max_size=4))
    return model, anchors, draw(weights(len(anchors)))


@FAST
@given(cat_plans())
def test_cat_fusion_is_the_weighted_sum_of_the_deltas(plan: tuple[Model, list[LoraWeights], list[float]]) -> None:
    """`cat` is the exact fusion: its rank is the sum of the ranks, it covers the union of the
    modules, and its delta-W is sum_i w_i delta-W_i for every module (zero where a LoRA has none)."""
    model, anchors, w = plan
    fused = fuse_cat(anchors, w)
    assert fused.rank == sum(lora.rank for lora in anchors)
    assert fused.scaling == 1.0
    assert set(fused.modules) == set().union(*(lora.a for lora in anchors))
    for m in fused.modules:
        fan_in, fan_out = model.features[m]
        assert fused.a[m].shape == (fused.rank, fan_in) and fused.b[m].shape == (fan_out, fused.rank)
        expected = sum((wi * delta_or_zeros(lora, m, model) for lora, wi in zip(anchors, w)), torch.zeros(fan_out, fan_in))
        torch.testing.assert_close(fused.delta(m), expected, **TOL)


@FAST
@given(linear_plans())
def test_linear_fusion_sums_a_and_b_at_the_anchors_rank(plan: tuple[Model, list[LoraWeights], list[float]]) -> None:
    """`linear` keeps the rank and sums A and (scaled) B element-wise, with the paper's weights."""
    _, anchors, w = plan
    fused = fuse_linear(anchors, w)
    assert fused.rank == anchors[0].rank and fused.scaling == 1.0
    assert fused.modules == anchors[0].modules
    for m in fused.modules:
        torch.testing.assert_close(fused.a[m], sum(wi * lora.a[m] for lora, wi in zip(anchors, w)), **TOL)
        torch.testing.assert_close(
            fused.b[m], sum(wi * lora.scaling * lora.b[m] for lora, wi in zip(anchors, w)), **TOL
        )


@FAST
@given(models().flatmap(lambda model: st.tuples(st.just(model), loras(model))), st.integers(1, 4), st.data())
def test_fusing_copies_of_one_adapter_gives_it_back(
    model_lora: tuple[Model, LoraWeights], copies: int, data: st.DataObject
) -> None:
    """With weights summing to 1, both fusions of one adapter with itself serve that adapter:
    the same delta-W (and, for `linear`, the same rank)."""
    _, lora = model_lora
    raw = data.draw(st.lists(st.floats(0.01, 1.0), min_size=copies, max_size=copies))
    w = [x / sum(raw) for x in raw]
    for mode in ("linear", "cat"):
        fused = fuse(mode, [lora] * copies, w)
        assert fused.modules == lora.modules
        if mode == "linear":
            assert fused.rank == lora.rank
        for m in lora.modules:
            torch.testing.assert_close(fused.delta(m), lora.delta(m), **TOL)


@FAST
@given(linear_plans())
def test_flat_linear_fusion_gives_the_same_bits_as_module_by_module(
    plan: tuple[Model, list[LoraWeights], list[float]],
) -> None:
    """A bank's anchors share one flat layout and are summed buffer-wide; the result must be the
    module-by-module sum bit for bit (the server serves the flat one, the tests check the other)."""
    _, anchors, w = plan
    flat = [flatten(anchors[0])]
    flat += [flatten(lora, flat[0].flat.layout) for lora in anchors[1:]]  # type: ignore[union-attr]
    by_module, buffer_wide = fuse_linear(anchors, w), fuse_linear(flat, w)
    assert buffer_wide.flat is not None
    for m in by_module.modules:
        assert torch.equal(buffer_wide.a[m], by_module.a[m]) and torch.equal(buffer_wide.b[m], by_module.b[m])


@FAST
@given(cat_plans(), st.data())
def test_stacking_adds_the_users_delta_and_rank(plan: tuple[Model, list[LoraWeights], list[float]], data: st.DataObject) -> None:
    model, anchors, w = plan
    fused = fuse_cat(anchors, w)
    user = data.draw(loras(model))
    stacked = stack(fused, user)
    assert stacked.rank == fused.rank + user.rank
    assert set(stacked.modules) == set(fused.modules) | set(user.modules)
    for m in stacked.modules:
        expected = delta_or_zeros(fused, m, model) + delta_or_zeros(user, m, model)
        torch.testing.assert_close(stacked.delta(m), expected, **TOL)


@FAST
@given(cat_plans(), st.sampled_from([-1.0, -1e-9, math.nan, math.inf]), st.data())
def test_a_bad_weight_is_refused_before_any_math(
    plan: tuple[Model, list[LoraWeights], list[float]], bad: float, data: st.DataObject
) -> None:
    """A negative or non-finite weight never yields an adapter: one FusionError naming it."""
    _, anchors, w = plan
    w = list(w)
    w[data.draw(st.integers(0, len(w) - 1))] = bad
    for mode in ("cat", "linear"):
        with pytest.raises(FusionError, match="weights must be finite and >= 0"):
            check_fusion_plan(anchors, w, mode)


similarities = st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8)


@FAST
@given(similarities, st.one_of(st.none(), st.floats(0.01, 2.0)), st.sampled_from([0.0, 0.05, 0.1, 0.25]))
def test_anchor_weights_are_a_distribution_that_keeps_the_order(
    sims: list[float], temperature: float | None, round_step: float
) -> None:
    """Weights sum to 1 (up to their 6-decimal rounding), are >= 0, never zero the most similar
    anchor, and never rank a less similar anchor above a more similar one."""
    w = anchor_weights(sims, temperature, round_step)
    assert len(w) == len(sims)
    assert all(x >= 0 for x in w)
    assert abs(sum(w) - 1.0) <= 1e-6 * len(w)
    assert w[int(np.argmax(sims))] > 0
    for i in range(len(sims)):
        for j in range(len(sims)):
            if sims[i] > sims[j]:
                assert w[i] >= w[j], (sims, w)


# --- stores ------------------------------------------------------------------------------

LIMITS = Settings.model_fields  # the server's defaults: what a profile may hold through the API
MAX_ITEM_CHARS = LIMITS["max_item_chars"].default
# Any Unicode text but lone surrogates (the API refuses them: no store or response encodes them).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
values = st.one_of(
    text,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),  # the API refuses NaN and infinities
    st.booleans(),
    st.none(),
)
items = st.lists(st.dictionaries(st.text(st.characters(exclude_categories=["Cs"]), max_size=20), values, max_size=5), max_size=6)
user_ids = st.from_regex(USER_ID_PATTERN, fullmatch=True)
embeddings = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=16).map(
    lambda xs: np.asarray(xs, dtype=np.float32)
)


def as_json(value: Any) -> str:
    """Text equality catches what `==` does not: True vs 1, 1 vs 1.0, -0.0 vs 0.0, key order."""
    return json.dumps(value, ensure_ascii=False)


async def round_trip(store: UserStore, user_id: str, profile: list[dict[str, Any]], vector: np.ndarray, blob: bytes) -> None:
    """Write twice (the version counts writes), read back, then delete: exactly what went in."""
    try:
        await store.put_profile(user_id, [{"text": "replaced"}], None, None)
        written = await store.put_profile(user_id, profile, vector, "embedder-é")
        read = await store.get_user(user_id)
        assert read is not None
        for record in (written, read):
            assert record.user_id == user_id
            assert as_json(record.items) == as_json(profile)
            assert record.embedding is not None and record.embedding.tobytes() == vector.tobytes()
            assert record.embedding_model == "embedder-é" and record.profile_version == 2
        version = await store.put_blob(user_id, "stacked_lora", blob)
        assert await store.get_blob(user_id, "stacked_lora") == (version, blob)
        assert await store.delete_user(user_id) is True
        assert await store.get_user(user_id) is None and await store.get_blob(user_id, "stacked_lora") is None
    finally:
        await store.close()


STORE_EXAMPLES = settings(
    FAST, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@STORE_EXAMPLES
@given(user_id=user_ids, profile=items, vector=embeddings, blob=st.binary(max_size=256))
def test_sqlite_round_trips_any_profile_the_api_accepts(
    tmp_path: Path, user_id: str, profile: list[dict[str, Any]], vector: np.ndarray, blob: bytes
) -> None:
    ProfileRequest(items=profile)  # within what the API lets through (types, Unicode) ...
    assert all(sum(len(str(k)) + len(str(v)) for k, v in i.items()) <= MAX_ITEM_CHARS for i in profile)  # ... and size
    store = SQLiteUserStore(tmp_path / f"{uuid.uuid4().hex}.db")
    asyncio.run(round_trip(store, user_id, profile, vector, blob))


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """This test's Redis key prefix (`redis_key_prefix` deletes its keys afterwards)."""
    return request.getfixturevalue("redis_key_prefix")


@STORE_EXAMPLES
@given(user_id=user_ids, profile=items, vector=embeddings, blob=st.binary(max_size=256))
def test_redis_round_trips_any_profile_the_api_accepts(
    redis_url: str, key_prefix: str, user_id: str, profile: list[dict[str, Any]], vector: np.ndarray, blob: bytes
) -> None:
    ProfileRequest(items=profile)
    store = RedisUserStore(redis_url, key_prefix=f"{key_prefix}{uuid.uuid4().hex}:")  # one prefix per example
    asyncio.run(round_trip(store, user_id, profile, vector, blob))


# --- BM25 retrieval: the postings-based scores are rank_bm25's, exactly ------------------------

_WORDS = st.sampled_from(["space", "mars", "love", "rome", "heist", "bank", "the", "a", "of", "robot", "castle", "war"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(st.lists(_WORDS, max_size=12).map(" ".join), min_size=2, max_size=30),
    st.lists(st.one_of(_WORDS, st.just("unseen")), max_size=8).map(" ".join),
)
def test_profile_index_scores_are_bm25okapis(history, query):
    """Serving scores a query from postings; the sums are BM25Okapi's, term by term, so equal
    bit for bit (and the top-1 item with them, ties to the first)."""
    import numpy as np

    from server.prompts import ProfileIndex, _tokens

    index = ProfileIndex(history)
    expected = index._bm25.get_scores(_tokens(query))
    assert np.array_equal(index.scores(query), expected)
    assert index.top1(query) == history[int(expected.argmax())]


def test_a_profile_items_cut_is_truncate_tokens_remembered(tiny_model_dir):
    """Serving cuts the retrieved item through the index: the same text as `truncate_tokens`, and
    the tokenizer runs once per (item, budget), not once per request."""
    from transformers import AutoTokenizer

    from server.prompts import ProfileIndex, truncate_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return tok(*args, **kwargs)

    history = ["space robot heist " * 40, "a castle of love", "rome war bank " * 10]
    index = ProfileIndex(history)
    for i, text in enumerate(history):
        for budget in (0, 3, 17, 1000):
            assert index.cut(i, counting, budget) == truncate_tokens(tok, text, budget)
    first = len(calls)
    for i in range(len(history)):
        for budget in (0, 3, 17, 1000):
            index.cut(i, counting, budget)
    assert len(calls) == first  # remembered
    assert index.longest == len(history[0])


# --- prompt splicing: the same token ids as tokenizing the whole prompt ---------------------------

_TEXT = st.text(alphabet=st.sampled_from(list("ab Z9:,.#\n\t-'é€ ")), max_size=40)
_TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_model_dir):
    """The tiny model's tokenizer with its ChatML template, and with a template that trims the content (as Llama 3's)."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    trimming = AutoTokenizer.from_pretrained(tiny_model_dir)
    trimming.chat_template = _TRIMMING_TEMPLATE
    return plain, trimming


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=_TEXT, instruction=_TEXT, trimming=st.booleans())
def test_a_spliced_prompt_is_the_whole_prompt_tokenized(tiny_tokenizers, item, instruction, trimming):
    """Whatever the item's and the instruction's first and last characters, the splicer gives the
    ids of tokenizing the whole prompt, or declines (and serving tokenizes the whole prompt)."""
    from server.prompts import PromptSplicer, chat_prompt, user_content

    tok = tiny_tokenizers[trimming]
    splicer = PromptSplicer(tok)
    whole = chat_prompt(tok, [{"role": "user", "content": user_content(instruction, item)}])
    for _ in range(2):  # the item's check, then its remembered ids
        spliced = splicer.ids(instruction, item)
        assert spliced is None or spliced == whole


def test_lamp_items_are_spliced_and_a_template_that_rewrites_content_is_not(tiny_tokenizers):
    """On real profile items the splice applies (the point of it); a template that does not insert
    the content verbatim is never spliced."""
    from server.lamp_data import load_users
    from server.prompts import PromptSplicer, chat_prompt, user_content
    from server.tasks import TASKS

    tok = tiny_tokenizers[0]
    splicer = PromptSplicer(tok)
    task = TASKS["movie_tagging"]
    users = load_users(Path(__file__).resolve().parents[1] / "bank_artifacts" / "data" / "movie_tagging.json", task)
    items = [task.render(i) for u in users[:10] for i in u.profile]
    instruction = task.instruction(users[10].profile[0])
    spliced = [splicer.ids(instruction, item) for item in items]
    assert all(s == chat_prompt(tok, [{"role": "user", "content": user_content(instruction, i)}]) for s, i in zip(spliced, items))
    assert sum(s is not None for s in spliced) >= 0.9 * len(items)

    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert PromptSplicer(tok).ids(instruction, items[0]) is None

"""Fusion weights, plans, and the materialized-adapter cache."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.adapter_cache import AdapterCache, AdapterKey
from server.adapters import load_adapter
from server.bank.loader import load_bank
from server.fusion import anchor_weights, build_adapter, materialize, plan_fusion


def test_weights_are_normalised_similarities():
    assert anchor_weights([0.6, 0.2]) == pytest.approx([0.75, 0.25])
    assert anchor_weights([0.5, -0.3]) == pytest.approx([1.0, 0.0])  # negatives clipped
    assert anchor_weights([-0.1, -0.2]) == pytest.approx([0.5, 0.5])  # all negative: uniform
    # Top-1 gets the larger weight (the reference two-anchor script has this backwards).
    w = anchor_weights([0.9, 0.3, 0.1])
    assert w[0] > w[1] > w[2] and sum(w) == pytest.approx(1.0)


def test_softmax_temperature_and_rounding():
    sharp, flat = anchor_weights([0.9, 0.8], temperature=0.01), anchor_weights([0.9, 0.8], temperature=10)
    assert sharp[0] > 0.99 and flat[0] == pytest.approx(0.5, abs=0.01)
    # Near-identical neighbourhoods round to the same weights (one cache key).
    assert anchor_weights([0.61, 0.39], round_step=0.1) == anchor_weights([0.62, 0.38], round_step=0.1)
    assert anchor_weights([0.61, 0.39], round_step=0.1) == pytest.approx([0.6, 0.4])
    # Rounding never drops every anchor.
    assert anchor_weights([0.5, 0.5, 0.5, 0.5], round_step=0.5) == pytest.approx([1.0, 0, 0, 0])


@pytest.fixture(scope="module")
def bank(tiny_bank, tiny_model_targets, tiny_model_dir):
    return load_bank(
        tiny_bank, model_id=tiny_model_dir.name, targets=tiny_model_targets, embedding_dim=384, max_lora_rank=16
    )


def test_plan_and_materialize_cat(bank, theme_embeddings, tmp_path):
    plan = plan_fusion(bank, theme_embeddings[0], bank_uid="u1", top_k=2, mode="cat", round_step=0.05)
    assert plan.anchors[0][0] == "space" and len(plan.retrieved) == 2
    assert sum(w for _, w in plan.anchors) == pytest.approx(1.0)
    rank = materialize(bank, plan, tmp_path / "a", max_rank=16)
    assert rank == 8
    written = load_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and written.scaling == 1.0
    fused = build_adapter(bank, plan, 16)
    for m in fused.modules[:3]:
        assert (written.delta(m) - fused.delta(m)).abs().max() < 1e-6
    assert plan.key() == plan_fusion(bank, theme_embeddings[0], bank_uid="u1", top_k=2, mode="cat", round_step=0.05).key()
    assert plan.key() != plan_fusion(bank, theme_embeddings[0], bank_uid="u2", top_k=2, mode="cat", round_step=0.05).key()


async def test_cache_builds_once_evicts_lru_and_defers_deletion(tmp_path):
    cache = AdapterCache(tmp_path / "cache", capacity=2)
    builds = []

    async def build(path):
        builds.append(path)
        await asyncio.sleep(0.01)
        path.mkdir(parents=True)

    k = [AdapterKey("b#1", ((f"a{i}", 1.0),), "cat") for i in range(3)]
    # Concurrent first requests for one key build it once.
    async def use(key):
        async with cache.lease(key, build) as (entry, hit):
            return entry.lora_int_id, hit

    results = await asyncio.gather(*(use(k[0]) for _ in range(5)))
    assert len(builds) == 1 and len({r[0] for r in results}) == 1 and sum(not r[1] for r in results) == 1

    async with cache.lease(k[1], build) as (e1, _):
        async with cache.lease(k[2], build) as (e2, _):
            # k[0] was least recently used: evicted and deleted (no lease).
            assert not builds[0].exists() and len(cache) == 2
            assert e1.lora_int_id < e2.lora_int_id
            # Invalidation while leased: directories stay until released.
            assert cache.invalidate() == 2
            assert e1.path.exists() and e2.path.exists()
        assert not e2.path.exists()
    assert not e1.path.exists()
    # A rebuilt key gets a new lora_int_id (vLLM must not serve the old weights for it).
    async with cache.lease(k[1], build) as (again, hit):
        assert not hit and again.lora_int_id > e2.lora_int_id

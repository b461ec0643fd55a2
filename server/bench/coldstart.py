"""`mta bench coldstart`: a new user's first request vs the same request once warm.

A real `mta serve` (SmolLM2-135M bf16, fast CPU LoRA ops, server defaults otherwise) with a
RANDOM bench bank whose anchors are the LaMP-2M users (rank-8 all-linear, top-2 `linear`, weight
rounding off so every user is a new adapter). Users are taken one at a time, with no other load:

1. `PUT /users/{id}/profile` (embed the profile, store it): timed on its own;
2. the first `POST /generate` (a cache miss: retrieve, fuse, materialize, vLLM adapter load);
3. the same request `--warm-repeats` times (cache hit, adapter already in the engine).

Cold-start overhead = first latency - median warm latency, per user; the server's own
`mta_fusion_seconds` (fuse + materialize) splits it into fusion and the rest (mostly vLLM's
adapter load). Reported: medians over users. `ratio` = median first-request latency / median
warm latency (1.0 = no cold start; the goal is an overhead of at most 100 ms).

How often a request pays it is the adapter caches' miss rate, simulated here too (numpy, no
server; docs/capacity.md): 1 M users drawn from a Gaussian fitted to the real LaMP-2M user
embeddings (the bench bank's), `--sim-anchors` of those users as anchors, top-k retrieval and the
server's weights and rounding give each user's cache key; request popularity is Zipf over users;
LRU hit rates for each cache size come from Che's approximation (checked against an exact LRU
run, reported as "che_check"), and the expected number of distinct adapters among B concurrent
requests (what `max_loras` must hold) is sum over keys of 1 - (1 - p_key)^B.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from server.bench import common, harness

PROMPT = "Recommend one movie for tonight and say why in one sentence."


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=16, help="new users measured (one at a time)")
    p.add_argument("--warm-repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="meta-LoRA rank of the bench bank")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop taking new users after this long")
    harness.server_options(p)  # a --url server is measured with its own bank and settings
    sim = p.add_argument_group("cache simulation")
    sim.add_argument("--no-simulate", dest="simulate", action="store_false", help="skip the cache simulation")
    sim.add_argument("--simulate-only", action="store_true", help="only the simulation (no server; ratio = null)")
    sim.add_argument("--sim-embeddings", type=Path, help=".npy user embeddings to fit (default: the bench bank's)")
    sim.add_argument("--sim-users", type=int, default=1_000_000)
    sim.add_argument("--sim-anchors", type=int, default=50, help="anchors taken from the real users (paper: 50)")
    sim.add_argument("--sim-top-k", type=int, default=2)
    sim.add_argument(
        "--sim-steps", type=common.float_list, default=[0.0, 0.01, 0.05, 0.1], help="weight rounding steps"
    )
    sim.add_argument("--sim-temperature", type=float, default=None, help="softmax temperature (default: s_i / sum s)")
    sim.add_argument(
        "--sim-zipf", type=common.float_list, default=[0.8, 1.0, 1.2], help="Zipf exponents of user popularity"
    )
    sim.add_argument("--sim-cache", type=common.int_list, default=[8, 32, 128, 256, 512, 2048, 8192, 32768])
    sim.add_argument("--sim-batch", type=common.int_list, default=[8, 32, 64, 256], help="concurrent requests")


def quick(opts: argparse.Namespace) -> None:
    opts.users, opts.warm_repeats, opts.max_tokens, opts.sim_users = 2, 2, 4, 20_000


async def measure(url: str, opts: argparse.Namespace) -> dict[str, Any]:
    import httpx

    users = common.lamp_users()
    prefix = f"bench-cold-{uuid.uuid4().hex[:6]}"
    body = {"prompt": PROMPT, "max_tokens": opts.max_tokens, "temperature": 0.0}
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + opts.max_seconds
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300)) as client:

        async def generate(uid: str) -> tuple[float, dict[str, Any]]:
            start = time.perf_counter()
            r = await client.post("/generate", json={**body, "user_id": uid})
            seconds = time.perf_counter() - start
            r.raise_for_status()
            return seconds, r.json()

        async def fusion_seconds() -> tuple[float, float]:
            text = (await client.get("/metrics")).text
            return (
                common.prometheus_value(text, "mta_fusion_seconds_sum"),
                common.prometheus_value(text, "mta_fusion_seconds_count"),
            )

        # one untimed user first: the server's first adapter ever loads code paths once
        warm_uid = f"{prefix}-warmup"
        await common.put_profile(client, warm_uid, common.profile_items(users[-1]))
        for _ in range(2):
            await generate(warm_uid)
        for i in range(opts.users):
            if time.monotonic() > deadline:
                print(f"[coldstart] time budget spent after {i} users", flush=True)
                break
            uid = f"{prefix}-{i:03d}"
            start = time.perf_counter()
            await common.put_profile(client, uid, common.profile_items(users[i % (len(users) - 1)]))
            put_seconds = time.perf_counter() - start
            fusion_before, count_before = await fusion_seconds()
            cold, first = await generate(uid)
            fusion_after, count_after = await fusion_seconds()
            warm = [(await generate(uid))[0] for _ in range(opts.warm_repeats)]
            rec = {
                "user": uid,
                "put_profile_seconds": put_seconds,
                "cold_seconds": cold,
                "warm_seconds": warm,
                "warm_median_seconds": common.median(warm),
                "overhead_seconds": cold - common.median(warm),
                "fusion_seconds": fusion_after - fusion_before,
                "fusions": count_after - count_before,
                "cache_hit_first": first["adapter"]["cache_hit"] if first.get("adapter") else None,
                "rank": first["adapter"]["rank"] if first.get("adapter") else None,
                "output_tokens": first["usage"]["completion_tokens"],
            }
            records.append(rec)
            print(
                f"[coldstart] {uid}: cold {cold * 1e3:.0f} ms, warm {rec['warm_median_seconds'] * 1e3:.0f} ms,"
                f" overhead {rec['overhead_seconds'] * 1e3:.0f} ms (fusion {rec['fusion_seconds'] * 1e3:.0f} ms),"
                f" PUT profile {put_seconds * 1e3:.0f} ms",
                flush=True,
            )
    return {"users": records}


def run_users(opts: argparse.Namespace) -> dict[str, Any]:
    embeddings = np.load(opts.sim_embeddings) if opts.sim_embeddings else None
    if opts.simulate_only:  # a calculator: nothing is timed
        if embeddings is None:
            embeddings = common.user_embeddings(common.lamp_users())
        return {"kind": "calculator", "ratio": None, "simulation": simulate_cache(embeddings, opts)}

    def bank(work: Path, model_dir: Path) -> Path:
        return common.write_user_bank(work / "bank", model_dir, common.lamp_users(), rank=opts.rank)

    with harness.server_under_test(opts, "coldstart", bank, MTA_DTYPE=opts.dtype, MTA_WEIGHT_ROUND_STEP="0") as target:
        if embeddings is None and not opts.url:
            embeddings = np.load(Path(target.info["bank"]) / "anchor_embeddings.npy")  # the LaMP-2M users' own
        data = asyncio.run(measure(target.url, opts))
    recs = data["users"]
    simulation = simulate_cache(embeddings, opts) if opts.simulate and embeddings is not None else None
    overhead = [r["overhead_seconds"] for r in recs]
    cold = [r["cold_seconds"] for r in recs]
    warm = [r["warm_median_seconds"] for r in recs]
    fusion = [r["fusion_seconds"] for r in recs]
    rest = [r["overhead_seconds"] - r["fusion_seconds"] for r in recs]
    result = {
        "ratio": common.ratio(common.median(cold), common.median(warm)),
        "ratio_definition": "median first-request latency / median warm latency of the same request (1.0 = no cold start)",
        "overhead_ms_median": common.median(overhead) * 1e3,
        "overhead_ms_p95": common.percentile(overhead, 95) * 1e3,
        "goal": {"overhead_ms_median": 100},
        "cold_ms_median": common.median(cold) * 1e3,
        "warm_ms_median": common.median(warm) * 1e3,
        "fusion_ms_median": common.median(fusion) * 1e3,
        "engine_and_rest_ms_median": common.median(rest) * 1e3,
        "put_profile_ms_median": common.median([r["put_profile_seconds"] for r in recs]) * 1e3,
        "all_first_requests_missed_cache": all(r["cache_hit_first"] is False for r in recs),
        "setup": {
            "model": target.model,
            "dtype": opts.dtype,
            "users": len(recs),
            "warm_repeats": opts.warm_repeats,
            "max_tokens": opts.max_tokens,
            "adapter_rank": recs[0]["rank"] if recs else None,
            "bank": f"random, anchors = LaMP-2M users, rank {opts.rank} all linear, top-2 linear, rounding off",
            "server": target.info,
        },
        "users": recs,
        "simulation": simulation,
    }
    if simulation:
        result["expected_overhead_ms_per_request"] = expected_overhead(result, simulation)
    return result


def report(result: dict[str, Any]) -> str:
    parts = [format_table(result)] if "users" in result else []
    if result.get("simulation"):
        parts.append(format_simulation(result["simulation"]))
    return "\n".join(parts)


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("first request (cold)", result["cold_ms_median"]),
        ("same request, warm", result["warm_ms_median"]),
        ("cold-start overhead", result["overhead_ms_median"]),
        ("  of which fuse + materialize", result["fusion_ms_median"]),
        ("  of which engine adapter load and the rest", result["engine_and_rest_ms_median"]),
        ("PUT profile (embed + store), separate request", result["put_profile_ms_median"]),
    ]
    head = f"coldstart: {result['setup']['model']}, {result['setup']['users']} new users, medians"
    table = common.table(["", "ms"], rows)
    return (
        f"{head}\n{table}\nratio (cold / warm): {result['ratio']:.2f}; overhead p95 {result['overhead_ms_p95']:.0f} ms"
    )


# --- adapter cache simulation -------------------------------------------------------------


def _server_defaults() -> dict[str, Any]:
    from server.settings import Settings

    f = Settings.model_fields
    # unset: sized from MTA_LORA_MEMORY_MB (server.engine_args.LoraSlots); 32 for SmolLM2-135M on the CPU
    max_loras = f["max_loras"].default or 32
    return {
        "round_step": f["weight_round_step"].default,
        "adapter_cache": f["adapter_cache_size"].default,
        "max_loras": max_loras,
        "max_cpu_loras": f["max_cpu_loras"].default or 4 * max_loras,
    }


SERVER_DEFAULTS = _server_defaults()  # the sizes `expected_overhead` reads; always simulated


def che_hit_rates(p: np.ndarray, sizes: list[int]) -> dict[int, float]:
    """LRU hit rate for each cache size under independent requests with probabilities `p` (Che's approximation).

    Semantics: T solves sum_i (1 - exp(-p_i T)) = C; hit = sum_i p_i (1 - exp(-p_i T)). The left side
    is at most T (1 - e^-x <= x, sum p = 1), so T >= C: the search starts there.
    """
    p = p[p > 0]
    p = p / p.sum()
    out: dict[int, float] = {}
    for c in sizes:
        if c >= len(p):
            out[c] = 1.0
            continue
        lo, hi = float(c), 2.0 * c
        while (-np.expm1(-p * hi)).sum() < c:
            lo, hi = hi, 2 * hi
        for _ in range(60):
            t = 0.5 * (lo + hi)
            lo, hi = (lo, t) if (-np.expm1(-p * t)).sum() > c else (t, hi)
        t = 0.5 * (lo + hi)
        out[c] = float((p * -np.expm1(-p * t)).sum())
    return out


def exact_lru_hit_rate(p: np.ndarray, size: int, requests: int, rng: np.random.Generator) -> float:
    """Hit rate of a real LRU on `requests` independent draws from `p`, after an uncounted warm-up of as many."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i, key in enumerate(rng.choice(len(p), size=2 * requests, p=p / p.sum()).tolist()):
        if key in cache:
            cache.move_to_end(key)
            hits += i >= requests
        else:
            cache[key] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / requests


class _TopK:
    """Stands in for the bank in `plan_fusion`: the users' top-k hits are computed in batch (exact cosine,
    like the bank's flat inner-product index), so `search` returns the hits it is given."""

    version = "sim"
    shared = None  # a bank without a shared LoRA: every neighbourhood is its own adapter
    residual_scale = 1.0

    @property
    def index(self) -> _TopK:
        return self

    def search(self, hits: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        return hits[:k]


def sample_users(population: np.ndarray, n: int, rng: np.random.Generator, chunk: int = 50_000) -> Iterator[np.ndarray]:
    """`n` unit user embeddings, in chunks, from a Gaussian fitted to `population` (its mean and covariance)."""
    mu = population.mean(0)
    _, sv, vt = np.linalg.svd(population - mu, full_matrices=False)
    scale = ((sv / math.sqrt(len(population) - 1))[:, None] * vt).astype(np.float32)  # [r, dim]
    for start in range(0, n, chunk):
        e = mu + rng.standard_normal((min(chunk, n - start), len(scale)), dtype=np.float32) @ scale
        yield e / np.linalg.norm(e, axis=1, keepdims=True)


def user_keys(
    population: np.ndarray, anchors: np.ndarray, opts: argparse.Namespace, rng: np.random.Generator
) -> dict[float, np.ndarray]:
    """Each simulated user's cache key id per rounding step.

    Users come from `sample_users`; their top-k anchors by cosine are computed in batch (exact,
    like the bank's flat inner-product index), and the key is the server's own:
    `plan_fusion(...).key()` (weights, rounding, zero-weight anchors dropped).
    """
    from server.fusion import plan_fusion

    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    k = min(opts.sim_top_k, len(a))
    bank = _TopK()
    hashes: dict[float, list[int]] = {step: [] for step in opts.sim_steps}
    for e in sample_users(population, opts.sim_users, rng):
        s = e @ a.T  # [m, anchors] cosine similarities
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(s, idx, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx, top = np.take_along_axis(idx, order, 1), np.take_along_axis(top, order, 1)
        hits = [list(zip(i, t)) for i, t in zip(idx.tolist(), top.tolist())]
        for step, out in hashes.items():
            out += [
                hash(
                    plan_fusion(
                        bank, h, bank_uid="sim", top_k=k, mode="linear",
                        temperature=opts.sim_temperature, round_step=step,
                    ).key()
                )
                for h in hits
            ]  # fmt: skip
    keys = {}
    for step, h in hashes.items():
        _, inverse = np.unique(np.asarray(h, dtype=np.int64), return_inverse=True)  # 64-bit: collisions ~ n^2/2^64
        keys[step] = inverse.ravel()
    return keys


def simulate_cache(embeddings: np.ndarray, opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    population = np.asarray(embeddings, dtype=np.float32)
    anchors = population[: opts.sim_anchors]
    caches = sorted({*opts.sim_cache, SERVER_DEFAULTS["adapter_cache"], SERVER_DEFAULTS["max_cpu_loras"]})
    keys = user_keys(population, anchors, opts, rng)
    rank_of_user = rng.permutation(opts.sim_users)  # popularity independent of taste
    by_step: dict[str, Any] = {}
    check: list[dict[str, Any]] = []
    for step, inverse in keys.items():
        per_key = np.bincount(inverse)
        entry: dict[str, Any] = {
            "distinct_adapters": len(per_key),
            "users_per_adapter_mean": opts.sim_users / len(per_key),
            "users_per_adapter_median": float(np.median(per_key)),
            "by_zipf": {},
        }
        for alpha in opts.sim_zipf:
            p_user = 1.0 / np.arange(1, opts.sim_users + 1) ** alpha
            p_user = p_user[rank_of_user] / p_user.sum()
            p_key = np.bincount(inverse, weights=p_user)
            entry["by_zipf"][str(alpha)] = {
                "hit_rate": {str(c): h for c, h in che_hit_rates(p_key, caches).items()},
                "distinct_adapters_in_batch": {
                    str(b): float((-np.expm1(b * np.log1p(-p_key))).sum()) for b in opts.sim_batch
                },
            }
            if alpha == opts.sim_zipf[0] and len(p_key) > 64:  # Che vs a real LRU, once per step
                size = min(SERVER_DEFAULTS["adapter_cache"], len(p_key) // 4)
                che = che_hit_rates(p_key, [size])[size]
                exact = exact_lru_hit_rate(p_key, size, min(200_000, 20 * opts.sim_users), rng)
                check.append({"step": step, "zipf": alpha, "cache": size, "che": che, "exact_lru": exact})
        by_step[str(step)] = entry
    sim_pop = population @ population.T
    np.fill_diagonal(sim_pop, -1)
    return {
        "users": opts.sim_users,
        "anchors": len(anchors),
        "population_users": len(population),
        "top_k": opts.sim_top_k,
        "weights": f"softmax, temperature {opts.sim_temperature}" if opts.sim_temperature else "s_i / sum s",
        "real_nearest_neighbour_cosine_median": float(np.median(sim_pop.max(1))),
        "by_step": by_step,
        "che_check": check,
        "seconds": time.perf_counter() - started,
        "command_options": {
            "steps": opts.sim_steps,
            "zipf": opts.sim_zipf,
            "cache": caches,
            "batch": opts.sim_batch,
        },
    }


def expected_overhead(result: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    """Mean cold-start cost per request at the server's defaults, if the measured split holds.

    Adapter cache (MTA_ADAPTER_CACHE_SIZE) miss: fusion + engine load; vLLM's CPU LoRA cache
    (max_cpu_loras, 4 x MTA_MAX_LORAS) miss: engine load only (LRU inclusion: a miss in the larger
    cache is a miss in the smaller one too).
    """
    d = SERVER_DEFAULTS
    step = str(d["round_step"]) if str(d["round_step"]) in sim["by_step"] else next(iter(sim["by_step"]))
    out = {}
    for alpha, z in sim["by_step"][step]["by_zipf"].items():
        hits = z["hit_rate"]
        h_cache = hits.get(str(d["adapter_cache"]), math.nan)
        h_engine = hits.get(str(d["max_cpu_loras"]), math.nan)
        out[alpha] = (1 - h_cache) * result["fusion_ms_median"] + (1 - h_engine) * result["engine_and_rest_ms_median"]
    return {
        "round_step": float(step),
        "adapter_cache": d["adapter_cache"],
        "engine_cpu_loras": d["max_cpu_loras"],
        "ms_by_zipf": out,
    }


def format_simulation(sim: dict[str, Any]) -> str:
    caches = sim["command_options"]["cache"]
    rows = []
    for step, entry in sim["by_step"].items():
        for alpha, z in entry["by_zipf"].items():
            rows.append(
                (
                    step,
                    alpha,
                    entry["distinct_adapters"],
                    *(z["hit_rate"][str(c)] for c in caches),
                    *(z["distinct_adapters_in_batch"][str(b)] for b in sim["command_options"]["batch"]),
                )
            )
    headers = [
        "round step",
        "zipf",
        "adapters",
        *(f"hit@{c}" for c in caches),
        *(f"distinct in {b}" for b in sim["command_options"]["batch"]),
    ]
    head = (
        f"adapter cache simulation: {sim['users']:,} users, {sim['anchors']} anchors, top-{sim['top_k']},"
        f" weights {sim['weights']}; LRU hit rates by Che's approximation"
    )
    checks = "; ".join(
        f"step {c['step']}, zipf {c['zipf']}, cache {c['cache']}: {c['che']:.3f} vs {c['exact_lru']:.3f}"
        for c in sim["che_check"]
    )
    if checks:
        head += f"\nChe vs an exact LRU run: {checks}"
    return f"{head}\n{common.table(headers, rows)}"


SCENARIO = harness.Scenario("coldstart", "first request of a new user minus warm latency", options, run_users, report, quick)

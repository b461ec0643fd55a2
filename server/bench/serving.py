"""`mta bench serving`: the real server under concurrent HTTP load, personalized vs shared vs base.

A real `mta serve` subprocess (vLLM CPU, SmolLM2-135M bf16) with a RANDOM bank whose anchors
are the LaMP-2M users themselves (rank-8 all-linear meta-LoRAs, top-2 `linear` fusion, weight
rounding off), so each of N users gets its own fused adapter. N concurrent clients (httpx,
async, 127.0.0.1 only), each a closed loop of `--rounds` requests, in three conditions:

- personalized: N distinct users, N distinct fused adapters;
- shared: N users with the same profile, hence one shared adapter;
- base: N users without a profile (the base model, no adapter).

Slot i sends the same prompt text in every condition (`use_profile: false`, the LaMP prompt
with its BM25 top-1 history item built client-side), so the conditions differ only by adapter;
each request starts with a fresh random tag, because the server's vLLM caches prefixes and a
repeated prompt would skip its prefill.
Workloads: prefill-heavy (LaMP-2M prompts, ~200 tokens, 10 output tokens) and decode-heavy
(short prompt, 64 output tokens). The server runs with the fast CPU LoRA ops
(`MTA_FAST_CPU_LORA_OPS=1`, default) and again with vLLM's stock ops on a smaller grid.

Throughput is output tokens per second (completion tokens reported by the server / wall time
of the cell); latency p50/p95 is per request, client side. `ratio` = personalized / base output
tokens per second at N = 32 (or the largest N run), prefill-heavy, fast ops.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid

import httpx
from pathlib import Path
from typing import Any

from server.bench import common, harness

CONDITIONS = ("personalized", "shared", "base")
WORKLOADS = ("prefill", "decode")
DECODE_PROMPT = "Write a long story about {topic}."
DECODE_TOPICS = ("a robot", "the sea", "a lost key", "a dragon", "winter", "a train", "a garden", "the moon")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=common.int_list, default=[1, 8, 32], help="concurrent users, e.g. 1,8,32 (64 optional)")
    p.add_argument("--workloads", type=common.str_list, default=list(WORKLOADS))
    p.add_argument("--conditions", type=common.str_list, default=list(CONDITIONS))
    p.add_argument("--ops", type=common.str_list, default=["fast", "stock"], help="fast,stock (server CPU LoRA ops)")
    p.add_argument("--stock-n", type=common.int_list, default=[32], help="N values with stock ops")
    p.add_argument("--stock-workloads", type=common.str_list, default=["prefill"])
    p.add_argument(
        "--stock-conditions",
        type=common.str_list,
        default=["personalized", "shared"],
        help="with stock ops (their base is a zero adapter, as costly as a LoRA; the base figure comes from fast ops)",
    )
    p.add_argument("--stock-rounds", type=int, default=1, help="rounds per cell with stock ops")
    p.add_argument("--rounds", type=int, default=2, help="rounds per cell: N concurrent requests per condition each")
    p.add_argument("--min-requests", type=int, default=4, help="more rounds for small N, up to this many requests")
    p.add_argument("--cell-seconds", type=float, default=240.0, help="no new round after this long in a cell")
    p.add_argument("--max-seconds", type=float, default=360.0, help="fast ops: no new cell after this long")
    p.add_argument("--stock-max-seconds", type=float, default=180.0, help="stock ops: no new cell after this long")
    p.add_argument("--prefill-tokens", type=int, default=10)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=None, help="cut LaMP prompts to this many characters")
    p.add_argument("--rank", type=int, default=8, help="meta-LoRA rank of the bench bank")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=None, help="MTA_MAX_LORAS (default: the server's, sized from its memory budget)")
    p.add_argument("--dtype", default="bfloat16")
    harness.server_options(p)  # a --url server is measured with its own ops and bank


def quick(opts: argparse.Namespace) -> None:
    opts.n, opts.rounds, opts.min_requests, opts.ops = [1, 2], 1, 1, ["fast"]
    opts.decode_tokens, opts.prefill_tokens = 8, 4
    opts.prompt_chars = opts.prompt_chars or 300
    opts.cell_seconds = min(opts.cell_seconds, 30)


# --- prompts and users ------------------------------------------------------------------


def prefill_prompts(users: list[dict[str, Any]], count: int, max_chars: int | None) -> list[str]:
    """Slot i: LaMP-2M user i's first query, with the BM25 top-1 item of the user's history."""
    from server.prompts import render_item, retrieve_top1, user_content

    out = []
    for i in range(count):
        user = users[i % len(users)]
        query = user["query"][0]["input"]
        history = [render_item(item, common.LAMP_TEMPLATE) for item in common.profile_items(user)]
        text = user_content(query, retrieve_top1(history, query))
        out.append(text[-max_chars:] if max_chars else text)
    return out


def decode_prompts(count: int) -> list[str]:
    return [DECODE_PROMPT.format(topic=DECODE_TOPICS[i % len(DECODE_TOPICS)]) for i in range(count)]


def user_ids(prefix: str, condition: str, n: int) -> list[str]:
    return [f"{prefix}-{condition[0]}{i:03d}" for i in range(n)]


async def setup_users(client: Any, prefix: str, users: list[dict[str, Any]], max_n: int, conditions: list[str]) -> None:
    """personalized: user i's own profile; shared: user 0's profile for all; base: no profile."""
    for condition in conditions:
        if condition == "base":
            continue
        ids = user_ids(prefix, condition, max_n)
        for i, uid in enumerate(ids):
            source = users[i % len(users)] if condition == "personalized" else users[0]
            await common.put_profile(client, uid, common.profile_items(source))


# --- load -------------------------------------------------------------------------------


def unique(prompt: str) -> str:
    """The server runs vLLM with prefix caching: a fresh tag first keeps every prefill real."""
    return f"[{uuid.uuid4().hex[:8]}] {prompt}"


async def one_request(client: Any, user_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "user_id": user_id,
        "prompt": unique(prompt),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "use_profile": False,
    }
    start = time.perf_counter()
    r = await client.post("/generate", json=body)
    latency = time.perf_counter() - start
    r.raise_for_status()
    data = r.json()
    return {
        "latency": latency,
        "completion_tokens": data["usage"]["completion_tokens"],
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "lora_int_id": (data.get("adapter") or {}).get("lora_int_id"),
        "personalized": data["personalized"],
    }


async def run_round(client: Any, ids: list[str], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """One request from each of len(ids) users at once; (wall seconds, records)."""
    start = time.perf_counter()
    records = await asyncio.gather(*(one_request(client, uid, p, max_tokens) for uid, p in zip(ids, prompts)))
    return {"wall": time.perf_counter() - start, "records": list(records)}


def cell_stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    records = [r for rnd in rounds for r in rnd["records"]]
    wall = sum(rnd["wall"] for rnd in rounds)
    latencies = [r["latency"] for r in records]
    completion = sum(r["completion_tokens"] for r in records)
    prompt = sum(r["prompt_tokens"] for r in records)
    return {
        "rounds": len(rounds),
        "requests": len(records),
        "wall_seconds": wall,
        "round_seconds": [rnd["wall"] for rnd in rounds],
        "output_tokens": completion,
        "prompt_tokens": prompt,
        "output_tokens_per_s": completion / wall,
        "requests_per_s": len(records) / wall,
        "total_tokens_per_s": (completion + prompt) / wall,
        "mean_output_tokens": completion / max(len(records), 1),
        "mean_prompt_tokens": prompt / max(len(records), 1),
        "latency_p50": common.percentile(latencies, 50),
        "latency_p95": common.percentile(latencies, 95),
        "distinct_adapters": len({r["lora_int_id"] for r in records if r["lora_int_id"] is not None}),
        "personalized": all(r["personalized"] for r in records),
    }


async def warm_up(
    client: Any, prefix: str, conditions: list[str], max_n: int, batch: int, prompt: str
) -> dict[str, Any]:
    """Materialize every adapter and load it into the engine once, outside the timed cells."""
    seen: dict[str, set] = {}
    for condition in conditions:
        ids = user_ids(prefix, condition, max_n)
        for start in range(0, len(ids), batch):
            out = await asyncio.gather(*(one_request(client, uid, prompt, 1) for uid in ids[start : start + batch]))
            seen.setdefault(condition, set()).update(r["lora_int_id"] for r in out)
    return {c: len(s - {None}) for c, s in seen.items()}


def grid(opts: argparse.Namespace, ops: str) -> list[tuple[str, int]]:
    """(workload, N) in priority order: the largest N first (the headline is N = 32, prefill)."""
    ns = opts.n if ops == "fast" else opts.stock_n
    workloads = opts.workloads if ops == "fast" else [w for w in opts.stock_workloads if w in opts.workloads]
    return [(w, n) for n in sorted(set(ns), reverse=True) for w in workloads]


async def load_test(url: str, opts: argparse.Namespace, ops: str, users: list[dict[str, Any]]) -> dict[str, Any]:
    """Every (workload, N) cell: rounds of N concurrent requests, the conditions interleaved.

    Round r runs the conditions in a rotated order (ABC, BCA, CAB, ...), so a change in the
    machine's load during a cell falls on every condition alike. Bounded: at most
    `rounds` (or enough for `min_requests`) rounds per cell, no new round after `cell_seconds`,
    no new cell after the ops mode's time budget.
    """
    import httpx

    cells_todo = grid(opts, ops)
    rounds = opts.rounds if ops == "fast" else opts.stock_rounds
    budget = opts.max_seconds if ops == "fast" else opts.stock_max_seconds
    max_n = max(n for _, n in cells_todo)
    prefix = f"bench-{uuid.uuid4().hex[:6]}-{ops}"
    prompts = {
        "prefill": (prefill_prompts(users, max_n, opts.prompt_chars), opts.prefill_tokens),
        "decode": (decode_prompts(max_n), opts.decode_tokens),
    }
    conditions = list(opts.conditions) if ops == "fast" else [c for c in opts.conditions if c in opts.stock_conditions]
    limits = httpx.Limits(max_connections=max_n + 8, max_keepalive_connections=max_n + 8)
    cells: list[dict[str, Any]] = []
    skipped: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900), limits=limits) as client:
        await setup_users(client, prefix, users, max_n, conditions)
        adapters = await warm_up(client, prefix, conditions, max_n, opts.max_loras or max_n, prompts["decode"][0][0])
        for workload in dict.fromkeys(w for w, _ in cells_todo):  # untimed: first batches of each shape
            await run_round(client, user_ids(prefix, conditions[0], max_n), prompts[workload][0], 2)
        deadline = time.monotonic() + budget
        for workload, n in cells_todo:
            if time.monotonic() > deadline:
                skipped.append(f"{workload} N={n}")
                print(f"[serving] {ops}: time budget spent, skipping {workload} N={n}", flush=True)
                continue
            texts, max_tokens = prompts[workload]
            wanted = max(rounds, math.ceil(opts.min_requests / n))
            cell_deadline = time.monotonic() + opts.cell_seconds
            done: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}
            for r in range(wanted):
                if r > 0 and (time.monotonic() > cell_deadline or time.monotonic() > deadline):
                    break
                for condition in conditions[r % len(conditions) :] + conditions[: r % len(conditions)]:
                    ids = user_ids(prefix, condition, n)
                    done[condition].append(await run_round(client, ids, texts[:n], max_tokens))
            for condition in conditions:
                cell = {"ops": ops, "workload": workload, "n": n, "condition": condition, "max_tokens": max_tokens}
                cell.update(cell_stats(done[condition]))
                cells.append(cell)
                print(
                    f"[serving] {ops} {workload} N={n} {condition}: {cell['output_tokens_per_s']:.1f} out tok/s,"
                    f" p50 {cell['latency_p50']:.2f} s, p95 {cell['latency_p95']:.2f} s, {cell['requests']} req,"
                    f" {cell['mean_output_tokens']:.1f} out tok/req, {cell['distinct_adapters']} adapters",
                    flush=True,
                )
        metrics = (await client.get("/metrics")).text
    return {
        "cells": cells,
        "skipped": skipped,
        "warmup_distinct_adapters": adapters,
        "cache_hits": common.prometheus_value(metrics, "mta_adapter_cache_hits_total"),
        "cache_misses": common.prometheus_value(metrics, "mta_adapter_cache_misses_total"),
        "fusion_seconds_sum": common.prometheus_value(metrics, "mta_fusion_seconds_sum"),
        "fusion_count": common.prometheus_value(metrics, "mta_fusion_seconds_count"),
    }


# --- run --------------------------------------------------------------------------------


def run_load(opts: argparse.Namespace) -> dict[str, Any]:
    users = common.lamp_users()
    runs: dict[str, dict[str, Any]] = {}
    servers: dict[str, Any] = {}
    if opts.url:
        with harness.server_under_test(opts, "serving") as target:
            runs["as-configured"] = asyncio.run(load_test(target.url, opts, "fast", users))
        return summarize(opts, runs, target.model, servers)
    model_dir = opts.model or common.default_model_dir()
    max_n = max(opts.n + (opts.stock_n if "stock" in opts.ops else []))
    with common.workdir(opts.workdir, prefix="mta-bench-serving-") as work:
        print(f"[serving] writing a bench bank ({len(users)} anchors = the LaMP-2M users)", flush=True)
        bank = common.write_user_bank(work / "bank", model_dir, users, rank=opts.rank)
        for ops in opts.ops:
            env = {
                "MTA_DTYPE": opts.dtype,
                "MTA_FAST_CPU_LORA_OPS": "1" if ops == "fast" else "0",
                "MTA_LORA_OPS_STATS_DIR": str(work / ops / "lora-ops-stats"),
                "MTA_WEIGHT_ROUND_STEP": "0",
                "MTA_MAX_LORA_RANK": str(opts.max_lora_rank),
                "MTA_MAX_NUM_SEQS": str(max(64, max_n)),
                "MTA_ADAPTER_CACHE_SIZE": str(max(256, 4 * max_n)),
            }
            if opts.max_loras:  # else the server's default: slots sized from its memory budget
                env["MTA_MAX_LORAS"] = str(opts.max_loras)
            one = argparse.Namespace(**{**vars(opts), "model": model_dir, "workdir": work / ops})
            with harness.server_under_test(one, f"serving-{ops}", lambda *_: bank, **env) as target:
                with httpx.Client(base_url=target.url) as c:
                    servers[ops] = {**c.get("/readyz").json()["lora_slots"], "max_lora_rank": opts.max_lora_rank}
                runs[ops] = asyncio.run(load_test(target.url, opts, ops, users))
                runs[ops]["server_start_seconds"] = target.info["start_seconds"]
            runs[ops]["fast_op_calls"] = read_op_calls(work / ops / "lora-ops-stats")
    return summarize(opts, runs, model_dir.name, servers)


def read_op_calls(stats_dir: Path) -> int:
    """Calls of the fast ops in every engine process (0 when vLLM's stock ops ran)."""
    import json

    return sum(sum(json.loads(p.read_text())["counts"].values()) for p in stats_dir.glob("*.json"))


def _cell(cells: list[dict[str, Any]], workload: str, n: int, condition: str) -> dict[str, Any] | None:
    return next((c for c in cells if c["workload"] == workload and c["n"] == n and c["condition"] == condition), None)


def _tps(cell: dict[str, Any] | None) -> float:
    return cell["output_tokens_per_s"] if cell else math.nan


def summarize(
    opts: argparse.Namespace, runs: dict[str, dict[str, Any]], model: str, servers: dict[str, Any]
) -> dict[str, Any]:
    main_ops = "fast" if "fast" in runs else next(iter(runs))
    main = runs[main_ops]["cells"]
    n_ref = 32 if any(c["n"] == 32 for c in main) else max((c["n"] for c in main), default=0)
    ratios: dict[str, float] = {}
    for workload in opts.workloads:
        for n in sorted({c["n"] for c in main}):
            pers, shared, base = (_cell(main, workload, n, c) for c in ("personalized", "shared", "base"))
            ratios[f"{workload}_n{n}_personalized_over_base"] = common.ratio(_tps(pers), _tps(base))
            ratios[f"{workload}_n{n}_personalized_over_shared"] = common.ratio(_tps(pers), _tps(shared))
            ratios[f"{workload}_n{n}_personalized_over_base_requests"] = (
                common.ratio(pers["requests_per_s"], base["requests_per_s"]) if pers and base else math.nan
            )
    if "stock" in runs:
        for c in runs["stock"]["cells"]:
            fast_base = _cell(main, c["workload"], c["n"], "base")
            ratios[f"stock_{c['workload']}_n{c['n']}_{c['condition']}_over_base"] = common.ratio(
                _tps(c), _tps(fast_base)
            )
            fast_same = _cell(main, c["workload"], c["n"], c["condition"])
            ratios[f"fast_over_stock_{c['workload']}_n{c['n']}_{c['condition']}"] = common.ratio(
                _tps(fast_same), _tps(c)
            )
    headline = f"prefill_n{n_ref}_personalized_over_base"
    return {
        "ratio": ratios.get(headline, math.nan),
        "ratio_definition": f"personalized / base output tokens per s, N={n_ref}, prefill-heavy, {main_ops} CPU LoRA ops",
        "goals": {"personalized_over_base": 0.85, "personalized_over_shared": 0.9},
        "ratios": ratios,
        "setup": {
            "model": model,
            "dtype": opts.dtype,
            "bank": f"random, anchors = {len(common.lamp_users())} LaMP-2M users, rank {opts.rank} all linear, top-2 linear, rounding off",
            "servers": servers,
            "n": opts.n,
            "rounds": opts.rounds,
            "min_requests": opts.min_requests,
            "prefill_tokens": opts.prefill_tokens,
            "decode_tokens": opts.decode_tokens,
            "note": "output lengths are the model's (no ignore_eos in the API): compare mean_output_tokens across cells",
        },
        "runs": runs,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for ops, r in result["runs"].items():
        for c in r["cells"]:
            rows.append(
                (
                    ops,
                    c["workload"],
                    c["n"],
                    c["condition"],
                    c["requests"],
                    c["mean_output_tokens"],
                    c["output_tokens_per_s"],
                    c["latency_p50"],
                    c["latency_p95"],
                )
            )
    head = f"serving: {result['setup']['model']} {result['setup']['dtype']}"
    table = common.table(
        ["ops", "workload", "N", "adapters", "requests", "out tok/req", "out tok/s", "p50 s", "p95 s"], rows
    )
    keys = [k for k in result["ratios"] if "requests" not in k]
    ratios = "\n".join(f"  {k}: {result['ratios'][k]:.2f}" for k in keys)
    return f"{head}\n{table}\nratios (output tokens per s):\n{ratios}\nratio: {result['ratio']:.2f} ({result['ratio_definition']})"


SCENARIO = harness.Scenario("serving", "concurrent users: personalized vs shared vs base", options, run_load, format_table, quick)

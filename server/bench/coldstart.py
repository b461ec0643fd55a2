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
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from server.bench import common

PROMPT = "Recommend one movie for tonight and say why in one sentence."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta bench coldstart", description="first request of a new user minus warm latency")
    p.add_argument("--users", type=int, default=16, help="new users measured (one at a time)")
    p.add_argument("--warm-repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="meta-LoRA rank of the bench bank")
    p.add_argument("--model", type=Path, help="model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--url", help="measure an already running server on 127.0.0.1 instead (its bank and settings)")
    p.add_argument("--quick", action="store_true", help="smallest run: 2 users, 2 warm repeats, 4 tokens")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop taking new users after this long")
    p.add_argument("--workdir", type=Path, help="keep the bank and server log here")
    return p


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = common.parse_options(build_parser(), args)
    common.quiet_http_logs()
    if opts.quick:
        opts.users, opts.warm_repeats, opts.max_tokens = 2, 2, 4
    server_info: dict[str, Any] = {}
    if opts.url:
        data = asyncio.run(measure(common.check_loopback(opts.url), opts))
        model_name = "(running server)"
    else:
        model_dir = opts.model or common.default_model_dir()
        model_name = model_dir.name
        users = common.lamp_users()
        with common.workdir(opts.workdir, prefix="mta-bench-coldstart-") as work:
            bank = common.write_user_bank(work / "bank", model_dir, users, rank=opts.rank)
            env = common.server_env(work, model_dir, bank, MTA_DTYPE=opts.dtype, MTA_WEIGHT_ROUND_STEP="0")
            print("[coldstart] starting the server", flush=True)
            with common.BenchServer(work, env, name="serve-coldstart") as server:
                data = asyncio.run(measure(server.url, opts))
                server_info["start_seconds"] = server.start_seconds
    recs = data["users"]
    overhead = [r["overhead_seconds"] for r in recs]
    cold = [r["cold_seconds"] for r in recs]
    warm = [r["warm_median_seconds"] for r in recs]
    fusion = [r["fusion_seconds"] for r in recs]
    rest = [r["overhead_seconds"] - r["fusion_seconds"] for r in recs]
    result = {
        "benchmark": "coldstart",
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
            "model": model_name,
            "dtype": opts.dtype,
            "users": len(recs),
            "warm_repeats": opts.warm_repeats,
            "max_tokens": opts.max_tokens,
            "adapter_rank": recs[0]["rank"] if recs else None,
            "bank": f"random, anchors = LaMP-2M users, rank {opts.rank} all linear, top-2 linear, rounding off",
            "server": server_info,
        },
        "users": recs,
        "machine": common.machine(),
        "command": common.command_line("coldstart", args),
    }
    print(format_table(result))
    return result


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
    return f"{head}\n{table}\nratio (cold / warm): {result['ratio']:.2f}; overhead p95 {result['overhead_ms_p95']:.0f} ms"

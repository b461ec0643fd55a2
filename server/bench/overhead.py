"""`mta bench overhead`: the server's own work per request, from a generation's start to its engine
submit (user context, plan, prompt with the BM25 history item, adapter lease), as the server
reports it in each `/generate` response's `Server-Timing` header (`mta;dur=<ms>`).

A real `mta serve` (SmolLM2-135M bf16, the demo bank, server defaults otherwise, except the
profile size limit), one request at a time, no other load:
- `base`: a user without a profile (the base model, as `MTA_UNKNOWN_USER=base` serves it);
- `warm-N`: a user with N history items (10 and 512 by default) after its first request (adapter
  cached): the steady state of a returning user;
- `first-N`: a new user's first request with that profile (plan and BM25 index built; the fused
  adapter too, unless a user with the same neighbourhood has it cached already).
Reported: median and p90 of the server-side time per cell, and the HTTP round trip beside it.
`ratio` = median warm overhead at the largest profile / at the smallest (1.0: independent of the
profile's size). Goal (issue 16): a warm user's overhead under 1 ms.
"""

from __future__ import annotations

import argparse
import re
import time
import uuid
from typing import Any

import httpx

from server.bench import common, harness

PROMPT = "Which tag fits a movie about a heist that goes wrong?"
_TIMING = re.compile(r"(?:^|,)\s*mta;dur=([0-9.]+)")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=common.int_list, default=[10, 512], help="profile sizes (comma-separated)")
    p.add_argument("--repeats", type=int, default=50, help="requests per warm cell")
    p.add_argument("--new-users", type=int, default=5, help="new users per profile size (their first request)")
    harness.server_options(p)  # a --url server's profile limit must allow --items


def quick(opts: argparse.Namespace) -> None:
    opts.items, opts.repeats, opts.new_users = [2, 16], 5, 1


def profile(n: int, users: list[dict[str, Any]]) -> list[dict[str, str]]:
    """N distinct LaMP-2M history items (the users' profiles in turn)."""
    pool = [item for u in users for item in common.profile_items(u)]
    return [{**pool[i % len(pool)], "description": f"{pool[i % len(pool)]['description']} ({i})"} for i in range(n)]


def timed(c: httpx.Client, user_id: str) -> tuple[float, float, bool]:
    """(server-side seconds, round-trip seconds, adapter cache hit) of one /generate."""
    body = {"user_id": user_id, "prompt": PROMPT, "max_tokens": 1}
    started = time.perf_counter()
    r = c.post("/generate", json=body)
    total = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"/generate answered {r.status_code}: {r.text}")
    m = _TIMING.search(r.headers.get("server-timing", ""))
    if m is None:
        raise RuntimeError("the server sent no Server-Timing header (an older server?)")
    adapter = r.json()["adapter"]
    return float(m.group(1)) / 1e3, total, bool(adapter and adapter["cache_hit"])


def cell(name: str, samples: list[tuple[float, float, bool]]) -> dict[str, Any]:
    server, total = [s[0] for s in samples], [s[1] for s in samples]
    return {
        "cell": name,
        "requests": len(samples),
        "server_ms_median": common.median(server) * 1e3,
        "server_ms_p90": common.percentile(server, 90) * 1e3,
        "round_trip_ms_median": common.median(total) * 1e3,
        "cache_hits": sum(s[2] for s in samples),
    }


def measure(url: str, opts: argparse.Namespace) -> list[dict[str, Any]]:
    users = common.lamp_users()
    cells = []
    with httpx.Client(base_url=url, timeout=120) as c:
        base = f"bench-overhead-base-{uuid.uuid4().hex[:8]}"  # no profile: the base model (MTA_UNKNOWN_USER=base)
        for _ in range(3):  # warm-up: the engine's first steps
            timed(c, base)
        cells.append(cell("base", [timed(c, base) for _ in range(opts.repeats)]))
        for n in opts.items:
            items = profile(n, users)
            first = []
            for _ in range(opts.new_users):
                user = f"bench-overhead-{n}-{uuid.uuid4().hex[:8]}"
                c.put(f"/users/{user}/profile", json={"items": items}).raise_for_status()
                first.append(timed(c, user))
            cells.append(cell(f"first-{n}", first))
            cells.append(cell(f"warm-{n}", [timed(c, user) for _ in range(opts.repeats)]))
    return cells


def run_cells(opts: argparse.Namespace) -> dict[str, Any]:
    with harness.server_under_test(opts, "overhead", MTA_MAX_PROFILE_ITEMS=str(max(opts.items))) as target:
        cells = measure(target.url, opts)
    warm = {c["cell"]: c for c in cells if c["cell"].startswith("warm-")}
    small, large = warm[f"warm-{min(opts.items)}"], warm[f"warm-{max(opts.items)}"]
    return {
        "ratio": common.ratio(large["server_ms_median"], small["server_ms_median"]),
        "ratio_definition": f"median server-side overhead of a warm user with {max(opts.items)} vs {min(opts.items)} history items (1.0 = independent of profile size)",
        "goal": {"warm_server_ms_median": 1.0},
        "cells": cells,
        "setup": {"model": target.model, "items": opts.items, "repeats": opts.repeats, "new_users": opts.new_users, "server": target.info},
    }


def report(result: dict[str, Any]) -> str:
    items = result["setup"]["items"]
    rows = [
        (c["cell"], c["requests"], f"{c['server_ms_median']:.3f}", f"{c['server_ms_p90']:.3f}", f"{c['round_trip_ms_median']:.1f}", c["cache_hits"])
        for c in result["cells"]
    ]
    return "\n".join([
        f"overhead: {result['setup']['model']}, one request at a time (server-side: Server-Timing)",
        common.table(["cell", "requests", "server ms (median)", "server ms (p90)", "round trip ms", "cache hits"], rows),
        f"ratio (warm {max(items)} items / warm {min(items)} items): {result['ratio']:.2f}",
    ])  # fmt: skip


SCENARIO = harness.Scenario("overhead", "server-side time from request to engine submit", options, run_cells, report, quick)

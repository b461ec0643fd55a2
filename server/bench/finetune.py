"""`mta bench finetune`: a stacked rank-4 fine-tune through the real server, and what it costs /generate.

A real `mta serve` (SmolLM2-135M bf16 serving, fast CPU LoRA ops, the embedded in-process job
runner) with a RANDOM bench bank (anchors = the LaMP-2M users, rank-8 all-linear, top-2
`linear`). For each of `--jobs` users (the first job also loads the training model):

- `POST /users/{id}/finetune` with 10 LaMP-2M examples made from the user's own history
  (the movie-tagging instruction + an item's description -> its tag), rank 4, 1 epoch;
- meanwhile another user sends `/generate` requests back to back (a LaMP prompt, 10 tokens)
  and `/jobs/{id}` is polled, until the job ends (bounded by `--timeout`).

The same probe requests are timed with nothing else running, right before and after each job. Reported:
the job's wall time (submit -> succeeded, as a client sees it) and its training seconds (the
job record), and probe latencies with and without a fine-tune running. `ratio` = median probe
latency while a fine-tune runs / median probe latency without (1.0 = no interference).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from server.bench import common, harness


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=10)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="fine-tunes, one after another (the first loads the model)")
    p.add_argument(
        "--probes",
        type=int,
        default=6,
        help="probes timed without a fine-tune around each job (half before, half after)",
    )
    p.add_argument("--probe-tokens", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900.0, help="give up waiting for a job after this long")
    p.add_argument("--bank-rank", type=int, default=8, help="meta-LoRA rank of the bench bank")
    p.add_argument("--dtype", default="bfloat16")
    harness.server_options(p)


def quick(opts: argparse.Namespace) -> None:
    opts.jobs, opts.probes, opts.probe_tokens = 1, 3, 4


def lamp_examples(user: dict[str, Any], count: int) -> list[dict[str, str]]:
    """LaMP-2M examples from a user's history: the task's instruction with an item's description -> its tag."""
    query = user["query"][0]["input"]
    instruction = query[: query.rindex("description:")]
    items = user["profile"][:count]
    return [{"input": f"{instruction}description: {i['description']}", "output": i["tag"]} for i in items]


async def measure(url: str, opts: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from server.prompts import render_item, retrieve_top1, user_content

    users = [u for u in common.lamp_users() if len(u["profile"]) >= opts.examples]
    prefix = f"bench-ft-{uuid.uuid4().hex[:6]}"
    probe_user = users[0]
    query = probe_user["query"][0]["input"]
    history = [render_item(i, common.LAMP_TEMPLATE) for i in common.profile_items(probe_user)]
    probe_prompt = user_content(query, retrieve_top1(history, query))
    probe_uid = f"{prefix}-probe"
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as client:
        await common.put_profile(client, probe_uid, common.profile_items(probe_user))

        async def probe() -> float:
            body = {"user_id": probe_uid, "prompt": probe_prompt, "max_tokens": opts.probe_tokens, "use_profile": False}
            start = time.perf_counter()
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            return time.perf_counter() - start

        await probe()  # materialize the probe user's adapter
        # idle probes bracket every job (before and after), so a change in the machine's load
        # during the run falls on both sides of the comparison
        half = max(2, opts.probes // 2)
        idle: list[float] = []
        jobs = []
        for j in range(opts.jobs):
            idle += [await probe() for _ in range(half)]
            user = users[1 + j]
            uid = f"{prefix}-{j}"
            await common.put_profile(client, uid, common.profile_items(user))
            jobs.append(await one_job(client, uid, lamp_examples(user, opts.examples), opts, probe))
            print(
                f"[finetune] job {j + 1}: {jobs[-1]['status']} in {jobs[-1]['wall_seconds']:.1f} s"
                f" (training {jobs[-1].get('train_seconds') or 0:.1f} s); /generate meanwhile: median"
                f" {common.median(jobs[-1]['probe_seconds']) * 1e3:.0f} ms over {len(jobs[-1]['probe_seconds'])},"
                f" without: median {common.median(idle[-half:]) * 1e3:.0f} ms",
                flush=True,
            )
        idle += [await probe() for _ in range(half)]
        check = await client.post(
            "/generate", json={"user_id": f"{prefix}-0", "prompt": "Recommend a movie.", "max_tokens": 4}
        )
        check.raise_for_status()
    return {"idle_probe_seconds": idle, "jobs": jobs, "stacked_served": check.json()["stacked"]}


async def one_job(
    client: Any, uid: str, examples: list[dict[str, str]], opts: argparse.Namespace, probe: Any
) -> dict[str, Any]:
    body = {"examples": examples, "rank": opts.rank, "epochs": opts.epochs}
    start = time.perf_counter()
    r = await client.post(f"/users/{uid}/finetune", json=body)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + opts.timeout
    done = asyncio.Event()
    job: dict[str, Any] = {}

    async def poll() -> None:
        nonlocal job
        while time.monotonic() < deadline:
            job = (await client.get(f"/jobs/{job_id}")).json()
            if job["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.25)
        else:
            job = {**job, "status": "timeout"}
        done.set()

    probes: list[float] = []

    async def probe_loop() -> None:
        while not done.is_set():
            probes.append(await probe())

    await asyncio.gather(poll(), probe_loop())
    wall = time.perf_counter() - start
    started, finished = job.get("started_at"), job.get("finished_at")
    return {
        "job_id": job_id,
        "status": job.get("status", "timeout"),
        "error": job.get("error"),
        "wall_seconds": wall,
        "train_seconds": job.get("seconds"),
        "queued_to_finished_seconds": (finished - job["created_at"]) if finished else None,
        "running_seconds": (finished - started) if finished and started else None,
        "initial_loss": job.get("initial_loss"),
        "final_loss": job.get("final_loss"),
        "stacked_bytes": job.get("stacked_bytes"),
        "probe_seconds": probes,
    }


def run_jobs(opts: argparse.Namespace) -> dict[str, Any]:
    def bank(work: Path, model_dir: Path) -> Path:
        return common.write_user_bank(work / "bank", model_dir, common.lamp_users(), rank=opts.bank_rank)

    with harness.server_under_test(opts, "finetune", bank, MTA_DTYPE=opts.dtype) as target:
        data = asyncio.run(measure(target.url, opts))
    jobs = data["jobs"]
    during = [s for j in jobs for s in j["probe_seconds"]]
    idle = data["idle_probe_seconds"]
    return {
        "ratio": common.ratio(common.median(during), common.median(idle)),
        "ratio_definition": "median /generate latency while a fine-tune runs / without (1.0 = no interference)",
        "job_wall_seconds": [j["wall_seconds"] for j in jobs],
        "job_train_seconds": [j["train_seconds"] for j in jobs],
        "all_succeeded": all(j["status"] == "succeeded" for j in jobs),
        "stacked_served_after": data["stacked_served"],
        "generate_ms": {
            "idle": {k: v * 1e3 for k, v in common.summarize(idle).items() if k != "n"},
            "during_finetune": {k: v * 1e3 for k, v in common.summarize(during).items() if k != "n"},
        },
        "setup": {
            "model": target.model,
            "dtype": opts.dtype,
            "examples": opts.examples,
            "rank": opts.rank,
            "epochs": opts.epochs,
            "jobs": opts.jobs,
            "probe_tokens": opts.probe_tokens,
            "runner": "in-process (the API process trains; the engine core is a separate process)",
            "server": target.info,
        },
        "jobs": jobs,
        "idle_probe_seconds": idle,
    }


def format_table(result: dict[str, Any]) -> str:
    g = result["generate_ms"]
    rows = [
        (
            f"fine-tune job {i + 1} (submit -> succeeded)",
            j["wall_seconds"],
            j["train_seconds"] or float("nan"),
            len(j["probe_seconds"]),
        )
        for i, j in enumerate(result["jobs"])
    ]
    table = common.table(["", "wall s", "training s", "/generate during"], rows)
    lat = common.table(
        ["/generate latency", "median ms", "p95 ms", "max ms"],
        [(k, v["median"], v["p95"], v["max"]) for k, v in g.items()],
    )
    return f"finetune: {result['setup']['model']}, {result['setup']['examples']} examples, rank {result['setup']['rank']}\n{table}\n{lat}\nratio (during / idle median): {result['ratio']:.2f}"


SCENARIO = harness.Scenario("finetune", "stacked fine-tune wall time and /generate wait", options, run_jobs, format_table, quick)

"""`mta bench lora-ops`: vLLM's CPU LoRA ops ("stock") vs ours (`server.lora_ops`), one run.

Offline `vllm.LLM` on SmolLM2-135M-Instruct (bf16) with random rank-16 adapters; every cell
generates for the same 32 prompts:

- workloads: prefill-heavy (LaMP-2M movie-tagging prompts of about 200 tokens, 10 output
  tokens) and decode-heavy (short prompts, 64 output tokens), `ignore_eos` so every run
  generates the same number of tokens;
- adapters: base (no adapter), one adapter shared by all prompts, one distinct adapter per
  prompt.

The plugin reads `MTA_FAST_CPU_LORA_OPS` when vLLM loads it, so each side runs in its own
worker process (`python -m server.bench.lora_ops --worker JOB --mode stock|ours`), which
starts one engine and times every cell. Prefix caching is off, so repeated prompts are
recomputed. The reported "ratio" is personalized (distinct adapters) throughput over base
throughput with our ops, prefill-heavy; the JSON also has every cell's raw times.

Each cell also records the CPU time of vLLM's model worker (`cpu_seconds`, "cpu_ratios"):
on a shared machine wall time mostly measures the other load; with `OMP_NUM_THREADS=1` (no
OpenMP threads spinning while another is descheduled) the CPU time is a stable measure of
the work a cell needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.bench import harness

MODES = ("stock", "ours")
PROGRESS = "[lora-ops]"
WORKLOADS = ("prefill", "decode")
CELLS = ("base", "one", "distinct")
CELL_TITLES = {"base": "base (no adapter)", "one": "one shared adapter", "distinct": "distinct adapters"}
LAMP_MOVIES = Path(__file__).resolve().parents[2] / "bank_artifacts" / "data" / "movie_tagging.json"
DECODE_PROMPT = "Write a short story about {topic}."
DECODE_TOPICS = ("a robot", "the sea", "a lost key", "a dragon", "winter", "a train", "a garden", "the moon")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=32, help="prompts per cell (and distinct adapters)")
    p.add_argument("--prefill-tokens", type=int, default=10, help="output tokens, prefill-heavy")
    p.add_argument("--decode-tokens", type=int, default=64, help="output tokens, decode-heavy")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=None, help="adapters per engine step; default = --prompts")
    p.add_argument("--repeats", type=int, default=1, help="engine runs per side; the best time per cell counts")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of stock,ours")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of prefill,decode")
    p.add_argument("--workdir", type=Path, default=None, help="adapters and job files (default: a temp dir)")


# --- parent: prepare, run both sides, report ------------------------------------------


def run_cells(opts: argparse.Namespace) -> dict[str, Any]:
    modes = [m for m in MODES if m in opts.modes.split(",")]
    workloads = [w for w in WORKLOADS if w in opts.workloads.split(",")]
    if not modes or not workloads:
        raise SystemExit(f"--modes takes some of {','.join(MODES)}; --workloads some of {','.join(WORKLOADS)}")
    with tempfile.TemporaryDirectory(prefix="mta-bench-lora-ops-") as tmp:
        workdir = opts.workdir or Path(tmp)
        job = prepare_job(opts, workdir, workloads)
        job_path = workdir / "job.json"
        job_path.write_text(json.dumps(job))
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(opts.repeats):
            for mode in modes:
                runs[mode].append(run_worker(job_path, mode, workdir))
    return summarize(job, runs)


def prepare_job(opts: argparse.Namespace, workdir: Path, workloads: list[str]) -> dict[str, Any]:
    """Model, adapters and prompt token ids for the workers."""
    from transformers import AutoTokenizer

    from server.adapters import save_adapter
    from server.adapters.targets import ModelTargets
    from server.bank.random_bank import random_lora
    from server.model_prep import default_cache_dir, prepare_smollm2
    from server.prompts import chat_prompt, render_item, retrieve_top1, user_content

    model_dir = prepare_smollm2(default_cache_dir())
    targets = ModelTargets.from_config(json.loads((model_dir / "config.json").read_text()))
    adapters = []
    for i in range(opts.prompts):
        path = workdir / "adapters" / f"a{i:03d}"
        if not (path / "adapter_config.json").is_file():
            lora = random_lora(targets, rank=opts.rank, a_seed=i, b_seed=10_000 + i)
            save_adapter(lora, path, base_model_name_or_path=str(model_dir), dtype=_bf16())
        adapters.append(str(path))

    tok = AutoTokenizer.from_pretrained(model_dir)
    users = json.loads(LAMP_MOVIES.read_text())
    prefill = []
    for i in range(opts.prompts):
        user = users[i % len(users)]
        query = user["query"][0]["input"]
        history = [render_item(item) for item in user["profile"]]
        prefill.append(
            chat_prompt(tok, [{"role": "user", "content": user_content(query, retrieve_top1(history, query))}])
        )
    decode = [
        chat_prompt(
            tok, [{"role": "user", "content": DECODE_PROMPT.format(topic=DECODE_TOPICS[i % len(DECODE_TOPICS)])}]
        )
        for i in range(opts.prompts)
    ]
    return {
        "model": str(model_dir),
        "adapters": adapters,
        "rank": opts.rank,
        "max_loras": opts.max_loras or opts.prompts,
        "workloads": {
            name: spec
            for name, spec in (
                ("prefill", {"prompts": prefill, "max_tokens": opts.prefill_tokens}),
                ("decode", {"prompts": decode, "max_tokens": opts.decode_tokens}),
            )
            if name in workloads
        },
        "warmup_prompts": decode,
    }


def _bf16():
    import torch

    return torch.bfloat16


def run_worker(job_path: Path, mode: str, workdir: Path) -> dict[str, Any]:
    out = workdir / f"result-{mode}-{time.monotonic_ns()}.json"
    stats_dir = workdir / f"stats-{mode}-{time.monotonic_ns()}"
    env = {
        **os.environ,
        "MTA_FAST_CPU_LORA_OPS": "1" if mode == "ours" else "0",
        "MTA_LORA_OPS_STATS_DIR": str(stats_dir),
        # vLLM's ops can take minutes for one step on a busy CPU (its default limit is 300 s).
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    log_path = out.with_suffix(".log")
    print(f"[lora-ops] {mode}: starting an engine (log: {log_path})", flush=True)
    cmd = [sys.executable, "-m", "server.bench.lora_ops", "--worker", str(job_path), "--mode", mode, "--out", str(out)]
    with (
        open(log_path, "w") as log,
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:  # keep vLLM's logs in the file, show our progress lines
            log.write(line)
            if line.startswith(PROGRESS):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"lora-ops {mode} worker failed ({proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["op_calls"] = read_op_calls(stats_dir)
    return result


def read_op_calls(stats_dir: Path) -> int:
    """Our ops' calls over every process (0 for stock: nothing is installed)."""
    total = 0
    for path in stats_dir.glob("*.json"):
        total += sum(json.loads(path.read_text())["counts"].values())
    return total


def summarize(job: dict[str, Any], runs: dict[str, list[dict]]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for workload in job["workloads"]:
        spec = job["workloads"][workload]
        n = len(spec["prompts"])
        prompt_tokens = sum(len(p) for p in spec["prompts"])
        for mode, mode_runs in runs.items():
            for cell in CELLS:
                times = [r["seconds"][workload][cell] for r in mode_runs]
                cpu = [r.get("cpu_seconds", {}).get(workload, {}).get(cell) for r in mode_runs]
                best = min(times)
                cells.setdefault(workload, {}).setdefault(cell, {})[mode] = {
                    "seconds": best,
                    "all_seconds": times,
                    "output_tokens_per_s": n * spec["max_tokens"] / best,
                    "tokens_per_s": (prompt_tokens + n * spec["max_tokens"]) / best,
                    "cpu_seconds": min(cpu) if None not in cpu else None,
                    "all_cpu_seconds": cpu,
                }
        for mode in runs:
            base = cells[workload]["base"][mode]
            for cell in CELLS:
                c = cells[workload][cell][mode]
                c["vs_base"] = base["seconds"] / c["seconds"]
                c["vs_base_cpu"] = base["cpu_seconds"] / c["cpu_seconds"] if c["cpu_seconds"] and base["cpu_seconds"] else None
    ratios = {f"{w}_{m}": cells[w]["distinct"][m]["vs_base"] for w in job["workloads"] for m in runs}
    cpu_ratios = {f"{w}_{m}": cells[w]["distinct"][m]["vs_base_cpu"] for w in job["workloads"] for m in runs}
    n = len(job["adapters"])
    return {
        "ratio": ratios.get("prefill_ours"),  # None when prefill or ours was not run
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,  # the same from the model worker's CPU time (robust on a shared machine)
        "setup": {
            "model": Path(job["model"]).name,
            "dtype": "bfloat16",
            "adapters": n,
            "rank": job["rank"],
            "max_loras": job["max_loras"],
            "prompts": n,
            **{
                name: {"mean_prompt_tokens": sum(map(len, spec["prompts"])) / n, "output_tokens": spec["max_tokens"]}
                for name, spec in job["workloads"].items()
            },
            "cpu_threads": os.cpu_count(),
        },
        "cells": cells,
        "op_calls": {mode: [r["op_calls"] for r in mode_runs] for mode, mode_runs in runs.items()},
        "engine_start_seconds": {mode: [r["start_seconds"] for r in mode_runs] for mode, mode_runs in runs.items()},
    }


def format_table(result: dict[str, Any]) -> str:
    modes = [m for m in MODES if m in result["op_calls"]]
    setup = result["setup"]
    lines = [
        f"{setup['model']} bf16, {setup['prompts']} prompts, rank-{setup['rank']} adapters, max_loras={setup['max_loras']}",
        "| workload | adapters | "
        + " | ".join(f"{m} s | {m} x base | {m} cpu s | {m} cpu x base" for m in modes)
        + " |"
        + (" speedup |" if len(modes) == 2 else ""),
        "|---|---|" + "---:|---:|---:|---:|" * len(modes) + ("---:|" if len(modes) == 2 else ""),
    ]
    for workload in result["cells"]:
        w = result["setup"][workload]
        label = f"{workload} ({w['mean_prompt_tokens']:.0f} in / {w['output_tokens']} out)"
        for cell in CELLS:
            row = result["cells"][workload][cell]
            cols = " | ".join(
                f"{row[m]['seconds']:.2f} | {row[m]['vs_base']:.2f} | {_num(row[m]['cpu_seconds'])} | "
                f"{_num(row[m]['vs_base_cpu'])}"
                for m in modes
            )
            speed = f" {row['stock']['seconds'] / row['ours']['seconds']:.1f}x |" if len(modes) == 2 else ""
            lines.append(f"| {label} | {CELL_TITLES[cell]} | {cols} |{speed}")
    lines.append(
        "ratio (distinct adapters / base throughput): " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items())
    )
    lines.append(
        "ratio from the model worker's CPU time: " + ", ".join(f"{k} {_num(v)}" for k, v in result.get("cpu_ratios", {}).items())
    )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def engine_cpu_seconds() -> float:
    """User + system CPU time of vLLM's model worker process(es) (else: this process and its children).

    On a shared machine, wall time depends on what else runs; the CPU time the model worker
    spends on a cell much less so. The engine core and this process are left out: they poll
    the worker while it runs, so their CPU time grows with the wall time.
    """
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    workers = []
    for proc in procs:
        try:
            if "Worker" in proc.name() or any("Worker" in part for part in proc.cmdline()[:1]):
                workers.append(proc)
        except psutil.Error:
            continue
    total = 0.0
    for proc in workers or procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# --- worker: one engine, every cell -----------------------------------------------------


def worker(job_path: Path, mode: str, out: Path) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from server.engine_args import EngineSpec

    job = json.loads(job_path.read_text())
    n = len(job["adapters"])
    started = time.perf_counter()
    llm = EngineSpec(
        model=job["model"],
        max_loras=job["max_loras"],
        max_lora_rank=job["rank"],
        max_cpu_loras=max(n, job["max_loras"]),
        max_num_seqs=max(n, 8),
        max_model_len=1024,
        enable_prefix_caching=False,
        cpu_threads_bind="nobind",  # a shared machine: pinned threads would wait for busy cores
    ).offline_llm()
    start_seconds = time.perf_counter() - started
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(job["adapters"])]
    cell_loras = {"base": None, "one": [loras[0]] * n, "distinct": loras}

    def generate(prompts: list[list[int]], max_tokens: int, lora: list | None) -> tuple[float, float]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t, c = time.perf_counter(), engine_cpu_seconds()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - t, engine_cpu_seconds() - c

    # Load every adapter into vLLM's CPU cache and run each kind of step once before timing.
    warm = job["warmup_prompts"]
    generate(warm, 2, loras)
    generate(warm, 2, None)
    seconds: dict[str, dict[str, float]] = {}
    cpu_seconds: dict[str, dict[str, float]] = {}
    for workload, spec in job["workloads"].items():
        for cell in CELLS:
            wall, cpu = generate(spec["prompts"], spec["max_tokens"], cell_loras[cell])
            seconds.setdefault(workload, {})[cell] = wall
            cpu_seconds.setdefault(workload, {})[cell] = cpu
            print(f"{PROGRESS} {mode}: {workload} {cell}: {wall:.2f} s ({cpu:.2f} CPU s)", flush=True)
    result = {"mode": mode, "seconds": seconds, "cpu_seconds": cpu_seconds, "start_seconds": start_seconds}
    out.write_text(json.dumps(result))


SCENARIO = harness.Scenario("lora-ops", __doc__.split("\n")[0], options, run_cells, format_table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.bench.lora_ops")
    p.add_argument("--worker", type=Path, required=True, help="job file written by the parent")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    worker(a.worker, a.mode, a.out)


if __name__ == "__main__":
    main()

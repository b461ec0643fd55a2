"""Shared helpers for the benchmarks: options, statistics, tables, machine facts, a server subprocess.

Benchmarks run on a shared machine, so they compare ours with the baseline in the same run and
report medians and ratios; every load loop is bounded in count and in time, and every request
goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from server.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[2]
LAMP_MOVIES = REPO / "bank_artifacts" / "data" / "movie_tagging.json"
LAMP_TEMPLATE = "Description: {description} Tag: {tag}"  # LaMP-2M history items, as the banks render them


# --- options ------------------------------------------------------------------------------


def parse_options(parser: argparse.ArgumentParser, args: argparse.Namespace | None) -> argparse.Namespace:
    """The benchmark's own flags from `args.options` (what follows `mta bench NAME`)."""
    options = list(getattr(args, "options", None) or [])
    return parser.parse_args([o for o in options if o != "--"])


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, like numpy's default."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, median, p95, min, max, mean of raw figures (seconds stay seconds)."""
    return {
        "n": len(values),
        "median": median(values),
        "p95": percentile(values, 95),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def time_calls(fn: Callable[[int], Any], runs: int, warmup: int = 1, max_seconds: float | None = None) -> list[float]:
    """Seconds of `fn(i)` over `runs` calls after `warmup` untimed ones; stops early after `max_seconds`."""
    for i in range(warmup):
        fn(-1 - i)
    times: list[float] = []
    deadline = time.monotonic() + max_seconds if max_seconds else math.inf
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
        if time.monotonic() > deadline and len(times) >= 3:
            break
    return times


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


# --- output -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are printed with 3 significant digits, the first column left-aligned."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Facts about the machine and its load when the benchmark ran (the machine is shared)."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def command_line(name: str, args: argparse.Namespace | None) -> str:
    options = [o for o in (getattr(args, "options", None) or []) if o != "--"]
    out = f" --out {args.out}" if args is not None and getattr(args, "out", None) else ""
    return " ".join(["mta bench", name + out, *options])


# --- model, data and banks ----------------------------------------------------------------


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted once into the cache (the server's default model)."""
    from server.model_prep import default_cache_dir, prepare_smollm2

    return prepare_smollm2(default_cache_dir())


def model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def lamp_users(path: Path = LAMP_MOVIES) -> list[dict[str, Any]]:
    """LaMP-2M users: {user_id, profile: [{id, description, tag}], query: [{id, input, gold}]}."""
    return json.loads(Path(path).read_text())


def profile_items(user: dict[str, Any]) -> list[dict[str, str]]:
    return [{"description": i["description"], "tag": i["tag"]} for i in user["profile"]]


def user_embeddings(users: Sequence[dict[str, Any]]) -> Any:
    """[n_users, 384] MiniLM user embeddings, as the server computes them from a profile."""
    import numpy as np

    from server.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, resolve_embedding_model
    from server.prompts import render_item

    embedder = Embedder(resolve_embedding_model(DEFAULT_EMBEDDING_MODEL))
    return np.stack([embedder.embed_user([render_item(i, LAMP_TEMPLATE) for i in u["profile"]]) for u in users])


def write_user_bank(
    out: Path, model_dir: Path, users: Sequence[dict[str, Any]], *, rank: int = 8, mode: str = "linear", top_k: int = 2
) -> Path:
    """A RANDOM bank whose anchors are these LaMP users (their own embeddings), rank-`rank` all-linear LoRAs.

    With weight rounding off (MTA_WEIGHT_ROUND_STEP=0) each of these users retrieves itself first and
    a neighbour second with its own weights, so every user gets a distinct fused adapter.
    """
    from server.adapters.targets import ModelTargets
    from server.bank.manifest import FusionDefaults, TaskSpec
    from server.bank.random_bank import write_random_bank
    from server.embedding import DEFAULT_EMBEDDING_MODEL

    return write_random_bank(
        out,
        targets=ModelTargets.from_config(model_config(model_dir)),
        model_id=Path(model_dir).name,
        anchor_ids=[f"lamp2m-{u['user_id']}" for u in users],
        anchor_embeddings=user_embeddings(users),
        embedding_model=DEFAULT_EMBEDDING_MODEL,
        rank=rank,
        fusion=FusionDefaults(mode=mode, top_k=top_k),
        task=TaskSpec(name="movie_tagging", history_template=LAMP_TEMPLATE),
        name="bench",
        bank_version=f"bench-{len(users)}x{rank}",
    )


@contextlib.contextmanager
def workdir(keep: Path | None = None, prefix: str = "mta-bench-") -> Iterator[Path]:
    """`keep` if given (kept afterwards), else a temporary directory removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tmpfs_dir(prefix: str) -> Path:
    """A fresh directory on /dev/shm when writable (where the server materializes adapters)."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


# --- the real server in a subprocess ------------------------------------------------------


def server_env(work: Path, model_dir: Path, bank: Path, **extra: str) -> dict[str, str]:
    """`mta serve` settings for a benchmark server: its own data and adapter directories, bf16, quiet."""
    env = {
        "MTA_MODEL_PATH": str(model_dir),
        "MTA_BANK_PATH": str(bank),
        "MTA_DATA_DIR": str(work / "data"),
        "MTA_ADAPTER_CACHE_DIR": str(tmpfs_dir("mta-bench-adapters-")),
        "MTA_DTYPE": "bfloat16",
        "MTA_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),  # shared machine: OS places threads
    }
    env.update(extra)
    return env


class BenchServer(ServerProcess):
    """A benchmark's server: its tmpfs adapter cache (see `server_env`) goes when it stops."""

    def stop(self, timeout: float = 60, sig: int = signal.SIGINT) -> int | None:
        code = super().stop(timeout, sig)
        shutil.rmtree(self.env.get("MTA_ADAPTER_CACHE_DIR", ""), ignore_errors=True)
        return code


def check_loopback(url: str) -> str:
    """Benchmarks send load only to this machine."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"benchmarks only send traffic to 127.0.0.1, not {host!r}")
    return url.rstrip("/")


async def put_profile(client: Any, user_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    r = await client.put(f"/users/{user_id}/profile", json={"items": items})
    r.raise_for_status()
    return r.json()


def prometheus_value(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (e.g. `mta_fusion_seconds_sum`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def quiet_http_logs() -> None:
    """`mta bench` logs at INFO; httpx would log every request."""
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)


def json_safe(obj: Any) -> Any:
    """NaN and infinities (a skipped cell, an empty list) as null, so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj

"""Benchmarks: `mta bench NAME --out FILE.json`. Each prints a short table and writes JSON.

Every benchmark module exposes `run(args: argparse.Namespace) -> dict`, returning the JSON to
write (with a top-level "ratio"); `args.options` holds the benchmark's own flags, which the
module parses itself so `mta --help` never imports it.
"""

from __future__ import annotations

# name -> module path; modules are imported only when their benchmark runs.
BENCHMARKS: dict[str, str] = {
    "lora-ops": "server.bench.lora_ops",
    "fusion": "server.bench.fusion",
    "serving": "server.bench.serving",
    "coldstart": "server.bench.coldstart",
    "storage": "server.bench.storage",
    "finetune": "server.bench.finetune",
    "overhead": "server.bench.overhead",
}

"""Benchmarks: `mta bench NAME --out FILE.json`. Each prints a short table and writes JSON.

Every benchmark module exposes `SCENARIO` (`server.bench.harness.Scenario`: its options, what it
measures, its table); the harness parses `args.options` (the benchmark's own flags, imported
only when it runs, so `mta --help` never imports a benchmark), starts the server under test and
stamps the record. `storage` is a calculator, not a benchmark: its figures are computed.
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

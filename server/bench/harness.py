"""One harness for every `mta bench` scenario: options, the server under test, the record, the table.

A scenario says only what is particular to it: its options, what it measures and how its table
reads. The harness parses the options (`mta bench NAME -- ...`), applies `--quick`, starts the
server under test (or takes a running one at `--url`, loopback only), stamps the record with the
benchmark's name, the machine's facts and the command line, prints the table and returns strict
JSON (NaN as null). Calculators (`kind="calculator"`: storage, the cache simulation) use the same
harness and say so in their record: their figures are computed, not timed.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.bench import common
from server.defaults import DEMO_BANK


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    options: Callable[[argparse.ArgumentParser], None]  # adds the scenario's own flags
    measure: Callable[[argparse.Namespace], dict[str, Any]]  # the record's body, with "ratio"
    report: Callable[[dict[str, Any]], str]  # the table printed for the whole record
    quick: Callable[[argparse.Namespace], None] | None = None  # shrinks the options for a smoke run
    kind: Literal["benchmark", "calculator"] = "benchmark"

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"mta bench {self.name}", description=self.description)
        self.options(p)
        if self.quick is not None:
            p.add_argument("--quick", action="store_true", help="a small smoke run (tests)")
        return p


def run(scenario: Scenario, args: argparse.Namespace | None) -> dict[str, Any]:
    """Parse, measure, stamp, print; returns the JSON record."""
    opts = common.parse_options(scenario.parser(), args)
    if scenario.quick is not None and opts.quick:
        scenario.quick(opts)
    common.quiet_http_logs()
    body = scenario.measure(opts)
    record = {
        "benchmark": scenario.name,
        "kind": scenario.kind,
        **body,
        "machine": common.machine(),
        "command": common.command_line(scenario.name, args),
    }
    print(scenario.report(record))
    return common.json_safe(record)


def server_options(p: argparse.ArgumentParser) -> None:
    """The flags of a scenario that measures a server: a running one, or one it starts."""
    p.add_argument("--url", help="measure a running server (127.0.0.1 only) instead of starting one")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the server's default model)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the server's files here (default: a temp dir)")


@dataclass
class Target:
    """The server a scenario measures."""

    url: str
    model: str  # its model's name, "(running server)" for --url
    info: dict[str, Any] = field(default_factory=dict)  # start-up facts for the record's setup


@contextlib.contextmanager
def server_under_test(
    opts: argparse.Namespace, name: str, bank: Callable[[Path, Path], Path] | None = None, **env: str
) -> Iterator[Target]:
    """`opts.url`, or a fresh `mta serve` (bf16, its own data and tmpfs adapter directories) for the run.

    `bank(work, model_dir)` writes the bank to serve (default: the demo bank); `env` adds MTA_*
    settings.
    """
    if opts.url:
        yield Target(common.check_loopback(opts.url), "(running server)")
        return
    model_dir = Path(opts.model) if opts.model else common.default_model_dir()
    with common.workdir(Path(opts.workdir) if opts.workdir else None, prefix=f"mta-bench-{name}-") as work:
        bank_dir = bank(work, model_dir) if bank is not None else DEMO_BANK
        print(f"[{name}] starting the server", flush=True)
        with common.BenchServer(work, common.server_env(work, model_dir, bank_dir, **env), name=f"serve-{name}") as server:
            yield Target(server.url, model_dir.name, {"start_seconds": server.start_seconds, "bank": str(bank_dir)})

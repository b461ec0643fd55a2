"""Smoke runs of every benchmark at its smallest size: it runs and writes JSON with a numeric "ratio".

No timing assertions (the machines are shared). The server benchmarks run against the session's
tiny-model server (`--url`), so they cost seconds, not an engine start each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.bench import BENCHMARKS
from server.cli import main


def bench(name: str, out: Path, *options: str) -> dict:
    main(["bench", name, "--out", str(out), "--", *options])
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert isinstance(result["ratio"], (int, float)) and math.isfinite(result["ratio"]), result["ratio"]
    return result


def test_every_benchmark_is_registered() -> None:
    assert {"fusion", "serving", "coldstart", "storage", "finetune"} <= set(BENCHMARKS)


def test_fusion(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = bench(
        "fusion", tmp_path / "fusion.json",
        "--model", str(tiny_model_dir), "--anchors", "4", "--k", "2", "--modes", "linear,cat", "--stacking", "on",
        "--threads", "default", "--runs", "2", "--peft-runs", "1",
    )
    assert len(result["cells"]) == 2
    assert result["checks"]["cat_stacked_equals_peft"], result["checks"]


def test_storage(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = bench("storage", tmp_path / "storage.json", "--model", str(tiny_model_dir))
    assert result["models"][0]["formula_matches_measured"]  # the Llama-3-8B figures use the same formula
    assert result["models"][1]["bytes"]["oppu_lora_fp32"] > 0


def test_serving(tmp_path: Path, server) -> None:
    result = bench("serving", tmp_path / "serving.json", "--url", server.url, "--quick")
    cells = result["runs"]["as-configured"]["cells"]
    assert {c["condition"] for c in cells} == {"personalized", "shared", "base"}
    assert all(c["requests"] > 0 for c in cells)


def test_coldstart(tmp_path: Path, server) -> None:
    result = bench("coldstart", tmp_path / "coldstart.json", "--url", server.url, "--quick")
    assert result["setup"]["users"] == 2


@pytest.mark.timeout(300)
def test_finetune(tmp_path: Path, server) -> None:
    result = bench("finetune", tmp_path / "finetune.json", "--url", server.url, "--quick")
    assert result["all_succeeded"], result["jobs"]
    assert result["stacked_served_after"]

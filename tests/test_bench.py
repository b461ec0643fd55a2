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
    assert result["benchmark"] == name and result["command"].startswith(f"mta bench {name}")
    assert result["kind"] in ("benchmark", "calculator") and result["machine"]["cpu_count"] >= 1  # the harness's stamp
    assert isinstance(result["ratio"], (int, float)) and math.isfinite(result["ratio"]), result["ratio"]
    return result


def test_every_benchmark_is_registered() -> None:
    assert {"fusion", "serving", "coldstart", "storage", "finetune", "overhead"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_is_a_scenario_of_the_one_harness(name: str) -> None:
    import importlib

    scenario = importlib.import_module(BENCHMARKS[name]).SCENARIO
    assert scenario.name == name
    flags = {a for action in scenario.parser()._actions for a in action.option_strings}
    if name in ("serving", "coldstart", "finetune", "overhead"):  # they measure a server: a running one or their own
        assert {"--url", "--model", "--workdir", "--quick"} <= flags
    assert scenario.kind == ("calculator" if name == "storage" else "benchmark")


def test_fusion(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = bench(
        "fusion",
        tmp_path / "fusion.json",
        "--model",
        str(tiny_model_dir),
        "--anchors",
        "4",
        "--k",
        "2",
        "--modes",
        "linear,cat",
        "--stacking",
        "on",
        "--threads",
        "default",
        "--runs",
        "2",
        "--peft-runs",
        "1",
    )
    assert len(result["cells"]) == 2
    assert result["checks"]["cat_stacked_equals_peft"], result["checks"]
    assert result["checks"]["linear_flat_equals_per_module"], result["checks"]


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


def test_overhead(tmp_path: Path, server) -> None:
    result = bench("overhead", tmp_path / "overhead.json", "--url", server.url, "--quick")
    cells = {c["cell"]: c for c in result["cells"]}
    assert set(cells) == {"base", "first-2", "warm-2", "first-16", "warm-16"}
    assert cells["warm-16"]["cache_hits"] == cells["warm-16"]["requests"] == 5 and cells["base"]["cache_hits"] == 0
    assert all(0 < c["server_ms_median"] <= c["round_trip_ms_median"] for c in cells.values())


def test_coldstart_che_approximation_matches_an_exact_lru() -> None:
    import numpy as np

    from server.bench.coldstart import che_hit_rates, exact_lru_hit_rate

    p = 1.0 / np.arange(1, 2001) ** 1.0
    p /= p.sum()
    che = che_hit_rates(p, [10, 100, 500, 2000])
    assert che[2000] == 1.0
    assert che[10] < che[100] < che[500] < 1.0
    for size in (10, 100, 500):
        exact = exact_lru_hit_rate(p, size, 50_000, np.random.default_rng(size))
        assert abs(che[size] - exact) < 0.02, (size, che[size], exact)


def test_coldstart_cache_simulation_uses_the_server_keys() -> None:
    """The simulated users' cache keys partition them exactly as the server's retrieval and keys do."""
    from types import SimpleNamespace

    import numpy as np

    from server.bank.index import AnchorIndex
    from server.bench.coldstart import SCENARIO, sample_users, simulate_cache, user_keys
    from server.fusion import plan_fusion

    population = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    anchors = population[:12]
    opts = SCENARIO.parser().parse_args(
        ["--sim-users", "3000", "--sim-anchors", "12", "--sim-steps", "0,0.1", "--sim-cache", "4,16,10000"]
    )
    keys = user_keys(population, anchors, opts, np.random.default_rng(1))
    users = np.concatenate(list(sample_users(population, 3000, np.random.default_rng(1))))
    bank = SimpleNamespace(version="v", index=AnchorIndex([f"a{i}" for i in range(12)], anchors), shared=None)
    for step, sim_ids in keys.items():
        server_keys = [
            plan_fusion(bank, u, bank_uid="u", top_k=2, mode="linear", round_step=step).key() for u in users
        ]
        pairs = set(zip(server_keys, sim_ids.tolist()))
        assert len(pairs) == len(set(server_keys)) == len(set(sim_ids.tolist())), step  # same partition

    sim = simulate_cache(population, opts)
    exact, rounded = sim["by_step"]["0.0"], sim["by_step"]["0.1"]
    assert exact["distinct_adapters"] > 2900  # weights kept to 6 decimals: (almost) every user is its own
    assert rounded["distinct_adapters"] < exact["distinct_adapters"] / 5
    for entry in (exact, rounded):
        for z in entry["by_zipf"].values():
            hits = [z["hit_rate"][str(c)] for c in sim["command_options"]["cache"]]
            assert hits == sorted(hits) and 0 < hits[0] and hits[-1] == 1.0
            for b, d in z["distinct_adapters_in_batch"].items():
                assert d <= min(int(b), entry["distinct_adapters"]) + 1e-9
    assert all(abs(c["che"] - c["exact_lru"]) < 0.03 for c in sim["che_check"]), sim["che_check"]

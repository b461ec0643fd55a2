"""`mta bench fusion`: build and materialize one user's adapter, ours vs the PEFT way.

Ours is the server's cache-miss path: top-k retrieval (`server.fusion.plan_fusion`, FAISS),
fusion, stacking concat (the stacked LoRA parsed from its stored bytes, as the server does) and
the write of a PEFT directory on tmpfs (`server.fusion.materialize`). The PEFT way is the same
result from a `PeftModel` that already holds every anchor (and the stacked LoRA) as a named
adapter: the same retrieval, `add_weighted_adapter(...)` (`cat` for the stacking), then
`save_pretrained(selected_adapters=[...])` and `delete_adapter`.

Shapes: SmolLM2-135M (or `--model`), a random bank of `--anchors` rank-8 all-linear meta-LoRAs,
a rank-4 all-linear stacked LoRA; k = 2 and 4, `linear` and `cat`, with and without stacking.
Each side runs at torch's default thread count (as the server runs it) and at 1 thread.

`ratio` = PEFT median / ours median, the smallest over the configurations at the default thread
count (higher is better; the goal is >= 10 and ours <= 10 ms). `cat` results are checked equal
to PEFT's; PEFT's `linear` scales A and B by sqrt(w_i s_i), so it is the same cost, not the
same adapter. Ours `linear` (whole-buffer sums over the bank's flat anchors) is checked equal,
bit for bit, to the per-module float32 sums rounded to the written dtype.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
from pathlib import Path
from typing import Any

from server.adapters.targets import ModelTargets
from server.bench import common, harness

DESCRIPTION = "build + materialize one user's adapter: ours vs PEFT add_weighted_adapter + save_pretrained"


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model directory for shapes and PEFT (default: SmolLM2-135M-Instruct)")
    p.add_argument("--anchors", type=int, default=16, help="anchors in the bank")
    p.add_argument("--rank", type=int, default=8, help="meta-LoRA rank (all linear modules)")
    p.add_argument("--stacked-rank", type=int, default=4, help="stacked LoRA rank (all linear modules)")
    p.add_argument("--k", type=common.int_list, default=[2, 4], help="top-k values, e.g. 2,4")
    p.add_argument("--modes", type=common.str_list, default=["linear", "cat"])
    p.add_argument("--stacking", type=common.str_list, default=["off", "on"], help="off,on")
    p.add_argument(
        "--threads",
        type=common.str_list,
        default=["default", "1"],
        help="torch threads for ours, e.g. default,1; PEFT runs at the first setting only",
    )
    p.add_argument("--runs", type=int, default=30, help="timed runs of ours per configuration")
    p.add_argument("--peft-runs", type=int, default=5, help="timed runs of PEFT per configuration (~2 s each)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="time bound per configuration and side")
    p.add_argument("--round-step", type=float, default=0.05, help="weight rounding (the server's default)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype ours writes (the server writes its model dtype, MTA_DTYPE); PEFT writes its model's, float32",
    )


def run_cells(opts: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT's save_pretrained would look the base model up online
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = opts.model or common.default_model_dir()
    default_threads = torch.get_num_threads()
    with common.workdir(prefix="mta-bench-fusion-") as work:
        setup = _Setup(opts, model_dir, work)
        configs = list(itertools.product(opts.k, opts.modes, opts.stacking))
        cells: list[dict[str, Any]] = []
        for threads in opts.threads:
            torch.set_num_threads(default_threads if threads == "default" else int(threads))
            for k, mode, stacking in configs:
                stacked = stacking == "on"
                ours = common.time_calls(
                    lambda i, k=k, mode=mode, stacked=stacked: setup.ours(k, mode, stacked, i),
                    opts.runs,
                    2,
                    opts.max_seconds,
                )
                peft = []
                if threads == opts.threads[0]:
                    peft = common.time_calls(
                        lambda i, k=k, mode=mode, stacked=stacked: setup.peft(k, mode, stacked, i),
                        opts.peft_runs,
                        1,
                        opts.max_seconds,
                    )
                cell = {
                    "threads": torch.get_num_threads(),
                    "threads_setting": threads,
                    "k": k,
                    "mode": mode,
                    "stacking": stacking == "on",
                    "rank": setup.result_rank(k, mode, stacking == "on"),
                    "ours_seconds": common.summarize(ours),
                    "peft_seconds": common.summarize(peft) if peft else None,
                    "ours_raw": ours,
                    "peft_raw": peft,
                }
                cell["ratio"] = common.ratio(common.median(peft), cell["ours_seconds"]["median"]) if peft else None
                cells.append(cell)
                peft_ms = f", PEFT {common.median(peft) * 1e3:.1f} ms" if peft else ""
                print(
                    f"[fusion] threads={threads} k={k} {mode} stacking={stacking}: ours"
                    f" {cell['ours_seconds']['median'] * 1e3:.1f} ms{peft_ms}",
                    flush=True,
                )
        torch.set_num_threads(default_threads)
        checks = {**setup.check_cat_equal(), **setup.check_linear_flat()}
        adapter_bytes = setup.adapter_bytes
        shutil.rmtree(setup.out, ignore_errors=True)
    headline = [c for c in cells if c["threads_setting"] == opts.threads[0]]
    ratios = [c["ratio"] for c in headline]
    return {
        "ratio": min(ratios),
        "ratio_definition": "PEFT median / ours median, smallest over configurations at threads=" + opts.threads[0],
        "ratio_geomean": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
        "ours_median_ms_max": max(c["ours_seconds"]["median"] for c in headline) * 1e3,
        "goal": {"ours_median_ms": 10, "ratio": 10},
        "setup": {
            "model": model_dir.name,
            "anchors": opts.anchors,
            "anchor_rank": opts.rank,
            "stacked_rank": opts.stacked_rank,
            "target_modules": "all linear (7 per layer)",
            "modules": setup.n_modules,
            "round_step": opts.round_step,
            "dtype_ours": opts.dtype,
            "dtype_peft": "float32",
            "adapter_dir": "tmpfs (/dev/shm)" if str(setup.out).startswith("/dev/shm") else str(setup.out.parent),
            "adapter_bytes": adapter_bytes,
            "peft_linear_note": "PEFT linear = sum sqrt(w s) A, sum sqrt(w s) B (not the paper's); timed as the PEFT way",
        },
        "cells": cells,
        "checks": checks,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [
        (
            c["threads_setting"],
            c["k"],
            c["mode"],
            "yes" if c["stacking"] else "no",
            c["rank"],
            c["ours_seconds"]["median"] * 1e3,
            c["ours_seconds"]["p95"] * 1e3,
            c["peft_seconds"]["median"] * 1e3 if c["peft_seconds"] else math.nan,
            c["ratio"] if c["ratio"] is not None else math.nan,
        )
        for c in result["cells"]
    ]
    head = f"fusion: {result['setup']['model']}, {result['setup']['anchors']} rank-{result['setup']['anchor_rank']} anchors"
    table = common.table(
        [
            "threads",
            "k",
            "mode",
            "stacked",
            "rank",
            "ours ms (median)",
            "ours ms (p95)",
            "PEFT ms (median)",
            "PEFT / ours",
        ],
        rows,
    )
    return f"{head}\n{table}\nratio (smallest PEFT / ours): {result['ratio']:.1f}x; slowest ours median {result['ours_median_ms_max']:.1f} ms"


class _Setup:
    """One bank, one stacked LoRA, the same bank as PEFT adapters, and an output directory on tmpfs."""

    def __init__(self, opts: argparse.Namespace, model_dir: Path, work: Path) -> None:
        import numpy as np
        import torch

        from server.adapters import adapter_to_bytes
        from server.bank.loader import load_bank
        from server.bank.random_bank import random_lora, write_random_bank

        self.opts = opts
        self.model_dir = model_dir
        targets = ModelTargets.from_config(common.model_config(model_dir))
        rng = np.random.default_rng(0)
        self.dim = 384
        anchor_ids = [f"a{i:03d}" for i in range(opts.anchors)]
        bank_path = write_random_bank(
            work / "bank",
            targets=targets,
            model_id=model_dir.name,
            anchor_ids=anchor_ids,
            anchor_embeddings=rng.standard_normal((opts.anchors, self.dim)).astype(np.float32),
            embedding_model="bench",
            rank=opts.rank,
        )
        self.bank = load_bank(bank_path, model_id=model_dir.name, targets=targets, embedding_dim=self.dim, max_lora_rank=512)
        stacked = random_lora(targets, rank=opts.stacked_rank, a_seed=7, b_seed=8)
        self.stacked_bytes = adapter_to_bytes(stacked, extra={"bank_version": self.bank.version, "job_id": "bench"})
        self.n_modules = len(stacked.modules)
        self.out = common.tmpfs_dir("mta-bench-fusion-")
        self._queries = rng.standard_normal((4096, self.dim)).astype(np.float32)  # one new user per run
        self._peft: Any = None
        self._stacked_dir = work / "stacked"
        from server.adapters import save_adapter

        save_adapter(stacked, self._stacked_dir, base_model_name_or_path=model_dir.name)
        self.adapter_bytes: dict[str, int] = {}
        self.dtype = getattr(torch, opts.dtype)  # what ours writes

    def result_rank(self, k: int, mode: str, stacking: bool) -> int:
        base = self.opts.rank if mode == "linear" else k * self.opts.rank
        return base + (self.opts.stacked_rank if stacking else 0)

    def _plan(self, k: int, mode: str, i: int):
        from server.fusion import plan_fusion

        return plan_fusion(
            self.bank,
            self._queries[i % len(self._queries)],
            bank_uid="bench",
            top_k=k,
            mode=mode,
            round_step=self.opts.round_step,
        )

    # --- ours: the server's cache-miss path ---------------------------------------------------

    def ours(self, k: int, mode: str, stacking: bool, i: int) -> None:
        from server.adapters import adapter_from_bytes
        from server.fusion import materialize

        path = self.out / f"ours-{k}-{mode}-{int(stacking)}-{i}"
        plan = self._plan(k, mode, i)
        stacked = adapter_from_bytes(self.stacked_bytes) if stacking else None
        materialize(self.bank, plan, path, 512, stacked, self.dtype)
        self._record_size(f"{k}-{mode}-{int(stacking)}", path)
        shutil.rmtree(path, ignore_errors=True)  # untimed in the server (eviction); cheap here

    def _record_size(self, key: str, path: Path) -> None:
        if key not in self.adapter_bytes:
            self.adapter_bytes[key] = sum(f.stat().st_size for f in path.iterdir())

    # --- the PEFT way -------------------------------------------------------------------------

    def _peft_model(self) -> Any:
        if self._peft is None:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            ids = list(self.bank.loras)
            model = PeftModel.from_pretrained(base, self.bank.path / "loras" / ids[0], adapter_name=ids[0])
            for anchor in ids[1:]:
                model.load_adapter(self.bank.path / "loras" / anchor, adapter_name=anchor)
            model.load_adapter(self._stacked_dir, adapter_name="stacked")
            self._peft = model
        return self._peft

    def peft(self, k: int, mode: str, stacking: bool, i: int, keep: bool = False) -> Path:
        model = self._peft_model()
        plan = self._plan(k, mode, i)
        names = [a for a, _ in plan.anchors]
        weights = [w for _, w in plan.anchors]
        if stacking and mode == "cat":
            model.add_weighted_adapter([*names, "stacked"], [*weights, 1.0], "user", combination_type="cat")
        elif stacking:
            model.add_weighted_adapter(names, weights, "fused", combination_type=mode)
            model.add_weighted_adapter(["fused", "stacked"], [1.0, 1.0], "user", combination_type="cat")
            model.delete_adapter("fused")
        else:
            model.add_weighted_adapter(names, weights, "user", combination_type=mode)
        path = self.out / f"peft-{k}-{mode}-{int(stacking)}-{i}"
        model.save_pretrained(path, selected_adapters=["user"])
        model.delete_adapter("user")
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        return path

    # --- correctness --------------------------------------------------------------------------

    def check_cat_equal(self) -> dict[str, Any]:
        """Ours and PEFT's `cat` (with stacking) give the same weight updates for one user."""
        from server.adapters import adapter_from_bytes, load_adapter
        from server.fusion import build_adapter

        k = self.opts.k[0]
        plan = self._plan(k, "cat", 0)
        ours = build_adapter(self.bank, plan, 512, adapter_from_bytes(self.stacked_bytes))
        peft_dir = self.peft(k, "cat", True, 0, keep=True)
        theirs = load_adapter(next(p for p in peft_dir.rglob("adapter_config.json")).parent)
        worst = max(float((ours.delta(m) - theirs.delta(m)).abs().max()) for m in ours.modules)
        scale = max(float(ours.delta(m).abs().max()) for m in ours.modules)
        shutil.rmtree(peft_dir, ignore_errors=True)
        return {
            "cat_stacked_equals_peft": worst <= 1e-5 * max(scale, 1e-12),
            "max_abs_diff": worst,
            "max_abs_delta": scale,
        }

    def check_linear_flat(self) -> dict[str, Any]:
        """Ours `linear` from the bank's flat anchors, in the written dtype, equals the per-module
        float32 sums rounded once to it, bit for bit."""
        import torch

        from server.adapters import LoraWeights, fuse
        from server.fusion import build_adapter

        plan = self._plan(self.opts.k[0], "linear", 0)
        ours = build_adapter(self.bank, plan, 512, dtype=self.dtype)
        anchors = [self.bank.loras[a] for a, _ in plan.anchors]
        per_module = [LoraWeights(a=dict(x.a), b=dict(x.b), scaling=x.scaling) for x in anchors]  # not flat
        expected = fuse("linear", per_module, [w for _, w in plan.anchors])
        equal = ours.flat is not None and all(
            torch.equal(ours.a[m], expected.a[m].to(self.dtype)) and torch.equal(ours.b[m], expected.b[m].to(self.dtype))
            for m in expected.modules
        )
        return {"linear_flat_equals_per_module": equal}


SCENARIO = harness.Scenario("fusion", DESCRIPTION, options, run_cells, format_table)

"""`mta bench storage`: bytes stored per user by this server vs one OPPU-style LoRA per user.

Per user this server stores the profile (the user's own history items, JSON), the user
embedding (float32, as the store keeps it) and, only after a fine-tune, the stacked LoRA
(rank 4 on all linear modules, safetensors bytes in the model's dtype as `server.stacking`
stores it: `--dtype`, bfloat16 by default as the server).
The alternatives: OPPU (one LoRA per user, rank 8 on q_proj and v_proj) and, for scale, one
full meta-LoRA (rank 8, all linear; the bank holds one per anchor, shared by every user).

SmolLM2 sizes are measured by serializing random LoRAs of its shapes with the server's own
code (`server.adapters.adapter_to_bytes`); Llama-3-8B sizes are computed from its published
config (same formula, checked here to reproduce the SmolLM2 bytes exactly).

`ratio` = OPPU LoRA bytes (float32) / ours, for SmolLM2 and a user without a stacked LoRA
(profile + embedding; the profile counted on our side only). Every other combination is in
"ratios".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from server.bench import common, harness

ALL_LINEAR = None  # every linear layer of the model's decoder layers (ModelTargets.select)
OPPU_TARGETS = ("q_proj", "v_proj")

# meta-llama/Meta-Llama-3-8B(-Instruct) config.json, the fields that fix LoRA shapes.
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}
DTYPE_BYTES = {"F32": 4, "BF16": 2}


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="measured model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--stacked-rank", type=int, default=4)
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the server's MTA_DTYPE: stacked LoRAs are stored in it",
    )
    p.add_argument("--oppu-rank", type=int, default=8)
    p.add_argument("--meta-rank", type=int, default=8)
    p.add_argument("--embedding-dim", type=int, default=384, help="user embedding size (all-MiniLM-L6-v2: 384)")
    p.add_argument("--anchors", type=int, default=50, help="anchors in a bank (paper: 50), for the amortized bank cost")
    p.add_argument("--users", type=int, default=1_000_000, help="users, for totals and the amortized bank cost")


def lora_shapes(config: dict[str, Any], rank: int, targets: tuple[str, ...] | None) -> dict[str, tuple[int, ...]]:
    """PEFT tensor names -> shapes of a LoRA of `rank` on the `targets` kinds of every layer."""
    from server.adapters.peft_io import PEFT_PREFIX
    from server.adapters.targets import ModelTargets

    out: dict[str, tuple[int, ...]] = {}
    for module, (fan_in, fan_out) in ModelTargets.from_config(config).select(targets).items():
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (rank, fan_in)
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (fan_out, rank)
    return out


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: str, metadata: dict[str, str] | None = None) -> int:
    """Exact size of a safetensors file holding these tensors (one dtype): 8 + JSON header (padded to 8) + data."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in sorted(shapes):  # the serializer orders tensors of one dtype by name
        n = DTYPE_BYTES[dtype]
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    size = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + size + (-size) % 8 + offset


def lora_bytes(
    config: dict[str, Any], rank: int, targets: tuple[str, ...] | None, dtype: str = "F32", stacked: bool = False
) -> int:
    metadata = {"bank_version": "x" * 24, "job_id": "ft-" + "0" * 16} if stacked else {}
    metadata.update({"rank": str(rank), "scaling": repr(1.0)})
    return safetensors_bytes(lora_shapes(config, rank, targets), dtype, metadata)


def lora_params(config: dict[str, Any], rank: int, targets: tuple[str, ...] | None) -> int:
    total = 0
    for shape in lora_shapes(config, rank, targets).values():
        total += shape[0] * shape[1]
    return total


def measured_bytes(config: dict[str, Any], rank: int, targets: tuple[str, ...] | None, stacked: bool = False) -> int:
    """Serialize a random LoRA with the server's own code: what the user store would hold."""
    from server.adapters import adapter_to_bytes
    from server.adapters.targets import ModelTargets
    from server.bank.random_bank import random_lora

    lora = random_lora(ModelTargets.from_config(config), rank=rank, target_modules=targets)
    extra = {"bank_version": "x" * 24, "job_id": "ft-" + "0" * 16} if stacked else None
    return len(adapter_to_bytes(lora, extra=extra))


def profile_bytes() -> dict[str, float]:
    """JSON bytes of LaMP-2M profiles as the server stores them (median and mean over users)."""
    sizes = [len(json.dumps(common.profile_items(u)).encode()) for u in common.lamp_users()]
    return {"median": common.median(sizes), "mean": sum(sizes) / len(sizes), "users": len(sizes)}


def per_model(
    name: str, config: dict[str, Any], opts: argparse.Namespace, profile: float, measure: bool
) -> dict[str, Any]:
    embedding = opts.embedding_dim * 4
    stacked = lora_bytes(config, opts.stacked_rank, ALL_LINEAR, "F32", stacked=True)
    oppu = {dt: lora_bytes(config, opts.oppu_rank, OPPU_TARGETS, dt) for dt in DTYPE_BYTES}
    meta = {dt: lora_bytes(config, opts.meta_rank, ALL_LINEAR, dt) for dt in DTYPE_BYTES}
    stacked_bf16 = lora_bytes(config, opts.stacked_rank, ALL_LINEAR, "BF16", stacked=True)
    ours_fused = embedding + profile
    ours_stacked = ours_fused + (stacked if opts.dtype == "float32" else stacked_bf16)  # 16-bit: same size
    out: dict[str, Any] = {
        "model": name,
        "shapes": {
            k: config[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        },
        "bytes": {
            "embedding": embedding,
            "profile_median": profile,
            "stacked_lora_fp32": stacked,
            "stacked_lora_bf16": stacked_bf16,
            "ours_fused_only": ours_fused,
            "ours_with_stacked": ours_stacked,
            "ours_fused_only_without_profile": embedding,
            "oppu_lora_fp32": oppu["F32"],
            "oppu_lora_bf16": oppu["BF16"],
            "meta_lora_fp32": meta["F32"],
            "meta_lora_bf16": meta["BF16"],
            "bank_fp32": meta["F32"] * opts.anchors,
            "bank_per_user_fp32": meta["F32"] * opts.anchors / opts.users,
        },
        "params": {
            "stacked_lora": lora_params(config, opts.stacked_rank, ALL_LINEAR),
            "oppu_lora": lora_params(config, opts.oppu_rank, OPPU_TARGETS),
            "meta_lora": lora_params(config, opts.meta_rank, ALL_LINEAR),
        },
        "ratios": {
            "oppu_over_ours_fused_only": oppu["F32"] / ours_fused,
            "oppu_over_ours_fused_only_without_profile": oppu["F32"] / embedding,
            "oppu_over_ours_with_stacked": oppu["F32"] / ours_stacked,
            "oppu_plus_profile_over_ours_with_stacked": (oppu["F32"] + profile) / ours_stacked,
            "oppu_over_ours_with_stacked_bf16": oppu["BF16"] / (ours_fused + stacked_bf16),
            "meta_lora_over_ours_fused_only": meta["F32"] / ours_fused,
        },
    }
    if measure:
        out["measured_bytes"] = {
            "stacked_lora_fp32": measured_bytes(config, opts.stacked_rank, ALL_LINEAR, stacked=True),
            "oppu_lora_fp32": measured_bytes(config, opts.oppu_rank, OPPU_TARGETS),
            "meta_lora_fp32": measured_bytes(config, opts.meta_rank, ALL_LINEAR),
        }
        out["formula_matches_measured"] = all(
            out["measured_bytes"][k] == out["bytes"][k]
            for k in ("stacked_lora_fp32", "oppu_lora_fp32", "meta_lora_fp32")
        )
    return out


def sizes(opts: argparse.Namespace) -> dict[str, Any]:
    model_dir = opts.model or common.default_model_dir()
    profile = profile_bytes()
    models = [
        per_model(model_dir.name, common.model_config(model_dir), opts, profile["median"], measure=True),
        per_model("Llama-3-8B (published config)", LLAMA3_8B_CONFIG, opts, profile["median"], measure=False),
    ]
    totals = {
        m["model"]: {
            f"{opts.users:,} users, ours fused only (GB)": m["bytes"]["ours_fused_only"] * opts.users / 1e9,
            f"{opts.users:,} users, ours all stacked (GB)": m["bytes"]["ours_with_stacked"] * opts.users / 1e9,
            f"{opts.users:,} users, OPPU fp32 (GB)": m["bytes"]["oppu_lora_fp32"] * opts.users / 1e9,
        }
        for m in models
    }
    return {
        "ratio": models[0]["ratios"]["oppu_over_ours_fused_only"],
        "ratio_definition": f"OPPU rank-{opts.oppu_rank} q,v LoRA fp32 bytes / ours (profile + embedding), {models[0]['model']}",
        "ratios": {m["model"]: m["ratios"] for m in models},
        "setup": {
            "stacked": f"rank {opts.stacked_rank}, all linear, stored in {opts.dtype} (MTA_DTYPE)",
            "oppu": f"rank {opts.oppu_rank}, q_proj + v_proj",
            "meta_lora": f"rank {opts.meta_rank}, all linear",
            "embedding": f"{opts.embedding_dim} x float32",
            "profile": f"LaMP-2M profiles as JSON, median over {profile['users']} users ({profile['median']:.0f} B)",
            "anchors": opts.anchors,
            "stacked_rank": opts.stacked_rank,
            "stored_dtype": opts.dtype,
            "users": opts.users,
        },
        "profile_bytes": profile,
        "models": models,
        "totals": totals,
    }


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for m in result["models"]:
        b = m["bytes"]
        rows.append(
            (
                m["model"],
                _size(b["ours_fused_only"]),
                _size(b["ours_with_stacked"]),
                _size(b["oppu_lora_fp32"]),
                _size(b["meta_lora_fp32"]),
                f"{m['ratios']['oppu_over_ours_fused_only']:.0f}x",
                f"{m['ratios']['oppu_over_ours_with_stacked']:.2f}x",
            )
        )
    table = common.table(
        [
            "model",
            "ours: profile+embedding",
            f"ours: + stacked r{result['setup']['stacked_rank']} ({result['setup']['stored_dtype']})",
            "OPPU r8 q,v (fp32)",
            "meta-LoRA r8 (fp32)",
            "OPPU / ours",
            "OPPU / ours stacked",
        ],
        rows,
    )
    return f"storage per user\n{table}\nratio (OPPU / ours, {result['models'][0]['model']}, no stacked LoRA): {result['ratio']:.0f}x"


SCENARIO = harness.Scenario(
    "storage", "bytes per user: ours vs one OPPU LoRA per user", options, sizes, format_table, kind="calculator"
)

"""Adapter math and PEFT I/O, checked numerically against real PEFT on a tiny Llama."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from server.adapters import (
    AdapterFormatError,
    FlatLayout,
    FusionError,
    LoraWeights,
    adapter_from_bytes,
    adapter_to_bytes,
    check_fusion_plan,
    flatten,
    fold_scaling,
    fuse,
    fuse_cat,
    fuse_linear,
    get_scaling,
    load_adapter,
    lora_from_peft_model,
    peft_io,
    save_adapter,
    serving_dtype,
    stack,
)
from server.adapters import math as lora_math

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Different alphas, ranks, an rsLoRA and one LoRA on fewer modules, so that every
# scaling and padding path is exercised. (PEFT warns on names that are substrings of
# its "lora_" prefix, such as "a".)
ADAPTERS = {
    "x": dict(r=4, lora_alpha=8),
    "y": dict(r=4, lora_alpha=16),
    "z": dict(r=8, lora_alpha=4, use_rslora=True),
    "qv": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
}
WEIGHTS = [0.5, 0.3, 0.15, 0.05]
VOCAB = 128
TOL = dict(rtol=1e-5, atol=1e-5)


def make_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture
def peft_model() -> PeftModel:
    """A tiny Llama with four PEFT LoRAs whose A and B are both random (non-zero deltas)."""
    model = None
    for name, kwargs in ADAPTERS.items():
        config = LoraConfig(
            **{"target_modules": ALL_LINEAR, **kwargs}, lora_dropout=0.0, init_lora_weights=False
        )
        if model is None:
            model = get_peft_model(make_base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


@pytest.fixture
def loras(peft_model: PeftModel) -> dict[str, LoraWeights]:
    return {name: lora_from_peft_model(peft_model, name) for name in ADAPTERS}


def peft_deltas(model: PeftModel, adapter: str) -> dict[str, Tensor]:
    """PEFT's own delta weights (scaling * B @ A) of `adapter`, by module name."""
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight(adapter)
        for name, module in model.named_modules()
        if adapter in getattr(module, "lora_A", {})
    }


def assert_deltas(lora: LoraWeights, expected: dict[str, Tensor]) -> None:
    assert lora.modules == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(lora.delta(module), delta, **TOL)


def assert_serves_like(
    model: PeftModel, active: str | list[str], lora: LoraWeights, path: Path
) -> None:
    """`lora` saved and loaded by PEFT gives the logits of `model` with `active` adapters."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    served = PeftModel.from_pretrained(
        make_base(), save_adapter(lora, path, base_model_name_or_path="tiny-llama")
    ).eval()
    model.base_model.set_adapter(active)
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        got = served(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, expected, **TOL)


def test_get_scaling() -> None:
    assert get_scaling(16, 8) == 2.0
    assert get_scaling(16, 16, use_rslora=True) == 4.0


def test_lora_from_peft_model_matches_peft(peft_model: PeftModel, loras: dict) -> None:
    for name in ADAPTERS:
        assert_deltas(loras[name], peft_deltas(peft_model, name))
    assert loras["z"].scaling == pytest.approx(4 / 8**0.5)
    assert loras["qv"].target_modules == ["q_proj", "v_proj"]


def test_cat_equals_peft_add_weighted_adapter(peft_model: PeftModel, loras: dict) -> None:
    fused = fuse_cat([loras[n] for n in ADAPTERS], WEIGHTS)
    # PEFT gives the result the first adapter's use_rslora (scaling sqrt(r), not 1),
    # so the rsLoRA "z" must not come first.
    peft_model.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "cat", combination_type="cat")

    assert (fused.rank, fused.scaling) == (4 + 4 + 8 + 2, 1.0)
    assert_deltas(fused, peft_deltas(peft_model, "cat"))


def test_linear_is_elementwise_weighted_sum(loras: dict) -> None:
    x, y = loras["x"], loras["y"]
    fused = fuse_linear([x, y], [0.7, 0.3])

    assert (fused.rank, fused.scaling) == (4, 1.0)
    for m in x.modules:
        torch.testing.assert_close(fused.a[m], 0.7 * x.a[m] + 0.3 * y.a[m], **TOL)
        expected_b = 0.7 * x.scaling * x.b[m] + 0.3 * y.scaling * y.b[m]
        torch.testing.assert_close(fused.b[m], expected_b, **TOL)


def test_linear_with_equal_scalings_is_the_paper_formula(loras: dict) -> None:
    x = loras["x"]
    y = dataclasses.replace(loras["y"], scaling=x.scaling)
    fused = fuse("linear", [x, y], [0.7, 0.3])

    for m in x.modules:
        paper = x.scaling * (0.7 * x.b[m] + 0.3 * y.b[m]) @ (0.7 * x.a[m] + 0.3 * y.a[m])
        torch.testing.assert_close(fused.delta(m), paper, **TOL)


def test_linear_of_one_lora_reproduces_it(peft_model: PeftModel, loras: dict) -> None:
    peft_model.add_weighted_adapter(["x"], [1.0], "one", combination_type="linear")

    assert_deltas(fuse_linear([loras["x"]], [1.0]), peft_deltas(peft_model, "x"))
    assert_deltas(fuse_linear([loras["x"]], [1.0]), peft_deltas(peft_model, "one"))


def test_fold_scaling_keeps_the_delta(peft_model: PeftModel, loras: dict) -> None:
    folded = fold_scaling(loras["z"])

    assert folded.scaling == 1.0
    assert_deltas(folded, peft_deltas(peft_model, "z"))


def test_saved_adapter_serves_like_peft(peft_model: PeftModel, loras: dict, tmp_path) -> None:
    assert_serves_like(peft_model, "z", loras["z"], tmp_path / "z")  # scaling folded on save

    peft_model.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "cat", combination_type="cat")
    fused = fuse_cat([loras[n] for n in ADAPTERS], WEIGHTS)
    assert_serves_like(peft_model, "cat", fused, tmp_path / "cat")


def test_stack_adds_deltas_and_ranks(loras: dict) -> None:
    fused = fuse_cat([loras["x"], loras["z"]], [0.6, 0.4])
    user = loras["qv"]  # only q/v: the other modules get zero padding
    stacked = stack(fused, user)

    assert stacked.rank == fused.rank + user.rank
    assert stacked.modules == fused.modules
    for m in fused.modules:
        expected = fused.delta(m) + (user.delta(m) if m in user.a else 0)
        torch.testing.assert_close(stacked.delta(m), expected, **TOL)


def test_stacked_adapter_serves_like_two_active_peft_adapters(
    peft_model: PeftModel, loras: dict, tmp_path
) -> None:
    peft_model.add_weighted_adapter(["x", "y"], [0.6, 0.4], "fused", combination_type="cat")
    stacked = stack(fuse_cat([loras["x"], loras["y"]], [0.6, 0.4]), loras["qv"])

    assert_serves_like(peft_model, ["fused", "qv"], stacked, tmp_path / "stacked")


@pytest.mark.parametrize("mode", ["linear", "cat"])
def test_fuse_with_stacking_is_stack_of_the_fusion(loras: dict, mode: str) -> None:
    anchors, weights = [loras["x"], loras["y"]], [0.7, 0.3]
    expected = stack(fuse(mode, anchors, weights), loras["qv"])
    got = fuse(mode, anchors, weights, stacked=loras["qv"], max_rank=32)

    assert got.rank == expected.rank == (4 if mode == "linear" else 8) + 2
    assert_deltas(got, {m: expected.delta(m) for m in expected.modules})
    with pytest.raises(FusionError, match="exceeds max_rank"):
        fuse(mode, anchors, weights, stacked=loras["qv"], max_rank=4)


@pytest.mark.parametrize("mode", ["linear", "cat"])
@pytest.mark.parametrize("scale", [0.0, 0.25, 1.0])
def test_a_shared_lora_under_scaled_residuals_is_peft_s_sum(peft_model: PeftModel, loras: dict, mode: str, scale: float) -> None:
    """A `--init task` bank: shared task LoRA + scale x fused residuals + stacked LoRA, one adapter.

    Scale 0 is the shared LoRA (plus the stacked one) exactly: the residuals add no rank.
    """
    shared, user = loras["z"], loras["qv"]  # an rsLoRA as the shared LoRA: its scaling is folded too
    got = fuse(mode, [loras["x"], loras["y"]], [0.6, 0.4], stacked=user, shared=shared, residual_scale=scale, max_rank=32)
    residual_rank = (4 if mode == "linear" else 8) if scale else 0
    assert got.rank == shared.rank + residual_rank + user.rank
    d = {name: peft_deltas(peft_model, name) for name in ("x", "y", "z", "qv")}
    linear = fuse_linear([loras["x"], loras["y"]], [0.6, 0.4])  # its own cross terms: checked against PEFT above
    for m in d["z"]:
        fused = linear.delta(m) if mode == "linear" else 0.6 * d["x"][m] + 0.4 * d["y"][m]
        expected = d["z"][m] + scale * fused + d["qv"].get(m, 0)
        torch.testing.assert_close(got.delta(m), expected, **TOL)
    alone = fuse(mode, [loras["x"], loras["y"]], [0.6, 0.4], shared=shared, residual_scale=0.0)
    assert alone.rank == shared.rank
    with pytest.raises(FusionError, match="residual_scale 0 without a shared LoRA"):
        fuse(mode, [loras["x"]], [1.0], residual_scale=0.0)
    with pytest.raises(FusionError, match=r"residual_scale must be in \[0, 1\]"):
        fuse(mode, [loras["x"]], [1.0], shared=shared, residual_scale=1.5)
    with pytest.raises(FusionError, match="exceeds max_rank"):
        fuse(mode, [loras["x"], loras["y"]], [0.6, 0.4], shared=shared, residual_scale=scale or 1.0, max_rank=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_written_safetensors_read_back_exactly(loras: dict, tmp_path, dtype: torch.dtype) -> None:
    lora = fuse_cat([loras["x"], loras["qv"]], [0.6, 0.4])
    path = save_adapter(lora, tmp_path / "adapter", base_model_name_or_path="tiny-llama", dtype=dtype)
    tensors = load_file(path / "adapter_model.safetensors")  # safetensors' own reader validates the layout

    assert len(tensors) == 2 * len(lora.modules)
    for m in lora.modules:
        got_a = tensors[f"base_model.model.{m}.lora_A.weight"]
        got_b = tensors[f"base_model.model.{m}.lora_B.weight"]
        assert got_a.dtype == got_b.dtype == dtype
        assert torch.equal(got_a, lora.a[m].to(dtype)) and torch.equal(got_b, lora.b[m].to(dtype))


@pytest.mark.parametrize("mode", ["linear", "cat"])
def test_a_stacked_lora_stored_in_bf16_serves_the_same_bf16_adapter(loras: dict, mode: str) -> None:
    """The server stores stacked LoRAs in the model's dtype: vLLM casts to it anyway."""
    user = fold_scaling(loras["qv"])  # the trainer's LoRAs have scaling 1 (alpha = r)
    stored = adapter_from_bytes(adapter_to_bytes(user, dtype=serving_dtype("bfloat16")))
    anchors, weights = [loras["x"], loras["y"]], [0.7, 0.3]
    exact = fuse(mode, anchors, weights, stacked=user)
    served = fuse(mode, anchors, weights, stacked=stored)

    assert serving_dtype("auto") == serving_dtype("float32") == torch.float32
    assert not all(torch.equal(stored.a[m], user.a[m]) for m in user.modules)  # it was rounded
    for m in exact.modules:
        assert torch.equal(served.a[m].bfloat16(), exact.a[m].bfloat16())
        assert torch.equal(served.b[m].bfloat16(), exact.b[m].bfloat16())


def _flat_anchors(loras: dict, names: list[str]) -> list[LoraWeights]:
    """The named LoRAs flattened into one shared layout, as the bank loader does."""
    layout = FlatLayout.of(loras[names[0]])
    return [flatten(loras[n], layout) for n in names]


def test_flatten_keeps_the_tensors_in_one_shared_buffer(loras: dict) -> None:
    x, y = _flat_anchors(loras, ["x", "y"])

    assert x.flat is not None and y.flat is not None and x.flat.layout is y.flat.layout
    assert (x.scaling, x.modules, x.rank) == (loras["x"].scaling, loras["x"].modules, loras["x"].rank)
    for m in x.modules:
        assert torch.equal(x.a[m], loras["x"].a[m]) and torch.equal(x.b[m], loras["x"].b[m])
        assert x.a[m].untyped_storage().data_ptr() == x.flat.data.untyped_storage().data_ptr()
        assert x.b[m].untyped_storage().data_ptr() == x.flat.data.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="not views of the flat buffer"):
        dataclasses.replace(x, a=dict(loras["x"].a), b=dict(loras["x"].b))  # the buffer would be stale
    with pytest.raises(ValueError, match="not the LoRA's"):
        flatten(loras["z"], x.flat.layout)  # rank 8, not 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("names", [["x"], ["x", "y"], ["y", "x", "x"]])
def test_flat_linear_fusion_equals_the_per_module_path_bit_for_bit(
    loras: dict, monkeypatch, names: list[str], dtype: torch.dtype
) -> None:
    """Float32 sums rounded once to the serving dtype, exactly as `_weighted_sum` then `.to()`."""
    monkeypatch.setattr(lora_math, "_CHUNK", 96)  # chunks and groups that cut across tensors
    monkeypatch.setattr(lora_math, "_GROUP", 3)
    weights = [0.55, 0.3, 0.15][: len(names)]
    expected = fuse("linear", [loras[n] for n in names], weights)  # per module (not flat)
    got = fuse("linear", _flat_anchors(loras, names), weights, dtype=dtype)

    assert expected.flat is None and got.flat is not None and got.scaling == 1.0
    for m in expected.modules:
        assert got.a[m].dtype == got.b[m].dtype == dtype
        assert torch.equal(got.a[m], expected.a[m].to(dtype)) and torch.equal(got.b[m], expected.b[m].to(dtype))


@pytest.mark.parametrize("mode", ["linear", "cat"])
def test_flat_anchors_fuse_and_stack_like_per_module_ones(loras: dict, mode: str) -> None:
    weights = [0.7, 0.3]
    expected = fuse(mode, [loras["x"], loras["y"]], weights, stacked=loras["qv"])
    for dtype in (torch.float32, torch.bfloat16):
        got = fuse(mode, _flat_anchors(loras, ["x", "y"]), weights, stacked=loras["qv"], dtype=dtype)
        for m in expected.modules:
            assert torch.equal(got.a[m], expected.a[m].to(dtype)) and torch.equal(got.b[m], expected.b[m].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_written_file_holds_exactly_peft_tensors(loras: dict, tmp_path, dtype: torch.dtype) -> None:
    """Flat or not, fused or loaded: the file is PEFT's names and the tensors cast to dtype, exactly."""
    fused = [
        fuse("linear", _flat_anchors(loras, ["x", "y"]), [0.6, 0.4], dtype=dtype),  # flat, in dtype
        fuse("linear", [loras["x"], loras["y"]], [0.6, 0.4]),  # float32, not flat
        fuse_cat([loras["x"], loras["qv"]], [0.6, 0.4]),
        loras["z"],  # scaling folded on save
    ]
    for i, lora in enumerate(fused):
        path = save_adapter(lora, tmp_path / f"a{i}", base_model_name_or_path="tiny-llama", dtype=dtype)
        written = load_file(path / "adapter_model.safetensors")
        expected = peft_io._peft_tensors(fold_scaling(lora), dtype)
        assert list(written) == sorted(expected)  # safetensors lists names sorted
        for name, tensor in expected.items():
            assert written[name].dtype == dtype and torch.equal(written[name], tensor), name


def test_save_load_round_trip_replaces_existing_dir(loras: dict, tmp_path) -> None:
    path = tmp_path / "adapter"
    save_adapter(loras["x"], path, base_model_name_or_path="tiny-llama")
    save_adapter(loras["z"], path, base_model_name_or_path="tiny-llama")
    loaded = load_adapter(path)

    assert (loaded.rank, loaded.scaling) == (8, 1.0)
    assert_deltas(loaded, {m: loras["z"].delta(m) for m in loras["z"].modules})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # scaling 1 when served
    assert config["target_modules"] == sorted(ALL_LINEAR)


def test_load_adapter_reads_peft_save_pretrained(peft_model: PeftModel, tmp_path) -> None:
    peft_model.save_pretrained(tmp_path, selected_adapters=["z"])  # rsLoRA config

    assert_deltas(load_adapter(tmp_path / "z"), peft_deltas(peft_model, "z"))


def test_load_adapter_accepts_keys_with_the_adapter_name(loras: dict, tmp_path) -> None:
    path = save_adapter(loras["x"], tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    tensors = load_file(path / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, path / "adapter_model.safetensors")  # e.g. lora_A.default.weight

    assert_deltas(load_adapter(path), {m: loras["x"].delta(m) for m in loras["x"].modules})


def test_adapter_bytes_round_trip(loras: dict) -> None:
    lora = loras["x"]
    restored = adapter_from_bytes(adapter_to_bytes(lora))

    assert (restored.rank, restored.scaling) == (4, lora.scaling)
    assert all(torch.equal(restored.a[m], lora.a[m]) for m in lora.modules)
    assert all(torch.equal(restored.b[m], lora.b[m]) for m in lora.modules)
    assert adapter_from_bytes(adapter_to_bytes(lora), scaling=0.5).scaling == 0.5
    with pytest.raises(AdapterFormatError, match="not a safetensors blob"):
        adapter_from_bytes(b"garbage!")


def test_check_fusion_plan_gathers_every_problem(loras: dict) -> None:
    q_only = LoraWeights(
        a={m: t for m, t in loras["x"].a.items() if m.endswith("q_proj")},
        b={m: t for m, t in loras["x"].b.items() if m.endswith("q_proj")},
        scaling=1.0,
    )
    with pytest.raises(FusionError) as error:
        check_fusion_plan([loras["x"], loras["z"], q_only], [0.5, -1.0], "linear", max_rank=2)

    for problem in ("3 LoRAs but 2 weights", "finite and >= 0", "equal ranks, got [4, 8, 4]",
                    "equal module sets", "rank 4 exceeds max_rank 2"):
        assert problem in str(error.value)


def test_check_fusion_plan_returns_rank_and_enforces_max_rank(loras: dict) -> None:
    x, y, user = loras["x"], loras["y"], loras["qv"]

    assert check_fusion_plan([x, y], [0.5, 0.5], "linear") == 4
    assert check_fusion_plan([x, y], [0.5, 0.5], "cat", max_rank=10, stacked=user) == 10
    with pytest.raises(FusionError, match="rank 10 exceeds max_rank 8"):
        check_fusion_plan([x, y], [0.5, 0.5], "cat", max_rank=8, stacked=user)


def test_fusion_refuses_bad_plans(loras: dict) -> None:
    wide = LoraWeights(  # same module names, other in-features: another base model
        a={m: torch.zeros(4, 3) for m in loras["x"].modules},
        b={m: torch.zeros(5, 4) for m in loras["x"].modules},
        scaling=1.0,
    )
    with pytest.raises(FusionError, match="unknown fusion mode 'svd'"):
        fuse("svd", [loras["x"]], [1.0])
    with pytest.raises(FusionError, match="equal ranks"):
        fuse_linear([loras["x"], loras["z"]], [0.5, 0.5])
    with pytest.raises(FusionError, match="disagree on"):
        fuse_cat([loras["x"], wide], [0.5, 0.5])
    with pytest.raises(FusionError, match="disagree on"):
        stack(loras["x"], wide)
    with pytest.raises(FusionError, match="no LoRAs"):
        fuse_cat([], [])


def _set_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config_path = path / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, key: value}))

    return edit


def _drop_one_lora_b(path: Path) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != key}, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda path: (path / "adapter_config.json").unlink(), "missing adapter_config.json"),
        (_set_config("r", 5), "config r=5 but tensors have rank [4]"),
        (_set_config("peft_type", "IA3"), "not 'LORA'"),
        (_set_config("use_dora", True), "unsupported use_dora"),
        (_set_config("target_modules", ["q_proj"]), "outside target_modules"),
        (_drop_one_lora_b, "without both lora_A and lora_B"),
    ],
)
def test_load_adapter_names_the_problem(loras: dict, tmp_path, edit, problem: str) -> None:
    path = save_adapter(loras["x"], tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    edit(path)

    with pytest.raises(AdapterFormatError) as error:
        load_adapter(path)
    assert str(path) in str(error.value) and problem in str(error.value)

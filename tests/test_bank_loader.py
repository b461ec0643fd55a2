"""The bank loader accepts a good bank and refuses broken ones with a message naming each problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.adapters import load_adapter
from server.adapters.targets import ModelTargets
from server.bank.loader import BankError, load_bank

from .conftest import THEMES


def load(path: Path, targets: ModelTargets, model_id: str, **kw):
    args = dict(model_id=model_id, targets=targets, embedding_dim=384, max_lora_rank=16)
    args.update(kw)
    return load_bank(path, **args)


@pytest.fixture()
def bank_copy(tiny_bank, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bank, tmp_path / "bank"))


def edit_manifest(bank: Path, **changes) -> None:
    m = json.loads((bank / "manifest.json").read_text())
    m.update(changes)
    (bank / "manifest.json").write_text(json.dumps(m))


def test_good_bank_loads_and_retrieves(tiny_bank, tiny_model_targets, tiny_model_dir, theme_embeddings):
    bank = load(tiny_bank, tiny_model_targets, tiny_model_dir.name)
    assert bank.version == "tiny-v1" and set(bank.loras) == set(THEMES)
    for i, theme in enumerate(THEMES):
        hits = bank.index.search(theme_embeddings[i], 2)
        assert hits[0][0] == theme and hits[0][1] == pytest.approx(1.0, abs=1e-5) and hits[1][1] < hits[0][1]


def test_anchors_share_one_flat_layout(tiny_bank, tiny_model_targets, tiny_model_dir):
    """So that `linear` fusion of any anchors is a few whole-buffer operations."""
    bank = load(tiny_bank, tiny_model_targets, tiny_model_dir.name)
    layouts = {id(lora.flat.layout) for lora in bank.loras.values() if lora.flat is not None}
    assert len(layouts) == 1 and all(lora.flat is not None for lora in bank.loras.values())
    for spec in bank.manifest.anchors:
        lora, original = bank.loras[spec.id], load_adapter(tiny_bank / spec.lora_path)
        assert lora.scaling == original.scaling
        assert all(torch.equal(lora.a[m], original.a[m]) and torch.equal(lora.b[m], original.b[m]) for m in lora.modules)


def test_problems_are_gathered_into_one_message(bank_copy, tiny_model_targets, tiny_model_dir):
    edit_manifest(bank_copy, base_model="other-model")
    shutil.rmtree(bank_copy / "loras" / "romance")
    np.save(bank_copy / "anchor_embeddings.npy", np.ones((2, 384), dtype=np.float32))
    with pytest.raises(BankError) as e:
        load(bank_copy, tiny_model_targets, tiny_model_dir.name)
    msg = str(e.value)
    assert "other-model" in msg and "romance" in msg and "shape (2, 384)" in msg


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda b: (b / "manifest.json").unlink(), "missing manifest.json"),
        (lambda b: (b / "manifest.json").write_text("{oops"), "not valid JSON"),
        (lambda b: edit_manifest(b, format_version=99), "format_version"),
        (lambda b: edit_manifest(b, anchors=[]), "anchors"),
        (lambda b: edit_manifest(b, surprise=1), "surprise"),
        (lambda b: (b / "anchor_embeddings.npy").unlink(), "missing anchor embeddings"),
        (lambda b: edit_manifest(b, embedding_model={"name": "x", "dim": 768}), "embedding dim 768"),
    ],
)
def test_broken_manifest_or_files(bank_copy, tiny_model_targets, tiny_model_dir, mutate, fragment):
    mutate(bank_copy)
    with pytest.raises(BankError, match=fragment):
        load(bank_copy, tiny_model_targets, tiny_model_dir.name)


def test_anchor_rank_and_targets_must_match_manifest(bank_copy, tiny_model_targets, tiny_model_dir):
    m = json.loads((bank_copy / "manifest.json").read_text())
    m["anchors"][0]["rank"] = 8
    m["anchors"][1]["target_modules"] = ["q_proj"]
    (bank_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError) as e:
        load(bank_copy, tiny_model_targets, tiny_model_dir.name, fusion_mode="cat")
    assert "adapter rank 4 != manifest rank 8" in str(e.value) and "targets" in str(e.value)


def test_lora_shapes_must_match_the_served_model(tiny_bank, tiny_model_targets, tiny_model_dir):
    wider = ModelTargets({m: (i * 2, o) for m, (i, o) in tiny_model_targets.linears.items()})
    with pytest.raises(BankError, match="the model's maps"):
        load(tiny_bank, wider, tiny_model_dir.name)
    fewer_layers = ModelTargets({m: s for m, s in tiny_model_targets.linears.items() if ".layers.0." in m})
    with pytest.raises(BankError, match=r"model.layers.1.self_attn.q_proj is not a linear layer of this model"):
        load(tiny_bank, fewer_layers, tiny_model_dir.name)


def test_fused_rank_must_fit_max_lora_rank(tiny_bank, tiny_model_targets, tiny_model_dir):
    # cat of the top 4 rank-4 anchors = 16 > 8; linear keeps rank 4.
    with pytest.raises(BankError, match="rank 16 > max_lora_rank 8"):
        load(tiny_bank, tiny_model_targets, tiny_model_dir.name, max_lora_rank=8, top_k=4, fusion_mode="cat")
    assert load(tiny_bank, tiny_model_targets, tiny_model_dir.name, max_lora_rank=8, top_k=4, fusion_mode="linear")


def test_linear_needs_equal_ranks(make_bank, tiny_model_targets, tiny_model_dir, tmp_path):
    bank = Path(shutil.copytree(make_bank("mixed"), tmp_path / "mixed"))
    other = make_bank("rank8", rank=8)
    shutil.rmtree(bank / "loras" / "space")
    shutil.copytree(other / "loras" / "space", bank / "loras" / "space")
    m = json.loads((bank / "manifest.json").read_text())
    m["anchors"][0]["rank"] = 8
    (bank / "manifest.json").write_text(json.dumps(m))
    assert load(bank, tiny_model_targets, tiny_model_dir.name, fusion_mode="cat")
    with pytest.raises(BankError, match="linear fusion needs one rank"):
        load(bank, tiny_model_targets, tiny_model_dir.name, fusion_mode="linear")


def test_lora_path_cannot_escape_the_bank(bank_copy, tiny_model_targets, tiny_model_dir):
    m = json.loads((bank_copy / "manifest.json").read_text())
    m["anchors"][0]["lora_path"] = "../../etc"
    (bank_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="inside the bank"):
        load(bank_copy, tiny_model_targets, tiny_model_dir.name)


def test_a_bank_for_other_module_names_is_refused_before_vllm_sees_it(tiny_bank, tiny_model_dir, tmp_path):
    """Phi-3 fuses q/k/v and gate/up into `qkv_proj`/`gate_up_proj`: a bank of Llama-named LoRAs
    must be refused at load time (vLLM would refuse the first fused adapter and die with it)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    targets = ModelTargets.from_checkpoint(tmp_path / "phi3")
    assert targets.kinds == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert targets.linears["model.layers.1.self_attn.qkv_proj"] == (64, 3 * 64)
    with pytest.raises(BankError) as e:
        load(tiny_bank, targets, tiny_model_dir.name)
    assert "model.layers.0.self_attn.q_proj is not a linear layer of this model" in str(e.value)
    assert "(the model's are down_proj, gate_up_proj, o_proj, qkv_proj)" in str(e.value)

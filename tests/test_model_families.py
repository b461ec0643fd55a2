"""Any decoder, not only Llama: a bank, fusion, a fine-tune and serving on Qwen2, Mistral and Phi-3.

Each family gets a tiny random model; its bank's LoRAs target the modules the model has (Phi-3's
fused `qkv_proj` and `gate_up_proj`, Qwen2's biased projections), derived from the model, and
the served greedy output, fused and fused + stacked, equals transformers + PEFT token for token.
(The Llama model of the rest of the suite is checked the same way in test_api_e2e/test_finetune.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.adapters import adapter_from_bytes, load_adapter
from server.adapters.targets import ModelTargets

from .conftest import server_env
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, PROMPT, generate, peft_greedy, put_profile
from .test_finetune import EXAMPLES, stored_stacked, submit, wait_job
from .tiny_model import build_tiny_model

# The linear layers each family's decoder layer has, as its checkpoint names them.
FAMILY_KINDS = {
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


@pytest.fixture(scope="module", params=sorted(FAMILY_KINDS))
def family(request, tmp_path_factory, make_bank) -> Iterator[tuple[str, Path, Path, ServerProcess, tuple]]:
    """One family at a time: its tiny model, a random bank derived from it, a server, the HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    model_dir = build_tiny_model(tmp / f"tiny-{arch}", arch=arch)
    targets = ModelTargets.from_config(json.loads((model_dir / "config.json").read_text()))
    bank = make_bank(f"tiny-{arch}", targets=targets, model_id=model_dir.name, bank_version=f"tiny-{arch}-v1")
    server = ServerProcess(tmp, server_env(tmp, model_dir, bank)).start()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)
    try:
        yield arch, model_dir, bank, server, hf
    finally:
        server.stop()


def test_bank_fusion_fine_tune_and_serving_match_peft(family, tmp_path):
    arch, model_dir, bank, server, hf = family
    anchor = load_adapter(bank / "loras" / "space")
    assert set(anchor.target_modules) == FAMILY_KINDS[arch]  # derived from the model, not a Llama table
    assert not ModelTargets.from_checkpoint(model_dir).problems("space", anchor)

    with server.client() as client:
        put_profile(client, "fam-user", PROFILES["space"])
        fused = generate(client, "fam-user")
        assert fused["personalized"] is True and fused["bank_version"] == f"tiny-{arch}-v1"
        expected = peft_greedy(hf, bank, fused["anchors"], fused["fusion_mode"], PROFILES["space"], PROMPT, 12, tmp_path / "f")
        assert fused["token_ids"] == expected

        r = submit(client, "fam-user", EXAMPLES)
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        stacked = generate(client, "fam-user")
        assert stacked["stacked"] is True and stacked["token_ids"] != fused["token_ids"]

    version, data = stored_stacked(server, "fam-user")
    lora = adapter_from_bytes(data)
    assert version == job["stacked_version"] and set(lora.target_modules) == FAMILY_KINDS[arch]
    expected = peft_greedy(
        hf, bank, stacked["anchors"], stacked["fusion_mode"], PROFILES["space"], PROMPT, 12, tmp_path / "s", stacked=lora
    )
    assert stacked["token_ids"] == expected

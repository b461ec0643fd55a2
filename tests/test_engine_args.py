"""One factory for every vLLM engine: what the settings say is what vLLM's config holds."""

from __future__ import annotations

from server.adapters.targets import ModelTargets
from server.engine_args import EngineSpec, LoraSlots
from server.settings import Settings


def test_the_servers_settings_reach_vllms_engine_config(tiny_model_dir):
    settings = Settings(model_path=tiny_model_dir, max_loras=5, max_lora_rank=32, max_model_len=1536, max_num_seqs=7)
    config = EngineSpec.from_settings(settings, tiny_model_dir, "tiny").async_engine_args().create_engine_config()
    assert config.lora_config is not None  # multi-LoRA is always on
    assert (config.lora_config.max_loras, config.lora_config.max_lora_rank) == (5, 32)
    assert config.lora_config.max_cpu_loras == 4 * 5
    assert config.model_config.max_model_len == 1536 and config.model_config.served_model_name == "tiny"
    assert config.scheduler_config.max_num_seqs == 7
    assert str(config.model_config.dtype) == "torch.bfloat16"  # the default: what `make run` serves


def test_unset_sizes_are_left_to_vllm():
    spec = EngineSpec(model="m", max_cpu_loras=None, enable_prefix_caching=None)
    kwargs = spec.kwargs()
    assert "max_cpu_loras" not in kwargs and "enable_prefix_caching" not in kwargs
    assert kwargs["enable_lora"] is True and kwargs["disable_log_stats"] is True


def test_the_cpu_sizes_vllm_reads_from_the_environment_are_set_unless_the_operator_set_them(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    spec = EngineSpec(model="m", cpu_kvcache_space_gb=3, cpu_threads_bind="nobind")
    assert spec.environment() == {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert "cpu_kvcache_space_gb" not in spec.kwargs() and "cpu_threads_bind" not in spec.kwargs()  # not vLLM arguments
    assert "VLLM_CPU_OMP_THREADS_BIND" not in EngineSpec(model="m").environment()  # unset: vLLM's default binding
    settings = Settings(cpu_kvcache_space_gb=5, max_loras=8)
    assert EngineSpec.from_settings(settings, "m", "m").environment()["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_unset_lora_slots_are_sized_from_the_memory_budget_and_the_models_layers(tiny_model_dir):
    width = sum(i + o for i, o in ModelTargets.from_checkpoint(tiny_model_dir).linears.values())
    slot = 2 * 2 * 16 * width  # bf16 A and B at rank 16, twice on the CPU (the grouped ops' packed copy)
    settings = Settings(model_path=tiny_model_dir, lora_memory_mb=1, max_num_seqs=64)
    slots = LoraSlots.from_settings(settings, tiny_model_dir)
    assert slots.slot_bytes == slot and slots.max_loras == 2**20 // slot and slots.max_cpu_loras == 4 * slots.max_loras
    assert "MTA_LORA_MEMORY_MB=1" in slots.chosen_by
    config = EngineSpec.from_settings(settings, tiny_model_dir, "tiny").async_engine_args().create_engine_config()
    assert config.lora_config.max_loras == slots.max_loras  # what vLLM gets
    # the default budget holds more slots than a step has sequences: capped there
    capped = LoraSlots.from_settings(Settings(model_path=tiny_model_dir, max_num_seqs=12), tiny_model_dir)
    assert capped.max_loras == 12 and "capped" in capped.chosen_by
    # without the CPU's packed copy (stock ops, or a GPU) a slot costs half; float32 twice as much
    stock = LoraSlots.from_settings(Settings(model_path=tiny_model_dir, lora_memory_mb=1, fast_cpu_lora_ops=False), tiny_model_dir)
    assert stock.slot_bytes == slot // 2
    fp32 = LoraSlots.from_settings(Settings(model_path=tiny_model_dir, lora_memory_mb=1, dtype="float32"), tiny_model_dir)
    assert fp32.slot_bytes == 2 * slot
    # set explicitly: used as is
    assert LoraSlots.from_settings(Settings(max_loras=3), "no-model-needed") == LoraSlots(3, 12, None, "MTA_MAX_LORAS")


def test_the_default_budget_gives_the_default_model_32_slots_on_the_cpu():
    """SmolLM2-135M's shapes (30 layers, hidden 576, 9 heads, 3 KV heads): 32 slots, one per concurrent user
    of `mta bench serving`'s 32-user cell; docs/deploy.md's slot table."""
    smol = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}  # fmt: skip
    targets = ModelTargets.from_config(smol)
    assert sum(i + o for i, o in targets.linears.values()) == 305_280
    chosen = LoraSlots.from_settings(Settings(), "SmolLM2-135M", targets)
    assert chosen.max_loras == 32 and chosen.slot_bytes == 2 * 9_768_960

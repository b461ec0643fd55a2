"""One factory for every vLLM engine: what the settings say is what vLLM's config holds."""

from __future__ import annotations

from server.engine_args import EngineSpec
from server.settings import Settings


def test_the_servers_settings_reach_vllms_engine_config(tiny_model_dir):
    settings = Settings(model_path=tiny_model_dir, max_loras=5, max_lora_rank=32, max_model_len=1536, max_num_seqs=7)
    config = EngineSpec.from_settings(settings, tiny_model_dir, "tiny").async_engine_args().create_engine_config()
    assert config.lora_config is not None  # multi-LoRA is always on
    assert (config.lora_config.max_loras, config.lora_config.max_lora_rank) == (5, 32)
    assert config.lora_config.max_cpu_loras == settings.resolved_max_cpu_loras
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
    settings = Settings(cpu_kvcache_space_gb=5)
    assert EngineSpec.from_settings(settings, "m", "m").environment()["VLLM_CPU_KVCACHE_SPACE"] == "5"

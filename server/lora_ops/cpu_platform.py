"""vLLM's CPU platform with the project's punica wrapper.

vLLM asks the platform which punica wrapper runs a model's LoRA layers
(`Platform.get_punica_wrapper`); this subclass of the CPU platform vLLM would pick itself
(`CpuPlatform`, or `ZenCpuPlatform` where zentorch is installed) names `MtaPunicaWrapperCPU`.
vLLM activates it through the platform plugin `server.lora_ops.plugin:platform`.
"""

from __future__ import annotations

from vllm.platforms import cpu_platform_plugin
from vllm.utils.import_utils import resolve_obj_by_qualname

_VLLM_CPU_PLATFORM = resolve_obj_by_qualname(cpu_platform_plugin() or "vllm.platforms.cpu.CpuPlatform")

PUNICA_WRAPPER = "server.lora_ops.punica.MtaPunicaWrapperCPU"


class MtaCpuPlatform(_VLLM_CPU_PLATFORM):  # type: ignore[misc, valid-type]
    @classmethod
    def get_punica_wrapper(cls) -> str:
        return PUNICA_WRAPPER

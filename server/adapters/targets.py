"""The linear layers of the served model that a LoRA may target, read from its checkpoint.

vLLM accepts an adapter only for modules the model really has, under the names its checkpoint
uses (Llama's `q_proj`, ..., Phi-3's fused `qkv_proj`, `gate_up_proj`); an adapter it refuses
at load time kills the engine. So every adapter is checked against these names and shapes
before it is served, for any decoder, without a table of architectures: the checkpoint says
what the model has (only the safetensors headers are read, no weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from server.adapters.math import LoraWeights

# A decoder layer's 2-D weight: `model.layers.3.self_attn.q_proj.weight` (any prefix before `layers`).
_LAYER_LINEAR = re.compile(r"^(?:.*\.)?layers\.\d+\..+\.weight$")


@dataclass(frozen=True)
class ModelTargets:
    """Module name (as in a PEFT adapter, without `.weight`) -> (in, out) features."""

    linears: dict[str, tuple[int, int]]

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> ModelTargets:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors checkpoint to read the model's layers from")
        linears: dict[str, tuple[int, int]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    if _LAYER_LINEAR.match(key) and len(shape := f.get_slice(key).get_shape()) == 2:
                        linears[key.removesuffix(".weight")] = (shape[1], shape[0])
        if not linears:
            raise ValueError(f"{model_dir}: the checkpoint has no decoder-layer linear weights")
        return cls(linears)

    @property
    def kinds(self) -> list[str]:
        """The distinct module kinds (`q_proj`, `qkv_proj`, ...): what a LoRA's target_modules name."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.linears})

    def problems(self, label: str, lora: LoraWeights) -> list[str]:
        """Why vLLM would refuse `lora` for this model (unknown module, wrong shape); empty if none."""
        problems = []
        for name in lora.modules:
            if name not in self.linears:
                kind = name.rsplit(".", 1)[-1]
                known = f" (the model's are {', '.join(self.kinds)})" if kind not in self.kinds else ""
                problems.append(f"{label}: module {name} is not a linear layer of this model{known}")
                continue
            fan_in, fan_out = self.linears[name]
            a, b = lora.a[name], lora.b[name]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                problems.append(f"{label}: {name} maps {a.shape[1]}->{b.shape[0]}, the model's maps {fan_in}->{fan_out}")
        return problems

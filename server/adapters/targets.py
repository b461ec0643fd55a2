"""The linear layers of the served model that a LoRA may target, read from its checkpoint.

vLLM accepts an adapter only for modules the model really has, under the names its checkpoint
uses (Llama's `q_proj`, ..., Phi-3's fused `qkv_proj`, `gate_up_proj`); an adapter it refuses
at load time kills the engine. So every adapter is checked against these names and shapes
before it is served, for any decoder, without a table of architectures: the checkpoint says
what the model has (only the safetensors headers are read, no weights). Where there is no
checkpoint (a published config, sizing) or the model's own module order matters (random
adapters, training's default targets), the model itself says it: its `nn.Linear` modules,
built on the meta device from the config when no weights are at hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from server.adapters.math import LoraWeights

# A module of a decoder layer: `model.layers.3.self_attn.q_proj` (any prefix before `layers`).
_IN_LAYER = re.compile(r"^(?:.*\.)?layers\.\d+\..+$")


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
                    name = key.removesuffix(".weight")
                    if key != name and _IN_LAYER.match(name) and len(shape := f.get_slice(key).get_shape()) == 2:
                        linears[name] = (shape[1], shape[0])
        if not linears:
            raise ValueError(f"{model_dir}: the checkpoint has no decoder-layer linear weights")
        return cls(linears)

    @classmethod
    def of_module(cls, model: torch.nn.Module) -> ModelTargets:
        """A loaded (or meta-device) model's decoder-layer `nn.Linear`s, in the model's own order."""
        linears = {
            name: (m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and _IN_LAYER.match(name)
        }
        if not linears:
            raise ValueError(f"{type(model).__name__}: no linear layers inside decoder layers")
        return cls(linears)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelTargets:
        """From a `config.json` alone: the model is built on the meta device (no memory, no weights)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = dict(config)
        if "model_type" not in fields:
            raise ValueError("model config has no model_type: cannot tell which architecture it describes")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
        return cls.of_module(model)

    @property
    def kinds(self) -> list[str]:
        """The distinct module kinds (`q_proj`, `qkv_proj`, ...), in model order: what target_modules name."""
        return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.linears))

    def select(self, kinds: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
        """The modules of these kinds (all when None), refusing kinds the model does not have."""
        wanted = set(self.kinds if kinds is None else kinds)
        if unknown := sorted(wanted - set(self.kinds)):
            raise ValueError(f"target modules {unknown} are not linear layers of this model (it has {', '.join(self.kinds)})")
        return {name: shape for name, shape in self.linears.items() if name.rsplit(".", 1)[-1] in wanted}

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

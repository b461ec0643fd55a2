"""LoRA adapter math (fuse, stack, fold scalings) and PEFT adapter I/O."""

from __future__ import annotations

from .math import (
    FUSERS,
    FlatLayout,
    FusionError,
    LoraWeights,
    check_fusion_plan,
    flatten,
    fold_scaling,
    fuse,
    fuse_cat,
    fuse_linear,
    get_scaling,
    stack,
)
from .peft_io import (
    AdapterFormatError,
    adapter_from_bytes,
    adapter_metadata,
    adapter_to_bytes,
    load_adapter,
    lora_from_peft_model,
    save_adapter,
    serving_dtype,
)

__all__ = [
    "FUSERS",
    "AdapterFormatError",
    "FlatLayout",
    "FusionError",
    "LoraWeights",
    "adapter_from_bytes",
    "adapter_metadata",
    "adapter_to_bytes",
    "check_fusion_plan",
    "flatten",
    "fold_scaling",
    "fuse",
    "fuse_cat",
    "fuse_linear",
    "get_scaling",
    "load_adapter",
    "lora_from_peft_model",
    "save_adapter",
    "serving_dtype",
    "stack",
]

"""PEFT LoRA adapters on disk and as bytes <-> LoraWeights (safetensors only).

vLLM loads adapters only from a directory, so the server materializes every fused
adapter with `save_adapter` (atomically, on the per-request path). Small per-user
LoRAs go to the user store as `adapter_to_bytes` blobs.

The config is written as a plain dict rather than `peft.LoraConfig(...).to_dict()`:
importing peft (and with it transformers) costs seconds, and PEFT fills every field
left out with its default.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save
from torch import Tensor

from .math import FlatLayout, LoraWeights, flatten, fold_scaling, get_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# `<prefix><module>.lora_A.weight`, optionally with the adapter name before `.weight`
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# Config features that change what the tensors mean; we would silently drop them.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)
# Inits that only set starting values; others (PiSSA, OLoRA, LoftQ, ...) edit the base.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


class AdapterFormatError(ValueError):
    """An adapter that is missing, malformed, or uses features we cannot serve."""


def _fail(source: object, problems: Iterable[str]) -> AdapterFormatError:
    return AdapterFormatError(f"{source}: " + "; ".join(problems))


def load_adapter(path: str | os.PathLike[str]) -> LoraWeights:
    """Read a PEFT LoRA adapter directory (adapter_config.json + safetensors)."""
    path = Path(path)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise _fail(path, [f"missing {name}" for name in missing])
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, [f"{CONFIG_NAME} is not valid JSON ({e})"]) from e
    problems = _config_problems(config)
    if problems:
        raise _fail(path, problems)
    try:
        tensors = load_file(path / WEIGHTS_NAME)
    except SafetensorError as e:
        raise _fail(path, [f"{WEIGHTS_NAME} is not readable ({e})"]) from e
    a, b, problems = _split_tensors(tensors)
    problems += _rank_problems(a, b, config["r"])
    problems += _target_problems(a, config["target_modules"])
    scaling = get_scaling(config["lora_alpha"], config["r"], config.get("use_rslora", False))
    return _build(path, a, b, scaling, problems)


def _config_problems(config: dict[str, Any]) -> list[str]:
    if config.get("peft_type") != "LORA":
        return [f"peft_type is {config.get('peft_type')!r}, not 'LORA'"]
    required = ("r", "lora_alpha", "target_modules")
    problems = [f"{CONFIG_NAME} lacks {k}" for k in required if k not in config]
    r, alpha = config.get("r", 1), config.get("lora_alpha", 1)
    if not (isinstance(r, int) and r > 0):
        problems.append(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)):
        problems.append(f"lora_alpha must be a number, got {alpha!r}")
    problems += [f"unsupported {k}={config[k]!r}" for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        problems.append(f"unsupported bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"unsupported init_lora_weights={init!r} (it modifies the base weights)")
    return problems


def _split_tensors(
    tensors: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Sort PEFT-named tensors into float32 A and B dicts keyed by module name."""
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    unsupported, duplicated = [], []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            unsupported.append(key)
            continue
        side = a if match["ab"] == "A" else b
        if match["module"] in side:
            duplicated.append(key)
        side[match["module"]] = tensor.float()
    problems = []
    if unsupported:
        problems.append(f"unsupported tensors (only lora_A/lora_B weights): {unsupported[:3]}")
    if duplicated:
        problems.append(f"tensors for several adapters: {duplicated[:3]}")
    unpaired = sorted(a.keys() ^ b.keys())
    if unpaired:
        problems.append(f"modules without both lora_A and lora_B: {unpaired[:3]}")
    return a, b, problems


def _rank_problems(a: dict[str, Tensor], b: dict[str, Tensor], r: int) -> list[str]:
    ranks = {t.shape[0] for t in a.values()} | {t.shape[-1] for t in b.values()}
    return [f"config r={r} but tensors have rank {sorted(ranks)}"] if ranks - {r} else []


def _target_problems(a: dict[str, Tensor], targets: str | list[str]) -> list[str]:
    """Tensors of untargeted modules would be dropped by PEFT without a word."""
    untargeted = [m for m in sorted(a) if not _is_targeted(m, targets)]
    return [f"tensors for modules outside target_modules: {untargeted[:3]}"] if untargeted else []


def _is_targeted(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry, a name suffix."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _build(
    source: object, a: dict[str, Tensor], b: dict[str, Tensor], scaling: float, problems: list[str]
) -> LoraWeights:
    if problems:
        raise _fail(source, problems)
    try:
        return LoraWeights(a=a, b=b, scaling=scaling)
    except ValueError as e:
        raise _fail(source, [str(e)]) from e


def save_adapter(
    lora: LoraWeights,
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `lora` as a PEFT adapter directory that PEFT and vLLM load.

    The scaling is folded into B and the config says `lora_alpha = r`, so the served
    scaling is 1. The directory is built beside `path` and renamed into place, so a
    reader (vLLM) never sees a half-written adapter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lora = fold_scaling(lora)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide it from a server run as another user
        _write_weights(lora, dtype, tmp / WEIGHTS_NAME)
        config = _adapter_config(lora, base_model_name_or_path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _peft_tensors(lora: LoraWeights, dtype: torch.dtype) -> dict[str, Tensor]:
    """PEFT's saved names (`base_model.model.<module>.lora_A.weight`), contiguous."""
    tensors = {}
    for m in lora.modules:
        tensors[_peft_name(m, "A")] = lora.a[m].to(dtype).contiguous()  # [r, in]
        tensors[_peft_name(m, "B")] = lora.b[m].to(dtype).contiguous()  # [out, r]
    return tensors


def _peft_name(module: str, ab: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{ab}.weight"


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_IOV_MAX = 1024  # Linux's limit on buffers per writev


def _write_weights(lora: LoraWeights, dtype: torch.dtype, path: Path) -> None:
    """Write the (scaling-folded) `lora` as PEFT's safetensors file, tensors in `dtype`.

    Fusion results already are one flat buffer of the serving dtype; any other LoRA (loaded,
    trained, scaling folded) is first copied into one: a single `torch._foreach_copy_` costs
    less than a `.to()` call per tensor, and the file is then written with no call per tensor.
    """
    if lora.flat is None or lora.flat.data.dtype != dtype:
        lora = flatten(lora, dtype=dtype)
    assert lora.flat is not None
    write_flat_safetensors(lora.flat.layout, lora.flat.data, path)


def write_flat_safetensors(layout: FlatLayout, data: Tensor, path: Path) -> None:
    """Write a flat LoRA buffer as PEFT's safetensors file (what `_peft_tensors` names and holds).

    The file holds each module's A then B (PEFT's order); the buffer holds every A then every
    B, so the data goes out as one `writev` of slices of the buffer: no copy, no tensor calls
    (safetensors' own torch writer spends about 25 us per tensor: 10 ms for the 420 tensors
    of an all-linear adapter). The header depends only on the layout and dtype, so it is
    built once per bank. Files are read back with safetensors' loader, PEFT and vLLM in the tests.
    """
    header, spans = _flat_file_plan(layout, data.dtype)
    memory = memoryview(data.view(torch.uint8).numpy())
    _write_file(path, [header, *(memory[start:end] for start, end in spans)])


@lru_cache(maxsize=64)
def _flat_file_plan(layout: FlatLayout, dtype: torch.dtype) -> tuple[bytes, list[tuple[int, int]]]:
    """The header of `layout`'s file in `dtype` and the byte spans of the buffer in file order."""
    entries, spans = [], []
    (a_offsets, b_offsets), size = layout.offsets, dtype.itemsize
    for i, m in enumerate(layout.modules):
        for ab, start, (rows, cols) in (("A", a_offsets[i], layout.a_shapes[i]), ("B", b_offsets[i], layout.b_shapes[i])):
            entries.append((_peft_name(m, ab), dtype, (rows, cols)))
            spans.append((start * size, (start + rows * cols) * size))
    return _safetensors_header(tuple(entries)), spans


def _safetensors_header(entries: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> bytes:
    """Header size and JSON header for tensors stored back to back in the order of `entries`."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head


def _write_file(path: Path, buffers: list[Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, buffers)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list[Any]) -> None:
    """`os.writev` (one system call for all tensors, not one each), resumed after a short write.

    A short write is what a filling disk returns first; resuming then raises ENOSPC.
    """
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        if written == 0:
            raise OSError(errno.EIO, "write made no progress")
        while first < len(views) and written >= views[first].nbytes:
            written -= views[first].nbytes
            first += 1
        if written:
            views[first] = views[first][written:]


def _adapter_config(lora: LoraWeights, base_model_name_or_path: str) -> dict[str, Any]:
    """The fields PEFT's LoraConfig and vLLM's PEFTHelper read, for a scaling of 1."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.rank,
        "use_rslora": False,
        "target_modules": lora.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _move_into_place(new: Path, path: Path) -> None:
    """Rename `new` to `path`, replacing an existing directory there.

    A rename cannot replace a non-empty directory, so the old one is renamed aside
    first and deleted after; `path` is missing only between the two renames, and on
    failure the old directory is put back.
    """
    if not path.exists():
        os.rename(new, path)
        return
    old = new.with_name(new.name + ".old")
    os.rename(path, old)
    try:
        os.rename(new, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def adapter_to_bytes(
    lora: LoraWeights, extra: dict[str, str] | None = None, dtype: torch.dtype = torch.float32
) -> bytes:
    """Serialize as safetensors bytes, rank and scaling (and `extra`) in the metadata (for a DB)."""
    metadata = {**(extra or {}), "rank": str(lora.rank), "scaling": repr(lora.scaling)}
    return save(_peft_tensors(lora, dtype), metadata=metadata)


def serving_dtype(model_dtype: str) -> torch.dtype:
    """The dtype vLLM casts a loaded adapter to: the model's (`MTA_DTYPE`; float32 for "auto").

    Adapters written or stored in it are served exactly as float32 ones, in half the bytes
    for 16-bit models.
    """
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_dtype, torch.float32)


def adapter_metadata(data: bytes) -> dict[str, str]:
    """The metadata of `adapter_to_bytes` output, without reading the tensors."""
    try:
        return _safetensors_metadata(data)
    except (struct.error, ValueError) as e:
        raise _fail("adapter bytes", [f"not a safetensors blob ({e})"]) from e


def adapter_from_bytes(data: bytes, scaling: float | None = None) -> LoraWeights:
    """Inverse of `adapter_to_bytes`; `scaling` overrides the stored one if given."""
    try:
        metadata = _safetensors_metadata(data)
        tensors = load(data)
    except (SafetensorError, struct.error, ValueError) as e:
        raise _fail("adapter bytes", [f"not a safetensors blob ({e})"]) from e
    if scaling is None:
        if "scaling" not in metadata:
            raise _fail("adapter bytes", ["no scaling in the metadata and none given"])
        scaling = float(metadata["scaling"])
    a, b, problems = _split_tensors(tensors)
    if "rank" in metadata:
        problems += _rank_problems(a, b, int(metadata["rank"]))
    return _build("adapter bytes", a, b, scaling, problems)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (`safetensors.torch.load` drops it).

    Format: an 8-byte little-endian header length, then the JSON header.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def lora_from_peft_model(model: torch.nn.Module, adapter_name: str = "default") -> LoraWeights:
    """Snapshot one adapter of a PeftModel (lora_A, lora_B, scaling) as LoraWeights."""
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    scalings: set[float] = set()
    problems: list[str] = []
    for name, module in model.named_modules():
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            problems.append(f"{name}: embedding LoRAs are unsupported")
        if adapter_name not in getattr(module, "lora_A", {}):
            continue
        if module.lora_variant.get(adapter_name) or module.lora_bias.get(adapter_name):
            problems.append(f"{name}: LoRA variants (DoRA, aLoRA, ...) and bias are unsupported")
        m = name.removeprefix(PEFT_PREFIX)
        a[m] = module.lora_A[adapter_name].weight.detach().to(torch.float32, copy=True)  # [r, in]
        b[m] = module.lora_B[adapter_name].weight.detach().to(torch.float32, copy=True)  # [out, r]
        scalings.add(module.scaling[adapter_name])
    if len(scalings) > 1:
        problems.append(f"modules have different scalings {sorted(scalings)}")
    source = f"{type(model).__name__} adapter {adapter_name!r}"
    return _build(source, a, b, scalings.pop() if scalings else 1.0, problems)

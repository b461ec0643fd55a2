"""vLLM plugin that installs the grouped LoRA ops into vLLM's CPU punica wrapper.

Registered as the entry point `mta_cpu_lora_ops` in the group `vllm.general_plugins`, which
vLLM loads in each of its processes (API, engine core, workers). `register()` patches the six
op names that `vllm.lora.punica_wrapper.punica_cpu` imported from `vllm.lora.ops.torch_ops`,
so `PunicaWrapperCPU` calls ours; `vllm.lora.ops.torch_ops` itself is left as it is.

Environment (read when the plugin loads, i.e. when the engine starts):
- `MTA_FAST_CPU_LORA_OPS`: "0" keeps vLLM's ops (default "1"; the server sets it from
  `Settings.fast_cpu_lora_ops`). Nothing is patched on non-CPU platforms.
- `MTA_LORA_OPS_STATS_DIR`: if set, each process that runs the ops writes its call counts to
  `<dir>/<pid>.json` (on the first call, then at most once a second), so tests and benchmarks
  can see the ops running inside vLLM's worker process.
- `MTA_LORA_CPU_KERNEL`: "0" keeps the decode products on `torch.bmm` instead of the C++
  kernel (see `kernel`; default "1", used where it can be built).

It also replaces two methods of `PunicaWrapperCPU` (see `punica`): `add_lora_linear` (one
shrink per layer instead of one per slice) and `add_lora_logits` (no LM-head work for slots
without LM-head weights). The class is patched in place and restored by `uninstall()`.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.lora_ops import punica, untested_vllm
from server.lora_ops.ops import OPS

ENABLE_ENV = "MTA_FAST_CPU_LORA_OPS"
STATS_DIR_ENV = "MTA_LORA_OPS_STATS_DIR"
TARGET_MODULE = "vllm.lora.punica_wrapper.punica_cpu"
TARGET_CLASS = "PunicaWrapperCPU"
INSTALLED_MESSAGE = "MTA fast CPU LoRA ops installed"
FIRST_CALL_MESSAGE = "MTA fast CPU LoRA ops in use"

# A child of vLLM's logger, so vLLM's own handler prints it in the engine processes, where
# nothing configures the root logger.
log = logging.getLogger("vllm.mta_lora_ops")

_FALSE = {"0", "false", "no", "off"}


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in _FALSE


def register() -> None:
    """Entry point for `vllm.general_plugins`: install the ops on CPU unless disabled or on an
    untested vLLM (then vLLM's own ops run, and the log says why)."""
    if not enabled():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if (why := untested_vllm()) is not None:
        log.warning("MTA fast CPU LoRA ops not installed (pid %d): %s", os.getpid(), why)
        return
    install()


class _CallStats:
    """Per-process op call counts: logged on the first call, optionally written to a file."""

    def __init__(self, stats_dir: Path | None) -> None:
        self.counts: dict[str, int] = dict.fromkeys([*OPS, *punica.METHODS], 0)
        self.path = stats_dir / f"{os.getpid()}.json" if stats_dir is not None else None
        self._flushed_at: float | None = None

    def hit(self, name: str) -> None:
        self.counts[name] += 1
        if self._flushed_at is None:
            log.info("%s (first call: %s, pid %d)", FIRST_CALL_MESSAGE, name, os.getpid())
            self.flush()
        elif self.path is not None and time.monotonic() - self._flushed_at >= 1.0:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "counts": self.counts}))
            os.replace(tmp, self.path)
        except OSError as e:  # statistics must never break serving
            log.warning("cannot write LoRA op stats to %s: %s", self.path, e)


def _counted(stats: _CallStats, name: str, op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def counted(*args: Any, **kwargs: Any) -> Any:
        stats.hit(name)
        return op(*args, **kwargs)

    return counted


_originals: dict[str, Callable[..., Any]] = {}
_stats: _CallStats | None = None


def install() -> bool:
    """Patch the ops into PunicaWrapperCPU's module; False if they were already installed."""
    global _stats
    import importlib

    if _originals:
        return False
    module = importlib.import_module(TARGET_MODULE)
    stats_dir = os.environ.get(STATS_DIR_ENV)
    _stats = _CallStats(Path(stats_dir) if stats_dir else None)
    for name, op in OPS.items():
        _originals[name] = getattr(module, name)
        setattr(module, name, _counted(_stats, name, op))
    cls = getattr(module, TARGET_CLASS)
    for name, method in punica.METHODS.items():
        punica._original[name] = getattr(cls, name)
        setattr(cls, name, _counted(_stats, name, method))
    if _stats.path is not None:
        atexit.register(_stats.flush)
    log.info(
        "%s (pid %d, patched %s.{%s} and %s.{%s})",
        INSTALLED_MESSAGE,
        os.getpid(),
        TARGET_MODULE,
        ",".join(OPS),
        TARGET_CLASS,
        ",".join(punica.METHODS),
    )
    return True


def uninstall() -> None:
    """Put vLLM's ops back (tests)."""
    global _stats
    if not _originals:
        return
    import importlib

    module = importlib.import_module(TARGET_MODULE)
    for name, op in _originals.items():
        setattr(module, name, op)
    cls = getattr(module, TARGET_CLASS)
    for name, method in punica._original.items():
        setattr(cls, name, method)
    punica._original.clear()
    if _stats is not None and _stats.path is not None:
        atexit.unregister(_stats.flush)
    _originals.clear()
    _stats = None


def call_counts() -> dict[str, int]:
    """This process's op call counts since `install()` (empty when not installed)."""
    return dict(_stats.counts) if _stats is not None else {}

"""The vLLM plugin that runs the project's CPU LoRA ops, through vLLM's own seams.

vLLM takes a platform's punica wrapper (the object every LoRA layer calls) from the platform
class, and an out-of-tree platform from the entry point group `vllm.platform_plugins`, which it
loads in each of its processes (API, engine core, workers). `platform()`, the entry point
`mta_cpu` of that group, activates `cpu_platform.MtaCpuPlatform` wherever vLLM would run its
own CPU platform: the same platform, whose punica wrapper is `punica.MtaPunicaWrapperCPU`, a
subclass of vLLM's `PunicaWrapperCPU`. Nothing of vLLM is patched.

vLLM skips platform plugins when `VLLM_TARGET_DEVICE=cpu` is set (`vllm.platforms`): its own
ops run then, and the engine reports the `stock` path with that reason (see `unavailable`).

Environment (read when vLLM loads the plugin, i.e. when an engine starts):
- `MTA_FAST_CPU_LORA_OPS`: "0" keeps vLLM's ops (default "1"; the server sets it from
  `Settings.fast_cpu_lora_ops`). Nothing changes on non-CPU platforms.
- `MTA_LORA_OPS_STATS_DIR`: if set, each process that runs the ops writes its call counts to
  `<dir>/<pid>.json` (on the first call, then at most once a second), so tests and benchmarks
  can see the ops running inside vLLM's worker process.
- `MTA_LORA_CPU_KERNEL`: "0" keeps the decode products on `torch.bmm` instead of the C++
  kernel (see `kernel`; default "1", used where it can be built).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path

from server.lora_ops import unavailable
from server.lora_ops.ops import OPS

ENABLE_ENV = "MTA_FAST_CPU_LORA_OPS"
STATS_DIR_ENV = "MTA_LORA_OPS_STATS_DIR"
PLATFORM = "server.lora_ops.cpu_platform.MtaCpuPlatform"
INSTALLED_MESSAGE = "MTA fast CPU LoRA ops installed"
FIRST_CALL_MESSAGE = "MTA fast CPU LoRA ops in use"
COUNTED = (*OPS, "add_lora_linear", "add_lora_logits")  # the ops, and the wrapper's whole-layer methods

# A child of vLLM's logger, so vLLM's own handler prints it in the engine processes, where
# nothing configures the root logger.
log = logging.getLogger("vllm.mta_lora_ops")

_FALSE = {"0", "false", "no", "off"}


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in _FALSE


def platform() -> str | None:
    """Entry point of `vllm.platform_plugins`: our CPU platform where vLLM would run its own, the
    ops are enabled and this vLLM release is tested (else None: vLLM's platform and ops, and the
    log says why)."""
    if not enabled():
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    if (why := unavailable()) is not None:
        log.warning("MTA fast CPU LoRA ops not installed (pid %d): %s", os.getpid(), why)
        return None
    return PLATFORM


class CallStats:
    """Per-process op call counts: logged on the first call, optionally written to a file."""

    def __init__(self, stats_dir: Path | None) -> None:
        self.counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
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


_stats: CallStats | None = None


def stats() -> CallStats:
    """This process's counts, started (and the ops announced) by the first wrapper vLLM builds."""
    global _stats
    if _stats is None:
        stats_dir = os.environ.get(STATS_DIR_ENV)
        _stats = CallStats(Path(stats_dir) if stats_dir else None)
        if _stats.path is not None:
            atexit.register(_stats.flush)
        log.info("%s (pid %d): vLLM runs %s", INSTALLED_MESSAGE, os.getpid(), "MtaPunicaWrapperCPU")
    return _stats


def reset_stats() -> None:
    """Forget this process's counts (tests: the next wrapper starts them again)."""
    global _stats
    if _stats is not None and _stats.path is not None:
        atexit.unregister(_stats.flush)
    _stats = None


def call_counts() -> dict[str, int]:
    """This process's op call counts (empty before a wrapper of ours was built)."""
    return dict(_stats.counts) if _stats is not None else {}

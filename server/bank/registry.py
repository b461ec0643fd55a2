"""The bank being served and its embedding model, swapped atomically on reload."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters.targets import ModelTargets
from server.bank.loader import Bank, BankError, fused_rank, load_bank, read_manifest
from server.embedding import Embedder, resolve_embedding_model
from server.prompts import render_item
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedBank:
    """A bank with the embedder of its embedding model: requests take one snapshot of this."""

    bank: Bank
    embedder: Embedder
    top_k: int
    mode: str
    uid: str  # version plus load counter: cache keys never outlive a reload

    @property
    def version(self) -> str:
        return self.bank.version

    @property
    def fused_rank(self) -> int:
        m = self.bank.manifest
        shared = m.shared_lora.rank if m.shared_lora else 0
        return fused_rank([a.rank for a in m.anchors], self.mode, self.top_k, shared, self.bank.residual_scale)

    @property
    def embedding_model(self) -> str:
        return self.bank.manifest.embedding_model.name

    def render(self, item: dict[str, Any]) -> str:
        return render_item(item, self.bank.manifest.task.history_template)


class BankRegistry:
    def __init__(self, settings: Settings, model_id: str, model_path: Path) -> None:
        self.settings = settings
        self.model_id = model_id
        self.targets = ModelTargets.from_checkpoint(model_path)  # what a served adapter may target
        self._current: ServedBank | None = None
        self._embedders: dict[Path, Embedder] = {}
        self._reload_lock = asyncio.Lock()
        self._loads = 0

    @property
    def current(self) -> ServedBank:
        if self._current is None:
            raise BankError("no bank loaded")
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def _embedder(self, name: str) -> Embedder:
        path = resolve_embedding_model(name, self.settings.embedding_model_path)
        if path not in self._embedders:
            log.info("loading embedding model %s", path)
            self._embedders[path] = Embedder(path)
        return self._embedders[path]

    def _load(self, path: Path, uid_suffix: int) -> ServedBank:
        s = self.settings
        manifest = read_manifest(path)  # first: it names the embedding model
        try:
            embedder = self._embedder(manifest.embedding_model.name)
        except (OSError, ValueError) as e:
            raise BankError(f"bank {path}: embedding model {manifest.embedding_model.name!r}: {e}") from e
        bank = load_bank(
            path,
            model_id=self.model_id,
            targets=self.targets,
            embedding_dim=embedder.dim,
            max_lora_rank=s.max_lora_rank,
            fusion_mode=s.fusion_mode,
            top_k=s.top_k,
            residual_scale=s.residual_scale,
        )
        return ServedBank(
            bank=bank,
            embedder=embedder,
            top_k=min(s.top_k or manifest.fusion.top_k, len(manifest.anchors)),
            mode=s.fusion_mode or manifest.fusion.mode,
            uid=f"{manifest.bank_version}#{uid_suffix}",
        )

    def open(self, path: Path) -> ServedBank:
        """Load a bank without serving it (offline tools: the evaluator)."""
        return self._load(Path(path), 0)

    async def load(self, path: Path) -> tuple[ServedBank | None, ServedBank]:
        """Load a bank beside the current one, then swap; returns (old, new). Raises BankError."""
        async with self._reload_lock:
            self._loads += 1
            new = await asyncio.to_thread(self._load, Path(path), self._loads)
            old, self._current = self._current, new
            log.info("serving bank %s (%s) from %s", new.version, new.bank.manifest.name, new.bank.path)
            return old, new

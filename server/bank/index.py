"""FAISS inner-product index over L2-normalised anchor embeddings (cosine retrieval)."""

from __future__ import annotations

import faiss
import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors in float32; zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


class AnchorIndex:
    """Exact cosine top-k over a few hundred anchors: a flat index is fast and has no training."""

    def __init__(self, anchor_ids: list[str], embeddings: np.ndarray) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(anchor_ids):
            raise ValueError(f"embeddings shape {embeddings.shape} does not match {len(anchor_ids)} anchors")
        self.anchor_ids = list(anchor_ids)
        self.dim = int(embeddings.shape[1])
        self._index = faiss.IndexFlatIP(self.dim)
        self._index.add(l2_normalize(embeddings))

    def search(self, embedding: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Top-k anchors as (anchor id, cosine similarity), most similar first."""
        query = l2_normalize(np.asarray(embedding, dtype=np.float32).reshape(1, -1))
        if query.shape[1] != self.dim:
            raise ValueError(f"embedding has dimension {query.shape[1]}, the bank expects {self.dim}")
        sims, idx = self._index.search(query, min(k, len(self.anchor_ids)))
        return [(self.anchor_ids[i], float(s)) for i, s in zip(idx[0], sims[0]) if i >= 0]

"""Exact inner-product search over item vectors in memory, answering the store's search calls.

The harness scores the served chain (``atelier``) on tens of thousands of shoppers; a pgvector round
trip per stage and shopper would take longer than the rest of the evaluation. This index answers the
same ``search`` / ``vectors`` calls the chain's stages make on ``VectorStore`` exactly (a matrix
product), so the harness runs the stages' own code. The served HNSW index is checked against exact
search when it is built (``atelier index`` reports its recall@100), which is what ties the two.
Metadata filters are not supported here: the harness sends none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ExactIndex:
    """One model's vectors with their item ids and product groups; ``search`` as ``VectorStore.search``."""

    def __init__(self, model_id: str, item_ids: Sequence[str], vectors: np.ndarray, groups: Sequence[str]) -> None:
        assert len(item_ids) == len(vectors) == len(groups), "ids, vectors and groups must align"
        self.model_id = model_id
        self.item_ids = np.asarray(item_ids, dtype=object)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
        self.groups = np.asarray(groups, dtype=object)
        self.index = {str(i): n for n, i in enumerate(self.item_ids)}

    def _check(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise KeyError(f"this index holds {self.model_id}, not {model_id}")

    def vectors_of(self, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the known ids among ``item_ids``."""
        self._check(model_id)
        return {i: self.vectors[self.index[i]] for i in item_ids if i in self.index}

    def search(
        self, model_id: str, query_vector: Any, k: int = 100, *, filters: Any = None,
        exclude_ids: Sequence[str] = (), dedupe_groups: bool = False,
    ) -> list[tuple[str, float]]:
        """Top-k ``(item_id, inner product)``, best first; with ``dedupe_groups`` the best item per group."""
        self._check(model_id)
        if filters is not None and not filters.is_empty():
            raise NotImplementedError("the exact index takes no metadata filters")
        scores = self.vectors @ np.asarray(query_vector, dtype=np.float32)  # (n,)
        rows = [self.index[i] for i in exclude_ids if i in self.index]
        scores[rows] = -np.inf
        # Enough rows that k distinct groups survive folding (colourways come in handfuls).
        depth = min(len(scores), 8 * k if dedupe_groups else k)
        top = np.argpartition(-scores, depth - 1)[:depth]
        top = top[np.argsort(-scores[top], kind="stable")]
        out: list[tuple[str, float]] = []
        seen: set[str] = set()
        for r in top:
            if not np.isfinite(scores[r]):
                break
            if dedupe_groups:
                if self.groups[r] in seen:
                    continue
                seen.add(self.groups[r])
            out.append((str(self.item_ids[r]), float(scores[r])))
            if len(out) == k:
                break
        return out

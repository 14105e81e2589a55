"""Hybrid retrieval: reciprocal-rank fusion and normalised score fusion over any retrievers."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from .base import Hit


def _gather(retrievers, queries, depth):
    per_retriever = [r.retrieve_batch(list(queries), depth) for r in retrievers]
    return list(zip(*per_retriever))  # per query: one hit list per retriever


class _FusedRetrieval:
    """Mixin: retrieve ``depth`` hits from every part, then ``self.fuse`` them per query."""

    def retrieve(self, query: str, k: int = 10) -> list[Hit]:
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        depth = max(k, self.depth)
        return [self.fuse(lists, k) for lists in _gather(self.retrievers, queries, depth)]


class RRF(_FusedRetrieval):
    """score(d) = sum_i w_i / (k + rank_i(d)), rank from 1 (Cormack et al.; k=60 is the usual choice)."""

    def __init__(self, retrievers: Sequence, k: int = 60, weights: Sequence[float] | None = None,
                 depth: int = 100, name: str = "hybrid"):
        if not retrievers:
            raise ValueError("RRF needs at least one retriever")
        self.retrievers, self.k, self.depth, self.name = list(retrievers), k, depth, name
        self.weights = list(weights) if weights else [1.0] * len(self.retrievers)

    def fuse(self, hit_lists: Sequence[list[Hit]], k: int) -> list[Hit]:
        scores: dict[str, float] = defaultdict(float)
        for weight, hits in zip(self.weights, hit_lists):
            for rank, hit in enumerate(hits, start=1):
                scores[hit.chunk_id] += weight / (self.k + rank)
        return [Hit(c, s) for c, s in sorted(scores.items(), key=lambda kv: -kv[1])[:k]]


class ScoreFusion(_FusedRetrieval):
    """Min-max normalise each retriever's scores per query, then a weighted sum (missing = 0)."""

    def __init__(self, retrievers: Sequence, weights: Sequence[float] | None = None, depth: int = 100,
                 name: str = "score-fusion"):
        if not retrievers:
            raise ValueError("ScoreFusion needs at least one retriever")
        self.retrievers, self.depth, self.name = list(retrievers), depth, name
        self.weights = list(weights) if weights else [1.0] * len(self.retrievers)

    def fuse(self, hit_lists: Sequence[list[Hit]], k: int) -> list[Hit]:
        scores: dict[str, float] = defaultdict(float)
        for weight, hits in zip(self.weights, hit_lists):
            if not hits:
                continue
            lo, hi = min(h.score for h in hits), max(h.score for h in hits)
            span = hi - lo or 1.0
            for hit in hits:
                scores[hit.chunk_id] += weight * (hit.score - lo) / span
        return [Hit(c, s) for c, s in sorted(scores.items(), key=lambda kv: -kv[1])[:k]]

"""What every reranker shares: ``rerank(query, items, k, texts)`` orders items by the reranker's ``score``.

A reranker is any object with ``score(query, doc_texts, ids=None) -> np.ndarray`` (higher = more relevant);
:func:`rank_items` turns that into the ``rerank`` protocol the Pipeline calls.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from blockrag.retrievers.base import Hit

Texts = Mapping[str, str] | Callable[[str], str] | None


def resolve_items(items: Sequence, texts: Texts) -> tuple[list[str], list[str]]:
    """(ids, texts) of ``items``: chunks (``.id``/``.text``), ``(id, text)`` pairs, or hits/ids with ``texts``."""
    ids, out = [], []
    for it in items:
        if hasattr(it, "text") and hasattr(it, "id"):
            ids.append(str(it.id))
            out.append(it.text)
        elif isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], str):
            ids.append(str(it[0]))
            out.append(it[1])
        else:
            cid = it.chunk_id if hasattr(it, "chunk_id") else str(it)
            if texts is None:
                raise ValueError("hits / ids need `texts` (a mapping or a function id -> text)")
            ids.append(cid)
            out.append(texts(cid) if callable(texts) else texts[cid])
    return ids, out


def rank_items(score: Callable[[str, Sequence[str], Sequence[str]], np.ndarray], query: str, items: Sequence,
               k: int | None = None, texts: Texts = None) -> list[Hit]:
    """Score ``items`` with ``score(query, doc_texts, ids)`` and return them best first (ties keep input order)."""
    ids, doc_texts = resolve_items(items, texts)
    if not ids:
        return []
    scores = np.asarray(score(query, doc_texts, ids), dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    hits = [Hit(ids[i], float(scores[i])) for i in order]
    return hits[:k] if k else hits

"""Cross-encoder reranker: each (query, passage) pair is scored jointly by a sentence-transformers ``CrossEncoder``.

    from blockrag.rerankers.cross_encoder import CrossEncoderReranker
    hits = CrossEncoderReranker("path/to/ms-marco-MiniLM-L-6-v2").rerank(query, chunks, k=10)

No cross-encoder ships with blockrag (none is packaged on PyPI): give a local folder (any model
``sentence_transformers.CrossEncoder`` loads, e.g. a downloaded MS MARCO MiniLM cross-encoder) or, online,
a hub id. ``BLOCKRAG_CROSS_ENCODER`` names the default. The score is the model's output with its own
activation (a sigmoid for one-label models: monotonic, so the ranking is the logits'); for several labels,
the last label's, the "relevant" class by convention.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from blockrag.retrievers.base import Hit

from .base import rank_items

ENV_MODEL = "BLOCKRAG_CROSS_ENCODER"


class CrossEncoderReranker:
    """``CrossEncoderReranker(model_name=None, *, model=None, batch_size=32, max_length=512, device=None)``;
    ``rerank(query, items, k=None, texts=None) -> [Hit]`` best first; ``score(query, texts) -> array``."""

    name = "cross-encoder"

    def __init__(self, model_name: str | None = None, *, model=None, batch_size: int = 32,
                 max_length: int | None = 512, device: str | None = None, **_ignored):
        # **_ignored: the registry may pass the generator's model/tokenizer to LLM rerankers; not used here
        self.model_name = model_name or os.environ.get(ENV_MODEL)
        if model is None and not self.model_name:
            raise ValueError("the cross-encoder reranker needs a model: pass model_name (a local folder or hub "
                             f"id) or set {ENV_MODEL}; none ships with blockrag")
        self._model, self.batch_size, self.max_length, self.device = model, batch_size, max_length, device

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import CrossEncoder

            name = self.model_name
            if Path(name).expanduser().exists():
                name = str(Path(name).expanduser())
            elif os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}:
                raise FileNotFoundError(f"cross-encoder {name!r} is not a local folder and the hub is offline")
            self._model = CrossEncoder(name, max_length=self.max_length, device=self.device)
        return self._model

    def score(self, query: str, doc_texts: Sequence[str]) -> np.ndarray:
        if not doc_texts:
            return np.zeros(0, np.float32)
        out = self.model.predict([(query, d) for d in doc_texts], batch_size=self.batch_size,
                                 show_progress_bar=False, convert_to_numpy=True)
        out = np.asarray(out, dtype=np.float32)
        return out[:, -1] if out.ndim == 2 else out

    def rerank(self, query: str, items: Sequence, k: int | None = None,
               texts: Mapping[str, str] | Callable[[str], str] | None = None) -> list[Hit]:
        """``items``: chunks (``.id``, ``.text``), ``(id, text)`` pairs, or hits/ids with ``texts``."""
        return rank_items(lambda q, docs, ids: self.score(q, docs), query, items, k, texts)

"""The pipeline: retrieve -> (rerank) -> generate from cached passage KV, with timings.

    collection = Collection("store/")
    pipe = Pipeline(collection, retriever="hybrid", k=5, generator=Generator(), mode="turbo")
    answer = pipe.ask("Who founded Veloria Bank?")
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .collection import Collection
from .documents import Chunk


@dataclass
class Answer:
    question: str
    text: str | None
    chunks: list[Chunk]
    scores: list[float]
    timings: dict = field(default_factory=dict)

    @property
    def cited_ids(self) -> list[str]:
        return [c.id for c in self.chunks]


class Pipeline:
    def __init__(self, collection: Collection, retriever="hybrid", k: int = 5, reranker=None,
                 rerank_depth: int = 50, generator=None, mode: str = "turbo", max_new_tokens: int = 64):
        self.collection = collection
        self.retriever = collection.retriever(retriever) if isinstance(retriever, str) else retriever
        self.k, self.reranker, self.rerank_depth = k, reranker, rerank_depth
        self.generator, self.mode, self.max_new_tokens = generator, mode, max_new_tokens

    def retrieve(self, question: str) -> tuple[list[Chunk], list[float], float]:
        start = time.perf_counter()
        depth = self.rerank_depth if self.reranker else self.k
        hits = self.retriever.retrieve(question, depth)
        if self.reranker is not None and hits:
            candidates = self.collection.get_chunks([h.chunk_id for h in hits])
            hits = self.reranker.rerank(question, candidates, k=self.k)
        hits = hits[: self.k]
        chunks = self.collection.get_chunks([h.chunk_id for h in hits])
        by_id = {h.chunk_id: h.score for h in hits}
        return chunks, [by_id[c.id] for c in chunks], (time.perf_counter() - start) * 1000

    def ask(self, question: str, stream=None) -> Answer:
        """Answer ``question``; ``stream(text_piece)`` (optional) receives tokens as they are decoded."""
        chunks, scores, retrieve_ms = self.retrieve(question)
        answer = Answer(question, None, chunks, scores, {"retrieve_ms": retrieve_ms})
        if self.generator is None or not chunks:
            return answer
        if stream is None:
            result = self.generator.generate(question, chunks, mode=self.mode, max_new_tokens=self.max_new_tokens)
        else:
            pieces = self.generator.generate(question, chunks, mode=self.mode, max_new_tokens=self.max_new_tokens,
                                             stream=True)
            for piece in pieces:
                stream(piece)
            result = pieces.result
        answer.text = result.answer.strip()
        answer.timings.update({"ttft_ms": result.ttft_ms, "tokens_per_s": result.decode_tokens_per_s,
                               "context_tokens": result.n_context_tokens})
        return answer

"""The one query path: retrieve -> (rerank) -> generate from cached passage KV, with timings.

    collection = Collection("store/")
    pipe = Pipeline(collection, retriever="hybrid", k=5, reranker="blockrank",
                    generator=collection_generator(collection), mode="turbo")
    answer = pipe.ask("Who founded Veloria Bank?")
    answer.text, answer.hits[0].doc_id, answer.timings["ttft_ms"]

    for piece in pipe.stream("Who founded Veloria Bank?"):   # text pieces as decoded, then the Answer
        ...

Retrievers and rerankers may be given by name (see :mod:`blockrag.registry`) or as objects. Every command
(``blockrag query``, ``demo``, the examples, eval) goes through this class, so a question is retrieved,
reranked and answered once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from . import registry
from .collection import Collection
from .documents import Chunk


@dataclass
class Passage:
    """One retrieved (and possibly reranked) chunk with its score and 1-based rank."""

    chunk: Chunk
    score: float
    rank: int

    @property
    def chunk_id(self) -> str:
        return self.chunk.id

    @property
    def doc_id(self) -> str:
        return self.chunk.doc_id

    @property
    def title(self) -> str | None:
        """The document's title when it has one."""
        return self.chunk.metadata.get("title") or None

    @property
    def text(self) -> str:
        return self.chunk.text

    def to_dict(self, text_chars: int | None = None) -> dict:
        """JSON-ready: rank, chunk_id, doc_id, title, score, text (cut to ``text_chars`` when given)."""
        text = self.text if text_chars is None else self.text[:text_chars]
        return {"rank": self.rank, "chunk_id": self.chunk_id, "doc_id": self.doc_id, "title": self.title,
                "score": self.score, "text": text}


@dataclass
class Retrieval:
    """The passages retrieved for one question, with ``retrieve_ms`` and ``rerank_ms``.

    Unpacks as ``chunks, scores, ms`` (``ms`` = retrieval + reranking), like earlier versions."""

    question: str
    passages: list[Passage]
    retrieve_ms: float
    rerank_ms: float | None = None

    @property
    def chunks(self) -> list[Chunk]:
        return [p.chunk for p in self.passages]

    @property
    def scores(self) -> list[float]:
        return [p.score for p in self.passages]

    @property
    def total_ms(self) -> float:
        return self.retrieve_ms + (self.rerank_ms or 0.0)

    def __iter__(self):
        return iter((self.chunks, self.scores, self.total_ms))

    def timings(self) -> dict:
        out = {"retrieve_ms": self.retrieve_ms}
        if self.rerank_ms is not None:
            out["rerank_ms"] = self.rerank_ms
        return out


@dataclass
class Answer:
    """A question's answer (``text`` is None without a generator), its passages and timings.

    ``timings``: ``retrieve_ms``, ``rerank_ms`` (with a reranker), and with a generator ``ttft_ms``,
    ``tokens_per_s``, ``generate_ms``, ``context_tokens``, ``answer_tokens``; always ``total_ms``."""

    question: str
    text: str | None
    hits: list[Passage]
    timings: dict = field(default_factory=dict)
    retriever: str = ""
    reranker: str | None = None

    @property
    def chunks(self) -> list[Chunk]:
        return [h.chunk for h in self.hits]

    @property
    def scores(self) -> list[float]:
        return [h.score for h in self.hits]

    @property
    def cited_ids(self) -> list[str]:
        return [h.chunk_id for h in self.hits]

    def to_dict(self, text_chars: int | None = None) -> dict:
        """JSON-ready form (what a server returns)."""
        return {"question": self.question, "answer": self.text, "retriever": self.retriever,
                "reranker": self.reranker, "hits": [h.to_dict(text_chars) for h in self.hits],
                "timings": dict(self.timings)}


def _name(obj, default: str = "") -> str:
    return getattr(obj, "name", None) or default or type(obj).__name__


def collection_generator(collection: Collection, model_name: str | None = None, **kwargs):
    """The generator of a collection: its ``kv`` index's (whose passage caches were built at indexing time)
    when it has one, else a :class:`Generator` caching passages under the store folder. The model is the
    process's shared copy (:func:`blockrag.models.shared_generator`)."""
    if "kv" in collection.indexes:
        return collection.index("kv", model=model_name).generator(**kwargs)
    from blockrag.attention_kv import Generator

    return Generator(model_name, cache_dir=collection.store.folder / "kv", **kwargs)


class Pipeline:
    """``Pipeline(collection, retriever="hybrid", k=5, reranker=None, rerank_depth=50, generator=None,
    mode="turbo", max_new_tokens=64)``.

    ``retriever`` / ``reranker``: a registry name (with ``retriever_opts`` / ``reranker_opts`` for its
    constructor) or an object. An LLM reranker named here runs the generator's model (one copy per process).
    ``ask`` answers a question; ``stream`` yields the answer's text pieces and then the :class:`Answer`;
    ``retrieve`` / ``retrieve_batch`` stop after reranking. One generation at a time per Pipeline (its
    Generator keeps one decode state).
    """

    def __init__(self, collection: Collection, retriever="hybrid", k: int = 5, reranker=None,
                 rerank_depth: int = 50, generator=None, mode: str = "turbo", max_new_tokens: int = 64,
                 retriever_opts: dict | None = None, reranker_opts: dict | None = None):
        self.collection = collection
        if isinstance(retriever, str):
            self.retriever_name = retriever
            retriever = registry.retriever(collection, retriever, **(retriever_opts or {}))
        else:
            self.retriever_name = _name(retriever)
        self.retriever = retriever
        if isinstance(reranker, str):
            opts = dict(reranker_opts or {})
            if registry.reranker_spec(reranker).llm and generator is not None and hasattr(generator, "model"):
                opts.setdefault("model", generator.model)  # the generator's LLM: never a second copy
                opts.setdefault("tokenizer", generator.tokenizer)
            reranker = registry.reranker(reranker, **opts)
        self.reranker = reranker
        self.k, self.rerank_depth = k, rerank_depth
        self.generator, self.mode, self.max_new_tokens = generator, mode, max_new_tokens

    # ------------------------------------------------------------------------------------ retrieval
    def _depth(self, k: int) -> int:
        return max(self.rerank_depth, k) if self.reranker is not None else k

    def _rerank(self, question: str, hits: list, k: int) -> list:
        if self.reranker is None or not hits:
            return hits[:k]
        candidates = self.collection.get_chunks([h.chunk_id for h in hits])
        return list(self.reranker.rerank(question, candidates, k=k))[:k]

    def retrieve(self, question: str, k: int | None = None) -> Retrieval:
        """The top ``k`` (default ``self.k``) passages: ``rerank_depth`` candidates reranked when there is a
        reranker. Unpacks as ``chunks, scores, ms``."""
        k = self.k if k is None else k
        t0 = time.perf_counter()
        hits = self.retriever.retrieve(question, self._depth(k))
        t1 = time.perf_counter()
        rerank_ms = None
        if self.reranker is not None:
            hits = self._rerank(question, hits, k)
            rerank_ms = (time.perf_counter() - t1) * 1000
        hits = hits[:k]
        by_id = {c.id: c for c in self.collection.get_chunks([h.chunk_id for h in hits])}
        passages = [Passage(by_id[h.chunk_id], float(h.score), rank)
                    for rank, h in enumerate((h for h in hits if h.chunk_id in by_id), 1)]
        return Retrieval(question, passages, (t1 - t0) * 1000, rerank_ms)

    def retrieve_batch(self, questions: Sequence[str], k: int | None = None) -> list[list]:
        """Scored chunk ids (``Hit``) per question, batched through the retriever (for evaluation);
        each list reranked when there is a reranker."""
        k = self.k if k is None else k
        questions = list(questions)
        if not questions:
            return []
        batch = getattr(self.retriever, "retrieve_batch", None)
        depth = self._depth(k)
        lists = batch(questions, depth) if batch else [self.retriever.retrieve(q, depth) for q in questions]
        return [self._rerank(q, hits, k) for q, hits in zip(questions, lists)]

    # ------------------------------------------------------------------------------------ answering
    def stream(self, question: str, retrieval: Retrieval | None = None) -> Iterator:
        """Yield the answer's text pieces as they are decoded, then the :class:`Answer` (last item).

        ``retrieval``: passages already retrieved for ``question`` (e.g. shown to the user first); else
        :meth:`retrieve` runs here. Without a generator (or passages) the only item is the Answer."""
        t0 = time.perf_counter()
        given = retrieval is not None
        if retrieval is None:
            retrieval = self.retrieve(question)
        answer = Answer(question, None, list(retrieval.passages), retrieval.timings(),
                        retriever=self.retriever_name,
                        reranker=_name(self.reranker) if self.reranker is not None else None)
        if self.generator is not None and answer.hits:
            t_gen = time.perf_counter()
            pieces = self.generator.generate(question, answer.chunks, mode=self.mode,
                                             max_new_tokens=self.max_new_tokens, stream=True)
            try:
                yield from pieces
            except GeneratorExit:  # the consumer stopped early (a client went away): end the decode too
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                raise
            result = pieces.result
            answer.text = result.answer.strip()
            answer.timings.update({"ttft_ms": result.ttft_ms, "tokens_per_s": result.decode_tokens_per_s,
                                   "generate_ms": (time.perf_counter() - t_gen) * 1000,
                                   "context_tokens": result.n_context_tokens,
                                   "answer_tokens": len(result.token_ids)})
        elapsed = (time.perf_counter() - t0) * 1000
        answer.timings["total_ms"] = elapsed + (retrieval.total_ms if given else 0.0)
        yield answer

    def ask(self, question: str, stream: Callable[[str], None] | None = None,
            retrieval: Retrieval | None = None) -> Answer:
        """Answer ``question``; ``stream(text_piece)`` (optional) receives tokens as they are decoded."""
        answer = None
        for item in self.stream(question, retrieval):
            if isinstance(item, Answer):
                answer = item
            elif stream is not None:
                stream(item)
        return answer

"""The one query path: Pipeline retrieves, reranks and generates once per question (also under
`blockrag query --generate`), its Answer carries hits and timings, stream() yields pieces then the Answer,
and one process holds one copy of the LLM (reranker, KV index and generator share it)."""
from __future__ import annotations

import threading
import time

import pytest

from blockrag import registry
from blockrag.collection import Collection
from blockrag.documents import Chunk, Document, chunk_id
from blockrag.pipeline import Answer, Pipeline, Retrieval
from blockrag.retrievers.base import Hit

DOCS = [
    Document("bank", "The Veloria Savings Bank was founded by Tobias Renn in 1784.", "Veloria Savings Bank"),
    Document("ferry", "The night ferry crosses the strait to Tarr in four hours."),
    Document("mine", "Copper has been mined in the Ashen Hills since 1840.", "Mining"),
]


Q3 = "Who founded the bank, which ferry crosses, where was copper mined?"  # bm25 matches all three


def _split(doc):
    return [Chunk(id=chunk_id(doc.id, 0, doc.full_text), doc_id=doc.id, position=0, text=doc.full_text,
                  metadata={"title": doc.title})]


@pytest.fixture()
def collection(tmp_path):
    col = Collection(tmp_path / "store", progress=False)
    col.build_index("bm25")
    col.add_documents(DOCS, chunks_for=_split)
    yield col
    col.close()


class Counting:
    """Wraps a retriever and counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls, self.name = inner, 0, getattr(inner, "name", "counted")

    def retrieve(self, query, k=10):
        self.calls += 1
        return self.inner.retrieve(query, k)

    def retrieve_batch(self, queries, k=10):
        self.calls += 1
        return self.inner.retrieve_batch(queries, k)


class ReverseReranker:
    name = "reverse"

    def __init__(self):
        self.calls = 0

    def rerank(self, query, chunks, k=None):
        self.calls += 1
        return [Hit(c.id, float(i)) for i, c in enumerate(chunks)][::-1][:k]


class _Stream:
    def __init__(self, pieces, result):
        self._it, self.result, self._final = iter(pieces), None, result

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self.result = self._final
            raise


class FakeGenerator:
    """Generator protocol: generate(question, chunks, mode, max_new_tokens, stream=True) -> pieces + .result."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def generate(self, question, chunks, mode="turbo", max_new_tokens=64, stream=False):
        from types import SimpleNamespace

        self.calls += 1
        self.seen.append([c.id for c in chunks])
        pieces = ["Tobias", " Renn", "."]
        result = SimpleNamespace(answer=" Tobias Renn. ", ttft_ms=1.5, decode_tokens_per_s=100.0,
                                 n_context_tokens=42, token_ids=[1, 2, 3])
        return _Stream(pieces, result) if stream else result


def test_ask_retrieves_reranks_generates_once(collection):
    gen, rr = FakeGenerator(), ReverseReranker()
    pipe = Pipeline(collection, "bm25", k=2, reranker=rr, rerank_depth=3, generator=gen)
    pipe.retriever = counted = Counting(pipe.retriever)
    pieces = []
    answer = pipe.ask(Q3, stream=pieces.append)
    assert (counted.calls, rr.calls, gen.calls) == (1, 1, 1)
    assert pieces == ["Tobias", " Renn", "."] and answer.text == "Tobias Renn."
    assert len(answer.hits) == 2 and gen.seen == [answer.cited_ids]
    # the reranker reversed the three bm25 candidates: the generator saw the reranked top 2
    plain = Pipeline(collection, "bm25", k=3).retrieve(Q3)
    assert answer.cited_ids == [p.chunk_id for p in plain.passages][::-1][:2]
    h = answer.hits[0]
    assert h.rank == 1 and h.doc_id in {d.id for d in DOCS} and isinstance(h.score, float)
    by_doc = {d.id: d.title or None for d in DOCS}
    assert all(x.title == by_doc[x.doc_id] for x in answer.hits)
    for key in ("retrieve_ms", "rerank_ms", "ttft_ms", "tokens_per_s", "generate_ms", "total_ms"):
        assert answer.timings[key] >= 0, key
    assert answer.timings["context_tokens"] == 42 and answer.timings["answer_tokens"] == 3
    d = answer.to_dict()
    assert d["answer"] == "Tobias Renn." and d["hits"][0]["chunk_id"] == h.chunk_id and d["reranker"] == "reverse"


def test_stream_yields_pieces_then_the_answer(collection):
    pipe = Pipeline(collection, "bm25", k=1, generator=FakeGenerator())
    items = list(pipe.stream("Who founded the savings bank?"))
    assert items[:-1] == ["Tobias", " Renn", "."]
    assert isinstance(items[-1], Answer) and items[-1].hits[0].doc_id == "bank"
    # already-retrieved passages are answered from, not retrieved again
    ret = pipe.retrieve("Who founded the savings bank?")
    pipe.retriever = counted = Counting(pipe.retriever)
    answer = pipe.ask("Who founded the savings bank?", retrieval=ret)
    assert counted.calls == 0 and answer.cited_ids == [p.chunk_id for p in ret.passages]
    assert answer.timings["total_ms"] >= ret.total_ms


def test_without_generator_and_without_hits(collection):
    pipe = Pipeline(collection, "bm25", k=2)
    answer = pipe.ask("copper hills")
    assert answer.text is None and answer.hits[0].doc_id == "mine" and "ttft_ms" not in answer.timings
    assert answer.chunks[0].doc_id == "mine" and answer.scores == [h.score for h in answer.hits]
    gen = FakeGenerator()
    nothing = Pipeline(collection, "bm25", k=2, generator=gen).ask("zzzz qqqq")
    assert nothing.hits == [] and nothing.text is None and gen.calls == 0


def test_retrieve_unpacks_like_before_and_batches(collection):
    pipe = Pipeline(collection, "bm25", k=2)
    ret = pipe.retrieve("night ferry")
    assert isinstance(ret, Retrieval)
    chunks, scores, ms = ret
    assert chunks[0].doc_id == "ferry" and scores == sorted(scores, reverse=True) and ms >= 0
    batch = pipe.retrieve_batch(["night ferry", "copper hills"])
    assert [hits[0].chunk_id for hits in batch] == [chunks[0].id, pipe.retrieve("copper hills").chunks[0].id]
    assert pipe.retrieve_batch([]) == []


def test_cli_query_generate_retrieves_once(collection, monkeypatch, capsys):
    import blockrag.pipeline as pipeline_mod
    from blockrag.cli import main

    calls = {"retrieve": 0, "rerank": 0}
    real = registry.retriever

    def counting_retriever(col, name, **opts):
        inner = real(col, name, **opts)

        class C(Counting):
            def retrieve(self, query, k=10):
                calls["retrieve"] += 1
                return self.inner.retrieve(query, k)
        return C(inner)

    class R(ReverseReranker):
        def rerank(self, query, chunks, k=None):
            calls["rerank"] += 1
            return super().rerank(query, chunks, k)

    gen = FakeGenerator()
    monkeypatch.setattr(registry, "retriever", counting_retriever)
    monkeypatch.setitem(registry._RERANKERS, "blockrank", registry.RerankerSpec("blockrank", R, llm=False))
    monkeypatch.setattr(pipeline_mod, "collection_generator", lambda col, name=None, **kw: gen)
    store = str(collection.store.folder)
    collection.close()
    assert main(["query", Q3, "--store", store, "--retriever", "bm25", "-k", "2",
                 "--rerank", "blockrank", "--generate"]) == 0
    out = capsys.readouterr().out
    assert calls == {"retrieve": 1, "rerank": 1} and gen.calls == 1
    assert "2 results in" in out and "(bm25 + blockrank)" in out and "Tobias Renn." in out
    assert "retrieve_ms=" in out and "rerank_ms=" in out and "ttft_ms=" in out


# ------------------------------------------------------------------------------- one LLM per process
def test_shared_generator_loads_once_across_threads(tmp_path, monkeypatch):
    import blockrag.models as models

    loads = []

    def slow_load(name, dtype=None, device=None):
        loads.append(name)
        time.sleep(0.2)
        return object(), object()

    monkeypatch.setattr(models, "load_generator", slow_load)
    monkeypatch.setattr(models, "_shared", {})
    monkeypatch.setattr(models, "_shared_locks", {})
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.shared_generator(str(tmp_path), device="cpu")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 8 and all(g is got[0] for g in got)
    other = tmp_path / "other"
    other.mkdir()
    assert models.shared_generator(str(other), device="cpu") is not got[0] and len(loads) == 2
    import torch

    assert models.shared_generator(str(tmp_path), dtype=torch.bfloat16, device="cpu") is not got[0]


def _smollm2():
    from blockrag.models import ModelNotAvailable, resolve_generator

    try:
        resolve_generator(None)
    except ModelNotAvailable as err:
        pytest.skip(str(err))


def test_reranker_kv_index_and_generator_share_one_model(tmp_path):
    """SmolLM2 (CPU): one pipeline's BlockRank reranker, KV index and generator hold the same model object,
    and so does a reranker or Generator built on its own in the same process."""
    _smollm2()
    from blockrag.attention_kv import Generator
    from blockrag.pipeline import collection_generator

    col = Collection(tmp_path / "store", chunk_tokens=64, overlap=8, progress=False)
    col.build_index("bm25")
    col.build_index("kv")
    col.add_documents(DOCS)
    pipe = Pipeline(col, "bm25", k=1, reranker="blockrank", rerank_depth=3, generator=collection_generator(col),
                    max_new_tokens=4)
    model = pipe.generator.model
    assert col.index("kv")._model is model
    assert pipe.reranker.model is model
    assert registry.reranker("pointwise").model is model          # not handed over: the shared loader
    assert Generator(cache_dir=tmp_path / "kv2").model is model
    answer = pipe.ask("Who founded the savings bank?")
    assert answer.text is not None and answer.timings["rerank_ms"] > 0 and answer.timings["ttft_ms"] > 0
    assert answer.hits[0].doc_id == "bank"
    col.close()

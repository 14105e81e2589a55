"""The one registry of names: retrievers (graph modes included), rerankers, index kinds; CLI, Collection,
Pipeline and eval all read it. Fast: bm25 and a graph index with the hashing embedder, no model."""
from __future__ import annotations

import pytest

from blockrag import registry
from blockrag.collection import Collection
from blockrag.documents import Document
from blockrag.pipeline import Pipeline

DOCS = [
    Document("acme", "Mara Velt founded Acme Works in Osmund. Acme Works builds ferries.", "Acme"),
    Document("osmund", "Osmund is a harbour city in Veloria. Its mayor is Ivo Brenn.", "Osmund"),
    Document("ferry", "The ferry from Osmund to Tarr leaves at dawn and is built by Acme Works."),
]


def _split(doc):
    from blockrag.documents import Chunk, chunk_id

    return [Chunk(id=chunk_id(doc.id, 0, doc.full_text), doc_id=doc.id, position=0, text=doc.full_text,
                  metadata={"title": doc.title})]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from blockrag.graph import RegexExtractor

    col = Collection(tmp_path_factory.mktemp("reg") / "store", progress=False)
    col.build_index("bm25")
    col.build_index("graph", extractor=RegexExtractor(), embedder="hash")
    col.add_documents(DOCS, chunks_for=_split)
    yield col
    col.close()


def test_names_and_one_line_refusals(collection):
    names = registry.retriever_names()
    for name in ("bm25", "dense", "hybrid", "score-fusion", "mrag", "graph", "local", "global", "graph-hybrid",
                 "mix", "naive", "path", "ppr"):
        assert name in names
    assert "graph-local" in registry.retriever_names(aliases=True)
    assert registry.reranker_names()[:2] == ["blockrank", "pointwise"]
    # the built-in kinds (a test module may register more, e.g. the reliability suite's in-place index)
    assert {"bm25", "dense", "mrag", "graph", "kv"} <= set(registry.index_kinds())
    with pytest.raises(registry.UnknownName) as err:
        registry.retriever(collection, "bm52")
    msg = str(err.value)
    assert "\n" not in msg and "'bm52'" in msg and "bm25" in msg and "ppr" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(registry.UnknownName, match="unknown reranker 'nope'; choose from blockrank, pointwise"):
        registry.reranker("nope")
    with pytest.raises(registry.UnknownName, match="unknown index kind"):
        registry.index_class("nope")
    with pytest.raises(registry.UnknownName, match="unknown graph mode"):
        registry.graph_mode_name("nope")


def test_graph_modes_match_the_graph_package():
    from blockrag.graph.query import MODES

    assert tuple(registry.GRAPH_MODES) == tuple(MODES)


def test_missing_index_is_one_line(collection):
    with pytest.raises(registry.MissingIndex) as err:
        registry.retriever(collection, "dense")
    assert "\n" not in str(err.value) and "needs a dense index" in str(err.value)
    assert "--index dense" in str(err.value)
    # hybrid needs bm25 and/or dense: bm25 alone is enough
    assert [h.chunk_id for h in registry.retriever(collection, "hybrid").retrieve("ferry dawn", 1)]
    with pytest.raises(registry.RegistryError, match="index 'kv' is not a retriever|unknown retriever 'kv'"):
        registry.retriever(collection, "kv")


def test_graph_modes_work_everywhere(collection):
    chunk_doc = collection.store.chunk_doc_ids()
    from blockrag.graph import GraphRetriever

    for mode in registry.GRAPH_MODES:
        name = registry.graph_mode_name(mode)
        for spelled in {name, f"graph-{mode}"}:
            r = registry.retriever(collection, spelled)
            assert isinstance(r, GraphRetriever) and r.mode == mode
            assert collection.retriever(spelled).mode == mode
        pipe = Pipeline(collection, name, k=2)  # the failure that started this: Pipeline(collection, "local")
        ret = pipe.retrieve("Who founded Acme Works?")
        assert all(p.chunk_id in chunk_doc for p in ret.passages)
    hits = Pipeline(collection, "local", k=3).retrieve("Who founded Acme Works?").passages
    assert hits and hits[0].doc_id in {"acme", "ferry"}
    # the graph index itself is a retriever (its default mode)
    assert registry.retriever(collection, "graph") is collection.index("graph")


def test_any_index_name_is_a_retriever(tmp_path):
    col = Collection(tmp_path / "s", progress=False)
    col.build_index("bm25", name="bm25-plus", variant="bm25+")
    col.add_documents(DOCS, chunks_for=_split)
    assert registry.retriever(col, "bm25-plus") is col.index("bm25-plus")
    with pytest.raises(registry.UnknownName, match="bm25-plus"):  # listed among the choices
        registry.retriever(col, "bm25-pluss")
    col.close()


def test_registered_reranker_is_usable_everywhere(collection, monkeypatch):
    from blockrag.cli import build_parser
    from blockrag.retrievers.base import Hit

    class Reverse:
        name = "reverse"

        def rerank(self, query, chunks, k=None):
            return [Hit(c.id, float(i)) for i, c in enumerate(chunks)][::-1][:k]

    monkeypatch.setitem(registry._RERANKERS, "reverse",
                        registry.RerankerSpec("reverse", Reverse, llm=False))
    assert "reverse" in registry.reranker_names()
    args = build_parser().parse_args(["query", "q", "--rerank", "reverse"])  # CLI choices read the registry
    assert args.rerank == "reverse"
    plain = Pipeline(collection, "bm25", k=3, rerank_depth=3).retrieve("Osmund harbour ferry")
    rr = Pipeline(collection, "bm25", k=3, reranker="reverse", rerank_depth=3).retrieve("Osmund harbour ferry")
    assert [p.chunk_id for p in rr.passages] == [p.chunk_id for p in plain.passages][::-1]
    assert rr.rerank_ms is not None and plain.rerank_ms is None


def test_cli_choices_come_from_the_registry():
    from blockrag.cli import build_parser

    parser = build_parser()
    sub = {a.dest: a for a in parser._subparsers._group_actions[0].choices["query"]._actions}
    assert list(sub["rerank"].choices) == registry.reranker_names()
    assert list(sub["mode"].choices) == list(registry.GRAPH_MODES)
    idx = {a.dest: a for a in parser._subparsers._group_actions[0].choices["index"]._actions}
    assert list(idx["index"].choices) == registry.index_kinds()

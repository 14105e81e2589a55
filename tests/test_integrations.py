"""LangChain and LlamaIndex adapters against the real libraries (langchain-core, llama-index-core)."""
from __future__ import annotations

import asyncio

import pytest

from serving import build_store

pytest.importorskip("langchain_core")

QUESTION = "Who founded the Veloria Savings Bank?"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    col = build_store(tmp_path_factory.mktemp("lc") / "store")
    yield col
    col.close()


def test_langchain_retriever_sync_async_and_metadata(collection):
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda

    from blockrag.integrations.langchain import BlockragRetriever, format_passages

    retriever = BlockragRetriever(collection=collection, retriever="bm25", k=2)
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke(QUESTION)
    top = docs[0]
    assert top.metadata["doc_id"] == "bank.md" and top.metadata["source"] == "bank.md"
    assert top.metadata["title"] == "Veloria Savings Bank" and top.metadata["rank"] == 1
    assert top.metadata["score"] > 0 and top.id == top.metadata["chunk_id"]
    assert "Tobias Renn" in top.page_content
    adocs = asyncio.run(retriever.ainvoke(QUESTION))
    assert [d.metadata["chunk_id"] for d in adocs] == [d.metadata["chunk_id"] for d in docs]
    # the failure the issue saw: `retriever | format_docs`
    text = (retriever | RunnableLambda(format_passages)).invoke(QUESTION)
    assert text.startswith("[1] Veloria Savings Bank\n")
    assert len(retriever.batch([QUESTION, "Grey Heron steam engine"])) == 2


def test_langchain_chain_answers_from_the_stored_caches(collection):
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.runnables import RunnablePassthrough

    from blockrag.integrations.langchain import BlockragRetriever, CachedGenerator, CachedPrompt

    retriever = BlockragRetriever(collection=collection, retriever="bm25", k=2)
    generator = CachedGenerator(collection, mode="turbo", max_new_tokens=4)
    chain = {"documents": retriever, "question": RunnablePassthrough()} | CachedPrompt() | generator
    answer = chain.invoke(QUESTION)
    # the same as the Generator over the same stored chunks (the chain found them by chunk_id)
    chunks = collection.get_chunks([d.metadata["chunk_id"] for d in retriever.invoke(QUESTION)])
    direct = generator.generator.generate(QUESTION, chunks, mode="turbo", max_new_tokens=4)
    assert answer == direct.answer.strip() and answer
    pieces = list(chain.stream(QUESTION))
    assert len(pieces) >= 2 and "".join(pieces).strip() == answer
    # the prompt is an ordinary prompt for any other LLM
    echo = FakeListLLM(responses=["fake answer"])
    prompt_chain = {"documents": retriever, "question": RunnablePassthrough()} | CachedPrompt()
    value = prompt_chain.invoke(QUESTION)
    assert "Tobias Renn" in value.to_string() and value.to_string().endswith(f"Question: {QUESTION}\nAnswer:")
    assert (prompt_chain | echo).invoke(QUESTION) == "fake answer"


def test_langchain_documents_keep_every_metadata_field():
    from langchain_core.documents import Document as LCDocument

    from blockrag.documents import Chunk, Document, from_langchain, to_langchain

    doc = Document(id="d1", text="hello", title="Greeting",
                   metadata={"source": "notes/d1.md", "year": 2020, "tags": ["a", "b"], "score": 0.5})
    lc = to_langchain(doc)
    assert {k: lc.metadata[k] for k in doc.metadata} == doc.metadata and lc.metadata["doc_id"] == "d1"
    assert from_langchain(lc) == doc
    chunk = Chunk(id="c1", doc_id="d1", position=3, text="piece", metadata={"title": "Greeting", "lang": "en"})
    m = to_langchain(chunk, score=1.25).metadata
    assert m == {"title": "Greeting", "lang": "en", "doc_id": "d1", "chunk_id": "c1", "position": 3,
                 "source": "d1", "score": 1.25}
    foreign = LCDocument(page_content="text", metadata={"source": "http://x", "page": 4, "score": 0.9, "title": "T"})
    back = from_langchain(foreign, default_id="f1")
    assert (back.id, back.title, back.metadata) == ("f1", "T", {"source": "http://x", "page": 4, "score": 0.9})
    again = to_langchain(back).metadata
    assert {k: again[k] for k in foreign.metadata} == foreign.metadata


def test_llamaindex_retriever(collection):
    pytest.importorskip("llama_index.core", reason="llama-index-core not installed (pip install blockrag[llamaindex])")
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore

    from blockrag.integrations.llamaindex import BlockragRetriever

    retriever = BlockragRetriever(collection, retriever="bm25", k=2)
    assert isinstance(retriever, BaseRetriever)
    hits = retriever.retrieve(QUESTION)
    assert isinstance(hits[0], NodeWithScore) and hits[0].score > 0
    meta = hits[0].node.metadata
    assert (meta["doc_id"], meta["title"], meta["source"], meta["rank"]) == ("bank.md", "Veloria Savings Bank",
                                                                              "bank.md", 1)
    assert hits[0].node.node_id == meta["chunk_id"] and "Tobias Renn" in hits[0].node.get_content()
    ahits = asyncio.run(retriever.aretrieve(QUESTION))
    assert [h.node.node_id for h in ahits] == [h.node.node_id for h in hits]


def test_examples_run(collection, capsys):
    from examples import langchain_qa, llamaindex_qa

    store = str(collection.store.folder)
    assert langchain_qa.main(["--store", store, "--retriever", "bm25", "-k", "1", "--max-new-tokens", "4",
                              QUESTION]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[0] and "[1] Veloria Savings Bank (bank.md, chunk" in out
    pytest.importorskip("llama_index.core")
    assert llamaindex_qa.main(["--store", store, "--retriever", "bm25", "-k", "1", QUESTION]) == 0
    assert "Veloria Savings Bank [bank.md]" in capsys.readouterr().out

from blockrag.collection import Collection
from blockrag.documents import Document
from blockrag.pipeline import Pipeline


def test_kv_index_follows_the_store_and_feeds_the_generator(tmp_path):
    c = Collection(tmp_path / "store", chunk_tokens=64, overlap=0, progress=False)
    c.build_index("bm25")
    kv = c.build_index("kv")
    c.add_documents([Document(id="a", text="The lighthouse of Merrowgate has a copper roof."),
                     Document(id="b", text="Kelp bread is the national dish of Veloria.")])
    assert len(kv.store) == 2
    c.delete_documents(["b"])
    assert len(kv.store) == 1
    assert c.store.manifest("kv")["tokenizer_hash"] == kv.store.manifest()["tokenizer_hash"]
    c.close()

    reopened = Collection(tmp_path / "store", progress=False)
    generator = reopened.index("kv").generator()
    pipe = Pipeline(reopened, "bm25", k=1, generator=generator, mode="turbo", max_new_tokens=4)
    pieces = []
    answer = pipe.ask("What roof does the lighthouse have?", stream=pieces.append)
    assert answer.cited_ids and answer.text is not None
    assert "".join(pieces).strip() == answer.text
    assert answer.timings["ttft_ms"] > 0 and answer.timings["context_tokens"] > 0


def test_on_demand_kv_index_encodes_when_a_question_needs_a_chunk(tmp_path, capsys):
    from blockrag.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The lighthouse of Merrowgate has a copper roof.")
    (docs / "b.txt").write_text("Kelp bread is the national dish of Veloria.")
    store = tmp_path / "store"
    assert main(["index", str(docs), "--store", str(store), "--index", "bm25", "--index", "kv",
                 "--kv-policy", "on-demand"]) == 0
    c = Collection(store, progress=False)
    kv = c.index("kv")
    assert kv.kv_policy == "on-demand" and len(kv.store) == 2  # chunks recorded ...
    assert kv.adapter == "default"  # the bundled block-attention adapter, as the demo and eval qa use
    chunks = c.get_chunks([h.chunk_id for h in c.retriever("bm25").retrieve("copper roof lighthouse", 2)])
    assert not any(ch in kv.store for ch in chunks)  # ... but nothing encoded at indexing time
    answer = Pipeline(c, "bm25", k=1, generator=kv.generator(), mode="turbo", max_new_tokens=3).ask(
        "What roof does the lighthouse have?")
    assert answer.text is not None and answer.cited_ids
    assert sum(ch in kv.store for ch in chunks) == 1  # the cited chunk's KV was computed on the miss

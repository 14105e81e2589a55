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

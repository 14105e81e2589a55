import pytest

from blockrag.collection import Collection
from blockrag.documents import Document
from blockrag.store import IndexMismatch

DOCS = [
    Document(id="cats", text="Cats purr when they are content and sleep most of the day."),
    Document(id="market", text="The stock market fell sharply after the central bank raised interest rates."),
    Document(id="volcano", text="The volcano erupted, covering the village in grey ash and lava."),
    Document(id="bread", text="Sourdough bread rises slowly because of wild yeast and lactic bacteria."),
]


@pytest.fixture()
def collection(tmp_path):
    c = Collection(tmp_path / "store", chunk_tokens=64, overlap=8, progress=False)
    c.build_index("bm25")
    c.build_index("dense")
    c.add_documents(DOCS)
    return c


def _top_doc(collection, name, query):
    hit = collection.retriever(name).retrieve(query, 1)[0]
    return collection.get_chunks([hit.chunk_id])[0].doc_id


def test_retrievers_find_the_right_document(collection):
    for name in ("bm25", "dense", "hybrid"):
        assert _top_doc(collection, name, "interest rates and stocks") == "market"
    assert _top_doc(collection, "dense", "kitten noises") == "cats"


def test_incremental_add_and_delete_keep_indexes_consistent(collection, tmp_path):
    collection.add_documents([Document(id="tea", text="Green tea is steeped at eighty degrees for two minutes.")])
    assert _top_doc(collection, "bm25", "steeped green tea") == "tea"
    collection.delete_documents(["market"])
    for name in ("bm25", "dense"):
        ids = {h.chunk_id for h in collection.retriever(name).retrieve("stock market interest rates", 10)}
        docs = {c.doc_id for c in collection.get_chunks(ids)}
        assert "market" not in docs
        if name == "dense":  # dense ranks every remaining chunk; bm25 returns term matches only
            assert docs == {"cats", "volcano", "bread", "tea"}
    # reopening reads the saved indexes: same results, nothing rebuilt
    collection.close()
    reopened = Collection(tmp_path / "store", progress=False)
    assert sorted(reopened.indexes) == ["bm25", "dense"]
    assert _top_doc(reopened, "dense", "steeped green tea") == "tea"
    assert reopened.store.count_documents() == 4


def test_replacing_a_document_replaces_its_chunks(collection):
    before = collection.store.count_chunks()
    report = collection.add_documents([Document(id="cats", text="Cats chase laser pointers with great focus.")])
    assert report.chunks_removed == 1 and report.chunks_added == 1
    assert collection.store.count_chunks() == before
    assert _top_doc(collection, "bm25", "laser pointers") == "cats"
    assert not collection.retriever("bm25").retrieve("purr content sleep", 5) or \
        _top_doc(collection, "bm25", "purr content sleep") != "cats"


def test_interrupted_ingest_leaves_previous_state(collection, monkeypatch, tmp_path):
    dense = collection.indexes["dense"]

    def boom(chunks):
        raise KeyboardInterrupt

    monkeypatch.setattr(dense, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        collection.add_documents([Document(id="new", text="Something entirely new about glaciers.")])
    collection.close()
    reopened = Collection(tmp_path / "store", progress=False)
    assert reopened.store.count_documents() == 4 and not reopened.store.has_document("new")
    assert _top_doc(reopened, "bm25", "volcano ash") == "volcano"


def test_failed_index_save_commits_nothing(collection, monkeypatch, tmp_path):
    # whole-folder indexes are saved inside the store's transaction: a failed save leaves the previous state
    # everywhere (rows, generation, every index), and the in-memory indexes are reloaded from their files
    dense = collection.indexes["dense"]
    generation = collection.generation
    monkeypatch.setattr(dense, "save", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        collection.add_documents([Document(id="glacier", text="Glaciers carve valleys over thousands of years.")])
    assert collection.generation == generation and not collection.store.has_document("glacier")
    assert "glacier" not in {c.doc_id for c in collection.get_chunks(
        [h.chunk_id for h in collection.retriever("bm25").retrieve("glaciers valleys", 10)])}
    collection.close()
    reopened = Collection(tmp_path / "store", progress=False)
    assert not reopened.store.has_document("glacier") and len(reopened.indexes["dense"]) == 4
    reopened.add_documents([Document(id="glacier", text="Glaciers carve valleys over thousands of years.")])
    assert _top_doc(reopened, "dense", "ice carving valleys") == "glacier"


def test_opening_with_another_embedding_model_fails_fast(collection):
    with pytest.raises(IndexMismatch, match="all-MiniLM-L6-v2.*other/model"):
        collection.index("dense", model="other/model")


def test_empty_store_returns_nothing(tmp_path):
    c = Collection(tmp_path / "empty", progress=False)
    c.build_index("bm25")
    c.build_index("dense")
    assert c.retriever("bm25").retrieve("anything", 5) == []
    assert c.retriever("dense").retrieve("anything", 5) == []
    assert c.retriever("hybrid").retrieve("anything", 5) == []

import pytest

from blockrag.documents import Chunk, Document
from blockrag.store import DocStore, IndexMismatch


def _doc(i, text):
    doc = Document(id=f"d{i}", text=text)
    return doc, [Chunk(id=f"d{i}-0", doc_id=doc.id, position=0, text=text, token_ids=[1, 2, i])]


def test_upsert_replace_delete(tmp_path):
    store = DocStore(tmp_path)
    added, removed = store.upsert([_doc(1, "one"), _doc(2, "two")])
    assert len(added) == 2 and removed == []
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # unchanged content is a no-op; changed content replaces the old chunks
    added, removed = store.upsert([_doc(1, "one")])
    assert added == [] and removed == []
    doc, _ = _doc(1, "uno")
    added, removed = store.upsert([(doc, [Chunk(id="d1-new", doc_id="d1", position=0, text="uno")])])
    assert removed == ["d1-0"] and [c.id for c in added] == ["d1-new"]
    assert store.get_chunks(["d2-0", "missing", "d1-new"])[0].token_ids == [1, 2, 2]
    assert store.delete(["d2"]) == ["d2-0"]
    assert store.count_documents() == 1 and store.count_chunks() == 1


def test_failed_transaction_keeps_previous_state(tmp_path):
    store = DocStore(tmp_path)
    store.upsert([_doc(1, "one")])
    bad_doc = Document(id="d9", text="nine")
    # a failure half-way through a batch (here: a broken chunk) rolls the whole batch back
    with pytest.raises(AttributeError):
        store.upsert([_doc(2, "two"), (bad_doc, [None])])
    assert store.document_ids() == ["d1"]


def test_manifest_mismatch_names_both_models(tmp_path):
    store = DocStore(tmp_path)
    store.record_index("dense", "dense", model="model-A", dimension=384)
    assert store.check_index("dense", model="model-A")["dimension"] == 384
    with pytest.raises(IndexMismatch, match="model-A.*model-B"):
        store.check_index("dense", model="model-B")
    # reopening sees the same manifest
    store.close()
    assert DocStore(tmp_path).manifest("dense")["model"] == "model-A"

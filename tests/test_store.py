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


def test_journal_nets_changes_per_chunk_and_knows_its_floor(tmp_path):
    from blockrag.store import DocStore

    s = DocStore(tmp_path / "j")
    with s.transaction():
        g1 = s.commit_generation(["a", "b"], [])
    with s.transaction():
        g2 = s.commit_generation(["c"], ["a"])
    with s.transaction():
        s.commit_generation(["a"], ["b"])
    assert (g1, g2, s.generation) == (1, 2, 3)
    assert s.changes_since(3) == ([], [])
    adds, dels = s.changes_since(0)
    assert sorted(adds) == ["a", "c"] and dels == ["b"]  # a: added, removed, added again -> added
    adds, dels = s.changes_since(1)
    assert sorted(adds) == ["a", "c"] and dels == ["b"]
    s.record_index("x", "bm25", params={"generation": 2})
    s.prune_journal()  # every index has applied generation 2: older rows go
    assert s.changes_since(1) is None  # no longer covered: the caller rebuilds
    assert s.changes_since(2) == (["a"], ["b"])
    with pytest.raises(RuntimeError):
        s.commit_generation(["z"], [])  # only inside a transaction (with the rows it describes)


def test_rows_and_generation_commit_together(tmp_path):
    from blockrag.documents import Chunk, Document
    from blockrag.store import DocStore

    s = DocStore(tmp_path / "t")
    with pytest.raises(KeyboardInterrupt):
        with s.transaction():
            s.replace_document(Document(id="d", text="x"), [Chunk(id="c", doc_id="d", position=0, text="x")])
            s.commit_generation(["c"], [])
            raise KeyboardInterrupt
    assert s.generation == 0 and s.count_documents() == 0 and s.changes_since(0) == ([], [])
    s.close()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.sqlite").write_bytes(b"\x80\x04not a database at all" * 10)
    from blockrag.fileformat import StoreFormatError

    with pytest.raises(StoreFormatError, match="not a blockrag store"):
        DocStore(tmp_path / "bad")

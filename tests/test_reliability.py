"""Crash windows, concurrent writers, readers that follow, locks, crafted stores, enforced manifests.

Writers are subprocesses (``python -m blockrag.eval.reliability worker``) killed with SIGKILL at named
commit points (the test-only ``BLOCKRAG_FAULT`` hook) or at random moments. CI size: bm25 + an in-place
index (the kv cache's save pattern, without a model); ``python -m blockrag.eval.reliability`` runs bigger.
"""
import json
import pickle
import random
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from blockrag.eval import reliability as R
from blockrag.lock import StoreBusy
from blockrag.store import IndexMismatch


# ------------------------------------------------------------------------------------ crash windows
def test_kill_at_every_commit_point_leaves_old_or_new_state_and_next_run_completes(tmp_path):
    rows = R.commit_point_trials(tmp_path)
    assert len(rows) == 15
    for row in rows:
        assert row["killed"], f"{row['op']} never reached {row['point']}"
        assert row["next_open"]["ok"], (row["point"], row["next_open"])
        assert row["next_run"]["ok"], (row["point"], row["next_run"])
        assert row["next_run"]["lost"] == [] and row["next_run"]["ghosts"] == []
        assert row["next_run"].get("unreferenced_folders", []) == []


def test_random_kill_during_ingest_and_delete(tmp_path):
    rng = random.Random(7)
    for t in range(3):
        res = R.random_kill_trial(tmp_path / f"k{t}", rng)
        assert res["killed_rc"] == -9
        assert res["ok"], res


def test_checker_sees_lost_ghost_and_stale_index(tmp_path):
    # the check used above must be able to fail: a document removed behind the indexes' back, and an index
    # missing a chunk, are both reported
    c = R.open_store(tmp_path / "s", create=True)
    c.add_documents(R.make_docs("a", 3), chunks_for=R.simple_chunks)
    expected = R.state_of({}, [("add", R.make_docs("a", 3))])
    assert R.check_store(tmp_path / "s", [expected])["ok"]
    assert R.check_store(tmp_path / "s", [R.state_of(expected, [("del", ["a-1"])])])["ghosts"] == ["a-1"]
    db = sqlite3.connect(tmp_path / "s" / "store.sqlite")
    db.execute("PRAGMA foreign_keys=ON")
    with db:
        db.execute("DELETE FROM documents WHERE id='a-0'")
    db.close()
    res = R.check_store(tmp_path / "s", [expected])
    assert not res["ok"] and res["lost"] == ["a-0"] and res["indexes"]["bm25"]["extra"] > 0


# ------------------------------------------------------------------------------- concurrent writers
@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writers_every_document_in_every_index(tmp_path, writers):
    for t in range(2):
        res = R.writer_trial(tmp_path / f"t{t}", writers, docs=5, batches=3)
        assert res["exit_codes"] == [0] * writers
        assert res["ok"], res
        assert res["documents"] == 5 * writers
        assert res["unreferenced_folders"] == []  # no superseded or half-written index folder left behind


def test_busy_store_fails_after_timeout_with_one_line(tmp_path):
    store = tmp_path / "s"
    R.open_store(store, create=True).close()
    holder = R.run_worker(store, "--op", "hold", "--seconds", "20", wait=False)
    try:
        assert holder.stdout.readline().strip() == "held"
        c = R.open_store(store, lock_timeout=0.3)
        t0 = time.perf_counter()
        with pytest.raises(StoreBusy) as err:
            c.add_documents(R.make_docs("x", 1), chunks_for=R.simple_chunks)
        assert 0.25 < time.perf_counter() - t0 < 5
        msg = str(err.value)
        assert f"process {holder.pid}" in msg and "\n" not in msg
        assert c.store.count_documents() == 0
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a dead holder's lock: the next write goes through at once
    c.add_documents(R.make_docs("x", 1), chunks_for=R.simple_chunks)
    assert c.store.count_documents() == 1


def test_reader_follows_other_processes_without_restart(tmp_path):
    store = tmp_path / "s"
    reader = R.open_store(store, create=True)
    reader.add_documents(R.make_docs("a", 2), chunks_for=R.simple_chunks)
    assert reader.refresh() is False  # nothing changed: no reload
    before = reader.indexes["bm25"]
    assert R.run_worker(store, "--op", "ingest", "--prefix", "b", "--n", "2").returncode == 0
    assert reader.refresh() is True
    assert reader.indexes["bm25"] is not before
    hits = reader.retriever("bm25").retrieve("keybx1v0", 5)
    assert {c.doc_id for c in reader.get_chunks([h.chunk_id for h in hits])} == {"b-1"}
    assert R.run_worker(store, "--op", "delete", "--ids", "b-1").returncode == 0
    assert reader.refresh() is True
    assert reader.retriever("bm25").retrieve("keybx1v0", 5) == []
    assert reader.refresh() is False
    # and a write from the reader's process after that keeps everything
    reader.add_documents(R.make_docs("c", 1), chunks_for=R.simple_chunks)
    assert R.check_store(store, [R.state_of({}, [("add", R.make_docs("a", 2) + R.make_docs("b", 1)
                                                          + R.make_docs("c", 1))])])["ok"]


def test_stale_in_memory_writer_loads_others_commits_first(tmp_path):
    # the bug seen: two long-lived writers, the last one's in-memory index won
    store = tmp_path / "s"
    one = R.open_store(store, create=True)
    two = R.open_store(store)
    one.add_documents(R.make_docs("a", 3), chunks_for=R.simple_chunks)
    assert R.run_worker(store, "--op", "ingest", "--prefix", "p", "--n", "3").returncode == 0
    two.add_documents(R.make_docs("b", 3), chunks_for=R.simple_chunks)
    one.delete_documents(["b-0"])
    want = R.state_of({}, [("add", R.make_docs("a", 3) + R.make_docs("p", 3) + R.make_docs("b", 3)),
                           ("del", ["b-0"])])
    assert R.check_store(store, [want])["ok"]


# ------------------------------------------------------------------------------ nothing executable
class _Payload:
    """Unpickling this creates the marker file: proof that something in a store ran."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payloads(marker: Path) -> dict:
    _Payload.marker = marker
    raw = pickle.dumps(_Payload())
    npz = Path(marker).with_suffix(".npz")
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload()
    np.savez(npz, ids=arr, terms=arr, doc_ptr=arr, post_term=arr, post_tf=arr, doc_len=arr, indptr=arr,
             indices=arr, data=arr)
    return {"pickle": raw, "npz": npz.read_bytes()}


def _crafted_store(tmp_path) -> Path:
    from blockrag.documents import Document
    from blockrag.graph.extract import RegexExtractor

    store = tmp_path / "store"
    c = R.open_store(store, ("bm25",), create=True)
    c.build_index("dense")
    c.build_index("graph", embedder="hash", extractor=RegexExtractor())
    c.build_index("inplace")
    c.add_documents([Document(id="d1", text="Mara Velt founded Quill Works in Osmund in 1901."),
                     Document(id="d2", text="Quill Works makes fountain pens and ink in Osmund.")],
                    chunks_for=R.simple_chunks)
    c.close()
    db = sqlite3.connect(store / "store.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return store


def _cli(args, capsys):
    from blockrag.cli import main

    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_crafted_store_executes_nothing(tmp_path, capsys):
    store = _crafted_store(tmp_path)
    marker = tmp_path / "PWNED"
    payloads = _payloads(marker)
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "n.txt").write_text("Another note about Osmund.")
    ops = [["info", "--store", str(store)],
           ["query", "Quill Works", "--store", str(store), "--retriever", "bm25"],
           ["query", "Quill Works", "--store", str(store)],
           ["query", "Quill Works", "--store", str(store), "--mode", "local"],
           ["delete", "d1", "--store", str(store)],
           ["index", str(folder), "--store", str(store), "--index", "bm25"]]
    files = sorted(p for p in store.rglob("*") if p.is_file())
    assert any(p.name == "graph_data.json" for p in files) and any(p.suffix == ".faiss" for p in files)
    assert any(p.name == "bm25.npz" for p in files) and any(p.name == "store.sqlite" for p in files)
    pristine = tmp_path / "pristine"
    shutil.copytree(store, pristine)
    exits = set()
    for target in files + [None]:  # each file alone, then every file at once
        for kind, payload in payloads.items():
            if kind == "npz" and target is not None and target.suffix != ".npz":
                continue
            shutil.rmtree(store)
            shutil.copytree(pristine, store)
            for f in ([target] if target is not None else files):
                f.write_bytes(payload if f.suffix == ".npz" or kind == "pickle" else payloads["pickle"])
            # every operation on the all-at-once store and on the database; on one index's file, info and a
            # query that opens that index
            if target is None or target.name == "store.sqlite":
                chosen = ops
            else:
                chosen = [ops[0], ops[3] if "graph@" in str(target) else ops[2]]
            for op in chosen:
                code, err = _cli(op, capsys)
                exits.add(code)
                assert not marker.exists(), f"{target}: {op[0]} executed a payload"
                assert "Traceback" not in err, (target, op, err)
                errors = [line for line in err.splitlines() if line.startswith("error")]
                assert code in (0, 1, 2) and len(errors) == (code != 0), (target, op, code, err)
                assert code != 1, (target, op, err)  # never an internal error: a refusal naming the file
    assert 2 in exits
    # a pickle left under the old graph file name is never read
    shutil.rmtree(store)
    shutil.copytree(pristine, store)
    graph_dir = next(p for p in (store / "indexes").iterdir() if p.name.startswith("graph@"))
    (graph_dir / "blockrag.graph.pkl").write_bytes(payloads["pickle"])
    code, _ = _cli(["query", "Quill Works", "--store", str(store), "--mode", "local"], capsys)
    assert code == 0 and not marker.exists()


def test_graph_store_json_round_trip_is_exact(tmp_path):
    from blockrag.graph.extract import Entity, Relation
    from blockrag.graph.store import GraphStore

    g = GraphStore()
    rng = random.Random(3)
    names = [f"Entity {i}" for i in range(12)]
    for c in range(30):
        ents = [Entity(n, rng.choice(["PERSON", "ORG", ""]), f"desc {c}", rng.random() * 3)
                for n in rng.sample(names, 4)]
        rels = [Relation(a.name, b.name, ["kw", f"k{c}"], f"rel {c}", rng.random())
                for a, b in zip(ents, ents[1:])]
        g.add_chunk(f"c{c}", f"d{c % 7}", ents, rels)
    g.remove_chunk("c3")
    g.save(tmp_path / "g.json")
    h = GraphStore.load(tmp_path / "g.json")
    assert list(h.g.nodes(data=True)) == list(g.g.nodes(data=True))
    assert list(h.g.edges(data=True)) == list(g.g.edges(data=True))
    assert all(list(h.g.adj[n]) == list(g.g.adj[n]) for n in g.g)
    assert (h.chunk_entities, h.chunk_edges, h.chunk_doc, h.doc_chunks) == \
        (g.chunk_entities, g.chunk_edges, g.chunk_doc, g.doc_chunks)
    (tmp_path / "bad.json").write_bytes(pickle.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="not a blockrag graph file"):
        GraphStore.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "blockrag-graph", "format_version": 9}))
    with pytest.raises(ValueError, match="format 9"):
        GraphStore.load(tmp_path / "other.json")


# ------------------------------------------------------------------------------- enforced manifests
@pytest.mark.slow
def test_dense_index_refuses_other_weights_and_other_dimension(tmp_path):
    from blockrag.documents import Document
    from blockrag.models import resolve_embedder
    from blockrag.retrievers.dense import DenseRetriever
    from blockrag.retrievers.vector_index import VectorIndex

    model = tmp_path / "minilm"
    shutil.copytree(resolve_embedder(), model)
    store = tmp_path / "s"
    c = R.open_store(store, ("bm25",), create=True)
    c.build_index("dense", model_name=str(model))
    c.add_documents([Document(id="a", text="Cats purr when they are content.")], chunks_for=R.simple_chunks)
    c.close()
    # 1. the same path, weights rewritten in place (same sizes): the recorded revision no longer matches
    weights = next(model.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:header + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    c = R.open_store(store)
    with pytest.raises(IndexMismatch, match="revision") as err:
        c.retriever("dense").retrieve("cats", 1)
    assert "\n" not in str(err.value)
    with pytest.raises(IndexMismatch):
        c.add_documents([Document(id="b", text="Dogs bark.")], chunks_for=R.simple_chunks)
    assert c.store.count_documents() == 1
    # 2. an index pointed at another model folder of the same dimension: refused, naming both
    other = tmp_path / "other"
    shutil.copytree(resolve_embedder(), other)
    folder = store / "indexes" / c.store.manifest("dense")["params"]["folder"]
    meta = json.loads((folder / "dense.json").read_text())
    (folder / "dense.json").write_text(json.dumps({**meta, "model": str(other)}))
    c = R.open_store(store)
    with pytest.raises(IndexMismatch, match="model") as err:
        c.index("dense")
    assert str(model) in str(err.value) and str(other) in str(err.value)
    # rebuilding the index with the model that is there now makes the store usable again
    c.build_index("dense", model_name=str(other))
    assert c.retriever("dense").retrieve("cats purring", 1)
    # 3. another dimension never reaches faiss' AssertionError
    d = DenseRetriever(model_name=str(other), show_progress=False)
    d.index = VectorIndex(8)
    d.index.add(["x"], np.ones((1, 8), np.float32))
    with pytest.raises(IndexMismatch, match="8-dimensional"):
        d.retrieve("anything", 1)


def test_index_asked_for_another_model_is_refused(tmp_path):
    c = R.open_store(tmp_path / "s", create=True)
    c.store.record_index("kv", "kv", model="HuggingFaceTB/SmolLM2-135M-Instruct", params={"generation": 0})
    c.indexes["kv"] = object()
    with pytest.raises(IndexMismatch, match="SmolLM2.*other/model"):
        c.index("kv", model="other/model")
    assert c.index("kv", model="HuggingFaceTB/SmolLM2-135M-Instruct") is c.indexes["kv"]


def test_index_files_changed_behind_the_manifest_are_refused(tmp_path):
    c = R.open_store(tmp_path / "s", create=True)
    c.add_documents(R.make_docs("a", 2), chunks_for=R.simple_chunks)
    folder = tmp_path / "s" / "indexes" / c.store.manifest("bm25")["params"]["folder"]
    meta = json.loads((folder / "bm25.json").read_text())
    meta["manifest"]["params"]["tokenizer"]["stemmer"] = None  # another analyser: another tokenizer hash
    (folder / "bm25.json").write_text(json.dumps(meta))
    c2 = R.open_store(tmp_path / "s")
    with pytest.raises(IndexMismatch, match="tokenizer_hash"):
        c2.retriever("bm25").retrieve("x", 1)
    with pytest.raises(IndexMismatch, match="tokenizer_hash"):
        c2.retriever("hybrid").retrieve("x", 1)  # never a silent fall-back to the other indexes


@pytest.mark.slow
def test_kv_cache_files_go_only_after_the_commit(tmp_path, monkeypatch):
    # the kv cache is saved in place: the files of deleted chunks may only go once the delete is committed,
    # and a kill between that commit and the kv save is repaired (journal replay) on the next open
    from blockrag.attention_kv.index import KVIndex
    from blockrag.collection import Collection
    from blockrag.documents import Document

    c = Collection(tmp_path / "s", chunk_tokens=64, overlap=0, progress=False)
    c.build_index("bm25")
    c.build_index("kv")
    c.add_documents([Document(id="a", text="The lighthouse of Merrowgate has a copper roof."),
                     Document(id="b", text="Kelp bread is the national dish of Veloria.")])
    folder = tmp_path / "s" / "indexes" / "kv" / "cache" / "chunks"
    assert len(list(folder.glob("*.safetensors"))) == 2

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(c.store, "commit_generation", boom)  # fails before the commit
    with pytest.raises(KeyboardInterrupt):
        c.delete_documents(["b"])
    monkeypatch.undo()
    assert c.store.has_document("b") and len(list(folder.glob("*.safetensors"))) == 2
    monkeypatch.setattr(KVIndex, "save", boom)  # dies after the commit, before the kv index is saved
    with pytest.raises(KeyboardInterrupt):
        c.delete_documents(["b"])
    monkeypatch.undo()
    assert not c.store.has_document("b") and len(list(folder.glob("*.safetensors"))) == 2
    c.close()
    reopened = Collection(tmp_path / "s", progress=False)  # lag detected, journal replayed, file removed
    assert len(list(folder.glob("*.safetensors"))) == 1
    assert reopened.store.manifest("kv")["params"]["generation"] == reopened.generation
    assert set(reopened.indexes["kv"].store._index) == set(reopened.store.chunk_ids())

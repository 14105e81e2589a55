"""Evaluation: BEIR / MS MARCO loaders (errors name file:line), metrics on hand-computed examples,
evaluate_retriever, run_beir and its report."""
from __future__ import annotations

import json
import math

import pytest

from blockrag.eval.beir import beir_chunks, load_beir, load_qrels, load_queries
from blockrag.eval.evaluate import evaluate_retriever, format_table, run_beir
from blockrag.eval.metrics import evaluate_run, hits_to_doc_scores, hits_to_run
from blockrag.eval.msmarco import load_collection, load_msmarco
from blockrag.eval.msmarco import load_qrels as load_msmarco_qrels
from blockrag.eval.msmarco import load_queries as load_msmarco_queries
from blockrag.documents import Chunk, LoadError
from blockrag.retrievers.base import Hit
from blockrag.retrievers.bm25 import BM25Retriever

CORPUS = [
    {"_id": "d1", "title": "Foxes", "text": "The quick brown fox jumps over the lazy dog."},
    {"_id": "d2", "title": "Cats", "text": "Cats sleep most of the day."},
    {"_id": "d3", "title": "", "text": "Proteins fold into three dimensional structures."},
    {"_id": "d4", "title": "Qubits", "text": "Quantum computers use qubits in superposition."},
    {"_id": "d5", "title": "Empty", "text": ""},
    {"_id": "d6", "title": "", "text": "   "},
]
QUERIES = [
    {"_id": "q1", "text": "quick fox"},
    {"_id": "q2", "text": "sleeping cats"},
    {"_id": "q3", "text": "protein folding"},
    {"_id": "q4", "text": "quantum qubits"},
    {"_id": "q9", "text": "not judged"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t2\nq4\td4\t1\nq4\td1\t0\n"


def write_beir(root, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / f"{split}.tsv").write_text(qrels)
    return root


# ------------------------------------------------------------------------------------------ BEIR
def test_load_beir(tmp_path):
    data = load_beir(write_beir(tmp_path / "ds"), "test")
    assert [d.id for d in data.corpus] == ["d1", "d2", "d3", "d4"]  # empty-text d5, d6 skipped
    assert data.report.skipped_empty == 2
    assert data.corpus[0].full_text == "Foxes\nThe quick brown fox jumps over the lazy dog."
    assert data.queries == {"q1": "quick fox", "q2": "sleeping cats", "q3": "protein folding",
                            "q4": "quantum qubits"}  # unjudged q9 left out
    assert data.qrels["q3"] == {"d3": 2} and data.qrels["q4"] == {"d4": 1, "d1": 0}
    chunks = beir_chunks(data.corpus)
    assert chunks[0] == Chunk(id="d1", doc_id="d1", position=0, text=data.corpus[0].full_text)


def test_beir_errors_name_file_and_line(tmp_path):
    root = write_beir(tmp_path / "ds")
    with open(root / "corpus.jsonl", "a") as fh:
        fh.write('{"_id": "d7", "text": "ok"}\n{"_id": "d8", "text": \n')
    with pytest.raises(LoadError, match=r"corpus\.jsonl:8: malformed JSON"):
        load_beir(root)

    root = write_beir(tmp_path / "ds2", queries=QUERIES + [{"text": "no id"}])
    with pytest.raises(LoadError, match=r"queries\.jsonl:6: missing '_id'"):
        load_queries(root / "queries.jsonl")
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": 3}\n')
    with pytest.raises(LoadError, match=r"queries\.jsonl:1: .*'text'"):
        load_queries(root / "queries.jsonl")

    bad = tmp_path / "bad.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2 d2 1\n")
    with pytest.raises(LoadError, match=r"bad\.tsv:3: expected 3 tab-separated fields"):
        load_qrels(bad)
    bad.write_text("q1\td1\t1\nq2\td2\thigh\n")
    with pytest.raises(LoadError, match=r"bad\.tsv:2: relevance 'high' is not a number"):
        load_qrels(bad)
    bad.write_bytes(b"q1\td1\t1\nq\xff\td2\t1\n")
    with pytest.raises(LoadError, match=r"bad\.tsv:2: not UTF-8"):
        load_qrels(bad)

    with pytest.raises(FileNotFoundError, match="available splits: test"):
        load_beir(write_beir(tmp_path / "ds3"), "dev")
    with pytest.raises(FileNotFoundError):
        load_beir(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ MS MARCO
def test_msmarco_loaders(tmp_path):
    (tmp_path / "collection.tsv").write_text("0\tThe quick brown fox.\n1\tCats sleep.\n2\t \n\n3\tQubits!\n")
    (tmp_path / "queries.dev.tsv").write_text("100\tquick fox\n101\tcats\n102\tunjudged\n")
    (tmp_path / "qrels.dev.tsv").write_text("100\t0\t0\t1\n101 0 1 1\n")
    docs = load_collection(tmp_path / "collection.tsv")
    assert [(d.id, d.text) for d in docs] == [("0", "The quick brown fox."), ("1", "Cats sleep."), ("3", "Qubits!")]
    corpus, queries, qrels = load_msmarco(tmp_path, "dev")
    assert len(corpus) == 3 and queries == {"100": "quick fox", "101": "cats"}
    assert qrels == {"100": {"0": 1}, "101": {"1": 1}}

    tsv = tmp_path / "q.tsv"
    tsv.write_text("qid\tpid\trel\n7\t3\t2\n8\t4\n")  # header, 3 fields, 2 fields
    assert load_msmarco_qrels(tsv) == {"7": {"3": 2}, "8": {"4": 1}}


def test_msmarco_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "collection.tsv"
    bad.write_text("0\tfine\n1 no tab here\n")
    with pytest.raises(LoadError, match=r"collection\.tsv:2: expected 'pid<TAB>text'"):
        load_collection(bad)
    q = tmp_path / "queries.tsv"
    q.write_text("1\tok\n\tno id\n")
    with pytest.raises(LoadError, match=r"queries\.tsv:2"):
        load_msmarco_queries(q)
    r = tmp_path / "qrels.txt"
    r.write_text("1 0 5 1\n2 0 6 1 extra\n")
    with pytest.raises(LoadError, match=r"qrels\.txt:2: expected 'qid 0 pid rel'"):
        load_msmarco_qrels(r)
    r.write_text("1 0 5 1\n2 0 6 yes\n")
    with pytest.raises(LoadError, match=r"qrels\.txt:2: relevance 'yes'"):
        load_msmarco_qrels(r)
    with pytest.raises(FileNotFoundError):
        load_msmarco(tmp_path / "none")


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_hand_computed():
    qrels = {"q1": {"a": 1, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"d": 1}, "q4": {"e": 0}}
    run = {"q1": {"a": 3.0, "x": 2.0, "b": 1.0}, "q2": {"y": 1.0, "c": 0.5}, "q9": {"a": 1.0}}
    # q1: relevant at ranks 1 and 3; q2: at rank 2; q3: not retrieved; q4 has no relevant doc (dropped)
    ndcg_q1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_q2 = 1 / math.log2(3)
    got = evaluate_run(run, qrels, ["ndcg@10", "recall@100", "mrr@10", "map@100", "ndcg@1", "recall@2"])
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    assert got["recall@100"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["map@100"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5 + 0) / 3)
    assert got["ndcg@1"] == pytest.approx(1 / 3)
    assert got["recall@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    per_q = evaluate_run(run, qrels, ["mrr@10"], per_query=True)["mrr@10"]
    assert per_q == pytest.approx({"q1": 1.0, "q2": 0.5, "q3": 0.0})
    # graded relevance: linear gain (trec_eval / pytrec_eval convention)
    graded = evaluate_run({"q": {"a": 2.0, "b": 1.0}}, {"q": {"a": 1, "b": 2}}, ["ndcg@2"])["ndcg@2"]
    assert graded == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert evaluate_run({}, qrels, ["ndcg@10"]) == {"ndcg@10": 0.0}
    assert evaluate_run({"q1": {"q1": 9.0, "a": 1.0}}, {"q1": {"a": 1}}, ["mrr@10"],
                        ignore_identical_ids=True)["mrr@10"] == 1.0
    with pytest.raises(ValueError, match="no query with a relevant"):
        evaluate_run(run, {"q": {"a": 0}})


def test_hits_to_doc_scores_keeps_best_chunk():
    hits = [Hit("c1", 0.9), Hit("c2", 0.8), Hit("c3", 0.95), Hit("c4", 0.1), Hit("ghost", 5.0)]
    mapping = {"c1": "A", "c2": "B", "c3": "A", "c4": "B"}
    assert hits_to_doc_scores(hits, mapping) == {"A": 0.95, "B": 0.8}
    assert hits_to_doc_scores(hits[:2]) == {"c1": 0.9, "c2": 0.8}
    assert hits_to_run({"q": hits}, mapping) == {"q": {"A": 0.95, "B": 0.8}}


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_retriever_with_chunk_mapping():
    docs = {"A": ["the quick brown fox", "jumps over dogs"], "B": ["cats sleep all day", "sleepy cats purr"],
            "C": ["protein folding", "structure biology"]}
    chunks = [Chunk(id=f"{d}{i}", doc_id=d, position=i, text=t) for d, ts in docs.items() for i, t in enumerate(ts)]
    r = BM25Retriever().build(chunks)
    queries = {"q1": "fox dogs", "q2": "sleepy cats", "q3": "protein", "qx": "unjudged"}
    qrels = {"q1": {"A": 1}, "q2": {"B": 1}, "q3": {"C": 1}}
    scores = evaluate_retriever(r, queries, qrels, {c.id: c.doc_id for c in chunks}, k=10)
    assert scores == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0, "map@100": 1.0}


def test_run_beir_bm25_report_and_table(tmp_path):
    root = write_beir(tmp_path / "ds")
    report = tmp_path / "out" / "report.json"
    results = run_beir(root, "test", "bm25", report_path=report)
    assert set(results) == {"bm25"}
    row = results["bm25"]
    assert row["ndcg@10"] == pytest.approx(1.0) and row["recall@100"] == 1.0
    assert row["index_s"] >= 0 and row["queries_per_s"] > 0
    saved = json.loads(report.read_text())
    assert saved["results"] == results and saved["n_queries"] == 4 and saved["n_documents"] == 4
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| retriever | ndcg@10 | recall@100 | mrr@10 | map@100 |")
    assert lines[2].startswith("| bm25 | 1.0000 |") and len(lines) == 3
    assert run_beir(root, "test", "bm25", max_queries=2, bm25_params={"variant": "bm25+"})["bm25"]["ndcg@10"] == 1.0
    with pytest.raises(ValueError, match="unknown retriever kind"):
        run_beir(root, "test", "nope")


def test_run_beir_with_store_reuses_it(tmp_path):
    pytest.importorskip("blockrag.collection")
    root = write_beir(tmp_path / "ds")
    store = tmp_path / "store"
    first = run_beir(root, "test", "bm25", store_dir=store)
    assert first["bm25"]["ndcg@10"] == pytest.approx(1.0) and "index_s" in first["bm25"]
    second = run_beir(root, "test", "bm25", store_dir=store)
    assert second["bm25"]["ndcg@10"] == first["bm25"]["ndcg@10"]
    assert "index_s" not in second["bm25"]  # index reused, not rebuilt
    # index folders are versioned (bm25@<generation>-<id>): exactly one live version is kept
    assert len(list((store / "indexes").glob("bm25*/bm25.json"))) == 1

"""eval beir --rerank: a reranked row beside each first-stage row (top depth reordered, first-stage order below)."""
import json

import pytest

from blockrag import registry
from blockrag.eval.evaluate import run_beir
from blockrag.retrievers.base import Hit

# every query's words hit a decoy document harder than the relevant one, so BM25 ranks the relevant second
CORPUS = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate([
    "apple orchard harvest apple apple", "orchard notes: the apple harvest was late",
    "river boat crossing river river", "boat builders on the river crossing",
    "mountain snow peak mountain mountain", "the mountain peak holds snow in june",
    "unrelated filler text about nothing", "more filler with other words entirely"])]
QUERIES = [{"_id": "q1", "text": "apple orchard harvest"}, {"_id": "q2", "text": "river boat crossing"},
           {"_id": "q3", "text": "mountain snow peak"}]
RELEVANT = {"q1": "d1", "q2": "d3", "q3": "d5"}


class Oracle:
    """Puts the judged document first: reranked nDCG@10 must then be 1 wherever it is among the candidates."""

    name = "oracle"

    def rerank(self, query, chunks, k=None):
        rel = {QUERIES[i]["text"]: RELEVANT[QUERIES[i]["_id"]] for i in range(len(QUERIES))}[query]
        hits = [Hit(c.id, 1.0 if c.id == rel else 0.0) for c in chunks]
        hits.sort(key=lambda h: -h.score)
        return hits[:k] if k else hits


class Reverse:
    name = "reverse"

    def rerank(self, query, chunks, k=None):
        hits = [Hit(c.id, float(i)) for i, c in enumerate(chunks)]
        return list(reversed(hits))[:k] if k else list(reversed(hits))


@pytest.fixture
def beir_dir(tmp_path):
    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    (root / "qrels" / "test.tsv").write_text("".join(f"{q}\t{d}\t1\n" for q, d in RELEVANT.items()))
    registry.register_reranker("oracle-test", Oracle, llm=False)
    registry.register_reranker("reverse-test", Reverse, llm=False)
    yield root
    registry._RERANKERS.pop("oracle-test")
    registry._RERANKERS.pop("reverse-test")


def test_reranked_rows_beside_the_first_stage(beir_dir, tmp_path):
    report = tmp_path / "r.json"
    res = run_beir(beir_dir, "test", "bm25", k=8, rerank=["oracle-test", "reverse-test"], rerank_depth=2,
                   metrics=("ndcg@10", "mrr@10", "recall@8"), report_path=report)
    assert list(res) == ["bm25", "bm25+oracle-test@2", "bm25+reverse-test@2"]
    assert res["bm25"]["mrr@10"] < 1.0  # the decoys win the first stage
    assert res["bm25+oracle-test@2"]["ndcg@10"] == pytest.approx(1.0)
    # reversing the top 2 of a list whose relevant document is 2nd puts it first; the rest keeps its order,
    # so recall at the full depth is the first stage's
    assert res["bm25+reverse-test@2"]["mrr@10"] == pytest.approx(1.0)
    assert res["bm25+reverse-test@2"]["recall@8"] == res["bm25"]["recall@8"]
    rep = json.loads(report.read_text())
    assert rep["rerank"] == ["oracle-test", "reverse-test"] and rep["rerank_depth"] == 2


def test_only_the_asked_retriever_is_reranked(beir_dir):
    res = run_beir(beir_dir, "test", "hybrid", k=8, rerank="oracle-test", rerank_depth=3, metrics=("ndcg@10",))
    assert list(res) == ["bm25", "dense", "hybrid", "hybrid+oracle-test@3"]


def test_rerank_depth_one_changes_nothing(beir_dir):
    res = run_beir(beir_dir, "test", "bm25", k=8, rerank="reverse-test", rerank_depth=1, metrics=("ndcg@10",))
    assert res["bm25+reverse-test@1"]["ndcg@10"] == pytest.approx(res["bm25"]["ndcg@10"])


def test_cli_refuses_an_unknown_reranker(beir_dir, capsys):
    from blockrag.cli import main

    assert main(["eval", "beir", "--data", str(beir_dir), "--rerank", "nope"]) == 2
    assert "unknown reranker 'nope'" in capsys.readouterr().err

"""IR metrics (nDCG@k, Recall@k, MRR@k, MAP@k, P@k) through ranx, on BEIR-style runs.

A run is ``{qid: {doc_id: score}}``, qrels ``{qid: {doc_id: relevance}}``. Queries judged in the qrels
but missing from the run score 0; run queries without judgments are ignored; queries whose
judgments are all non-positive are dropped (they have no relevant document to find).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping, Sequence

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")


def hits_to_doc_scores(hits: Iterable, chunk_to_doc: Mapping[str, str] | None = None) -> dict[str, float]:
    """Chunk hits -> ``{doc_id: score}``, keeping each document's best chunk score.

    ``chunk_to_doc=None`` means chunk id == document id. Chunks missing from the mapping are skipped.
    """
    out: dict[str, float] = {}
    for h in hits:
        doc = h.chunk_id if chunk_to_doc is None else chunk_to_doc.get(h.chunk_id)
        if doc is None:
            continue
        s = float(h.score)
        if doc not in out or s > out[doc]:
            out[doc] = s
    return out


def hits_to_run(results: Mapping[str, Sequence], chunk_to_doc: Mapping[str, str] | None = None
                ) -> dict[str, dict[str, float]]:
    """``{qid: [Hit, ...]}`` -> BEIR-style run at document level."""
    return {qid: hits_to_doc_scores(hits, chunk_to_doc) for qid, hits in results.items()}


def evaluate_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                 metrics: Sequence[str] = DEFAULT_METRICS, ignore_identical_ids: bool = False,
                 per_query: bool = False) -> dict:
    """Mean of each metric over the judged queries (ranx). ``metrics`` use ranx names: ``ndcg@10``,
    ``recall@100``, ``mrr@10``, ``map@100``, ``precision@10``...

    ``ignore_identical_ids`` drops a retrieved document whose id equals the query id (BEIR's option,
    for datasets such as ArguAna or Quora). ``per_query=True`` returns ``{metric: {qid: value}}``.
    """
    from ranx import Qrels, Run, evaluate

    metrics = list(metrics)
    judged = {q: {d: int(r) for d, r in rels.items()} for q, rels in qrels.items()
              if any(int(r) > 0 for r in rels.values())}
    if not judged:
        raise ValueError("qrels contain no query with a relevant (relevance > 0) document")
    clean_run = {}
    for q, docs in run.items():
        if q not in judged:
            continue
        docs = {d: float(s) for d, s in docs.items() if not (ignore_identical_ids and d == q)}
        if docs:
            clean_run[q] = docs
    qids = sorted(judged)
    if not clean_run:  # ranx cannot build an empty run: every query scores 0
        zero = {m: 0.0 for m in metrics}
        return {m: {q: 0.0 for q in qids} for m in metrics} if per_query else zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba type-safety chatter from ranx
        ranx_qrels, ranx_run = Qrels(judged), Run(clean_run)
        scores = evaluate(ranx_qrels, ranx_run, metrics, make_comparable=True, return_mean=not per_query)
    if isinstance(scores, (int, float)) or not isinstance(scores, dict):  # a single metric
        scores = {metrics[0]: scores}
    if per_query:
        order = list(ranx_run.keys())  # make_comparable aligned the run with the qrels in place
        if len(order) != len(scores[metrics[0]]):
            order = qids
        return {m: {q: float(v) for q, v in zip(order, scores[m])} for m in metrics}
    return {m: float(scores[m]) for m in metrics}

"""Evaluate retrievers on BEIR-format datasets: ``evaluate_retriever``, ``run_beir``, ``format_table``."""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Mapping, Sequence

from .beir import beir_chunks, load_beir
from .metrics import DEFAULT_METRICS, evaluate_run, hits_to_run

log = logging.getLogger(__name__)

RETRIEVER_KINDS = ("bm25", "dense", "hybrid", "score-fusion")


def retrieve_run(retriever, queries: Mapping[str, str], k: int = 100, batch_size: int = 256,
                 chunk_to_doc: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Run ``retriever`` over ``queries`` (batched) -> BEIR-style ``{qid: {doc_id: score}}``."""
    qids = list(queries)
    results = {}
    for i in range(0, len(qids), batch_size):
        part = qids[i:i + batch_size]
        for qid, hits in zip(part, retriever.retrieve_batch([queries[q] for q in part], k)):
            results[qid] = hits
    return hits_to_run(results, chunk_to_doc)


def evaluate_retriever(retriever, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                       chunk_to_doc: Mapping[str, str] | None = None, k: int = 100,
                       metrics: Sequence[str] = DEFAULT_METRICS, ignore_identical_ids: bool = False
                       ) -> dict[str, float]:
    """Retrieve the top ``k`` chunks for every judged query, map chunks to documents (best chunk per
    document; ``chunk_to_doc=None`` means chunk id == doc id) and score the run against ``qrels``."""
    judged = {q: t for q, t in queries.items() if q in qrels}
    run = retrieve_run(retriever, judged, k, chunk_to_doc=chunk_to_doc)
    return evaluate_run(run, qrels, metrics, ignore_identical_ids=ignore_identical_ids)


# ------------------------------------------------------------------------------------ construction
def _make(kind: str, chunks, model_name: str | None, bm25_params: dict | None, rrf_k: int,
          built: dict, timings: dict):
    """Build (or reuse from ``built``) the retriever of ``kind`` over ``chunks``."""
    if kind in built:
        return built[kind]
    t0 = time.perf_counter()
    if kind == "bm25":
        from blockrag.retrievers.bm25 import BM25Retriever

        r = BM25Retriever(**(bm25_params or {})).build(chunks)
    elif kind == "dense":
        from blockrag.retrievers.dense import DenseRetriever

        r = DenseRetriever(model_name=model_name)
        r.build(chunks)
    elif kind in ("hybrid", "score-fusion"):
        parts = [_make(p, chunks, model_name, bm25_params, rrf_k, built, timings) for p in ("bm25", "dense")]
        from blockrag.retrievers import fusion

        r = fusion.RRF(parts, k=rrf_k) if kind == "hybrid" else fusion.ScoreFusion(parts)
    else:
        raise ValueError(f"unknown retriever kind {kind!r}; choose from {', '.join(RETRIEVER_KINDS)}")
    if kind in ("bm25", "dense"):
        timings[kind] = time.perf_counter() - t0
    built[kind] = r
    return r


def _from_store(store_dir: Path, kind: str, corpus, model_name: str | None, bm25_params: dict | None,
                rrf_k: int, built: dict, timings: dict, state: dict):
    """Same, through a Collection persisted in ``store_dir`` (documents + indexes reused when present)."""
    if kind in built:
        return built[kind]
    if kind in ("hybrid", "score-fusion"):
        parts = [_from_store(store_dir, p, corpus, model_name, bm25_params, rrf_k, built, timings, state)
                 for p in ("bm25", "dense")]
        from blockrag.retrievers import fusion

        built[kind] = fusion.RRF(parts, k=rrf_k) if kind == "hybrid" else fusion.ScoreFusion(parts)
        return built[kind]
    from blockrag.collection import Collection

    if "collection" not in state:
        col = Collection(store_dir, chunk_tokens=None, overlap=0)
        col.store.set_setting("chunking", {"tokenizer": None, "chunk_tokens": None, "overlap": 0})
        col.chunking = col.store.get_setting("chunking")
        rep = col.add_documents(corpus, chunks_for=lambda d: beir_chunks([d]))
        log.info("store %s: %s", store_dir, rep.summary())
        state["collection"] = col
    col = state["collection"]
    if kind not in col.indexes:
        params = dict(bm25_params or {}) if kind == "bm25" else ({"model_name": model_name} if model_name else {})
        t0 = time.perf_counter()
        col.build_index(kind, **params)
        timings[kind] = time.perf_counter() - t0
    built[kind] = col.index(kind, model=model_name if kind == "dense" else None)
    return built[kind]


# ------------------------------------------------------------------------------------------- BEIR
def run_beir(data_dir: str | Path, split: str = "test", retriever_kind: str | Sequence[str] = "bm25",
             store_dir: str | Path | None = None, k: int = 100, metrics: Sequence[str] = DEFAULT_METRICS,
             report_path: str | Path | None = None, max_queries: int | None = None,
             model_name: str | None = None, bm25_params: dict | None = None, rrf_k: int = 60,
             ignore_identical_ids: bool = False) -> dict[str, dict[str, float]]:
    """Index a BEIR corpus (one chunk per document) and evaluate one or more retrievers on ``split``.

    ``retriever_kind``: ``bm25``, ``dense``, ``hybrid`` (RRF of bm25 + dense; its parts are reported
    too), ``score-fusion``, ``all``, or a list. With ``store_dir`` the documents and indexes are kept in
    a blockrag store there and reused on the next run. Returns ``{retriever: {metric: value}}``; each row
    also has ``index_s`` (build time, when built in this run) and ``queries_per_s`` (all queries,
    batched). ``report_path`` receives a JSON report.
    """
    data = load_beir(data_dir, split)
    queries = data.queries
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: data.qrels[q] for q in queries}
    kinds = [retriever_kind] if isinstance(retriever_kind, str) else list(retriever_kind)
    if kinds == ["all"]:
        kinds = ["bm25", "dense", "hybrid"]
    order = []
    for kind in kinds:  # a fusion is reported together with its parts
        for part in (["bm25", "dense"] if kind in ("hybrid", "score-fusion") else []) + [kind]:
            if part not in order:
                order.append(part)
    chunks = beir_chunks(data.corpus)
    built, timings, state = {}, {}, {}
    results: dict[str, dict[str, float]] = {}
    for kind in order:
        if store_dir is not None:
            retriever = _from_store(Path(store_dir), kind, data.corpus, model_name, bm25_params, rrf_k, built,
                                    timings, state)
        else:
            retriever = _make(kind, chunks, model_name, bm25_params, rrf_k, built, timings)
        if queries:  # warm-up outside the timing (numba kernel load, encoder's first batch)
            retriever.retrieve_batch([next(iter(queries.values()))], k)
        t0 = time.perf_counter()
        run = retrieve_run(retriever, queries, k)
        elapsed = time.perf_counter() - t0
        row = evaluate_run(run, qrels, metrics, ignore_identical_ids=ignore_identical_ids)
        if kind in timings:
            row["index_s"] = timings[kind]
        row["queries_per_s"] = len(queries) / elapsed if elapsed > 0 else float("inf")
        results[kind] = row
        log.info("%s: %s", kind, row)
    if "collection" in state:
        state["collection"].close()
    if report_path is not None:
        report = {"dataset": str(data_dir), "split": split, "n_documents": len(data.corpus),
                  "n_queries": len(queries), "k": k, "metrics": list(metrics), "results": results,
                  "store": str(store_dir) if store_dir else None, "model": model_name,
                  "bm25_params": bm25_params or {}, "rrf_k": rrf_k, "machine": platform.platform(),
                  "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = Path(report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)
    return results


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A markdown table: one row per retriever, one column per metric (timings last)."""
    columns: list[str] = []
    for row in results.values():
        for key in row:
            if key not in columns:
                columns.append(key)
    timing = [c for c in columns if c in ("index_s", "queries_per_s")]
    columns = [c for c in columns if c not in timing] + timing
    names = {"index_s": "index s", "queries_per_s": "queries/s"}
    header = "| retriever | " + " | ".join(names.get(c, c) for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, row in results.items():
        cells = []
        for c in columns:
            v = row.get(c)
            if v is None:
                cells.append("")
            elif c in timing:
                cells.append(f"{v:,.1f}" if c == "queries_per_s" else f"{v:.2f}")
            else:
                cells.append(f"{v:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

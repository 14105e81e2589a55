"""Evaluate retrievers on BEIR-format datasets: ``evaluate_retriever``, ``run_beir``, ``format_table``."""
from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from .beir import beir_chunks, load_beir
from .metrics import DEFAULT_METRICS, evaluate_run, hits_to_run

log = logging.getLogger(__name__)


def retrieve_run(retriever, queries: Mapping[str, str], k: int = 100, batch_size: int = 256,
                 chunk_to_doc: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Run ``retriever`` (anything with ``retrieve_batch(queries, k)``: a retriever or a Pipeline) over
    ``queries`` (batched) -> BEIR-style ``{qid: {doc_id: score}}``."""
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
def _check_names(kinds: Sequence[str]) -> None:
    """Every name must be a registry retriever (eval builds the indexes it needs); one line otherwise."""
    from blockrag import registry

    known = registry.retriever_names()
    for kind in kinds:
        if kind not in registry.retriever_names(aliases=True):
            raise registry.UnknownName(f"unknown retriever kind {kind!r}; choose from {', '.join(known)}, all")


def _open_collection(store_dir: Path, corpus):
    """A blockrag store holding the corpus, one chunk per document (chunk id == document id)."""
    from blockrag.collection import Collection

    col = Collection(store_dir, chunk_tokens=None, overlap=0)
    col.store.set_setting("chunking", {"tokenizer": None, "chunk_tokens": None, "overlap": 0})
    col.chunking = col.store.get_setting("chunking")
    rep = col.add_documents(corpus, chunks_for=lambda d: beir_chunks([d]))
    log.info("store %s: %s", store_dir, rep.summary())
    return col


def _ensure_indexes(col, kind: str, model_name: str | None, bm25_params: dict | None, timings: dict) -> None:
    """Build the indexes retriever ``kind`` reads that the store lacks (their build times go to ``timings``)."""
    from blockrag import registry

    for index_kind in registry.retriever_spec(kind).needs:
        if index_kind in col.indexes:  # reused; a dense index must have been built with the asked model
            col.index(index_kind, model=model_name if index_kind == "dense" else None)
            continue
        if index_kind == "bm25":
            params = dict(bm25_params or {})
        else:
            params = {"model_name": model_name} if model_name and index_kind in ("dense", "mrag") else {}
        t0 = time.perf_counter()
        col.build_index(index_kind, **params)
        timings[index_kind] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- BEIR
def run_beir(data_dir: str | Path, split: str = "test", retriever_kind: str | Sequence[str] = "bm25",
             store_dir: str | Path | None = None, k: int = 100, metrics: Sequence[str] = DEFAULT_METRICS,
             report_path: str | Path | None = None, max_queries: int | None = None,
             model_name: str | None = None, bm25_params: dict | None = None, rrf_k: int = 60,
             ignore_identical_ids: bool = False, rerank: str | Sequence[str] | None = None,
             rerank_depth: int = 20, reranker_opts: dict | None = None) -> dict[str, dict[str, float]]:
    """Index a BEIR corpus (one chunk per document) and evaluate one or more retrievers on ``split``.

    ``retriever_kind``: a retriever name of :mod:`blockrag.registry` (``bm25``, ``dense``, ``hybrid`` = RRF
    of bm25 + dense, whose parts are reported too, ``score-fusion``, ``mrag``, the graph modes, ...),
    ``all`` (bm25, dense, hybrid), or a list; the indexes it reads are built, and every query goes through
    :meth:`blockrag.pipeline.Pipeline.retrieve_batch`. With ``store_dir`` the documents and indexes are
    kept in a blockrag store there and reused on the next run (else a temporary one). Returns ``{retriever: {metric: value}}``; each row
    also has ``index_s`` (build time, when built in this run) and ``queries_per_s`` (all queries,
    batched). ``report_path`` receives a JSON report.

    ``rerank``: reranker name(s) of the registry; each asked first-stage row (not a fusion's parts) is followed by a row
    ``KIND+NAME@DEPTH`` where the top ``rerank_depth`` candidates are reordered by the reranker (through
    ``Pipeline``) and the first stage's ranking is kept below them, so metrics at cut-offs beyond the depth
    are comparable with the first stage's row. ``reranker_opts`` go to the reranker's constructor.
    """
    from blockrag import registry
    from blockrag.pipeline import Pipeline

    kinds = [retriever_kind] if isinstance(retriever_kind, str) else list(retriever_kind)
    if kinds == ["all"]:
        kinds = ["bm25", "dense", "hybrid"]
    _check_names(kinds)
    data = load_beir(data_dir, split)
    queries = data.queries
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: data.qrels[q] for q in queries}
    order = []
    for kind in kinds:  # a fusion is reported together with its parts
        for part in list(registry.retriever_spec(kind).parts) + [kind]:
            if part not in order:
                order.append(part)
    tmp = tempfile.TemporaryDirectory(prefix="blockrag-beir-") if store_dir is None else None
    col = _open_collection(Path(store_dir if store_dir is not None else tmp.name), data.corpus)
    timings: dict[str, float] = {}
    results: dict[str, dict[str, float]] = {}
    try:
        for kind in order:
            _ensure_indexes(col, kind, model_name, bm25_params, timings)
            spec = registry.retriever_spec(kind)
            opts = {"rrf_k": rrf_k} if spec.name == "hybrid" else {}
            pipe = Pipeline(col, kind, k=k, retriever_opts=opts)
            if queries:  # warm-up outside the timing (numba kernel load, encoder's first batch)
                pipe.retrieve_batch([next(iter(queries.values()))], k)
            t0 = time.perf_counter()
            run = retrieve_run(pipe, queries, k)
            elapsed = time.perf_counter() - t0
            row = evaluate_run(run, qrels, metrics, ignore_identical_ids=ignore_identical_ids)
            built = [timings[n] for n in spec.needs if n in timings]
            if built and not spec.parts:  # a fusion's build time is its parts' rows
                row["index_s"] = sum(built)
            row["queries_per_s"] = len(queries) / elapsed if elapsed > 0 else float("inf")
            results[kind] = row
            log.info("%s: %s", kind, row)
            for name in ([rerank] if isinstance(rerank, str) else list(rerank or [])) if kind in kinds else []:
                results[f"{kind}+{name}@{rerank_depth}"] = _reranked_row(
                    col, kind, opts, name, rerank_depth, reranker_opts, queries, run, qrels, metrics,
                    ignore_identical_ids)
    finally:
        col.close()
        if tmp is not None:
            tmp.cleanup()
    if report_path is not None:
        report = {"dataset": str(data_dir), "split": split, "n_documents": len(data.corpus),
                  "n_queries": len(queries), "k": k, "metrics": list(metrics), "results": results,
                  "store": str(store_dir) if store_dir else None, "model": model_name,
                  "bm25_params": bm25_params or {}, "rrf_k": rrf_k, "rerank": rerank,
                  "rerank_depth": rerank_depth if rerank else None, "machine": platform.platform(),
                  "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = Path(report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)
    return results


def _reranked_row(col, kind: str, retriever_opts: dict, name: str, depth: int, reranker_opts: dict | None,
                  queries: Mapping[str, str], first_run: Mapping[str, Mapping[str, float]], qrels, metrics,
                  ignore_identical_ids: bool) -> dict[str, float]:
    """Metrics of ``kind`` with its top ``depth`` reordered by reranker ``name``, the rest in first-stage order."""
    from tqdm.auto import tqdm

    from blockrag.pipeline import Pipeline

    pipe = Pipeline(col, kind, k=depth, reranker=name, rerank_depth=depth, retriever_opts=retriever_opts,
                    reranker_opts=reranker_opts)
    run: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for qid in tqdm(list(queries), desc=f"rerank {name}", unit="q"):
        top = list(hits_to_run({qid: pipe.retrieve_batch([queries[qid]], depth)[0]})[qid])
        rest = [d for d, _ in sorted(first_run.get(qid, {}).items(), key=lambda x: -x[1]) if d not in top]
        ranked = top + rest
        run[qid] = {d: float(len(ranked) - i) for i, d in enumerate(ranked)}  # rank order as scores
    elapsed = time.perf_counter() - t0
    row = evaluate_run(run, qrels, metrics, ignore_identical_ids=ignore_identical_ids)
    row["queries_per_s"] = len(queries) / elapsed if elapsed > 0 else float("inf")
    return row


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

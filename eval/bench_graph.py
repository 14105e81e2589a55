"""Graph RAG benchmark: multi-hop recall, multi-aspect topic recall, build throughput, query latency.

    python -m blockrag.eval.bench_graph --out runs/graph.json [--data ../shared/datasets] [--only synthetic,mrag,scifact]

1. Synthetic multi-hop set (eval.synthetic): recall@10 of *all* gold passages per question, by hop
   count, for every graph mode vs BM25, dense and hybrid (RRF of both).
2. mrag-wikipedia (subset: queries with 1-6 aspects, corpus = their topic articles + random others):
   fraction of a query's topics in the top k (k = number of aspects), per mode vs dense.
3. SciFact (subset of the corpus): graph build throughput with the offline (spaCy) extractor,
   incremental add of 1% more documents vs the full build, query latency per mode (median, p95).
Tables are printed last.
"""
from __future__ import annotations

import argparse
import bz2
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MODES = ("local", "global", "hybrid", "mix", "naive", "path", "ppr")


def _chunks(docs):
    from blockrag.documents import Chunk, chunk_id

    return [Chunk(id=chunk_id(d.id, 0, d.full_text), doc_id=d.id, position=0, text=d.full_text) for d in docs]


def _baselines(chunks):
    from blockrag.retrievers.bm25 import BM25Retriever
    from blockrag.retrievers.dense import DenseRetriever
    from blockrag.retrievers.fusion import RRF

    bm25 = BM25Retriever()
    bm25.build(chunks)
    dense = DenseRetriever(show_progress=False)
    dense.build(chunks)
    return {"bm25": bm25, "dense": dense, "hybrid": RRF([bm25, dense])}, dense


def _graph(chunks, dense, **kw):
    from blockrag.graph import GraphIndex

    gi = GraphIndex(dense=dense, **kw)
    t = time.perf_counter()
    rep = gi.build(chunks)
    return gi, time.perf_counter() - t, rep


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_synthetic(args) -> dict:
    from blockrag.eval.synthetic import make_multihop
    from blockrag.graph import GraphRetriever

    s = make_multihop(seed=args.seed)
    chunks = _chunks(s.passages)
    c2d = {c.id: c.doc_id for c in chunks}
    retrievers, dense = _baselines(chunks)
    gi, build_s, rep = _graph(chunks, dense)
    for m in MODES:
        retrievers[f"graph-{m}"] = GraphRetriever(gi, mode=m)
    out = {"set": s.summary(), "k": 10, "graph_build_s": round(build_s, 2), "graph": gi.stats(),
           "build_report": rep.summary(), "recall": {}}
    for name, r in retrievers.items():
        per = defaultdict(list)
        for q in s.questions:
            got = {c2d[h.chunk_id] for h in r.retrieve(q.text, 10)}
            per[q.hops].append(all(g in got for g in q.gold_doc_ids))
        out["recall"][name] = {str(h): round(sum(v) / len(v), 3) for h, v in sorted(per.items())}
        out["recall"][name]["all"] = round(sum(sum(v) for v in per.values()) / len(s.questions), 3)
        print(name, out["recall"][name], flush=True)
    return out


def bench_mrag(args) -> dict:
    from blockrag.graph import GraphRetriever
    from blockrag.documents import Document

    folder = Path(args.data) / "mrag-wikipedia"
    if not (folder / "articles.json.bz2").exists():
        return {"skipped": f"no {folder}"}
    articles = json.load(bz2.open(folder / "articles.json.bz2"))
    queries = json.load(bz2.open(folder / "queries.json.bz2"))
    rng = random.Random(args.seed)
    by_aspects = defaultdict(list)
    for q in queries:
        if len(q["topics"]) <= 6:
            by_aspects[len(q["topics"])].append(q)
    picked = [q for n in sorted(by_aspects) for q in rng.sample(by_aspects[n], min(args.mrag_per_aspect,
                                                                                  len(by_aspects[n])))]
    titles = {t for q in picked for t in q["topics"]}
    rest = [a for a in articles if a["title"] not in titles]
    rng.shuffle(rest)
    corpus = [a for a in articles if a["title"] in titles] + rest[: max(0, args.mrag_docs - len(titles))]
    docs = [Document(id=a["title"], title=a["title"], text=a["text"]) for a in corpus]
    chunks = _chunks(docs)
    c2d = {c.id: c.doc_id for c in chunks}
    retrievers, dense = _baselines(chunks)
    retrievers = {"dense": dense, "bm25": retrievers["bm25"], "hybrid": retrievers["hybrid"]}
    gi, build_s, rep = _graph(chunks, dense)
    for m in MODES:
        retrievers[f"graph-{m}"] = GraphRetriever(gi, mode=m)
    out = {"subset": f"{len(picked)} queries ({args.mrag_per_aspect} per aspect count 1-6), {len(docs)} articles "
                     f"(all their topics + random others)", "graph_build_s": round(build_s, 2),
           "graph": gi.stats(), "topic_recall": {}}
    for name, r in retrievers.items():
        per = defaultdict(list)
        for q in picked:
            k = len(q["topics"])
            got = {c2d[h.chunk_id] for h in r.retrieve(q["text"], k)}
            per[k].append(len(got & set(q["topics"])) / k)
        allv = [x for v in per.values() for x in v]
        out["topic_recall"][name] = {"all": round(sum(allv) / len(allv), 3),
                                     **{str(k): round(sum(v) / len(v), 3) for k, v in sorted(per.items())}}
        print(name, out["topic_recall"][name], flush=True)
    return out


def bench_scifact(args) -> dict:
    from blockrag.graph import GraphIndex, GraphRetriever
    from blockrag.documents import load_beir_corpus

    folder = Path(args.data) / "scifact"
    if not (folder / "corpus.jsonl").exists():
        return {"skipped": f"no {folder}"}
    docs = list(load_beir_corpus(folder))
    rng = random.Random(args.seed)
    rng.shuffle(docs)
    n = min(args.scifact_docs, len(docs))
    extra = max(1, n // 100)
    base, more = _chunks(docs[:n]), _chunks(docs[n:n + extra])
    gi = GraphIndex(chunk_vectors=False)
    gi.extractor  # load spaCy outside the timed region
    gi._encode(["warm up"])
    t = time.perf_counter()
    rep = gi.build(base)
    full_s = time.perf_counter() - t
    report_full = rep.summary()
    extract_s, embed_s = rep.extract_s, rep.embed_s
    t = time.perf_counter()
    gi.add(more)
    add_s = time.perf_counter() - t
    out = {"subset": f"{n} random SciFact abstracts (seed {args.seed}), +{extra} for the incremental add",
           "build_s": round(full_s, 2), "chunks_per_s": round(n / full_s, 2),
           "extract_s": round(extract_s, 2), "embed_s": round(embed_s, 2),
           "incremental_add_docs": extra, "incremental_add_s": round(add_s, 3),
           "incremental_vs_full": round(add_s / full_s, 4), "graph": gi.stats(), "build_report": report_full}
    print(out, flush=True)
    # latency: every mode; naive/mix need chunk vectors, so a dense retriever over the same chunks
    from blockrag.retrievers.dense import DenseRetriever

    dense = DenseRetriever(show_progress=False)
    dense.build(base + more)
    gi.dense = dense
    qs = [json.loads(line)["text"] for line in open(folder / "queries.jsonl")][: args.latency_queries]
    lat = {}
    for m in MODES:
        r = GraphRetriever(gi, mode=m)
        times = []
        for q in qs:
            gi.analysis_cache.clear()  # time the whole query, keyword analysis included
            t = time.perf_counter()
            r.retrieve(q, 10)
            times.append((time.perf_counter() - t) * 1000)
        lat[m] = {"median_ms": round(statistics.median(times), 1), "p95_ms": round(_pct(times, 0.95), 1)}
    times = []
    for q in qs:
        t = time.perf_counter()
        dense.retrieve(q, 10)
        times.append((time.perf_counter() - t) * 1000)
    lat["dense (reference)"] = {"median_ms": round(statistics.median(times), 1),
                                "p95_ms": round(_pct(times, 0.95), 1)}
    out["latency"] = lat
    out["latency_queries"] = len(qs)
    return out


def tables(res: dict) -> str:
    lines = []
    syn = res.get("synthetic")
    if syn and "recall" in syn:
        lines += [f"## Synthetic multi-hop ({syn['set']}): recall@10 of all gold passages", "",
                  "| retriever | 1-hop | 2-hop | 3-hop | all |", "|---|---|---|---|---|"]
        for name, r in syn["recall"].items():
            lines.append(f"| {name} | {r.get('1', '')} | {r.get('2', '')} | {r.get('3', '')} | {r['all']} |")
        lines.append("")
    mr = res.get("mrag")
    if mr and "topic_recall" in mr:
        ks = sorted({k for r in mr["topic_recall"].values() for k in r if k != "all"}, key=int)
        lines += [f"## mrag-wikipedia ({mr['subset']}): fraction of topics in top-k, k = #aspects", "",
                  "| retriever | all | " + " | ".join(f"{k} asp." for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for name, r in mr["topic_recall"].items():
            lines.append(f"| {name} | {r['all']} | " + " | ".join(str(r.get(k, "")) for k in ks) + " |")
        lines.append("")
    sf = res.get("scifact")
    if sf and "build_s" in sf:
        lines += [f"## SciFact build ({sf['subset']})", "",
                  "| full build s | chunks/s | extract s | embed s | +1% docs s | +1% / full |",
                  "|---|---|---|---|---|---|",
                  f"| {sf['build_s']} | {sf['chunks_per_s']} | {sf['extract_s']} | {sf['embed_s']} | "
                  f"{sf['incremental_add_s']} | {sf['incremental_vs_full']} |", "",
                  f"graph: {sf['graph']}", ""]
        if "latency" in sf:
            lines += [f"## Query latency on the SciFact graph ({sf['latency_queries']} queries, k=10)", "",
                      "| mode | median ms | p95 ms |", "|---|---|---|"]
            for m, v in sf["latency"].items():
                lines.append(f"| {m} | {v['median_ms']} | {v['p95_ms']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--only", default="synthetic,mrag,scifact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mrag-per-aspect", type=int, default=8)
    p.add_argument("--mrag-docs", type=int, default=300)
    p.add_argument("--scifact-docs", type=int, default=500)
    p.add_argument("--latency-queries", type=int, default=40)
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    res = {"args": vars(args)}
    for name, fn in (("synthetic", bench_synthetic), ("scifact", bench_scifact), ("mrag", bench_mrag)):
        if name in only:
            t = time.perf_counter()
            res[name] = fn(args)
            res[name]["bench_s"] = round(time.perf_counter() - t, 1)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(res, indent=1))
    print(tables(res))
    return res


if __name__ == "__main__":
    main()

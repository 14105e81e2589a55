"""Multi-Head RAG benchmark on the MRAG Wikipedia set (Besta et al.).

For each number of aspects n, a query's score is the fraction of its ``topics`` (titles of the relevant
articles) found among the top-k retrieved articles with k = n; the table reports the mean per n for
MRAG (per-head voting), Split-RAG (voting over slices of the single embedding), the single embedding of
the same model (SmolLM2, last token of the last hidden state) and MiniLM dense (all-MiniLM-L6-v2).

Articles are embedded as ``title\\ntext`` truncated to ``--doc-tokens`` generator tokens (MiniLM sees
the same text, truncated by its own 256-token limit). One SmolLM2 pass over the articles and one over
the queries serve all three SmolLM2 variants and every layer in ``--layers``.

    PYTHONPATH=. python -m blockrag.eval.bench_mrag --out mrag.json
"""
from __future__ import annotations

import argparse
import bz2
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mrag-wikipedia"


def load(data: Path):
    articles = json.load(bz2.open(data / "articles.json.bz2"))
    queries = json.load(bz2.open(data / "queries.json.bz2"))
    return articles, queries


def pick_queries(queries, per_aspect: int | None):
    by_n = defaultdict(list)
    for q in queries:
        by_n[len(q["topics"])].append(q)
    out = []
    for n in sorted(by_n):
        out.extend(by_n[n] if per_aspect is None else by_n[n][:per_aspect])
    return out


def coverage(hits_titles: list[list[str]], queries) -> dict[int, float]:
    per = defaultdict(list)
    for titles, q in zip(hits_titles, queries):
        topics = set(q["topics"])
        per[len(q["topics"])].append(len(topics & set(titles)) / len(topics))
    return {n: float(np.mean(v)) for n, v in sorted(per.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--articles", type=int, default=None, help="first N articles (default: all)")
    ap.add_argument("--queries-per-aspect", type=int, default=None, help="first N queries per aspect count")
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--query-tokens", type=int, default=320)
    ap.add_argument("--layers", default="-1", help="comma-separated layers for MRAG (first one is the headline)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=None, help="npz file caching the SmolLM2 embeddings")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="SmolLM2 weights/activations dtype (bfloat16 is ~1.4x faster on recent CPUs)")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--minilm-only", action="store_true", help="only the MiniLM column (e.g. where SmolLM2 runs elsewhere)")
    ap.add_argument("--extra-results", type=Path, default=None, help="merge the results of another run's --out")
    ap.add_argument("--model", default=None, help="generator path / name (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="only print one table from --out files")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge)

    import torch

    from blockrag.retrievers.mrag import HeadEncoder, MRAGRetriever

    articles, queries = load(args.data)
    if args.articles:
        articles = articles[:args.articles]
    titles = {a["title"] for a in articles}
    queries = [q for q in pick_queries(queries, args.queries_per_aspect) if set(q["topics"]) <= titles]
    ids = [str(i) for i in range(len(articles))]      # titles repeat (3,989 unique): index ids
    title_of = {str(i): a["title"] for i, a in enumerate(articles)}
    doc_texts = [f"{a['title']}\n{a['text']}" for a in articles]
    q_texts = [q["text"] for q in queries]
    layers = [int(x) for x in args.layers.split(",")]
    print(f"{len(articles)} articles, {len(queries)} queries, layers {layers}", flush=True)

    enc = HeadEncoder(args.model, layers=layers, device=args.device, batch_size=args.batch_size, max_doc_tokens=args.doc_tokens,
                      max_query_tokens=args.query_tokens, dtype=getattr(torch, args.dtype))
    timings = {}
    cached = None
    results: dict[str, dict[int, float]] = {}
    ks = [len(q["topics"]) for q in queries]
    weights = {}
    if args.minilm_only:
        pass
    elif args.cache and args.cache.exists():
        z = np.load(args.cache)
        if list(z["ids"]) == ids and list(z["qtexts_hash"]) == [hash_texts(q_texts)] and list(z["layers"]) == enc.layers:
            cached = z
    if args.minilm_only:
        pass
    elif cached is not None:
        d_heads = {l: cached[f"d_heads_{l}"] for l in enc.layers}
        q_heads = {l: cached[f"q_heads_{l}"] for l in enc.layers}
        d_single, q_single = cached["d_single"], cached["q_single"]
        timings = json.loads(str(cached["timings"]))
        print("embeddings from cache", args.cache)
    else:
        t0 = time.perf_counter()
        d_heads, d_single = enc.encode(doc_texts, kind="doc", progress=True)
        timings["encode_docs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        q_heads, q_single = enc.encode(q_texts, kind="query", progress=True)
        timings["encode_queries_s"] = time.perf_counter() - t0
        if args.cache:
            np.savez(args.cache, ids=np.array(ids), qtexts_hash=np.array([hash_texts(q_texts)]),
                     layers=np.array(enc.layers), d_single=d_single, q_single=q_single,
                     timings=json.dumps(timings),
                     **{f"d_heads_{l}": d_heads[l] for l in enc.layers},
                     **{f"q_heads_{l}": q_heads[l] for l in enc.layers})
    print(f"SmolLM2 encoding: {timings}", flush=True)

    for li, l in enumerate([] if args.minilm_only else enc.layers):
        r = MRAGRetriever(layer=l, encoder=enc)
        r.add_embeddings(ids, d_heads[l], d_single)
        weights[l] = [round(float(w), 4) for w in r.head_weights]
        modes = ("mrag", "split", "single") if li == 0 else ("mrag",)
        for mode in modes:
            hits = [r.search_encoded(q_heads[l][i:i + 1], q_single[i:i + 1], k=ks[i], mode=mode)[0]
                    for i in range(len(queries))]
            label = {"mrag": f"MRAG (layer {l})", "split": "Split-RAG", "single": "single (SmolLM2)"}[mode]
            results[label] = coverage([[title_of[h.chunk_id] for h in hs] for hs in hits], queries)

    if not args.no_minilm:
        from blockrag.models import load_embedder

        model = load_embedder()
        t0 = time.perf_counter()
        dv = model.encode(doc_texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        qv = model.encode(q_texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        timings["minilm_encode_s"] = time.perf_counter() - t0
        sims = qv @ dv.T
        hits = [[articles[j]["title"] for j in np.argsort(-sims[i])[:ks[i]]] for i in range(len(queries))]
        results["MiniLM dense"] = coverage(hits, queries)

    if args.extra_results:
        extra = json.loads(args.extra_results.read_text())
        for name, r in extra["results"].items():
            if name not in results:
                results[name] = {int(n): v for n, v in r.items()}
    aspects = sorted({n for r in results.values() for n in r})
    counts = {n: sum(1 for k in ks if k == n) for n in aspects}
    summary = {
        "articles": len(articles), "queries": len(queries), "queries_per_aspect": counts,
        "doc_tokens": args.doc_tokens, "dtype": args.dtype, "query_tokens": args.query_tokens, "timings": timings,
        "head_weights": weights, "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()},
        "mean_multi_aspect": {k: float(np.mean([v for n, v in r.items() if n > 1])) for k, r in results.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print_table(summary)


def print_table(summary: dict) -> None:
    results = {k: {int(n): v for n, v in r.items()} for k, r in summary["results"].items()}
    counts = {int(n): c for n, c in summary["queries_per_aspect"].items()}
    aspects = sorted(counts)
    print(f"\nfraction of query topics in top-k (k = #aspects); {summary['articles']} articles, "
          f"{summary['queries']} queries ({', '.join(f'{n}:{c}' for n, c in counts.items())}); "
          f"SmolLM2 prompts: docs {summary['doc_tokens']} tokens, queries {summary['query_tokens']} tokens")
    print("| aspects | " + " | ".join(results) + " |")
    print("|" + "---|" * (len(results) + 1))
    for n in aspects:
        print(f"| {n} | " + " | ".join(f"{results[k].get(n, float('nan')):.3f}" for k in results) + " |")
    mean = {k: float(np.mean([v for n, v in r.items() if n > 1])) for k, r in results.items()}
    print("| mean (>1 aspect) | " + " | ".join(f"{mean[k]:.3f}" for k in results) + " |")


def merge(paths) -> None:
    """Print one table from several ``--out`` files (same articles and queries), first file's settings."""
    base = json.loads(Path(paths[0]).read_text())
    for p in paths[1:]:
        other = json.loads(Path(p).read_text())
        if other["queries"] != base["queries"] or other["articles"] != base["articles"]:
            raise SystemExit(f"{p}: different articles/queries ({other['articles']}/{other['queries']})")
        for k, r in other["results"].items():
            base["results"].setdefault(k, r)
    print_table(base)


def hash_texts(texts) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    main()

"""Dense retrieval parity and throughput: our DenseRetriever vs sentence-transformers + faiss used directly.

    python -m blockrag.eval.bench_dense [--data ../shared/datasets/scifact] [--split train] [--out report.json]

Both sides embed the same texts (title + newline + abstract) with all-MiniLM-L6-v2 and search a flat
inner-product index; the nDCG@10 difference shows what our wrapping (ids, deletes, persistence) costs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


def direct_run(texts, doc_ids, queries, model_path, k):
    import faiss
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path)
    t0 = time.perf_counter()
    doc_vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    encode_s = time.perf_counter() - t0
    index = faiss.IndexFlatIP(doc_vecs.shape[1])
    index.add(np.asarray(doc_vecs, dtype=np.float32))
    qids = list(queries)
    q_vecs = model.encode([queries[q] for q in qids], batch_size=64, normalize_embeddings=True)
    scores, rows = index.search(np.asarray(q_vecs, dtype=np.float32), k)
    run = {q: {doc_ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0} for q, srow, rrow in zip(qids, scores, rows)}
    return run, encode_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from blockrag.eval.beir import beir_chunks, load_beir
    from blockrag.eval.evaluate import retrieve_run
    from blockrag.eval.metrics import evaluate_run
    from blockrag.models import resolve_embedder
    from blockrag.retrievers.dense import DenseRetriever

    data = load_beir(args.data, args.split)
    chunks = beir_chunks(data.corpus)
    texts, ids = [c.text for c in chunks], [c.id for c in chunks]

    ours = DenseRetriever(show_progress=False)
    t0 = time.perf_counter()
    ours.build(chunks)
    ours_encode_s = time.perf_counter() - t0
    ours_row = evaluate_run(retrieve_run(ours, data.queries, args.k), data.qrels)

    direct, direct_encode_s = direct_run(texts, ids, data.queries, resolve_embedder(None), args.k)
    direct_row = evaluate_run(direct, data.qrels)

    rows = {
        "blockrag DenseRetriever": {**ours_row, "docs_per_s": len(texts) / ours_encode_s},
        "sentence-transformers + faiss": {**direct_row, "docs_per_s": len(texts) / direct_encode_s},
    }
    delta = ours_row["ndcg@10"] - direct_row["ndcg@10"]
    print(f"\n{data.split}: {len(texts)} documents, {len(data.queries)} queries")
    print("| system | nDCG@10 | Recall@100 | MRR@10 | encode docs/s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} | {row['mrr@10']:.4f} | "
              f"{row['docs_per_s']:.0f} |")
    print(f"nDCG@10 difference (ours - direct): {delta:+.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "ndcg10_delta": delta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

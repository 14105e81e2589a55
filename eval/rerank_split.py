"""SciFact train split for reranker fine-tuning, and the first-stage candidates reranked.

    python -m blockrag.eval.rerank_split --data ../shared/datasets/scifact --depth 20 \\
        --store runs/scifact_store --out runs/scifact_rerank_cands.json

The judged train queries are split into two halves with a fixed seed (:func:`split_queries`): ``tune``
(training, layer / rows / fusion-weight selection) and ``held`` (reported only, never trained or selected
on). The candidates are the product's ``hybrid`` retriever (RRF of BM25 + MiniLM dense, the same store and
Pipeline path as ``blockrag eval beir --retriever hybrid``) top ``depth`` for every train query and, where
``qrels/test.tsv`` exists, every test query. ``--store`` keeps the built store, so ``blockrag eval beir --store`` reuses it.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Iterable

SPLIT_SEED = 13


def split_queries(qids: Iterable[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(tune, held): the sorted ids shuffled with ``seed``, first half tune (the odd one out goes to held)."""
    ids = sorted(set(qids))
    random.Random(seed).shuffle(ids)
    half = len(ids) // 2
    return sorted(ids[:half]), sorted(ids[half:])


def hybrid_candidates(data: Path, splits=None, depth: int = 20, store: Path | None = None,
                      rrf_k: int = 60) -> dict[str, dict[str, list[list]]]:
    """{split: {qid: [[doc_id, score], ...]}}: the product's hybrid top ``depth`` (one chunk per document) for
    each split (default: train, and test where ``qrels/test.tsv`` exists)."""
    import tempfile

    from blockrag.eval.beir import load_beir
    from blockrag.eval.evaluate import _ensure_indexes, _open_collection
    from blockrag.pipeline import Pipeline

    if splits is None:
        splits = [s for s in ("train", "test") if (Path(data) / "qrels" / f"{s}.tsv").exists()]
    tmp = tempfile.TemporaryDirectory(prefix="blockrag-rerank-") if store is None else None
    first = load_beir(data, splits[0])
    col = _open_collection(Path(store if store is not None else tmp.name), first.corpus)
    try:
        _ensure_indexes(col, "hybrid", None, None, {})
        pipe = Pipeline(col, "hybrid", k=depth, retriever_opts={"rrf_k": rrf_k})
        out = {}
        for split in splits:
            queries = (first if split == splits[0] else load_beir(data, split)).queries
            qids = list(queries)
            hits = pipe.retrieve_batch([queries[q] for q in qids], depth)
            out[split] = {q: [[h.chunk_id, float(h.score)] for h in hs] for q, hs in zip(qids, hits)}
        return out
    finally:
        col.close()
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="BEIR SciFact folder (qrels/train.tsv, test.tsv)")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--store", type=Path, default=None, help="keep the built store here")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from blockrag.eval.beir import load_qrels

    t0 = time.perf_counter()
    cands = hybrid_candidates(args.data, depth=args.depth, store=args.store)
    train_qrels = load_qrels(args.data / "qrels" / "train.tsv")
    tune, held = split_queries([q for q in cands["train"] if q in train_qrels], args.seed)
    out = {"seed": args.seed, "depth": args.depth, "retriever": "hybrid", "tune": tune, "held": held,
           "candidates": cands, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out))
    print(f"{len(tune)} tune / {len(held)} held-back train queries, {len(cands.get('test', {}))} test queries, "
          f"top-{args.depth} hybrid, {out['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

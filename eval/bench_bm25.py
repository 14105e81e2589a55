"""BM25 benchmark: ours vs bm25s vs rank-bm25 in the same run on the same machine, plus dense encode
throughput. ``python -m blockrag.eval.bench_bm25 [--data ../shared/datasets/scifact] [--out report.json]``

Every BM25 system indexes the same texts (BEIR title + "\\n" + text, one chunk per document) with the
same tokenisation (lowercase, ``\\b\\w\\w+\\b``, bm25s's English stopwords, Snowball English stemmer)
and answers the same judged queries at k=10, single-threaded (OMP/MKL/NUMBA threads pinned to 1,
``n_threads=1`` for bm25s). Query timings include tokenising the query. "one at a time" calls the
system once per query; "batch" hands it every query at once (bm25s's fastest mode). Each timing is
the best of ``--repeats`` interleaved rounds (the machine is shared: best-of is the least noisy).
rank-bm25 is timed on a subset of queries (it is slow) but its nDCG@10 uses all of them.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / numba / torch are imported

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from blockrag.eval.beir import beir_chunks, load_beir  # noqa: E402
from blockrag.eval.metrics import evaluate_run  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


def _best(times: list[float]) -> float:
    return min(times) if times else float("nan")


class _System:
    """One BM25 implementation: ``index()``, ``one(q)`` -> [doc ids], ``batch(qs)`` -> [[doc ids]]."""

    name = ""
    note = ""

    def index(self, ids: list[str], texts: list[str]) -> None: ...

    def one(self, q: str, k: int) -> list[str]: ...

    def batch(self, qs: list[str], k: int) -> list[list[str]]:
        return [self.one(q, k) for q in qs]

    def ids_of(self, results) -> list[list[str]]:
        return results


class Ours(_System):
    name = "blockrag BM25 (lucene)"

    def index(self, ids, texts):
        from blockrag.documents import Chunk
        from blockrag.retrievers.bm25 import BM25Retriever

        self.r = BM25Retriever(variant="lucene").build(
            [Chunk(id=i, doc_id=i, position=0, text=t) for i, t in zip(ids, texts)])

    def warm(self):
        self.r.retrieve("warm up the query kernel", 10)  # numba: load (or compile) the cached kernel

    # timed as the API answers: Hit(chunk_id, score) lists (bm25s: document ids, no scores)
    def one(self, q, k):
        return self.r.retrieve(q, k)

    def batch(self, qs, k):
        return self.r.retrieve_batch(qs, k)

    def ids_of(self, results):
        return [[h.chunk_id for h in hits] for hits in results]


class Bm25s(_System):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"bm25s (lucene, {backend} backend)"

    def index(self, ids, texts):
        import bm25s
        import Stemmer

        self.bm25s, self.ids = bm25s, ids
        self.stemmer = Stemmer.Stemmer("english")
        tokens = bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.r = bm25s.BM25(method="lucene", backend=self.backend)
        self.r.index(tokens, show_progress=False)

    def warm(self):
        self.batch(["warm up"], 10)

    def _ids(self, docs) -> list[list[str]]:
        return [[self.ids[int(i)] for i in row] for row in docs]

    def one(self, q, k):
        tokens = self.bm25s.tokenize([q], stopwords="en", stemmer=self.stemmer, show_progress=False)
        res = self.r.retrieve(tokens, k=k, n_threads=1, show_progress=False)
        return self._ids(res.documents)[0]

    def batch(self, qs, k):
        tokens = self.bm25s.tokenize(qs, stopwords="en", stemmer=self.stemmer, show_progress=False)
        res = self.r.retrieve(tokens, k=k, n_threads=1, show_progress=False)
        return self._ids(res.documents)


class RankBM25(_System):
    name = "rank-bm25 (BM25Okapi)"
    note = "same tokens; Okapi formula (its only BM25 with these semantics)"

    def index(self, ids, texts):
        import rank_bm25

        from blockrag.retrievers.bm25 import Tokenizer

        self.ids, self.tok = ids, Tokenizer()
        self.r = rank_bm25.BM25Okapi(self.tok.tokenize_many(texts))

    def warm(self):
        pass

    def one(self, q, k):
        scores = self.r.get_scores(self.tok.tokenize(q))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [self.ids[i] for i in top]


def _ndcg(runs: list[list[str]], qids: list[str], qrels) -> float:
    run = {q: {d: float(len(docs) - r) for r, d in enumerate(docs)} for q, docs in zip(qids, runs)}
    return evaluate_run(run, qrels, ["ndcg@10"])["ndcg@10"]


def _dense_throughput(texts: list[str], batch_size: int = 64) -> dict:
    import torch

    from blockrag.models import load_embedder

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # the BM25 pinning above is for BM25 only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_embedder(device=device)
    model.encode(texts[:batch_size], batch_size=batch_size, show_progress_bar=False)  # warm-up
    t0 = time.perf_counter()
    model.encode(texts, batch_size=batch_size, show_progress_bar=False, normalize_embeddings=True)
    elapsed = time.perf_counter() - t0
    return {"model": "all-MiniLM-L6-v2", "docs": len(texts), "seconds": elapsed, "docs_per_s": len(texts) / elapsed,
            "device": device, "torch_threads": threads, "batch_size": batch_size}


def run(data: Path, split: str = "train", repeats: int = 3, k: int = 10, rank_bm25_queries: int = 100,
        dense_docs: int = 1000, dense: bool = True) -> dict:
    ds = load_beir(data, split)
    chunks = beir_chunks(ds.corpus)
    ids, texts = [c.id for c in chunks], [c.text for c in chunks]
    qids = list(ds.queries)
    qs = [ds.queries[q] for q in qids]
    systems = [Ours(), Bm25s("numpy"), Bm25s("numba"), RankBM25()]
    rows = {}
    for s in systems:
        t0 = time.perf_counter()
        s.index(ids, texts)
        rows[s.name] = {"index_s": time.perf_counter() - t0, "one": [], "batch": []}
        s.warm()
    subset = qs[:rank_bm25_queries]
    for _ in range(repeats):  # interleaved rounds, so that load from other users hits everyone alike
        for s in systems:
            if isinstance(s, RankBM25):
                t0 = time.perf_counter()
                for q in subset:
                    s.one(q, k)
                rows[s.name]["one"].append((time.perf_counter() - t0) / len(subset))
                continue
            t0 = time.perf_counter()
            for q in qs:
                s.one(q, k)
            rows[s.name]["one"].append((time.perf_counter() - t0) / len(qs))
            t0 = time.perf_counter()
            s.batch(qs, k)
            rows[s.name]["batch"].append((time.perf_counter() - t0) / len(qs))
    for s in systems:
        row = rows[s.name]
        row["queries_per_s_one"] = 1.0 / _best(row.pop("one"))
        b = row.pop("batch")
        row["queries_per_s_batch"] = 1.0 / _best(b) if b else None
        row["ndcg@10"] = _ndcg(s.ids_of(s.batch(qs, k)), qids, ds.qrels)
        row["timed_queries"] = len(subset) if isinstance(s, RankBM25) else len(qs)
    ours = rows[systems[0].name]
    best_bm25s = max((rows[s.name] for s in systems[1:3]), key=lambda r: r["queries_per_s_one"])
    rb = rows[systems[3].name]
    ratios = {
        "ours_vs_bm25s_numpy_one": ours["queries_per_s_one"] / rows[systems[1].name]["queries_per_s_one"],
        "ours_vs_bm25s_numpy_batch": ours["queries_per_s_batch"] / rows[systems[1].name]["queries_per_s_batch"],
        "ours_vs_bm25s_numba_one": ours["queries_per_s_one"] / rows[systems[2].name]["queries_per_s_one"],
        "ours_vs_bm25s_numba_batch": ours["queries_per_s_batch"] / rows[systems[2].name]["queries_per_s_batch"],
        "ours_vs_best_bm25s_one": ours["queries_per_s_one"] / best_bm25s["queries_per_s_one"],
        "ours_vs_rank_bm25_one": ours["queries_per_s_one"] / rb["queries_per_s_one"],
        "ndcg10_ours_minus_bm25s": ours["ndcg@10"] - rows[systems[1].name]["ndcg@10"],
    }
    report = {"dataset": str(data), "split": split, "n_documents": len(ids), "n_queries": len(qs), "k": k,
              "repeats": repeats, "systems": rows, "ratios": ratios, "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if dense:
        report["dense"] = _dense_throughput(texts[:dense_docs])
    return report


def format_report(report: dict) -> str:
    lines = [f"Dataset {report['dataset']} ({report['split']}): {report['n_documents']:,} documents, "
             f"{report['n_queries']} queries, k={report['k']}, best of {report['repeats']} rounds, "
             f"single thread, {report['cpu_count']} CPUs, {report['time']}", ""]
    r = report["ratios"]
    lines += [f"ours / bm25s numpy: {r['ours_vs_bm25s_numpy_one']:.2f}x one at a time, "
              f"{r['ours_vs_bm25s_numpy_batch']:.2f}x batch",
              f"ours / bm25s numba: {r['ours_vs_bm25s_numba_one']:.2f}x one at a time, "
              f"{r['ours_vs_bm25s_numba_batch']:.2f}x batch",
              f"ours / rank-bm25: {r['ours_vs_rank_bm25_one']:.0f}x one at a time",
              f"nDCG@10 ours - bm25s: {r['ndcg10_ours_minus_bm25s']:+.4f}", ""]
    if "dense" in report:
        d = report["dense"]
        lines.append(f"dense encode: {d['model']} {d['docs']} docs in {d['seconds']:.2f} s on {d['device']} "
                     f"({d['torch_threads']} torch threads, batch {d['batch_size']})")
        lines.append("")
    lines += ["| system | index s | queries/s one at a time | queries/s batch | nDCG@10 |", "|---|---|---|---|---|"]
    for name, row in report["systems"].items():
        batch = f"{row['queries_per_s_batch']:,.0f}" if row["queries_per_s_batch"] else "n/a"
        sub = f" ({row['timed_queries']} queries)" if row["timed_queries"] != report["n_queries"] else ""
        lines.append(f"| {name} | {row['index_s']:.2f} | {row['queries_per_s_one']:,.0f}{sub} | {batch} | "
                     f"{row['ndcg@10']:.4f} |")
    if "dense" in report:
        d = report["dense"]
        lines.append(f"| dense encode all-MiniLM-L6-v2 ({d['device']}, {d['docs']} docs) | "
                     f"{d['docs_per_s']:,.1f} docs/s | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blockrag.eval.bench_bm25", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR dataset folder (default: %(default)s)")
    p.add_argument("--split", default="train")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rank-bm25-queries", type=int, default=100, help="queries timed for rank-bm25 (slow)")
    p.add_argument("--dense-docs", type=int, default=1000)
    p.add_argument("--no-dense", action="store_true", help="skip the dense encode throughput")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("bm25s", "numba", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DISABLE_TQDM", "1")
    if not args.data.exists():
        print(f"dataset not found: {args.data}", file=sys.stderr)
        return 2
    report = run(args.data, args.split, args.repeats, args.k, args.rank_bm25_queries, args.dense_docs,
                 dense=not args.no_dense)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

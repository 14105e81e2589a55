"""BM25 at MS MARCO size on one machine: our BM25 vs bm25s in the same run, on a synthetic MS MARCO-shaped
corpus (:mod:`blockrag.eval.synthetic_msmarco`; 1M passages by default, 8.8M is MS MARCO's size).

    python -m blockrag.eval.bench_bm25_scale --passages 1e6 --queries 1000 --work DIR [--out report.json]

Each system runs in its own child process (so that peak memory is its own): read the collection, index it
(tokenising included, same tokenisation for both: lowercase, ``\\b\\w\\w+\\b``, bm25s's English stopwords,
Snowball stemmer), answer the queries at k=10 single-threaded (OMP/MKL/NUMBA threads pinned to 1,
``n_threads=1`` for bm25s), one query per call and all in one call (best of ``--repeats`` rounds), save the
index, and then a second child loads the saved index (bm25s with ``mmap=True``) and answers the queries
again: load time, resident memory added by the load, queries/s after the load. Memory is the child's
resident set (peak: ``ru_maxrss``; "after read" is before indexing, so "peak - after read" is what indexing
needed). Both systems' top 10 are compared (agreement) and scored against the synthetic qrels (MRR@10).
A last child loads both saved indexes and times them in interleaved rounds, so that on a shared machine both
see the same load: that pair of rates is the fair single-thread comparison.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / numba are imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

MARK = "@@RESULT@@ "


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read(data: Path, n_queries: int) -> tuple[list[str], list[str], list[str], list[str]]:
    ids, texts = [], []
    with open(data / "collection.tsv", encoding="utf-8") as f:
        for line in f:
            pid, text = line.rstrip("\n").split("\t", 1)
            ids.append(pid)
            texts.append(text)
    qids, qs = [], []
    for line in (data / "queries.dev.tsv").read_text(encoding="utf-8").splitlines()[:n_queries]:
        q, t = line.split("\t", 1)
        qids.append(q)
        qs.append(t)
    return ids, texts, qids, qs


def _time_queries(system, qs: list[str], repeats: int) -> tuple[float, float, list[list[str]]]:
    one, batch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for q in qs:
            system.one(q, 10)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = system.batch(qs, 10)
        batch.append(time.perf_counter() - t0)
    return len(qs) / min(one), len(qs) / min(batch), system.ids_of(res)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(system: str, data: Path, n_queries: int, repeats: int, index_dir: Path) -> dict:
    """One system in this process: index + query + save, or (``*-load``) load the saved index + query."""
    from blockrag.eval.bench_bm25 import Bm25s, Ours

    rss0 = _rss()
    t0 = time.perf_counter()
    ids, texts, qids, qs = _read(data, n_queries)
    out = {"system": system, "read_s": time.perf_counter() - t0, "rss_after_read": _rss(), "rss_start": rss0,
           "passages": len(ids), "queries": len(qs)}
    if system.endswith("-load"):
        del texts
        import gc

        gc.collect()
        base = _rss()
        t0 = time.perf_counter()
        if system == "ours-load":
            from blockrag.retrievers.bm25 import BM25Retriever

            s = Ours()
            s.r = BM25Retriever.load(index_dir)
        else:
            import bm25s
            import Stemmer

            s = Bm25s("numba")
            s.bm25s, s.ids, s.stemmer = bm25s, ids, Stemmer.Stemmer("english")
            s.r = bm25s.BM25.load(str(index_dir), mmap=True)
            s.r.backend = "numba"
        out["load_s"] = time.perf_counter() - t0
        out["rss_added_by_load"] = _rss() - base
        s.warm()
        out["qps_one"], out["qps_batch"], top = _time_queries(s, qs, repeats)
        out["rss_added_after_queries"] = _rss() - base
    else:
        s = Ours() if system == "ours" else Bm25s("numba")
        t0 = time.perf_counter()
        s.index(ids, texts)
        out["index_s"] = time.perf_counter() - t0
        out["peak_rss_index"] = _peak()
        out["rss_after_index"] = _rss()
        s.warm()
        out["qps_one"], out["qps_batch"], top = _time_queries(s, qs, repeats)
        if system == "ours":
            r = s.r
            arrays = {"post_term (doc-major)": r._post_term, "post_tf (doc-major)": r._post_tf,
                      "doc_ptr": r._doc_ptr, "doc_len": r._doc_len, "indices (term-major)": r._indices,
                      "data (term-major)": r._data, "indptr": r._indptr}
            out["postings"] = int(len(r._indices))
            out["array_bytes"] = {k: int(v.nbytes) for k, v in arrays.items()}
        if index_dir.exists():
            shutil.rmtree(index_dir)
        t0 = time.perf_counter()
        if system == "ours":
            s.r.save(index_dir)
        else:
            s.r.save(str(index_dir))
        out["save_s"] = time.perf_counter() - t0
        out["disk_bytes"] = _folder_bytes(index_dir)
        if system == "bm25s":
            out["postings"] = int(s.r.scores["data"].shape[0])
    out["peak_rss"] = _peak()
    out["top10"] = top
    out["qids"] = qids
    return out


def together(data: Path, n_queries: int, repeats: int, work: Path, n: int) -> dict:
    """Both saved indexes loaded in one process and timed in interleaved rounds (the machine may be
    shared: interleaving exposes both systems to the same load; each rate is the best round)."""
    import bm25s
    import Stemmer

    from blockrag.eval.bench_bm25 import Bm25s, Ours
    from blockrag.retrievers.bm25 import BM25Retriever

    ids, texts, qids, qs = _read(data, n_queries)
    del texts
    ours = Ours()
    ours.r = BM25Retriever.load(work / f"index-ours-{n}")
    theirs = Bm25s("numba")
    theirs.bm25s, theirs.ids, theirs.stemmer = bm25s, ids, Stemmer.Stemmer("english")
    theirs.r = bm25s.BM25.load(str(work / f"index-bm25s-{n}"), mmap=True)
    theirs.r.backend = "numba"
    systems = {"ours": ours, "bm25s": theirs}
    times = {k: {"one": [], "batch": []} for k in systems}
    for s in systems.values():
        s.warm()
        s.batch(qs, 10)  # pages of the mapped files in
    for _ in range(repeats):
        for name, s in systems.items():
            t0 = time.perf_counter()
            for q in qs:
                s.one(q, 10)
            times[name]["one"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.batch(qs, 10)
            times[name]["batch"].append(time.perf_counter() - t0)
    return {name: {"qps_one": len(qs) / min(t["one"]), "qps_batch": len(qs) / min(t["batch"]),
                   "rounds_one_s": t["one"]} for name, t in times.items()}


def _run_child(system: str, args, data: Path, index_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "blockrag.eval.bench_bm25_scale", "--child", system, "--data", str(data),
           "--work", str(args.work),
           "--queries", str(args.queries), "--repeats", str(args.repeats), "--index-dir", str(index_dir)]
    print(f"[{time.strftime('%H:%M:%S')}] {system} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith(MARK)][-1]
    return json.loads(line[len(MARK):])


def _mrr(top: list[list[str]], qids: list[str], qrels: dict) -> float:
    tot = 0.0
    for q, docs in zip(qids, top):
        rel = qrels.get(q, {})
        tot += next((1.0 / (i + 1) for i, d in enumerate(docs[:10]) if d in rel), 0.0)
    return tot / max(1, len(qids))


def run(args) -> dict:
    from blockrag.eval.msmarco import load_qrels
    from blockrag.eval.synthetic_msmarco import SyntheticMSMarco

    data = Path(args.work) / f"synthetic-msmarco-{int(args.passages)}"
    t0 = time.perf_counter()
    SyntheticMSMarco(int(args.passages), seed=args.seed).write(data, args.queries)
    gen_s = time.perf_counter() - t0
    qrels = load_qrels(data / "qrels.dev.tsv")
    rows = {}
    for system in args.systems:
        idx = Path(args.work) / f"index-{system}-{int(args.passages)}"
        if not args.load_only:
            rows[system] = _run_child(system, args, data, idx)
        rows[system + "-load"] = _run_child(system + "-load", args, data, idx)
    for name, r in rows.items():
        r["mrr@10"] = _mrr(r["top10"], r["qids"], qrels)
    if set(args.systems) == {"ours", "bm25s"}:
        inter = _run_child("together", args, data, Path(args.work))
        inter.pop("top10", None)
        inter.pop("qids", None)
    report = {"passages": int(args.passages), "queries": args.queries, "repeats": args.repeats,
              "generate_s": gen_s, "collection_bytes": (data / "collection.tsv").stat().st_size,
              "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "ours" in rows and "bm25s" in rows:
        a, b = rows["ours"]["top10"], rows["bm25s"]["top10"]
        report["top10_overlap_ours_bm25s"] = sum(len(set(x) & set(y)) for x, y in zip(a, b)) / max(
            1, sum(max(len(x), len(y)) for x, y in zip(a, b)))
    for r in rows.values():
        r.pop("top10")
        r.pop("qids")
    report["systems"] = rows
    if set(args.systems) == {"ours", "bm25s"}:
        report["interleaved_after_load"] = inter
    return report


def format_report(rep: dict) -> str:
    G = 1 << 30
    s = rep["systems"]
    lines = [f"Synthetic MS MARCO: {rep['passages']:,} passages ({rep['collection_bytes'] / G:.2f} GiB TSV), "
             f"{rep['queries']} queries, k=10, single thread, best of {rep['repeats']}, {rep['time']}",
             f"top-10 overlap ours/bm25s: {100 * rep.get('top10_overlap_ours_bm25s', float('nan')):.1f}%", "",
             "| system | index s | peak RSS GiB (after read) | q/s one at a time | q/s batch | MRR@10 | "
             "index on disk GiB | load s | RSS added by load GiB | q/s after load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("ours", "bm25s"):
        if name + "-load" not in s:
            continue
        na = {"index_s": float("nan"), "peak_rss": float("nan"), "rss_after_read": float("nan"),
              "qps_one": float("nan"), "qps_batch": float("nan"), "mrr@10": float("nan"), "disk_bytes": float("nan")}
        r, l = s.get(name, na), s[name + "-load"]
        lines.append(f"| {name} | {r['index_s']:.1f} | {r['peak_rss'] / G:.2f} ({r['rss_after_read'] / G:.2f}) | "
                     f"{r['qps_one']:,.0f} | {r['qps_batch']:,.0f} | {r['mrr@10']:.3f} | {r['disk_bytes'] / G:.2f} | "
                     f"{l['load_s']:.2f} | {l['rss_added_by_load'] / G:.2f} | {l['qps_one']:,.0f} |")
    if "interleaved_after_load" in rep:
        i = rep["interleaved_after_load"]
        lines.append("")
        lines.append("after load, interleaved rounds in one process (same machine load for both): q/s one at a time "
                     + ", ".join(f"{k} {v['qps_one']:,.0f}" for k, v in i.items()) + "; batch "
                     + ", ".join(f"{k} {v['qps_batch']:,.0f}" for k, v in i.items()))
    if "ours" in s and "array_bytes" in s["ours"]:
        lines.append("")
        lines.append(f"ours, {s['ours']['postings']:,} postings; arrays in memory: " + ", ".join(
            f"{k} {v / G:.2f} GiB" for k, v in s["ours"]["array_bytes"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blockrag.eval.bench_bm25_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=float, default=1e6)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", nargs="+", default=["ours", "bm25s"], choices=["ours", "bm25s"])
    ap.add_argument("--work", type=Path, required=True, help="folder for the corpus and the saved indexes")
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument("--load-only", action="store_true", help="only the load children, on indexes saved by an earlier run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--index-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DISABLE_TQDM", "1")
    if args.child == "together":
        n = int(json.loads((args.data / "synthetic.json").read_text())["passages"])
        print(MARK + json.dumps(together(args.data, args.queries, args.repeats, args.index_dir, n)))
        return 0
    if args.child:
        print(MARK + json.dumps(child(args.child, args.data, args.queries, args.repeats, args.index_dir)))
        return 0
    rep = run(args)
    print(format_report(rep))
    if args.out:
        args.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

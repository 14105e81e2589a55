"""BlockRank benchmark: (a) quality on SciFact train, (b) speed block-sparse vs full causal attention.

(a) ``--quality``: candidates = hybrid retrieval (RRF of BM25 + MiniLM dense, ``--depth`` per query) on
    SciFact train; nDCG@10 of the hybrid order, of BlockRank (every layer up to ``--max-layer`` and three
    choices of query rows, from one forward per query), and of the pointwise yes/no baseline with the same
    model. The layer / rows are chosen on a *tune* half of the queries and reported on the other half.
    ``--candidates-out`` only computes and saves the candidates (so a GPU machine without MiniLM can rerank).
(b) ``--cpu-speed`` (SmolLM2) / ``--gpu-speed`` (randomly initialised Mistral-7B-shaped model, bf16, built on
    the GPU from ``MistralConfig``): time to score N documents (``--sizes``) with the block-sparse path
    (documents computed), the block-sparse path with every document's K/V already cached (query block only),
    and full causal attention over the same flat prompt (contiguous positions), all up to the same layer and
    through the same attention backend. Median of ``--reps`` runs after a warm-up.

    PYTHONPATH=. python -m blockrag.eval.bench_blockrank --candidates-out runs/scifact_cands.json --depth 100
    PYTHONPATH=. python -m blockrag.eval.bench_blockrank --quality --candidates runs/scifact_cands.json --depth 20 --queries 60
    PYTHONPATH=. python -m blockrag.eval.bench_blockrank --gpu-speed --out blockrank_gpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np

# the SciFact reader is the product's (the reranker fine-tune trains on it); bench_rerank_ft imports it from here
from blockrag.datasets import load_beir_split as load_scifact

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
ROW_MODES = ("tail", "last", "all")


# ------------------------------------------------------------------------------------------- metrics
def ndcg_at_10(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 (linear gains, log2 discount, BEIR / pytrec_eval convention) over the run's judged queries."""
    vals = []
    for qid, docs in run.items():
        rels = qrels.get(qid, {})
        if not any(r > 0 for r in rels.values()):
            continue
        ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, (d, _) in enumerate(ranked))
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:10]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        vals.append(dcg / idcg)
    return float(np.mean(vals)) if vals else 0.0


# ------------------------------------------------------------------------------------------- data
def hybrid_candidates(corpus, queries, depth: int) -> dict[str, list[list]]:
    from blockrag.documents import Chunk
    from blockrag.retrievers.bm25 import BM25Retriever
    from blockrag.retrievers.dense import DenseRetriever
    from blockrag.retrievers.fusion import RRF

    chunks = [Chunk(id=d, doc_id=d, position=0, text=t) for d, t in corpus.items()]
    bm25 = BM25Retriever().build(chunks)
    dense = DenseRetriever()
    dense.build(chunks)
    hybrid = RRF([bm25, dense], depth=depth)
    qids = list(queries)
    hits = hybrid.retrieve_batch([queries[q] for q in qids], k=depth)
    return {q: [[h.chunk_id, h.score] for h in hs] for q, hs in zip(qids, hits)}


# ------------------------------------------------------------------------------------------- quality
def quality(args) -> dict:
    import torch

    from blockrag.rerankers.blockrank import BlockRankReranker, relevance
    from blockrag.rerankers.pointwise import PointwiseReranker

    corpus, queries, qrels = load_scifact(args.data, "train")
    cands = json.loads(Path(args.candidates).read_text()) if args.candidates else \
        hybrid_candidates(corpus, queries, args.depth)
    qids = sorted(q for q in queries if q in cands)
    random.Random(0).shuffle(qids)
    if args.queries:
        qids = qids[:args.queries]
    from blockrag.models import load_generator

    model, tok = load_generator(args.model, device=args.device)
    br = BlockRankReranker(args.model, model=model, tokenizer=tok, doc_tokens=args.doc_tokens, query_rows="all",
                           doc_batch=args.doc_batch, attn=args.attn)
    n_layers = br.n_layers
    max_layer = min(args.max_layer if args.max_layer is not None else n_layers - 1, n_layers - 1)
    before, runs, point = {}, {}, {}
    t_br = t_pw = 0.0
    pw = PointwiseReranker(args.model, model=model, tokenizer=tok, doc_tokens=args.doc_tokens,
                           batch_size=args.pw_batch) if args.pointwise else None
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    done = []
    for qid in tqdm(qids, desc="rerank"):
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"time budget reached after {len(done)} queries", flush=True)
            break
        done.append(qid)
        docs = [d for d, _ in cands[qid][:args.depth]]
        texts = [corpus[d] for d in docs]
        before[qid] = {d: float(args.depth - i) for i, d in enumerate(docs)}
        prompt = br.build_prompt(queries[qid], texts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            mass = br.mass_ids(prompt, max_layer, mass_layers=range(max_layer))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t_br += time.perf_counter() - t0
        Lq = len(prompt.query)
        sel = {"tail": slice(Lq - prompt.tail, Lq), "last": slice(Lq - 1, Lq), "all": slice(0, Lq)}
        for layer, m in mass.items():
            for mode, s in sel.items():
                sc = relevance(m[:, s], len(docs))
                runs.setdefault((layer, mode), {})[qid] = {d: float(x) for d, x in zip(docs, sc)}
        if pw is not None:
            t0 = time.perf_counter()
            sc = pw.score(queries[qid], texts)
            t_pw += time.perf_counter() - t0
            point[qid] = {d: float(x) for d, x in zip(docs, sc)}

    qids = done                            # a prefix of a seeded shuffle: a random subset
    half = len(qids) // 2
    tune, evalq = set(qids[:half]), set(qids[half:])

    def on(run, ids):
        return ndcg_at_10({q: v for q, v in run.items() if q in ids}, qrels)

    sweep = {f"{l}:{m}": {"tune": on(r, tune), "eval": on(r, evalq), "all": on(r, set(qids))}
             for (l, m), r in sorted(runs.items())}
    best = max(runs, key=lambda lm: on(runs[lm], tune))
    res = {
        "queries": len(qids), "tune": len(tune), "eval": len(evalq), "depth": args.depth,
        "doc_tokens": args.doc_tokens, "model": args.model or "SmolLM2-135M-Instruct",
        "device": str(next(model.parameters()).device), "best_layer": best[0], "best_rows": best[1],
        "before": {"tune": on(before, tune), "eval": on(before, evalq), "all": on(before, set(qids))},
        "blockrank_best": sweep[f"{best[0]}:{best[1]}"],
        "sweep": sweep, "blockrank_s_per_query": t_br / max(1, len(qids)),
    }
    if pw is not None:
        res["pointwise"] = {"tune": on(point, tune), "eval": on(point, evalq), "all": on(point, set(qids))}
        res["pointwise_s_per_query"] = t_pw / max(1, len(qids))
    return res


def print_quality(res: dict) -> None:
    print(f"\nSciFact train, hybrid (RRF BM25+MiniLM) top-{res['depth']} reranked, {res['queries']} queries "
          f"(tune {res['tune']} / eval {res['eval']}), {res['model']} on {res['device']}; "
          f"BlockRank layer {res['best_layer']} rows '{res['best_rows']}' chosen on the tune half")
    print("| ranking | nDCG@10 eval half | nDCG@10 tune half | nDCG@10 all | s/query |")
    print("|---|---|---|---|---|")
    rows = [("hybrid (before)", res["before"], "")]
    rows.append((f"BlockRank (layer {res['best_layer']}, {res['best_rows']})", res["blockrank_best"],
                 f"{res['blockrank_s_per_query']:.2f}*"))
    if "pointwise" in res:
        rows.append(("pointwise yes/no", res["pointwise"], f"{res['pointwise_s_per_query']:.2f}"))
    for name, r, s in rows:
        print(f"| {name} | {r['eval']:.4f} | {r['tune']:.4f} | {r['all']:.4f} | {s} |")
    print("(* BlockRank time covers the one forward that yields every layer of the sweep)")
    layers = sorted({int(k.split(":")[0]) for k in res["sweep"]})
    print("\nlayer sweep, nDCG@10 on all queries (rows: tail / last / all)")
    print("| layer | " + " | ".join(ROW_MODES) + " |")
    print("|---|" + "---|" * len(ROW_MODES))
    for l in layers:
        print(f"| {l} | " + " | ".join(f"{res['sweep'][f'{l}:{m}']['all']:.4f}" for m in ROW_MODES) + " |")


# ------------------------------------------------------------------------------------------- speed
def _timer(device: str, budget_s: float = 60.0):
    import torch

    def run(fn, reps: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()                                   # warm-up (allocator, kernels, autotune)
        if device == "cuda":
            torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        if warm > budget_s:                    # too slow to repeat: the warm-up time is the (pessimistic) number
            return warm
        times = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def flops(cfg, n_docs: int, doc_len: int, instr: int, q: int, layer: int) -> dict:
    """Matmul FLOPs up to `layer` (layers 0..layer-1 in full, projections of `layer`), full vs block-sparse."""
    d, H, Hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or d // H
    ff = cfg.intermediate_size
    lin = 2 * (d * H * D * 2 + d * Hkv * D * 2 + 3 * d * ff)          # per token per layer
    T = instr + n_docs * doc_len + q
    full_pairs = T * (T + 1) / 2
    sparse_pairs = (instr * (instr + 1) / 2 + n_docs * (doc_len * instr + doc_len * (doc_len + 1) / 2)
                    + q * (T - q) + q * (q + 1) / 2)
    attn = 4 * H * D                                                  # QK^T + PV per visible pair
    full = layer * (T * lin + full_pairs * attn)
    sparse = layer * (T * lin + sparse_pairs * attn)
    return {"tokens": T, "full_tflop": full / 1e12, "sparse_tflop": sparse / 1e12, "flop_ratio": full / sparse}


def speed(model, layer: int, sizes, reps: int, device: str, doc_len: int = 160, instr_len: int = 64,
          q_len: int = 32, tail: int = 8, backends=("sdpa",), budget_s: float = 60.0, doc_batch: int = 512,
          vocab_hi: int | None = None) -> list[dict]:
    import torch

    from blockrag.rerankers.blockrank import BlockPrompt, BlockRankReranker, DocKVCache

    timer = _timer(device, budget_s)
    g = torch.Generator().manual_seed(0)
    hi = vocab_hi or model.config.vocab_size

    def rnd(n):
        return torch.randint(100, hi, (n,), generator=g).tolist()

    rows = []
    for backend in backends:
        br = BlockRankReranker(model=model, tokenizer=None, layer=layer, attn=backend, doc_batch=doc_batch,
                               query_rows=tail)
        too_slow: set[str] = set()
        for n in sizes:
            prompt = BlockPrompt(rnd(instr_len), [rnd(doc_len) for _ in range(n)], rnd(q_len), tail)
            row = {"backend": backend, "docs": n, **flops(model.config, n, doc_len, instr_len, q_len, layer)}
            with torch.inference_mode():
                for method in ("block_sparse", "block_sparse_cached", "full_causal"):
                    if method in too_slow:
                        row[method + "_s"] = None
                        continue
                    try:
                        if method == "full_causal":
                            fn = lambda: br.mass_full(prompt, layer)                      # noqa: E731
                        elif method == "block_sparse":
                            br.kv_cache = None
                            fn = lambda: br.mass_ids(prompt, layer)                       # noqa: E731
                        else:
                            cache = DocKVCache(max_items=n + 1)
                            keys = [f"{backend}-{n}-{i}" for i in range(n)]
                            br.kv_cache = cache
                            br.mass_ids(prompt, layer, cache_keys=keys)                   # fill the cache
                            fn = lambda: br.mass_ids(prompt, layer, cache_keys=keys)      # noqa: E731
                        t = timer(fn, reps)
                        br.kv_cache = None
                    except torch.OutOfMemoryError:
                        t = None
                        too_slow.add(method)
                    row[method + "_s"] = t
                    if t is not None and t > budget_s:
                        too_slow.add(method)
                    print(f"  {backend} n={n} {method}: {t if t is None else round(t, 4)} s", flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
            f, s = row.get("full_causal_s"), row.get("block_sparse_s")
            row["speedup"] = f / s if f and s else None
            c = row.get("block_sparse_cached_s")
            row["speedup_cached"] = f / c if f and c else None
            rows.append(row)
    return rows


def mistral7b(device: str = "cuda"):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16).eval()


def print_speed(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| backend | docs | tokens | full causal s | block-sparse s | speed-up | cached docs s | speed-up (cached) "
          "| FLOP ratio full/sparse |")
    print("|---|---|---|---|---|---|---|---|---|")

    def f(x, p=4):
        return "-" if x is None else f"{x:.{p}f}"
    for r in rows:
        print(f"| {r['backend']} | {r['docs']} | {r['tokens']} | {f(r.get('full_causal_s'))} | {f(r.get('block_sparse_s'))} "
              f"| {f(r.get('speedup'), 2)}x | {f(r.get('block_sparse_cached_s'))} | {f(r.get('speedup_cached'), 1)}x "
              f"| {r['flop_ratio']:.2f} |")


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default=None, help="generator (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--candidates-out", type=Path, default=None)
    ap.add_argument("--candidates", type=Path, default=None)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--pointwise", action="store_true", default=True)
    ap.add_argument("--no-pointwise", dest="pointwise", action="store_false")
    ap.add_argument("--depth", type=int, default=20, help="candidates reranked per query")
    ap.add_argument("--queries", type=int, default=None, help="random subset (seed 0) of judged train queries")
    ap.add_argument("--max-layer", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="quality: stop taking new queries after S s")
    ap.add_argument("--doc-tokens", type=int, default=160)
    ap.add_argument("--doc-batch", type=int, default=32)
    ap.add_argument("--pw-batch", type=int, default=8)
    ap.add_argument("--attn", default="sdpa", help="quality: attention backend for the forward (sdpa|kernel|auto)")
    ap.add_argument("--cpu-speed", action="store_true")
    ap.add_argument("--gpu-speed", action="store_true")
    ap.add_argument("--sizes", default=None, help="comma-separated document counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, default=None, help="speed: scoring layer (default 20 for the 32-layer "
                                                             "Mistral shape, as in the paper; 15 for SmolLM2)")
    ap.add_argument("--backends", default=None, help="speed: attention backends, e.g. sdpa,kernel")
    ap.add_argument("--budget", type=float, default=60.0, help="speed: stop growing a method past this many s")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    result: dict = {}
    if args.candidates_out:
        corpus, queries, qrels = load_scifact(args.data, "train")
        t0 = time.perf_counter()
        cands = hybrid_candidates(corpus, queries, args.depth)
        args.candidates_out.parent.mkdir(parents=True, exist_ok=True)
        args.candidates_out.write_text(json.dumps(cands))
        run = {q: {d: s for d, s in hs} for q, hs in cands.items()}
        result["candidates"] = {"queries": len(cands), "depth": args.depth, "ndcg@10": ndcg_at_10(run, qrels),
                                "seconds": time.perf_counter() - t0}
        print(f"hybrid candidates: {result['candidates']}")
    if args.quality:
        result["quality"] = quality(args)
    if args.cpu_speed:
        from blockrag.models import load_generator

        model, _ = load_generator(args.model, device="cpu")
        sizes = [int(x) for x in (args.sizes or "20,50,100,200,500").split(",")]
        layer = args.layer if args.layer is not None else 15
        result["cpu_speed"] = {"threads": torch.get_num_threads(), "layer": layer, "rows": speed(
            model, layer, sizes, args.reps, "cpu", backends=tuple((args.backends or "sdpa").split(",")),
            budget_s=args.budget, doc_batch=args.doc_batch)}
    if args.gpu_speed:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-speed needs a CUDA device")
        t0 = time.perf_counter()
        model = mistral7b("cuda")
        torch.cuda.synchronize()
        print(f"Mistral-7B-shaped random model built on {torch.cuda.get_device_name()} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        sizes = [int(x) for x in (args.sizes or "20,50,100,200,500").split(",")]
        layer = args.layer if args.layer is not None else 20
        result["gpu_speed"] = {"device": torch.cuda.get_device_name(), "layer": layer, "rows": speed(
            model, layer, sizes, args.reps, "cuda", backends=tuple((args.backends or "sdpa,kernel").split(",")),
            budget_s=args.budget, doc_batch=512)}
        del model
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    # tables last
    if "quality" in result:
        print_quality(result["quality"])
    if "cpu_speed" in result:
        print_speed(f"CPU speed, SmolLM2-135M fp32, {result['cpu_speed']['threads']} threads, scoring layer "
                    f"{result['cpu_speed']['layer']}, 160-token docs", result["cpu_speed"]["rows"])
    if "gpu_speed" in result:
        print_speed(f"GPU speed, random Mistral-7B shape bf16 on {result['gpu_speed']['device']}, scoring layer "
                    f"{result['gpu_speed']['layer']} of 32, 160-token docs", result["gpu_speed"]["rows"])


if __name__ == "__main__":
    main()

"""Where a request's time goes on the GPU, through the public Generator: per context length, the phases of a
turbo prefill (synchronised one by one: tokenising, chunk caches from the device tier, stitching, the
question graph), the decode step's GPU time (graph replays back to back) against the streamed tokens/s, and
the kernels of one eager question forward and one eager decode step (torch.profiler, top kernels by time).

    python -m blockrag.eval.profile_generate --tokenizer TOK --passages corpus.jsonl --contexts 2048,32768

Same model and passages as ``eval.bench_e2e`` (random Llama-3-8B shape, bf16). A diagnostic, not a headline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _ms(f, sync=True):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = f()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, out


def _kernels(fn, top: int = 12) -> dict:
    """GPU kernels of ``fn()``: total GPU ms, kernel count, and the top ones by time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:70], e.count, t / 1e3))
    rows.sort(key=lambda r: -r[2])
    return {"gpu_ms": sum(r[2] for r in rows), "kernels": sum(r[1] for r in rows),
            "top": [{"name": n, "count": c, "ms": round(ms, 3)} for n, c, ms in rows[:top]]}


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--passages", default=None)
    ap.add_argument("--contexts", default="2048,32768,131072")
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--no-fuse", action="store_true", help="Generator(fuse_layers=False)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv.block_cache import forward_block
    from blockrag.eval.bench_e2e import load_passages, question_text, take
    from blockrag.eval.bench_ttft import build_llama3_8b

    dev = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    contexts = [int(x) for x in args.contexts.split(",")]
    model = build_llama3_8b(dev)
    model.config.max_position_embeddings = 131072
    store = KVCacheStore(Path(tempfile.mkdtemp()) / "kv", model, tok, dtype=torch.bfloat16, lru_bytes=0)
    pool = load_passages(args.passages, tok, max(contexts))
    words = [w for c in pool[:50] for w in c.text.split()[:20] if w.isalpha()] or ["the"]
    question = question_text(store, 50, words)
    kvb = 32 * 2 * 8 * 128 * 2
    gen = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=int(max(contexts) * 1.25 * kvb),
                    fuse_layers=not args.no_fuse)
    res = {"fused": gen.fused_layers, "rows": []}
    for L in contexts:
        chunks = take(pool, len(store.prefix_ids), L - 200)
        store.add(chunks, progress=False)
        for _ in range(2):  # captures, device tier
            gen.generate(question, chunks, max_new_tokens=8)
        rs = [gen.generate(question, chunks, max_new_tokens=32) for _ in range(3)]
        row = {"target": L, "n_context": rs[0].n_context_tokens,
               "ttft_ms": statistics.median(r.ttft_ms for r in rs),
               "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in rs)}
        # prefill phases, each synchronised (internals of Generator.prefill's stitched path)
        ph = {}
        ph["question_ids"], q_ids = _ms(lambda: store.question_ids(question))
        ph["store_keys"], _ = _ms(lambda: [gen._store_key(c) for c in chunks])
        ph["device_parts"], parts = _ms(lambda: gen._device_parts(chunks))
        Lc = sum(p.n_tokens for p in parts)
        from blockrag.attention_kv.generate import question_bucket

        qb = question_bucket(len(q_ids), gen.question_buckets)
        cache, bucket = gen._cache_for(Lc + qb + max(33, qb) + 1, None)
        graph = gen._graph_for(bucket, qb)
        ph["stitch"], _ = _ms(lambda: cache.load_gathered(parts))  # copy + RoPE, one pass
        q = torch.tensor(q_ids, device=dev)
        ph["question_graph"], _ = _ms(lambda: graph.replay(q, Lc, n_valid=len(q_ids)))
        row["phases_ms"] = {k: round(v, 3) for k, v in ph.items()}
        # decode: GPU time of back-to-back replays of the (self-advancing) decode graph
        step = gen._graph_for(bucket, 1)
        step.ids.fill_(1)
        cache.set_device_positions(Lc + qb, 1)
        step.graph.replay()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            step.graph.replay()
        e.record()
        e.synchronize()
        row["decode_step_gpu_ms"] = s.elapsed_time(e) / 20
        # kernels of eager forwards over the same cache
        pad = torch.cat([q, q[-1:].expand(qb - len(q_ids))])
        row["question_eager"] = _kernels(lambda: forward_block(model, cache, pad, Lc, logits_to_keep=1))
        row["decode_eager"] = _kernels(lambda: forward_block(model, cache, q[-1:], Lc + qb, logits_to_keep=1))
        res["rows"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print("| context | TTFT ms | decode tok/s | step GPU ms | stitch | q graph | parts | keys | q eager GPU ms "
          "(kernels) | decode eager GPU ms (kernels) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        p = r["phases_ms"]
        print(f"| {r['n_context']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_step_gpu_ms']:.2f} | "
              f"{p['stitch']:.2f} | {p['question_graph']:.2f} | {p['device_parts']:.2f} | "
              f"{p['store_keys']:.2f} | {r['question_eager']['gpu_ms']:.2f} ({r['question_eager']['kernels']}) | "
              f"{r['decode_eager']['gpu_ms']:.2f} ({r['decode_eager']['kernels']}) |")


if __name__ == "__main__":
    main()

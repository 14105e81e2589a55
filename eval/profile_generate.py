"""Where a request's time goes on the GPU, through the public Generator: per context length, the phases of a
turbo prefill (synchronised one by one: tokenising, chunk caches from the device tier, stitching, the
question graph), the decode step's GPU time (graph replays back to back) against the streamed tokens/s, and
the kernels of one eager question forward and one eager decode step (torch.profiler, top kernels by time);
then two views of one whole public ``generate()`` call: "marks" (host and GPU clocks where each step of the
stitched path begins and ends, from CUDA events: no profiler overhead) and "timeline" (torch.profiler: when the
GPU first gets work, how long it is busy, and the gaps where it waits for the host, with the kernels on either
side; the profiler itself slows the host, so its gaps read longer than the marks').

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


def _timeline(fn, min_gap_us: float = 20.0) -> dict:
    """One call of ``fn()`` under torch.profiler (CPU + CUDA): wall ms, the first kernel's start and the last
    kernel's end after the call began, GPU busy ms (union of kernel intervals) and the idle gaps longer than
    ``min_gap_us`` (offset, length, kernels before / after)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("blockrag_call"):
            fn()
        torch.cuda.synchronize()
    evs = prof.events()
    call = next(e for e in evs if e.name == "blockrag_call" and e.device_type.name == "CPU")
    t0, t1 = call.time_range.start, call.time_range.end
    ks = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in evs
                if e.device_type.name == "CUDA" and e.name != "blockrag_call" and e.time_range.end > e.time_range.start)
    busy, gaps, cur_end, prev = 0.0, [], None, None
    for a, b, name in ks:
        if cur_end is None or a > cur_end:
            if cur_end is not None and a - cur_end >= min_gap_us:
                gaps.append({"at_us": round(cur_end - t0, 1), "gap_us": round(a - cur_end, 1), "after": prev,
                             "before": name})
            busy += b - a
            cur_end = b
        elif b > cur_end:
            busy += b - cur_end
            cur_end = b
        prev = name
    return {"wall_ms": round((t1 - t0) / 1e3, 3), "first_kernel_us": round(ks[0][0] - t0, 1) if ks else None,
            "last_kernel_end_us": round(cur_end - t0, 1) if ks else None, "gpu_busy_ms": round(busy / 1e3, 3),
            "kernels": len(ks), "gaps": gaps[:40]}


def _marks(gen, question, chunks, repeats: int = 5) -> dict:
    """Host and GPU clocks of one ``generate(max_new_tokens=1, stream=True)`` call, without a profiler: the
    steps of the stitched turbo path are wrapped to note the host time (perf_counter) and to record a CUDA
    event before and after each; a GPU time is measured from an event recorded as the call starts (the GPU is
    idle then, so it fires at once). Medians over ``repeats`` calls, ms after the call began."""
    import blockrag.attention_kv.block_cache as bc
    from blockrag.attention_kv.block_cache import GraphedStep

    marks: list = []

    def note(name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        marks.append((name, time.perf_counter(), e))

    def wrap(obj, attr, name):
        orig = getattr(obj, attr)

        def f(*a, **k):
            note(name + "_begin")
            out = orig(*a, **k)
            note(name + "_end")
            return out
        setattr(obj, attr, f)
        return orig

    saved = [(bc, "stitch_rotated_", wrap(bc, "stitch_rotated_", "stitch")),
             (gen, "_device_parts", wrap(gen, "_device_parts", "device_parts")),
             (gen.store, "question_ids", wrap(gen.store, "question_ids", "question_ids"))]
    orig_replay = GraphedStep.replay

    def replay(self, *a, **k):
        if self.n > 1:
            note("question_graph_begin")
        out = orig_replay(self, *a, **k)
        if self.n > 1:
            note("question_graph_end")
        return out
    GraphedStep.replay = replay
    runs = []
    try:
        for _ in range(repeats):
            torch.cuda.synchronize()
            marks.clear()
            note("call")
            for _piece in gen.generate(question, chunks, max_new_tokens=1, stream=True):
                note("first_piece")
                break
            torch.cuda.synchronize()
            h0, e0 = marks[0][1], marks[0][2]
            runs.append({n: ((t - h0) * 1e3, e0.elapsed_time(e)) for n, t, e in marks[1:]})
    finally:
        GraphedStep.replay = orig_replay
        for obj, attr, orig in saved:
            if obj is gen or obj is gen.store:
                delattr(obj, attr)
            else:
                setattr(obj, attr, orig)
    names = [n for n in runs[0] if all(n in r for r in runs)]
    return {n: {"host_ms": round(statistics.median(r[n][0] for r in runs), 3),
                "gpu_ms": round(statistics.median(r[n][1] for r in runs), 3)} for n in names}


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
        # the whole public call, one new token (TTFT's path), on a timeline
        row["marks"] = _marks(gen, question, chunks)
        row["timeline"] = _timeline(lambda: gen.generate(question, chunks, max_new_tokens=1))
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

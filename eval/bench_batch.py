"""Batched generation throughput: ``Generator.generate_batch`` at 1, 4, 16, 64 concurrent requests of an 8K
context each, against one request at a time through ``Generator.generate`` (CUDA graphs, warmed), in the
same run on the same GPU.

    python -m blockrag.eval.bench_batch --out eval/results/batch_h200.json

Model: a randomly initialised Llama-3-8B-shaped decoder in bf16 (speed does not depend on the weights).
Passages: a synthetic corpus (``eval/synthetic.py``'s fictional world, its passages packed into chunks of
~``--chunk-tokens`` tokens), encoded once; each request takes its own random subset of the chunks (random
order) filling ``--context`` tokens with the shared prefix, and its own question. Every request decodes
``--decode-tokens`` tokens (no stop strings; random weights never emit the end-of-turn token in practice).

Steps: (1) the attention backends of the batch engine on the engine's buffer layout at the measured
shapes — time and max |diff| against an fp32 computation; the fastest correct one is used below;
(2) correctness through the public API: batched greedy tokens vs ``generate()``'s for the same requests
(bf16 on the GPU: the two paths use different attention kernels, so near-ties may flip a token; the
agreement is reported, the CPU tests assert equality in fp32); (3) one request at a time: ``generate()``
sequentially (after ``warmup()`` for the bucket); (4) ``generate_batch`` with N requests and
``max_batch=N`` for each N, on one engine: an untimed run first (it allocates the buffer and captures the
decode graph of N rows), then the timed run. Throughput = answers (tokens) / wall clock of the whole
call (stitching, prefill and decode included); "decode tok/s" excludes the admission prefill.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from blockrag.eval.bench_attn_kernels import timed


def log(*a):
    print(*a, flush=True)


def synthetic_chunks(tok, n_tokens: int, chunk_tokens: int, seed: int = 0) -> list:
    """Chunks of ~``chunk_tokens`` tokens (whole synthetic passages packed together) totalling ``n_tokens``."""
    from blockrag.documents import Chunk
    from blockrag.eval.synthetic import make_multihop

    out, buf, total, s = [], [], 0, seed
    while total < n_tokens:
        world = make_multihop(seed=s, n_per_hop=1)
        s += 1
        for p in world.passages:
            buf += tok(p.text + "\n", add_special_tokens=False)["input_ids"]
            while len(buf) >= chunk_tokens:
                ids, buf = buf[:chunk_tokens], buf[chunk_tokens:]
                cid = f"syn{len(out)}"
                out.append(Chunk(id=cid, doc_id=cid, position=0, text=tok.decode(ids), token_ids=ids))
                total += len(ids)
                if total >= n_tokens:
                    return out
    return out


def make_requests(store, pool, n: int, context: int, decode_tokens: int, q_tokens: int, seed: int) -> list:
    from blockrag.attention_kv.batch import BatchRequest

    rng = random.Random(seed)
    sep = len(store.sep_ids)
    reqs = []
    for i in range(n):
        order = rng.sample(range(len(pool)), len(pool))
        chunks, used = [], len(store.prefix_ids)
        for j in order:
            c = pool[j]
            if used + len(c.token_ids) + sep > context - 2 * 64 - decode_tokens - 2:
                continue
            chunks.append(c)
            used += len(c.token_ids) + sep
        q = f"Request {i}: what does the record say about"
        words = pool[order[0]].text.split()
        k = 0
        while len(store.question_ids(q + "?")) < q_tokens:
            q += " " + words[k % len(words)]
            k += 1
        reqs.append(BatchRequest(q + "?", chunks, max_new_tokens=decode_tokens, stop=()))
    return reqs


def cuda_ms(fn, reps: int = 10) -> float:
    return timed(fn, reps=reps, warm=1)


@torch.no_grad()
def attention_backends(dev, n_layers_bytes: dict, shapes, cap: int) -> dict:
    """Time and check attend_rows' backends on the engine's layout: rows [B, cap, 2, Hkv, D] bf16, each row with
    its own length. Returns {shape: {backend: {ms, GBps, max_abs_diff} or {error}}}."""
    from blockrag.attention_kv.batch import attend_rows

    Hq, Hkv, D = n_layers_bytes["Hq"], n_layers_bytes["Hkv"], n_layers_bytes["D"]
    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for B, L in shapes:
        rows = torch.randn(B, cap, 2, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.randint(cap // 2, cap - L - 8, (B,), generator=torch.Generator().manual_seed(B))
        pos = (lens[:, None] + torch.arange(L)[None]).to(dev)
        Lk = int(pos.max()) + 1
        Lk = -(-Lk // 16) * 16
        vis = torch.arange(Lk, device=dev)[None, None] <= pos[:, :, None]
        q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.bfloat16, generator=g)
        K, V = rows[:, :Lk, 0].transpose(1, 2), rows[:, :Lk, 1].transpose(1, 2)
        ref = attend_rows(q.float(), K.float(), V.float(), vis, D ** -0.5, "matmul")
        kv_bytes = int((lens + L).sum()) * 2 * Hkv * D * 2
        res = {}
        for backend in ("sdpa", "matmul", "flash"):
            try:
                f = lambda: attend_rows(q, K, V, vis, D ** -0.5, backend, rows=rows)  # noqa: E731
                diff = (f().float() - ref).abs().max().item()
                ms = cuda_ms(f)
                res[backend] = {"ms": ms, "GBps": kv_bytes / (ms * 1e-3) / 1e9, "max_abs_diff": diff}
            except Exception as ex:  # noqa: BLE001 - reported, the others go on
                res[backend] = {"error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"}
            log(f"  attention B={B} L={L} {backend}: {res[backend]}")
        out[f"B{B}_L{L}"] = res
        del rows, K, V, q, ref
        torch.cuda.empty_cache()
    return out


def pick_backend(att: dict, tol: float = 0.05) -> str:
    """The backend with the least total time over the decode shapes, among those correct at every shape."""
    ok = {}
    for shape, res in att.items():
        for b, r in res.items():
            if "error" in r or not r["max_abs_diff"] < tol:
                ok[b] = None
            elif ok.get(b, 0.0) is not None:
                ok[b] = ok.get(b, 0.0) + (r["ms"] if shape.endswith("_L1") else 0.0)
    good = {b: t for b, t in ok.items() if t is not None}
    return min(good, key=good.get) if good else "sdpa"


def run_batch(eng, reqs) -> dict:
    """One ``run`` of ``reqs`` on engine ``eng`` (buffers and decode graphs kept from its earlier runs)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    s0 = dict(eng.stats)
    hs = [eng.submit(r) for r in reqs]
    eng.reserve_for(hs)
    eng.run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    toks = sum(len(h.result.token_ids) for h in hs)
    stats = {k: v - s0[k] for k, v in eng.stats.items()}
    first = stats["prefill_s"]
    res = {"wall_s": wall, "tokens": toks, "answers_per_s": len(reqs) / wall, "tok_per_s": toks / wall,
           "decode_tok_per_s": (toks - len(reqs)) / max(wall - first, 1e-9), "prefill_s": first,
           "ttft_ms_mean": statistics.mean(h.result.ttft_ms for h in hs), "stats": stats,
           "buffer_GiB": eng.kv.numel() * eng.kv.element_size() / 2 ** 30,
           "token_ids": [h.result.token_ids for h in hs]}
    return res


def table(res: dict) -> str:
    one = res["one_at_a_time"]
    lines = [f"{res['device']}; one request at a time: {one['tok_per_s']:.0f} tok/s, {one['answers_per_s']:.2f} "
             f"answers/s (Generator.generate, CUDA graphs); batch attention: {res['backend']}",
             "| concurrent requests | answers/s | tok/s | decode tok/s | tok/s vs one at a time | mean TTFT ms | "
             "wall s |",
             "|---|---|---|---|---|---|---|",
             f"| 1 (generate, sequential) | {one['answers_per_s']:.2f} | {one['tok_per_s']:.0f} | "
             f"{one['decode_tok_per_s']:.0f} | 1.0x | {one['ttft_ms_mean']:.1f} | {one['wall_s']:.2f} |"]
    for n, r in sorted(res["batched"].items(), key=lambda kv: int(kv[0])):
        if "error" in r:
            lines.append(f"| {n} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {n} | {r['answers_per_s']:.2f} | {r['tok_per_s']:.0f} | {r['decode_tok_per_s']:.0f} | "
                     f"{r['tok_per_s'] / one['tok_per_s']:.1f}x | {r['ttft_ms_mean']:.1f} | {r['wall_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="batch.json")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--question-tokens", type=int, default=50)
    ap.add_argument("--pool-tokens", type=int, default=24576, help="tokens of distinct passages to sample from")
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--sequential", type=int, default=4, help="requests run one at a time through generate()")
    ap.add_argument("--backend", default="pick", help="batch attention: pick (measured fastest), sdpa, flash, ...")
    ap.add_argument("--attention-only", action="store_true",
                    help="only step (1), saved to --out (a separate process: a failing kernel cannot end the run)")
    ap.add_argument("--attention-from", default=None, help="step (1)'s results from an --attention-only run")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: blockrag's generator tokenizer)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining steps past this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    t0 = time.time()
    dev = torch.device("cuda")
    shapes = [(16, 1), (64, 1), (16, 64)]
    cap = args.context + 64
    if args.attention_only:  # Llama-3-8B heads
        att = attention_backends(dev, {"Hq": 32, "Hkv": 8, "D": 128}, shapes, cap)
        Path(args.out).write_text(json.dumps({"attention": att, "backend": pick_backend(att)}, indent=1))
        return
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv.generate import question_bucket, size_bucket
    from blockrag.eval.bench_ttft import build_llama3_8b

    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from blockrag.models import load_tokenizer

        tok = load_tokenizer()
    model = build_llama3_8b(dev, layers=args.layers)
    ns = [int(x) for x in args.concurrency.split(",") if x]  # run in this order (the table is sorted)
    store = KVCacheStore(Path(tempfile.mkdtemp(prefix="bench-batch-")) / "kv", model, tok, dtype=torch.bfloat16,
                         lru_bytes=0)
    pool = synthetic_chunks(tok, args.pool_tokens, args.chunk_tokens)
    gen = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=16 << 30)
    t = time.time()
    store.add(pool, progress=False)
    log(f"model ready; pool of {len(pool)} chunks, {sum(len(c.token_ids) for c in pool)} tokens encoded in "
        f"{time.time() - t:.1f} s ({time.time() - t0:.0f} s)")
    ad = gen.adapter
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, context=args.context,
               decode_tokens=args.decode_tokens, pool_tokens=sum(len(c.token_ids) for c in pool),
               command=" ".join(["python -m blockrag.eval.bench_batch"] + (argv if argv is not None else sys.argv[1:])))
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(res, indent=1))

    # (1) attention backends at the engine's shapes
    if args.attention_from:
        try:
            res["attention"] = json.loads(Path(args.attention_from).read_text())["attention"]
        except (OSError, ValueError, KeyError) as ex:
            res["attention"] = {"error": f"{type(ex).__name__}: {ex}"}
    else:
        res["attention"] = attention_backends(dev, {"Hq": ad.n_heads, "Hkv": ad.n_kv_heads, "D": ad.head_dim},
                                              shapes, cap)
    backend = args.backend
    if backend == "pick":
        backend = "sdpa" if "error" in res["attention"] else pick_backend(res["attention"])
    res["backend"] = backend
    log(f"batch attention backend: {backend}")
    save()
    all_reqs = make_requests(store, pool, max(ns), args.context, args.decode_tokens, args.question_tokens, seed=1)
    res["n_context"] = [len(store.prefix_ids) + sum(len(c.token_ids) + len(store.sep_ids) for c in r.chunks)
                        for r in all_reqs]
    # (3) one at a time, warmed like a server would
    q_len = len(store.question_ids(all_reqs[0].question))
    n_q = question_bucket(q_len, gen.question_buckets)
    bucket = size_bucket(args.context + n_q + max(args.decode_tokens + 1, n_q) + 1, gen.max_cache_len,
                         gen.min_bucket)
    res["warmup"] = {k: v for k, v in gen.warmup(buckets=[bucket], question_lengths=(q_len,)).items()}
    seq = all_reqs[:args.sequential]
    gen.generate(seq[0].question, seq[0].chunks, max_new_tokens=4)  # untimed: device tier, first launches
    torch.cuda.synchronize()
    t = time.perf_counter()
    singles = [gen.generate(r.question, r.chunks, max_new_tokens=args.decode_tokens, stop=()) for r in seq]
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    toks = sum(len(r.token_ids) for r in singles)
    res["one_at_a_time"] = {"requests": len(seq), "wall_s": wall, "tokens": toks, "answers_per_s": len(seq) / wall,
                            "tok_per_s": toks / wall,
                            "decode_tok_per_s": statistics.median(r.decode_tokens_per_s for r in singles),
                            "ttft_ms_mean": statistics.mean(r.ttft_ms for r in singles),
                            "decode_graph": singles[0].timings.get("decode_graph")}
    log(f"one at a time: {res['one_at_a_time']}")
    save()
    # (2) correctness: first-token logits of one batched prefill vs the single-request prefill, then the
    # greedy tokens through the public API
    try:
        from blockrag.attention_kv.batch import BatchEngine

        eng = BatchEngine(gen, max_batch=len(seq), backend=backend)
        eng.keep_logits = True
        hs = [eng.submit(r) for r in seq]
        eng.reserve_for(hs)
        eng.step()  # the admission prefill of all of them
        got = eng.last_logits.float()
        ref = torch.stack([gen.prefill(r.question, r.chunks, "turbo", last_only=True)[0][-1].float() for r in seq])
        top2 = ref.topk(2, dim=-1).values
        res["first_logits"] = {"max_abs_diff": (got - ref).abs().max().item(), "logit_std": ref.std().item(),
                               "top1_top2_gap_min": (top2[:, 0] - top2[:, 1]).min().item(),
                               "argmax_equal": int((got.argmax(-1) == ref.argmax(-1)).sum())}
        del eng
    except Exception as ex:  # noqa: BLE001
        res["first_logits"] = {"error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"}
    log(f"first-token logits batched vs single: {res['first_logits']}")
    try:
        got = gen.generate_batch(seq, max_batch=len(seq), backend=backend)
        agree = []
        for a, b in zip(got, singles):
            n = 0
            while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
                n += 1
            agree.append(n)
        res["agreement"] = {"first_tokens_equal": sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(got, singles)),
                            "requests": len(seq), "equal_prefix_tokens": agree,
                            "tokens_per_request": [len(b.token_ids) for b in singles]}
    except Exception as ex:  # noqa: BLE001
        res["agreement"] = {"error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"}
    log(f"agreement batched vs generate(): {res['agreement']}")
    save()
    # (4) batched at each concurrency
    res["batched"] = {}
    for n in ns:
        if time.time() - t0 > args.budget_s:
            res["batched"][n] = {"error": "skipped: time budget"}
            continue
        try:
            from blockrag.attention_kv.batch import BatchEngine

            eng = BatchEngine(gen, max_batch=n, backend=backend, defaults={"stop": ()})
            warm = run_batch(eng, all_reqs[:n])  # untimed: buffer, decode graph capture, first launches
            r = run_batch(eng, all_reqs[:n])
            r["same_tokens_as_warm_run"] = r.pop("token_ids") == warm["token_ids"]
            r["warm_run_wall_s"] = warm["wall_s"]
            del eng
            torch.cuda.empty_cache()
            res["batched"][n] = r
            log(f"  {n} concurrent: {r['tok_per_s']:.0f} tok/s, {r['answers_per_s']:.2f} answers/s, decode "
                f"{r['decode_tok_per_s']:.0f} tok/s, wall {r['wall_s']:.2f} s, buffer {r['buffer_GiB']:.1f} GiB")
        except Exception as ex:  # noqa: BLE001
            res["batched"][n] = {"error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"}
            log(f"  {n} concurrent FAILED: {res['batched'][n]['error']}")
            eng = None  # noqa: F841 - frees the buffer before the next size
            torch.cuda.empty_cache()
        save()
    one = res["one_at_a_time"]["tok_per_s"]
    b16 = res["batched"].get(16, {})
    if "tok_per_s" in b16:
        res["ratio_16_vs_one"] = b16["tok_per_s"] / one
    res["elapsed_s"] = time.time() - t0
    save()
    log(table(res))


if __name__ == "__main__":
    main()

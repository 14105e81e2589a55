"""End to end, through the public API: time to the first streamed piece and decode tokens/s of
``Generator.generate(question, chunks, stream=True)`` at 2K..128K tokens of context, against HF transformers
on the same model, the same token ids and the same GPU, in the same run.

    python -m blockrag.eval.bench_e2e --out eval/results/e2e_h200.json

Model: a randomly initialised Llama-3-8B-shaped decoder in bf16 (speed does not depend on the weights),
``max_position_embeddings`` 131072. Passages: SciFact abstracts (``--passages``, JSONL with "text"; default
the dataset folder beside the repository, else random token ids), one chunk per abstract, taken in order
until the context (shared prefix + passages) reaches each length; a question of ``--question-tokens``.

Rows, per context length:
  ours TTFT        ``GenerationResult.ttft_ms``: from the call to the first token id (synchronised), after
                   ``Generator.warmup()``; chunk caches resident on the GPU (the device tier); median of repeats
  first piece      wall clock from ``generate(..., stream=True)`` to the first text piece: later than the first
                   token when that token alone decodes to no printable text (frequent with random weights)
  first call       the same for a question never seen before, of another length (the first request a user
                   makes after warm-up: any compilation or capture it pays shows here)
  HF full          ``model.generate(ids, max_new_tokens=1)`` on prefix + passages + question (full prefill, SDPA)
  HF reuse         HF's own cache reuse: a ``DynamicCache`` of the context built beforehand (untimed), then the
                   question forward over it and the argmax (wall clock; the cache cropped back after each run)
  decode           ours: tokens/s of the same streamed generation (CUDA-graph decode step); HF: ``StaticCache``
                   + ``torch.compile(mode="reduce-overhead")`` decode at ``--hf-static-at`` contexts, each in a
                   subprocess of its own after ours is done (beside our arena and graphs it ran out of memory)
Floors, from ceilings measured in the same run (copy bandwidth, bf16 matmul rate): TTFT >= max((weights + the
context's K/V) / copy bandwidth, the question forward's FLOPs / matmul rate); decode >= the same bytes per token.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PASSAGES = ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
CONTEXTS = (2048, 8192, 32768, 65536, 131072)


def log(*a):
    print(*a, flush=True)


def copy_bandwidth() -> float:
    n = 256 * 1024 * 1024
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    del src, dst
    return 2 * n * 2 / (statistics.median(ts) * 1e-3)


def matmul_rate() -> float:
    """bf16 dense matmul FLOP/s (8192^3, random data)."""
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    del a, b
    return 2 * m ** 3 / (statistics.median(ts) * 1e-3)


def load_passages(path: str | None, tokenizer, need_tokens: int, seed: int = 0) -> list:
    """Chunks (``blockrag.documents.Chunk``) holding at least ``need_tokens`` tokens, <= 512 tokens each."""
    from blockrag.documents import Chunk

    chunks, total = [], 0
    p = Path(path) if path else DEFAULT_PASSAGES
    if p.exists():
        with p.open() as f:
            for line in f:
                d = json.loads(line)
                text = d.get("text") or ""
                if d.get("title") and "_id" in d:
                    text = f"{d['title']}\n{text}"
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][:512]
                if len(ids) < 16:
                    continue
                cid = str(d.get("id", d.get("_id", len(chunks))))
                chunks.append(Chunk(id=cid, doc_id=cid, position=0, text=tokenizer.decode(ids), token_ids=ids))
                total += len(ids)
                if total >= need_tokens:
                    return chunks
    g = torch.Generator().manual_seed(seed)  # not enough text: random token ids for the rest
    while total < need_tokens:
        ids = torch.randint(100, len(tokenizer) - 100, (384,), generator=g).tolist()
        cid = f"rand{len(chunks)}"
        chunks.append(Chunk(id=cid, doc_id=cid, position=0, text="", token_ids=ids))
        total += len(ids)
    return chunks


def question_text(store, n_tokens: int, words: list[str]) -> str:
    """A question whose templated ids (``store.question_ids``) are ``n_tokens`` long (or just over)."""
    q = "What does the evidence say about"
    i = 0
    while len(store.question_ids(q + "?")) < n_tokens:
        q += " " + words[i % len(words)]
        i += 1
    return q + "?"


def take(chunks, prefix_len: int, target: int) -> list:
    out, n = [], prefix_len
    for c in chunks:
        if n + len(c.token_ids) > target:
            break
        out.append(c)
        n += len(c.token_ids)
    return out


@torch.no_grad()
def ours_ttft(gen, question, chunks, max_new_tokens: int):
    """(ms to the first streamed piece, decode tokens/s, result) of one streamed generation."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    s = gen.generate(question, chunks, max_new_tokens=max_new_tokens, stream=True)
    next(s, None)  # (None: no printable piece at all — random weights — then the time of the whole answer)
    first = (time.perf_counter() - t) * 1e3
    for _ in s:
        pass
    return first, s.result.decode_tokens_per_s, s.result


@torch.no_grad()
def hf_full_ms(model, ids) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         pad_token_id=0)
    int(out[0, -1])
    return (time.perf_counter() - t) * 1e3


@torch.no_grad()
def hf_reuse_ms(model, ctx, q, repeats: int) -> list[float]:
    from transformers import DynamicCache

    from blockrag.attention_kv.model import ModelAdapter

    kw = ModelAdapter.of(model)._cache_kw  # the cache argument's name in this transformers version
    cache = DynamicCache(config=model.config)
    model(input_ids=ctx, use_cache=True, logits_to_keep=1, **{kw: cache})
    L, n = ctx.shape[1], q.shape[1]
    pos = torch.arange(L, L + n, device=q.device)[None]
    ts = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=q, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        int(out.logits[0, -1].argmax())
        ts.append((time.perf_counter() - t) * 1e3)
        cache.crop(-n)  # back to the context alone
        assert cache.get_seq_length() == L
    del cache
    return ts[1:]  # the first run warms HF's kernels up


def table(res: dict) -> str:
    bw = res["copy_GBps"]
    lines = [f"{res['device']}, copy {bw:.0f} GB/s, bf16 matmul {res.get('matmul_TFLOPs', 0):.0f} TFLOP/s; warm-up "
             f"{res['warmup']['seconds']:.1f} s, {res['warmup']['graphs']} graphs, cache memory "
             f"{res['warmup']['cache_bytes'] / 2**30:.1f} GiB",
             "| context | ours TTFT ms | ours first piece ms | floor ms (bytes / FLOPs) | HF full ms | HF reuse ms | "
             "full / ours | reuse / ours | ours decode tok/s | decode floor tok/s | HF static+compile tok/s | "
             "first call after warm-up ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    for r in res["rows"]:
        full, reuse, ours = r.get("hf_full_ms"), r.get("hf_reuse_ms"), r.get("ttft_ms")
        lines.append(
            f"| {r['n_context']:,} | {f(ours)} | {f(r.get('first_piece_ms'))} | {f(r['ttft_floor_ms'])} "
            f"({f(r.get('ttft_floor_bytes_ms'))} / {f(r.get('ttft_floor_flops_ms'))}) | {f(full)} | "
            f"{f(reuse)} | "
            f"{f(full / ours if full and ours else None, '{:.0f}x')} | "
            f"{f(reuse / ours if reuse and ours else None, '{:.1f}x')} | {f(r.get('decode_tok_s'))} | "
            f"{f(r['decode_floor_tok_s'], '{:.0f}')} | {f(r.get('hf_static_tok_s'))} | {f(r.get('first_call_ms'))} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--question-tokens", type=int, default=50)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--passages", default=None, help="JSONL of passages (default: SciFact beside the repo)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: blockrag's generator tokenizer)")
    ap.add_argument("--store-dir", default=None, help="folder for the chunk caches (default: a temporary one)")
    ap.add_argument("--hf-static-at", default="32768", help="contexts for HF StaticCache+compile ('' = none)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: the 8B shape)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip HF peers once this much time has passed")
    ap.add_argument("--arena-gib", type=float, default=None,
                    help="page arena (device_cache_bytes) in GiB (default: the largest context plus a quarter)")
    ap.add_argument("--compile-decode", action="store_true", help="Generator(compile_decode=True)")
    ap.add_argument("--compile-question", action="store_true", help="Generator(compile_question=True)")
    ap.add_argument("--paged", action="store_true", help="Generator(paged=True): zero-copy stitching (experimental)")
    ap.add_argument("--paged-affine", type=int, default=0, metavar="STEP",
                    help="with --paged: the kernel's affine runs, STEP pages per inner step (0: off)")
    ap.add_argument("--compare-staging", action="store_true",
                    help="also time each context with Generator.staged_stitch switched (the stitching copy staged "
                         "on a side stream per layer group, or queued before the question forward), in the same run")
    ap.add_argument("--decode-kernel", action="store_true",
                    help="decode graphs always through our kernel (generate.DECODE_SDPA_FILL = None)")
    ap.add_argument("--warm-questions", default="48,64", help="question lengths warmed (the two asked)")
    ap.add_argument("--hf-static-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.paged_affine:
        from blockrag.attention_kv.kernels import paged_attention

        paged_attention.AFFINE_RUNS, paged_attention.RUN_STEP = True, args.paged_affine
    if args.decode_kernel:
        from blockrag.attention_kv import generate as generate_mod

        generate_mod.DECODE_SDPA_FILL = None
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    t_start = time.time()
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv.generate import question_bucket, size_bucket
    from blockrag.eval.bench_ttft import build_llama3_8b, hf_static_decode

    dev = torch.device("cuda")
    contexts = [int(x) for x in args.contexts.split(",") if x]
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from blockrag.models import load_tokenizer

        tok = load_tokenizer()
    model = build_llama3_8b(dev, layers=args.layers)
    model.config.max_position_embeddings = 131072
    store_dir = Path(args.store_dir or tempfile.mkdtemp(prefix="bench-e2e-"))
    store = KVCacheStore(store_dir / "kv", model, tok, dtype=torch.bfloat16, lru_bytes=0)
    room = 2 * 64 + args.decode_tokens + 2  # context target: the question (padded) and the answer fit below L
    pool = load_passages(args.passages, tok, max(contexts))
    words = [w for c in pool[:50] for w in c.text.split()[:20] if w.isalpha()] or ["the", "study"]
    question = question_text(store, args.question_tokens, words)
    new_question = question_text(store, args.question_tokens - 13, list(reversed(words)))
    sets = {L: take(pool, len(store.prefix_ids), L - room) for L in contexts}
    if args.hf_static_child is not None:  # a subprocess of the run: HF's compiled static-cache decode only
        L = args.hf_static_child
        ids = list(store.prefix_ids) + [t for c in sets[L] for t in c.token_ids] + store.question_ids(question)
        tps = hf_static_decode(model, torch.tensor([ids], device=dev), 32, dev)
        print("HF_STATIC " + json.dumps({"target": L, "n_ids": len(ids), "tok_s": tps}), flush=True)
        return
    bw = copy_bandwidth()
    flop_rate = matmul_rate()
    arena = int((args.arena_gib or 0) * 2 ** 30) or None
    if arena is None:  # every context's chunks resident at once (the sets share their first chunks)
        ad_ = (model.config.num_hidden_layers, model.config.num_key_value_heads, 128)
        arena = int(max(contexts) * 1.25 * ad_[0] * 2 * ad_[1] * ad_[2] * 2)
    gen = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=arena, paged=args.paged,
                    compile_decode=args.compile_decode, compile_question=args.compile_question)
    log(f"model ready, copy {bw / 1e9:.0f} GB/s; encoding {sum(len(c.token_ids) for c in sets[max(contexts)])} "
        f"context tokens ({time.time() - t_start:.0f} s)")
    t = time.time()
    store.add(sets[max(contexts)], progress=False)
    log(f"  encoded in {time.time() - t:.1f} s")
    warm_q = [int(x) for x in args.warm_questions.split(",") if x]
    if gen.paged:  # one graph per question length serves every context (zero-copy page table)
        wu = gen.warmup(question_lengths=warm_q)
    else:  # the buckets these requests fall in (as Generator.prefill sizes them), warmed like a server would
        n_q = question_bucket(len(store.question_ids(question)), gen.question_buckets)
        buckets = sorted({size_bucket(len(store.prefix_ids) + sum(len(c.token_ids) for c in s) + n_q
                                      + max(args.decode_tokens + 1, n_q) + 1, gen.max_cache_len, gen.min_bucket)
                          for s in sets.values()})
        wu = gen.warmup(buckets=buckets, question_lengths=warm_q)
    log(f"  warm-up: {wu}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_params = model.lm_head.weight.numel()
    dec_params = sum(p.numel() for p in model.parameters()) - head_params - model.model.embed_tokens.weight.numel()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_GBps=bw / 1e9,
               matmul_TFLOPs=flop_rate / 1e12, paged=gen.paged, fused_layers=gen.fused_layers,
               compile_decode=gen.compile_decode, staged_stitch=gen.staged_stitch,
               compile_question=gen.compile_question, warmup=wu,
               weights_bytes=weights, question_tokens=len(store.question_ids(question)),
               new_question_tokens=len(store.question_ids(new_question)), decode_tokens=args.decode_tokens,
               command=" ".join(["python -m blockrag.eval.bench_e2e"] + (argv or sys.argv[1:])), rows=[])
    static_at = {int(x) for x in args.hf_static_at.split(",") if x}
    for L in contexts:
        chunks = sets[L]
        row = {"target": L}
        try:
            ttfts, pieces, decs = [], [], []
            for i in range(args.repeats + 1):  # the first loads the chunk caches into the device tier
                ms, tps, r = ours_ttft(gen, question, chunks, args.decode_tokens)
                if i:
                    pieces.append(ms)
                    ttfts.append(r.ttft_ms)
                    decs.append(tps)
            row.update(n_context=r.n_context_tokens, n_question=r.n_question_tokens,
                       ttft_ms=statistics.median(ttfts), ttft_all_ms=ttfts, first_piece_ms=statistics.median(pieces),
                       first_piece_all_ms=pieces, decode_tok_s=statistics.median(decs),
                       timings=r.timings, n_decoded=len(r.token_ids))
            if args.compare_staging:
                default = gen.staged_stitch
                gen.staged_stitch = not default
                key = "ttft_staged" if gen.staged_stitch else "ttft_unstaged"
                row[key + "_all_ms"] = [ours_ttft(gen, question, chunks, args.decode_tokens)[2].ttft_ms
                                        for _ in range(args.repeats)]
                row[key + "_ms"] = statistics.median(row[key + "_all_ms"])
                gen.staged_stitch = default
                log(f"  {L}: staged_stitch={not default}: {row[key + '_ms']:.1f} ms TTFT")
            ms, _, r2 = ours_ttft(gen, new_question, chunks, 4)
            row.update(first_call_ms=r2.ttft_ms, first_call_piece_ms=ms,
                       first_call_capture_ms=r2.timings["graph_capture_ms"],
                       first_call_question_graph=r2.timings["question_graph"])
            kv = store.identity["n_layers"] * 2 * store.identity["n_kv_heads"] * store.identity["head_dim"] * 2
            ctx_bytes = kv * r.n_context_tokens
            # the question forward's FLOPs: 2 per decoder weight and real question token, the LM head for the
            # last token, and attention (QK^T and PV: 4 * Hq * D per query token and key, every layer)
            n_q_tok = r.n_question_tokens
            flops = (2 * dec_params * n_q_tok + 2 * head_params
                     + 4 * cfg.num_attention_heads * 128 * n_q_tok * r.n_context_tokens * cfg.num_hidden_layers)
            row["ttft_floor_bytes_ms"] = (weights + ctx_bytes) / bw * 1e3
            row["ttft_floor_flops_ms"] = flops / flop_rate * 1e3
            row["ttft_floor_ms"] = max(row["ttft_floor_bytes_ms"], row["ttft_floor_flops_ms"])
            row["decode_floor_tok_s"] = bw / (weights + ctx_bytes)
            log(f"  {L}: ours {row['ttft_ms']:.1f} ms TTFT, first piece {row['first_piece_ms']:.1f} ms (first call "
                f"{row['first_call_ms']:.1f} ms), {row['decode_tok_s']:.1f} tok/s, "
                f"bucket {r.timings['cache_bucket']}, graphs q={r.timings['question_graph']} "
                f"d={r.timings['decode_graph']} (sdpa {r.timings.get('decode_sdpa')})")
        except Exception as ex:  # noqa: BLE001 - reported in the table, the run goes on
            row["error"] = f"{type(ex).__name__}: {(str(ex).splitlines() or [''])[0][:300]}"
            log(f"  {L}: ours FAILED {row['error']}")
            row.setdefault("n_context", L)
            row.setdefault("ttft_floor_ms", None)
            row.setdefault("decode_floor_tok_s", None)
        if not args.no_hf and time.time() - t_start < args.budget_s:
            ids = [list(store.prefix_ids) + [t for c in chunks for t in c.token_ids], store.question_ids(question)]
            ctx = torch.tensor([ids[0]], device=dev)
            q = torch.tensor([ids[1]], device=dev)
            full = torch.cat([ctx, q], 1)
            try:
                reps = 1 if L > 16384 else 3
                if L == contexts[0]:
                    hf_full_ms(model, full)  # warm-up
                row["hf_full_ms"] = statistics.median([hf_full_ms(model, full) for _ in range(reps)])
                rs = hf_reuse_ms(model, ctx, q, 1 if L > 16384 else 3)
                row["hf_reuse_ms"] = statistics.median(rs)
                log(f"  {L}: HF full {row['hf_full_ms']:.0f} ms, reuse {row['hf_reuse_ms']:.1f} ms")
            except Exception as ex:  # noqa: BLE001
                row["hf_error"] = f"{type(ex).__name__}: {(str(ex).splitlines() or [''])[0][:300]}"
                log(f"  {L}: HF FAILED {row['hf_error']}")
            del ctx, q, full
            torch.cuda.empty_cache()
        res["rows"].append(row)
        Path(args.out).write_text(json.dumps(res, indent=1))
    res["memory"] = gen.cache_memory()
    # HF's compiled static-cache decode last, each context in a subprocess of its own once our memory is freed
    # (its compilation is the slowest step of the run; in our process it ran out of memory beside the arena)
    todo = [row for row in res["rows"] if row["target"] in static_at and not args.no_hf]
    if todo:
        import gc

        del gen, store
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    for row in todo:
        left = args.budget_s - (time.time() - t_start)
        if left < 60:
            row["hf_static_error"] = "skipped: out of the run's time budget"
            continue
        cmd = [sys.executable, "-m", "blockrag.eval.bench_e2e", "--hf-static-child", str(row["target"]),
               "--contexts", args.contexts, "--question-tokens", str(args.question_tokens),
               "--layers", str(args.layers), "--out", "/dev/null"]
        for flag, val in (("--tokenizer", args.tokenizer), ("--passages", args.passages)):
            if val:
                cmd += [flag, val]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, left - 5))
            hit = [ln for ln in out.stdout.splitlines() if ln.startswith("HF_STATIC ")]
            if hit:
                got = json.loads(hit[-1][len("HF_STATIC "):])
                row["hf_static_tok_s"] = got["tok_s"]
                if got["tok_s"] is None:  # the peer's own failure line (hf_static_decode logs it)
                    why = [ln.strip() for ln in out.stdout.splitlines() if "failed:" in ln]
                    row["hf_static_error"] = why[-1][:300] if why else "no tokens/s reported"
                log(f"  {row['target']}: HF StaticCache + torch.compile decode {got['tok_s']} tok/s")
            else:
                row["hf_static_error"] = (out.stderr or out.stdout).strip().splitlines()[-1][:300] if (
                    out.stderr or out.stdout) else f"exit {out.returncode}"
                log(f"  {row['target']}: HF static FAILED {row['hf_static_error']}")
        except subprocess.TimeoutExpired:
            row["hf_static_error"] = "timed out"
        Path(args.out).write_text(json.dumps(res, indent=1))
    res["elapsed_s"] = time.time() - t_start
    Path(args.out).write_text(json.dumps(res, indent=1))
    log(table(res))


if __name__ == "__main__":
    main()

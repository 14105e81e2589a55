"""Time to first token (TTFT) and decode speed: full prefill vs cached modes (turbo/block, blend).

GPU (default): a randomly initialised Llama-3-8B-shaped model in bf16 (speed does not depend on the
weights), total contexts 2K..32K (a shared prefix, passages of 256-512 tokens, a 50-token question).
Rows, all in one run on one machine:
  hf_full        HF prefill of prefix + passages + question (SDPA), use_cache=True
  hf_reuse       HF's own cache reuse: the context's DynamicCache, question-only forward with explicit positions
  turbo_eager    ours, cache resident on the GPU: stitch (one cat per layer) + question block, eager
  turbo          ours, same, question-block forward replayed from a CUDA graph (static shapes)
  turbo_host     ours, cache in pinned host memory: host->device copies layer by layer overlapped with the graph
  turbo_host_i8  same with the 8-bit (int8, per-channel scales) cache: half the bytes
  blend          CacheBlend with 15% recompute (check layer 1), eager
TTFT = from the request (cache on GPU or host) to the first token id on the device, CUDA events, median.
Decode tokens/s: greedy steps after the prefill: eager for HF and for ours, and ours replayed from one CUDA
graph captured once (positions and cache length read on the device, so every step replays the same graph).
Correctness first (2K, real encoding of the passages): ours vs HF's stitched DynamicCache, host vs GPU,
int8 vs bf16, blend(100%) vs full.

  PYTHONPATH=. python -m blockrag.eval.bench_ttft --out ttft.json            # GPU
  PYTHONPATH=. python -m blockrag.eval.bench_ttft --cpu --out ttft_cpu.json  # CPU, SmolLM2-135M
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time

import torch

from blockrag.attention_kv.cache_store import ChunkKV, encode_blocks, quantize_int8
from blockrag.attention_kv.blend import blend_prefill
from blockrag.attention_kv.block_cache import BlockKVCache, GraphedStep, forward_block
from blockrag.attention_kv.model import ModelAdapter
from blockrag.attention_kv.rope import cos_sin, rotate
from blockrag.eval.gpu_pieces import GraphedBlockForward


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- helpers
def make_layout(total: int, prefix_len: int, q_len: int, rng: torch.Generator) -> list[int]:
    """Passage lengths in [256, 512] filling ``total - prefix - question`` exactly."""
    room = total - prefix_len - q_len
    lens = []
    while room > 512:
        n = int(torch.randint(256, 513, (1,), generator=rng))
        n = min(n, room - 256) if room - n < 256 else n
        lens.append(n)
        room -= n
    lens.append(room)
    return lens


def timed(fn, reps: int, warmup: int = 1, device=None, reset=None) -> list[float]:
    """ms per call; CUDA events on GPU, perf_counter on CPU. ``reset`` runs untimed after each call."""
    cuda = device is not None and device.type == "cuda"
    out = []
    for i in range(warmup + reps):
        if cuda:
            torch.cuda.synchronize(device)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            ms = s.elapsed_time(e)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        if reset is not None:
            reset()
        if i >= warmup:
            out.append(ms)
    return out


def crop_to(dc, n: int) -> None:
    extra = dc.get_seq_length() - n
    if extra > 0:
        dc.crop(-extra)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def rel(a, b) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def hf_stitched_cache(model, parts: list[ChunkKV], device):
    """HF DynamicCache holding the stitched context with keys rotated (fp32) at contiguous positions."""
    from transformers import DynamicCache

    inv = ModelAdapter.of(model).inv_freq
    L = sum(p.n_tokens for p in parts)
    cos, sin = cos_sin(torch.arange(L, device=device), inv.to(device))
    dc = DynamicCache(config=model.config)
    kv = torch.cat([p.kv.to(device) if p.scale is None else p.dequant().to(device) for p in parts], dim=1)
    for l in range(kv.shape[0]):
        k = kv[l, :, 0].transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = kv[l, :, 1].transpose(0, 1)[None]
        dc.update(rotate(k, cos, sin).to(model.dtype), v.to(model.dtype), l)
    return dc


def set_attn(model, name):
    """HF's attention implementation for the HF peers; "blockrag" = ours (the seam never uses HF's)."""
    if name != "blockrag":
        model.set_attn_implementation(name)


@torch.no_grad()
def decode_speed(step, first_token, n: int, device, warmup: int = 2) -> float:
    tok = first_token
    for i in range(warmup):  # first calls compile kernels / pick GEMM algorithms
        tok = step(tok, i)
    first_token = tok
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t = time.perf_counter()
    for i in range(warmup, warmup + n):
        tok = step(tok, i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t)


@torch.no_grad()  # (with autograd on, inductor's CUDA graphs leave their fast path: "pending backwards")
def hf_static_decode(model, ids, n: int, device) -> float | None:
    """HF's own fast decoding path: a ``StaticCache`` sized to the context plus the new tokens and the
    forward compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Tokens/s, or None if
    compilation fails (the error is logged)."""
    from transformers import StaticCache

    from blockrag.attention_kv.model import ModelAdapter

    kw = ModelAdapter.of(model)._cache_kw  # the cache argument's name in this transformers version
    L = ids.shape[1]
    try:
        cache = StaticCache(config=model.config, max_cache_len=L + n + 16)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(L, device=device), **{kw: cache})
        fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        t = time.time()

        def step(tok, i):
            p = torch.full((1,), L + i, device=device, dtype=torch.long)
            return fwd(input_ids=tok.view(1, 1), position_ids=p[None], cache_position=p, use_cache=True,
                       **{kw: cache}).logits[0, -1].argmax()

        tok = out.logits[0, -1].argmax()
        for i in range(4):  # compile, then record the CUDA graph
            tok = step(tok, i)
        log(f"   HF static cache + torch.compile: compiled and recorded in {time.time() - t:.1f}s")
        return decode_speed(lambda tok, i: step(tok, i + 4), tok, n, device)
    except Exception as ex:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        log(f"   HF static cache + torch.compile failed: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}")
        return None
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- model
def build_llama3_8b(device, layers: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=65536,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    model.eval()
    # the rotary buffer must be fp32 and correct (constructed under a bf16 default dtype)
    rot = model.model.rotary_emb
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=device, dtype=torch.float32) / 128))
    rot.inv_freq = inv
    if hasattr(rot, "original_inv_freq"):
        rot.original_inv_freq = inv
    return model


# ----------------------------------------------------------------------------- GPU benchmark
@torch.no_grad()
def correctness(model, device, prefix_len, q_len, rng, results):
    log("== correctness (2K context, passages encoded by the model)")
    V = model.config.vocab_size
    lens = make_layout(2048, prefix_len, q_len, rng)
    prefix = torch.randint(0, V, (prefix_len,), generator=rng).tolist()
    blocks = [torch.randint(0, V, (n,), generator=rng).tolist() for n in lens]
    q_ids = torch.randint(0, V, (q_len,), generator=rng)
    set_attn(model, "blockrag")
    pkv, bkv = encode_blocks(model, prefix, blocks, batch_size=8)
    parts = [ChunkKV(torch.tensor(prefix), pkv.to(torch.bfloat16).to(device))]
    parts += [ChunkKV(torch.tensor(b), kv.to(torch.bfloat16).to(device)) for b, kv in zip(blocks, bkv)]
    Lc = sum(p.n_tokens for p in parts)
    cache = BlockKVCache(model, Lc + q_len + 64, device=device)
    cache.load_gathered(parts)
    qd = q_ids.to(device)
    graph = GraphedBlockForward(model, cache, Lc, q_len)
    cache.load_gathered(parts)
    ours = graph.replay(qd)[0].float().clone()
    cache.load_gathered(parts)
    eager = forward_block(model, cache, qd, Lc)[0, -1].float()
    set_attn(model, "sdpa")
    dc = hf_stitched_cache(model, parts, device)
    ref = model(input_ids=qd[None], position_ids=torch.arange(Lc, Lc + q_len, device=device)[None],
                past_key_values=dc, use_cache=True, logits_to_keep=1).logits[0, -1].float()
    c = {"turbo_graph_vs_hf_stitched_rel": rel(ours, ref), "turbo_eager_vs_hf_stitched_rel": rel(eager, ref),
         "turbo_graph_vs_eager_rel": rel(ours, eager), "argmax_equal": bool(ours.argmax() == ref.argmax())}
    # host-memory path (same data) and int8
    set_attn(model, "blockrag")
    from blockrag.eval.gpu_pieces import LayerPrefetcher, int8_blob

    hparts = [ChunkKV(p.token_ids, p.kv.cpu().pin_memory()) for p in parts]
    cache_h = BlockKVCache(model, Lc + q_len + 64, device=device)
    pf = LayerPrefetcher(cache_h)
    pf.epoch_t.zero_()
    cache_h.load_gathered(parts)
    graph_h = GraphedBlockForward(model, cache_h, Lc, q_len)
    cache_h.kv.zero_()
    pf.start(hparts)
    host = graph_h.replay(qd)[0].float().clone()
    c["turbo_host_vs_gpu_rel"] = rel(host, ours)
    # GPU-resident pool gather (fused RoPE) vs torch stitching, and the rope-at-stitch forward
    from blockrag.eval.gpu_pieces import DeviceKVPool

    nL = model.config.num_hidden_layers
    pool = DeviceKVPool(nL, parts[0].kv.shape[3], parts[0].kv.shape[4], Lc, dtype=torch.bfloat16, device=device)
    for i, p in enumerate(parts):
        pool.put(i, p)
    c_rs = BlockKVCache(model, Lc + q_len + 64, device=device, rope="stitch")
    c_ref = BlockKVCache(model, Lc + q_len + 64, device=device, rope="stitch")
    pool.gather_into(c_rs, list(range(len(parts))))
    c_ref.load_gathered(parts)
    c["pool_gather_rope_vs_torch_rel"] = rel(c_rs.kv[:, :, :Lc], c_ref.kv[:, :, :Lc])
    g_rs = GraphedBlockForward(model, c_rs, Lc, q_len)
    pool.gather_into(c_rs, list(range(len(parts))))
    rs = g_rs.replay(qd)[0].float().clone()
    c["turbo_rope_at_stitch_vs_hf_stitched_rel"] = rel(rs, ref)
    # graphed decode (positions on the device, one graph for every step) vs eager decode steps
    step_g = GraphedStep(model, c_rs, 1)
    toks = [int(rs.argmax())]
    g_lg, e_lg = [], []
    for i in range(4):  # eager greedy steps; the graph is then fed the same tokens (teacher forcing)
        e_lg.append(forward_block(model, c_rs, torch.tensor([toks[-1]], device=device), Lc + q_len + i)[0, -1].float())
        toks.append(int(e_lg[-1].argmax()))
    pool.gather_into(c_rs, list(range(len(parts))))
    g_rs.replay(qd)
    for i in range(4):
        g_lg.append(step_g.replay(toks[i], Lc + q_len + i)[0][0].float().clone())
    c["decode_graph_vs_eager_rel"] = max(rel(a, b) for a, b in zip(g_lg, e_lg))
    c["decode_graph_argmax_equal"] = all(int(a.argmax()) == int(b.argmax()) for a, b in zip(g_lg, e_lg))
    del step_g
    pf_rs = LayerPrefetcher(c_rs)
    pf_rs.prepare(hparts)
    pf_rs.epoch_t.zero_()
    g_rs_h = GraphedBlockForward(model, c_rs, Lc, q_len)
    c_rs.kv.zero_()
    pf_rs.arm()
    hrs = g_rs_h.replay(qd)[0]
    pf_rs.issue(hparts)
    c["turbo_host_rope_at_stitch_vs_gpu_rel"] = rel(hrs.float(), rs)
    c["host_wait_timed_out"] = pf_rs.timed_out()
    if c["host_wait_timed_out"] or c["turbo_host_rope_at_stitch_vs_gpu_rel"] > 0.02:
        log("  host path with overlap is wrong here: host timings skipped")
        results["skip_host"] = True
    del pool, c_rs, c_ref, g_rs, g_rs_h
    q8 = [quantize_int8(p.kv.float().cpu()) for p in parts]
    i8parts = [ChunkKV(p.token_ids, q, s) for p, (q, s) in zip(parts, q8)]
    blobs = [int8_blob(p).pin_memory() for p in i8parts]
    cache_h.kv.zero_()
    pf.start(i8parts, blobs=blobs)
    host8 = graph_h.replay(qd)[0].float().clone()
    deq = torch.cat([p.dequant(torch.float32) for p in i8parts], 1)
    orig = torch.cat([p.kv.float().cpu() for p in parts], 1)
    c["int8_kv_rel"] = rel(deq, orig)
    c["int8_device_dequant_vs_torch_rel"] = rel(cache_h.kv[:, 0, :Lc].float().cpu(), deq.to(torch.bfloat16).float())
    c["int8_logits_vs_bf16_rel"] = rel(host8, ours)
    c["int8_argmax_equal"] = bool(host8.argmax() == ours.argmax())
    pf.cache.layer_ready = None
    # blend 100% == full prefill; blend 15%
    set_attn(model, "sdpa")
    ids = torch.tensor(prefix + [t for b in blocks for t in b], device=device)
    full = model(input_ids=torch.cat([ids, qd])[None], logits_to_keep=1).logits[0, -1].float()
    set_attn(model, "blockrag")
    cache.load_gathered(parts)
    b100, _ = blend_prefill(model, cache, ids, qd, 1.0, 1)
    cache.load_gathered(parts)
    b15, nsel = blend_prefill(model, cache, ids, qd, 0.15, 1)
    c["blend100_vs_full_rel"] = rel(b100[-1], full)
    c["blend15_vs_full_rel"] = rel(b15[-1], full)
    c["turbo_vs_full_rel"] = rel(ours, full)
    for k, v in c.items():
        log(f"  {k}: {v:.3e}" if isinstance(v, float) else f"  {k}: {v}")
    results["correctness"] = c
    del cache, cache_h, graph, graph_h, dc
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def attn_micro(row, model, cache, load, Lc, Lq, device, reps):
    """One layer's question-block attention over the stitched cache: our kernel with RoPE on load
    (strided K/V views of the interleaved buffer), our kernel on pre-rotated contiguous K/V, and SDPA."""
    from blockrag.attention_kv.masks import get_attend

    attend = get_attend()
    load(cache)
    L = Lc + Lq
    cache.kv[:, :, Lc:L].normal_()  # the question's own keys (normally written by the forward)
    Hq = model.config.num_attention_heads
    q = torch.randn(1, Hq, Lq, 128, device=device, dtype=torch.bfloat16)
    k = cache.k[0, :, :L].transpose(1, 2)
    v = cache.v[0, :, :L].transpose(1, 2)
    kp = torch.arange(L, device=device, dtype=torch.int32)
    f_rope = lambda: attend(q, k, v, q_start=Lc, inv_freq=cache.inv_freq, k_positions=kp)
    kc, vc = k.contiguous(), v.contiguous()
    f_plain = lambda: attend(q, kc, vc, q_start=Lc)
    f_strided = lambda: attend(q, k, v, q_start=Lc)
    mask = torch.ones(Lq, L, dtype=torch.bool, device=device).tril(Lc)
    f_sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
    kv_bytes = 2 * kc.numel() * 2
    for name, f in (("attn_rope_us", f_rope), ("attn_strided_us", f_strided), ("attn_plain_us", f_plain),
                    ("attn_sdpa_us", f_sdpa)):
        try:
            row[name] = med(timed(f, max(20, reps * 5), 5, device)) * 1e3
        except Exception as err:  # keep the run going
            log(f"  {name} failed: {err!r}")
    if "attn_plain_us" in row:
        row["attn_plain_GBps"] = kv_bytes / (row["attn_plain_us"] * 1e-6) / 1e9
    ref = f_sdpa().float()
    row["attn_rel_err_rope_vs_sdpa"] = rel(f_rope().float(), torch.nn.functional.scaled_dot_product_attention(
        q, rotate(kc, *cos_sin(kp, cache.inv_freq)).to(kc.dtype), vc, attn_mask=mask, enable_gqa=True).float())
    row["attn_rel_err_plain_vs_sdpa"] = rel(f_plain().float(), ref)
    del kc, vc


def h2d_bandwidth(device, nbytes=1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ts = timed(lambda: dst.copy_(src, non_blocking=True), 5, 2, device)
    del src, dst
    return nbytes / (med(ts) * 1e-3) / 1e9


def d2d_bandwidth(device, nbytes=1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ts = timed(lambda: dst.copy_(src), 10, 3, device)
    return 2 * nbytes / (med(ts) * 1e-3) / 1e9


@torch.no_grad()
def bench_gpu(args):
    device = torch.device("cuda")
    rng = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": []}
    import transformers

    results["transformers"] = transformers.__version__
    t = time.time()
    model = build_llama3_8b(device, args.layers)
    log(f"model: Llama-3-8B shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params bf16, "
        f"built in {time.time() - t:.1f}s on {results['device']}")
    P, Lq = args.prefix_len, args.question_len
    if not args.skip_correctness:
        correctness(model, device, P, Lq, rng, results)
        args.no_host = args.no_host or results.get("skip_host", False)
    bw = h2d_bandwidth(device)
    results["h2d_GBps"] = bw
    results["d2d_GBps"] = d2d_bandwidth(device)
    log(f"measured H2D {bw:.1f} GB/s (pinned, 1 GiB), D2D copy {results['d2d_GBps']:.0f} GB/s")
    from blockrag.eval.gpu_pieces import DeviceKVPool, LayerPrefetcher, int8_blob

    V = model.config.vocab_size
    nL, Hkv, D = model.config.num_hidden_layers, model.config.num_key_value_heads, 128
    for total in args.lengths:
        row = {"total": total}
        lens = make_layout(total, P, Lq, rng)
        Lc = total - Lq
        row["n_passages"] = len(lens)
        ids = torch.randint(0, V, (1, total), generator=rng).to(device)
        q = ids[0, Lc:]
        reps = args.reps if total <= 8192 else max(3, args.reps // 3)
        log(f"== total {total}: prefix {P} + {len(lens)} passages + question {Lq}")
        # -- HF full prefill (SDPA)
        set_attn(model, "sdpa")
        ts = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), reps, 1, device)
        row["hf_full_ms"] = med(ts)
        # HF decode after full prefill
        from transformers import DynamicCache

        dc = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, :Lc], past_key_values=dc, use_cache=True, logits_to_keep=1)
        pos0 = Lc

        def hf_q():
            return model(input_ids=q[None], position_ids=torch.arange(Lc, total, device=device)[None],
                         past_key_values=dc, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()

        ts = timed(hf_q, reps * 2, 2, device, reset=lambda: crop_to(dc, Lc))
        row["hf_reuse_ms"] = med(ts)
        hf_q()

        def hf_step(tok, i):
            return model(input_ids=tok.view(1, 1), position_ids=torch.tensor([[total + i]], device=device),
                         past_key_values=dc, use_cache=True).logits[0, -1].argmax()

        row["hf_decode_tok_s"] = decode_speed(hf_step, q[-1], args.decode_tokens, device)
        crop_to(dc, Lc)
        del dc, out
        if args.hf_static:
            row["hf_static_compiled_tok_s"] = hf_static_decode(model, ids, args.decode_tokens, device)
        gc.collect()
        torch.cuda.empty_cache()
        # -- ours: chunk caches (values irrelevant to speed: random bf16)
        set_attn(model, "blockrag")
        pool = DeviceKVPool(nL, Hkv, D, Lc, dtype=torch.bfloat16, device=device)
        pool.kv.normal_()
        parts, keys, off = [], [], 0
        for i, n in enumerate([P] + lens):
            pool.entries[i] = (off, n)
            parts.append(ChunkKV(torch.zeros(n, dtype=torch.int32), pool.kv[:, off:off + n]))
            keys.append(i)
            off += n
        kv_bytes = sum(p.nbytes for p in parts)
        row["kv_MB"] = kv_bytes / 1e6
        cache = BlockKVCache(model, total + args.decode_tokens + 8 + Lq, device=device)
        attn_micro(row, model, cache, lambda c: pool.gather_into(c, keys), Lc, Lq, device, reps)

        def turbo_eager():
            pool.gather_into(cache, keys)
            return forward_block(model, cache, q, Lc)[0, -1].argmax()

        row["turbo_eager_ms"] = med(timed(turbo_eager, reps, 2, device))
        pool.gather_into(cache, keys)
        graph = GraphedBlockForward(model, cache, Lc, Lq)

        def turbo_graph():
            pool.gather_into(cache, keys)
            return graph.replay(q)[1]

        row["turbo_ms"] = med(timed(turbo_graph, reps * 2, 3, device))
        # stitch alone (one gather kernel over all layers) and the graph alone
        row["stitch_ms"] = med(timed(lambda: pool.gather_into(cache, keys), reps, 2, device))
        row["graph_only_ms"] = med(timed(lambda: graph.replay(q), reps, 2, device))
        del graph
        # rope applied once while stitching (no in-kernel rotation)
        cache_rs = BlockKVCache(model, total + args.decode_tokens + 8 + Lq, device=device, rope="stitch")
        pool.gather_into(cache_rs, keys)
        graph_rs = GraphedBlockForward(model, cache_rs, Lc, Lq)

        def turbo_rs():
            pool.gather_into(cache_rs, keys)
            return graph_rs.replay(q)[1]

        row["turbo_rs_ms"] = med(timed(turbo_rs, reps * 2, 3, device))
        row["graph_only_rs_ms"] = med(timed(lambda: graph_rs.replay(q), reps, 2, device))
        row["stitch_rs_ms"] = med(timed(lambda: pool.gather_into(cache_rs, keys), reps, 2, device))
        best_rope = "stitch" if row["turbo_rs_ms"] < row["turbo_ms"] else "kernel"
        row["host_rope"] = best_rope
        del graph_rs
        if best_rope == "stitch":
            cache, cache_rs = cache_rs, cache
        del cache_rs
        gc.collect()
        # greedy decoding after the prefill, on the faster variant (eager, no graph)
        pool.gather_into(cache, keys)
        forward_block(model, cache, q, Lc)

        def our_step(tok, i):
            return forward_block(model, cache, tok.view(1), total + i)[0, -1].argmax()

        row["turbo_decode_tok_s"] = decode_speed(our_step, q[-1], args.decode_tokens, device)
        # the same decoding replayed from one CUDA graph (positions and length on the device)
        if cache.rope == "stitch":
            step_g = GraphedStep(model, cache, 1)
            pool.gather_into(cache, keys)
            forward_block(model, cache, q, Lc)
            row["turbo_decode_graph_tok_s"] = decode_speed(lambda tok, i: step_g.replay(tok, total + i)[1],
                                                           q[-1], args.decode_tokens, device)
            del step_g
            if args.compile_decode:
                try:
                    t = time.time()
                    step_c = GraphedStep(model, cache, 1, compile=True)
                    log(f"   compiled + captured our decode step in {time.time() - t:.1f}s")
                    pool.gather_into(cache, keys)
                    forward_block(model, cache, q, Lc)
                    row["turbo_decode_graph_compiled_tok_s"] = decode_speed(
                        lambda tok, i: step_c.replay(tok, total + i)[1], q[-1], args.decode_tokens, device)
                    # same greedy tokens as the uncompiled step (teacher-forced from the same start)
                    pool.gather_into(cache, keys)
                    forward_block(model, cache, q, Lc)
                    a = step_c.replay(q[-1], total)[0].float().clone()
                    step_e = GraphedStep(model, cache, 1)
                    b = step_e.replay(q[-1], total)[0].float()
                    row["decode_compiled_vs_graph_rel"] = rel(a, b)
                    del step_c, step_e
                except Exception as ex:  # noqa: BLE001
                    log(f"   compiled decode failed: {type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
                torch._dynamo.reset()
                # the question forward as a device-position graph, plain and compiled (TTFT incl. stitching)
                try:
                    logits = {}
                    for name, comp in (("turbo_step_graph_ms", False), ("turbo_step_graph_compiled_ms", True)):
                        qg = GraphedStep(model, cache, Lq, compile=comp)

                        def turbo_step(qg=qg):
                            pool.gather_into(cache, keys)
                            return qg.replay(q, Lc)

                        row[name] = med(timed(lambda: turbo_step()[1], reps * 2, 3, device))
                        logits[comp] = turbo_step()[0].float().clone()
                        del qg
                    row["question_compiled_vs_graph_rel"] = rel(logits[True], logits[False])
                except Exception as ex:  # noqa: BLE001
                    log(f"   compiled question failed: {type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
                torch._dynamo.reset()
        # -- blend (eager)
        ctx_ids = ids[0, :Lc]

        def blend():
            pool.gather_into(cache, keys)
            return blend_prefill(model, cache, ctx_ids, q, args.blend_ratio, 1)[0][-1].argmax()

        row["blend_ms"] = med(timed(blend, max(2, reps // 2), 1, device))
        # -- host memory, bf16 and int8
        if not args.no_host:
            hparts = [ChunkKV(p.token_ids, p.kv.cpu().pin_memory()) for p in parts]
            pf = LayerPrefetcher(cache, group=args.group)
            pf.prepare(hparts)
            pf.epoch_t.zero_()
            graph_h = GraphedBlockForward(model, cache, Lc, Lq)

            def host():
                pf.arm()
                tok = graph_h.replay(q)[1]  # waits per layer on the copies issued below
                pf.issue(hparts)
                return tok

            host()
            torch.cuda.synchronize(device)
            if pf.timed_out():
                log("  host path: spin-wait timed out, no host timings from here on")
                args.no_host = True
            else:
                row["turbo_host_ms"] = med(timed(host, reps, 2, device))
            row["host_timed_out"] = pf.timed_out()
            row["host_bound_ms"] = kv_bytes / (bw * 1e9) * 1e3
        if not args.no_host:
            i8 = []
            for p in parts:
                qk, sc = quantize_int8(p.kv)
                i8.append(ChunkKV(p.token_ids, qk.cpu(), sc.cpu()))
            blobs = [int8_blob(p).pin_memory() for p in i8]
            i8_bytes = sum(b.numel() for b in blobs)
            row["kv_int8_MB"] = i8_bytes / 1e6

            pf.prepare(i8, blobs=blobs)

            def host8():
                pf.arm()
                tok = graph_h.replay(q)[1]
                pf.issue(i8, blobs=blobs)
                return tok

            row["turbo_host_i8_ms"] = med(timed(host8, reps, 2, device))
            row["host_timed_out"] = pf.timed_out()
            row["host_i8_bound_ms"] = i8_bytes / (bw * 1e9) * 1e3
            cache.layer_ready = None
            del graph_h, hparts, blobs, i8
        best = min(row["turbo_ms"], row["turbo_rs_ms"])
        row["speedup_vs_full"] = row["hf_full_ms"] / best
        row["speedup_vs_hf_reuse"] = row["hf_reuse_ms"] / best
        log("  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
        results["rows"].append(row)
        del cache, parts, pool
        gc.collect()
        torch.cuda.empty_cache()
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    return results


# ----------------------------------------------------------------------------- CPU benchmark
@torch.no_grad()
def bench_cpu(args):
    from blockrag.models import load_generator

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, tok = load_generator(None, dtype=torch.float32, device="cpu")
    rng = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    P, Lq = args.prefix_len, args.question_len
    results = {"device": "cpu", "threads": args.threads, "model": "SmolLM2-135M-Instruct fp32", "rows": []}
    for total in args.lengths:
        lens = make_layout(total, P, Lq, rng)
        Lc = total - Lq
        ids = torch.randint(0, V, (1, total), generator=rng)
        q = ids[0, Lc:]
        prefix = ids[0, :P].tolist()
        blocks, off = [], P
        for n in lens:
            blocks.append(ids[0, off:off + n].tolist())
            off += n
        pkv, bkv = encode_blocks(model, prefix, blocks, batch_size=4)
        parts = [ChunkKV(torch.tensor(prefix), pkv)] + [ChunkKV(torch.tensor(b), kv) for b, kv in zip(blocks, bkv)]
        row = {"total": total, "n_passages": len(lens)}
        reps = args.reps
        set_attn(model, "sdpa")
        row["hf_full_ms"] = med(timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), reps, 1))
        from transformers import DynamicCache

        dc = DynamicCache(config=model.config)
        model(input_ids=ids[:, :Lc], past_key_values=dc, use_cache=True, logits_to_keep=1)
        row["hf_reuse_ms"] = med(timed(lambda: model(
            input_ids=q[None], position_ids=torch.arange(Lc, total)[None], past_key_values=dc, use_cache=True,
            logits_to_keep=1), reps, 1, reset=lambda: crop_to(dc, Lc)))
        set_attn(model, "blockrag")
        cache = BlockKVCache(model, total + args.decode_tokens + 8 + Lq, device=device, rope=args.cpu_rope)

        def turbo():
            cache.load(parts)
            return forward_block(model, cache, q, Lc)[0, -1].argmax()

        row["turbo_ms"] = med(timed(turbo, reps, 1))
        row["blend_ms"] = med(timed(lambda: (cache.load(parts), blend_prefill(
            model, cache, ids[0, :Lc], q, args.blend_ratio, 1)), reps, 1))
        turbo()
        row["turbo_decode_tok_s"] = decode_speed(
            lambda t, i: forward_block(model, cache, t.view(1), total + i)[0, -1].argmax(), q[-1],
            args.decode_tokens, device)
        row["speedup_vs_full"] = row["hf_full_ms"] / row["turbo_ms"]
        row["speedup_vs_hf_reuse"] = row["hf_reuse_ms"] / row["turbo_ms"]
        log("  " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
        results["rows"].append(row)
    return results


# ----------------------------------------------------------------------------- table
def table(results) -> str:
    rows = results["rows"]
    cols = [("total", "ctx", "{:d}"), ("hf_full_ms", "HF full ms", "{:.1f}"), ("hf_reuse_ms", "HF reuse ms", "{:.1f}"),
            ("turbo_eager_ms", "turbo eager ms", "{:.1f}"), ("turbo_ms", "turbo ms", "{:.2f}"),
            ("turbo_rs_ms", "turbo rope@stitch ms", "{:.2f}"),
            ("stitch_ms", "stitch ms", "{:.2f}"), ("stitch_rs_ms", "stitch+rope ms", "{:.2f}"), ("blend_ms", "blend ms", "{:.1f}"),
            ("turbo_host_ms", "host ms", "{:.1f}"), ("host_bound_ms", "bytes/H2D ms", "{:.1f}"),
            ("turbo_host_i8_ms", "host i8 ms", "{:.1f}"), ("host_i8_bound_ms", "i8 bytes/H2D ms", "{:.1f}"),
            ("speedup_vs_full", "x vs full", "{:.1f}"), ("speedup_vs_hf_reuse", "x vs reuse", "{:.1f}"),
            ("hf_decode_tok_s", "HF dec tok/s", "{:.1f}"),
            ("hf_static_compiled_tok_s", "HF static+compile tok/s", "{:.1f}"), ("turbo_decode_tok_s", "turbo dec tok/s", "{:.1f}"),
            ("turbo_decode_graph_tok_s", "turbo dec graph tok/s", "{:.1f}"),
            ("turbo_decode_graph_compiled_tok_s", "turbo dec graph+compile tok/s", "{:.1f}"),
            ("turbo_step_graph_ms", "turbo step-graph ms", "{:.2f}"),
            ("turbo_step_graph_compiled_ms", "turbo step-graph+compile ms", "{:.2f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols) + " |")
    acols = [("attn_rope_us", "attn rope-on-load us"), ("attn_strided_us", "attn strided us"),
             ("attn_plain_us", "attn contiguous us"), ("attn_sdpa_us", "SDPA us"),
             ("attn_plain_GBps", "contig GB/s"), ("graph_only_ms", "graph ms"), ("graph_only_rs_ms", "graph rs ms")]
    acols = [c for c in acols if any(c[0] in r for r in rows)]
    if acols:
        lines += ["", "| ctx | " + " | ".join(c[1] for c in acols) + " |", "|---|" + "---|" * len(acols)]
        for r in rows:
            lines.append(f"| {r['total']} | " + " | ".join(f"{r[c[0]]:.1f}" if c[0] in r else "-" for c in acols) + " |")
    hr = [r for r in rows if "turbo_host_ms" in r and "turbo_host_i8_ms" in r]
    if hr:
        lines.append("")
        lines.append("host TTFT / (KV bytes / H2D): " + ", ".join(
            f"{r['total']}: {r['turbo_host_ms'] / r['host_bound_ms']:.2f} (int8 {r['turbo_host_i8_ms'] / r['host_i8_bound_ms']:.2f})"
            for r in hr))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU run with SmolLM2-135M")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--question-len", type=int, default=50)
    ap.add_argument("--prefix-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--blend-ratio", type=float, default=0.15)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group", type=int, default=4, help="layers per host->device copy group")
    ap.add_argument("--cpu-rope", default="stitch", choices=["stitch", "kernel"])
    ap.add_argument("--no-host", action="store_true")
    ap.add_argument("--compile-decode", action="store_true",
                    help="also time our graphed decode step with torch.compile (inductor) inside the graph")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time HF decoding with a StaticCache and torch.compile (reduce-overhead)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cpu:
        args.lengths = args.lengths or [512, 1024, 2048]
        args.reps = min(args.reps, 3)
        res = bench_cpu(args)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu")
        args.lengths = args.lengths or [2048, 4096, 8192, 16384, 32768]
        res = bench_gpu(args)
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)
    log("")
    if "correctness" in res:
        log("correctness: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in res["correctness"].items()))
    log(f"device: {res['device']}" + (f", H2D {res['h2d_GBps']:.1f} GB/s, D2D {res['d2d_GBps']:.0f} GB/s"
                                      if "h2d_GBps" in res else ""))
    log(table(res))


if __name__ == "__main__":
    main()

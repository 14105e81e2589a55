"""Short-question and decode attention kernels against their floors, on the cache layout the product uses.

    python -m blockrag.eval.bench_attn_kernels --out eval/results/attn_kernels_h200.json [--lengths 32768]
        [--heads 32/8,28/4]   # query heads / KV heads, default both (names llama3-8b, qwen2-7b also accepted)

Needs a CUDA GPU. One run: (1) the ceilings: device-to-device copy bandwidth (bytes read + written) and the
bf16 matmul rate (8192^3, random data); (2) correctness of every variant against float64 on random shapes
(ragged lengths, both head layouts, output poisoned with NaN first); (3) timings: a 50-token question and one
decoded token over a 32K cache, Llama-3-8B heads (32 q / 8 KV) and Qwen2-7B heads (28 q / 4 KV), d=128, bf16
(``--heads`` picks the layouts of all three parts).

Layout and call are the generator's: K and V interleaved per token (``kv[layer, token, 2, Hkv, D]``), the
whole buffer (twice the valid length: the worst case of power-of-two size buckets) passed with the valid
length on the device (``kv_len``), each call captured in one CUDA graph
with 8 layers back to back (each layer's K/V distinct, 8 x the L2 size in all), median of the replays / 8.
Floor of one call = max(K/V bytes / copy bandwidth, attention FLOPs / matmul rate); the FLOPs count the
question's real rows (4 * Hq * Lq * Lk * D, causal tail ignored).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from blockrag.attention_kv.kernels.paged_attention import attend_paged, attend_paged_reference
from blockrag.attention_kv.kernels.question_attention import attend_question

D = 128
DT = torch.bfloat16
HEADS = {"llama3-8b": (32, 8), "qwen2-7b": (28, 4)}  # the default layouts (--heads)
N_LAYERS = 8

# (name, knobs of attend_question); the first one is the default. Dropped after one H200 run (us at 32K, Llama
# heads, question / decode; default 84.9 / 43.3): bm128 bn64 w8 s3 125.6; bm128 bn128 w8 s2 132.4; bm64 bn64
# w4 s3 pps2 121.4; bm64 bn64 w4 s2 pps3 147.9; bm128 bn64 w8 s2 pps2 186.5; lazy rescaling 92.8 / decode:
# bn128 s3 pps2 54.3; bn64 s3 pps2 55.7; bn64 s2 pps3 67.7; bn128 s2 pps2 59.1; bn32 s4 pps4 68.7.
QUESTION_VARIANTS = [
    ("default", {}),
    ("bm64 bn64 w4 s2 pps2", dict(block_m=64, block_n=64, num_warps=4, num_stages=2, programs_per_sm=2)),
]
DECODE_VARIANTS = [  # default: bn128 s3 pps0.5 (pps2 / pps4 / bn64 w2: 1.4-1.9x slower at 32K on an H200)
    ("default", {}),
    ("bn128 s3 pps1", dict(block_n=128, num_stages=3, programs_per_sm=1)),
    ("bn128 s3 pps0.25", dict(block_n=128, num_stages=3, programs_per_sm=0.25)),
    ("bn64 s4 pps0.5", dict(block_n=64, num_stages=4, programs_per_sm=0.5)),
    # the main loop three tiles deep (the edge loop unpipelined leaves it the shared memory)
    ("bn128 s4 edge1 pps0.5", dict(block_n=128, num_stages=4, edge_stages=1, programs_per_sm=0.5)),
    ("bn128 s4 edge1 pps1", dict(block_n=128, num_stages=4, edge_stages=1, programs_per_sm=1)),
    ("bn128 s3 edge1 pps0.5", dict(block_n=128, num_stages=3, edge_stages=1, programs_per_sm=0.5)),
    ("bn64 s6 edge1 pps1", dict(block_n=64, num_stages=6, edge_stages=1, programs_per_sm=1)),
]


def log(*a):
    print(*a, flush=True)


def timed(fn, reps: int = 30, warm: int = 3) -> float:
    """Median ms of ``fn`` over ``reps`` runs, CUDA events around each."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def ceilings() -> dict:
    n = 512 * 1024 * 1024
    src = torch.randn(n, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=20)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=DT)
    b = torch.randn(m, m, device="cuda", dtype=DT)
    ms2 = timed(lambda: a @ b, reps=20)
    del a, b
    torch.cuda.empty_cache()
    return dict(copy_GBps=2 * n * 2 / (ms * 1e-3) / 1e9, matmul_TFLOPs=2 * m ** 3 / (ms2 * 1e-3) / 1e12)


def naive64(q, k, v, n_valid):
    """float64 causal attention of the last ``Lq`` positions of ``n_valid`` keys."""
    B, Hq, Lq, _ = q.shape
    G = Hq // k.shape[1]
    kk = k[:, :, :n_valid].double().repeat_interleave(G, 1)
    vv = v[:, :, :n_valid].double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    qpos = torch.arange(n_valid - Lq, n_valid, device=q.device)
    s = s.masked_fill(torch.arange(n_valid, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(s, -1) @ vv


def kv_buffer(n_layers, max_len, hkv):
    """The generator's cache layout: kv[layer, 1, token, 2, Hkv, D]; views k/v [layer] -> [1, Hkv, max_len, D]."""
    kv = torch.randn(n_layers, 1, max_len, 2, hkv, D, device="cuda", dtype=DT)
    ks = [kv[i, :, :, 0].transpose(1, 2) for i in range(n_layers)]
    vs = [kv[i, :, :, 1].transpose(1, 2) for i in range(n_layers)]
    return kv, ks, vs


def parse_heads(spec: str) -> dict:
    """``"32/8,28/4"`` (query heads / KV heads) or known names -> {name: (Hq, Hkv)}; a layout of
    ``HEADS`` keeps its model name in the results."""
    names = {v: k for k, v in HEADS.items()}
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in HEADS:
            hq, hkv = HEADS[item]
        else:
            try:
                hq, hkv = (int(x) for x in item.split("/"))
            except ValueError:
                raise SystemExit(f"--heads: expected Hq/Hkv (e.g. 28/4) or one of {list(HEADS)}, got {item!r}")
            if hkv <= 0 or hq % hkv:
                raise SystemExit(f"--heads: {item}: query heads must be a multiple of KV heads")
        out[names.get((hq, hkv), f"{hq}/{hkv}")] = (hq, hkv)
    if not out:
        raise SystemExit("--heads: no layout given")
    return out


def correctness(variants_q, variants_d, heads=HEADS) -> list:
    rows = []
    torch.manual_seed(0)
    for head_name, (hq, hkv) in heads.items():
        for lq, variants in ((50, variants_q), (64, variants_q[:1]), (1, variants_d)):
            if not variants:
                continue
            for n_valid in (3001, 12345):
                max_len = n_valid + 777
                _, ks, vs = kv_buffer(1, max_len, hkv)
                q = torch.randn(1, hq, lq, D, device="cuda", dtype=DT)
                ref = naive64(q, ks[0], vs[0], n_valid)
                kv_len = torch.tensor([n_valid], dtype=torch.int32, device="cuda")
                # every variant as timed (copy engine, length on the device); the default also eagerly
                cases = [(name, kw, True) for name, kw in variants] + [(variants[0][0], variants[0][1], False)]
                for name, kw, dyn in cases:
                    out = torch.full_like(q, float("nan"))
                    if dyn:
                        attend_question(q, ks[0], vs[0], kv_len=kv_len, out=out, tma=True, **kw)
                    else:
                        attend_question(q, ks[0][:, :, :n_valid], vs[0][:, :, :n_valid], out=out, tma=False, **kw)
                    torch.cuda.synchronize()
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(out).all()) and err < 2e-2
                    rows.append(dict(heads=head_name, Lq=lq, Lk=n_valid, variant=name, kv_len_on_device=dyn,
                                     rel_err_vs_fp64=err, ok=ok))
                    if not ok:
                        log(f"  FAIL {head_name} Lq={lq} Lk={n_valid} {name} dyn={dyn}: rel {err:.3g}")
                del ks, vs
    n_bad = sum(not r["ok"] for r in rows)
    log(f"correctness: {len(rows) - n_bad}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err_vs_fp64'] for r in rows):.2e}")
    return rows


def graph_of(calls):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return g


def layer_us(calls) -> float:
    """Microseconds per layer of ``calls`` (one per layer) replayed as one CUDA graph."""
    g = graph_of(calls)
    us = timed(g.replay, reps=40) / N_LAYERS * 1e3
    del g
    return us


def bench(ceil, lengths, heads=HEADS, on_row=None) -> list:
    """Timing rows; ``on_row(rows)`` after each one (the caller saves partial results)."""
    rows = []
    for head_name, (hq, hkv) in heads.items():
        for lk in lengths:
            # a power-of-two size bucket holding Lk keys plus the question: up to twice the valid length
            max_len = 2 * lk
            kv, ks, vs = kv_buffer(N_LAYERS, max_len, hkv)
            kv_len = torch.tensor([lk], dtype=torch.int32, device="cuda")
            kv_bytes = 2 * lk * hkv * D * 2
            # 50 tokens (the question), 64 (the same padded to its bucket: what the generator runs), 1
            for lq, variants in ((50, QUESTION_VARIANTS), (64, QUESTION_VARIANTS[:1]), (1, DECODE_VARIANTS)):
                if not variants:
                    continue
                q = torch.randn(1, hq, lq, D, device="cuda", dtype=DT)
                outs = [torch.empty_like(q) for _ in range(N_LAYERS)]
                flops = 4 * hq * lq * lk * D
                floor_us = max(kv_bytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12)) * 1e6
                tight = [(n + " (buffer Lk+1024)", dict(kw, _tight=True)) for n, kw in variants[:1]]
                for name, kw in variants + tight:
                    try:
                        kw = dict(kw)
                        n_buf = lk + 1024 if kw.pop("_tight", False) else max_len
                        calls = [(lambda i=i, kw=kw, n_buf=n_buf: attend_question(
                            q, ks[i][:, :, :n_buf], vs[i][:, :, :n_buf], kv_len=kv_len, out=outs[i], **kw))
                            for i in range(N_LAYERS)]
                        us = layer_us(calls)
                    except Exception as ex:  # noqa: BLE001
                        log(f"  {head_name} Lq={lq} {name}: {type(ex).__name__}: {str(ex).splitlines()[0][:150]}")
                        continue
                    r = dict(heads=head_name, Lq=lq, Lk=lk, variant=name, us=us, floor_us=floor_us,
                             x_floor=us / floor_us, kv_GBps=kv_bytes / (us * 1e-6) / 1e9,
                             pct_copy_bw=100 * kv_bytes / (us * 1e-6) / 1e9 / ceil["copy_GBps"],
                             TFLOPs=flops / (us * 1e-6) / 1e12)
                    rows.append(r)
                    if on_row:
                        on_row(rows)
                    log(f"  {head_name:10s} Lq={lq:3d} Lk={lk} {name:24s} {us:7.1f} us  x{r['x_floor']:.2f} floor "
                        f"{r['pct_copy_bw']:5.1f}% copy BW {r['TFLOPs']:5.0f} TFLOP/s")
                # SDPA on contiguous K/V (its best case: no interleaving), as a peer
                kc = ks[0][:, :, :lk].contiguous()
                vc = vs[0][:, :, :lk].contiguous()
                try:
                    from torch.nn.attention.bias import causal_lower_right

                    mask = causal_lower_right(lq, lk) if lq > 1 else None
                    fn = lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)  # noqa
                    g = graph_of([fn])
                    us = timed(g.replay, reps=40) * 1e3
                    rows.append(dict(heads=head_name, Lq=lq, Lk=lk, variant="torch SDPA (contiguous K/V)", us=us,
                                     floor_us=floor_us, x_floor=us / floor_us,
                                     pct_copy_bw=100 * kv_bytes / (us * 1e-6) / 1e9 / ceil["copy_GBps"],
                                     TFLOPs=flops / (us * 1e-6) / 1e12))
                    if on_row:
                        on_row(rows)
                    del g
                except Exception as ex:  # noqa: BLE001
                    log(f"  SDPA: {type(ex).__name__}: {str(ex).splitlines()[0][:150]}")
                del kc, vc
            del kv, ks, vs
            torch.cuda.empty_cache()
    return rows


def bench_decode_sdpa(ceil, lengths, heads=HEADS) -> list:
    """A decoded token through PyTorch SDPA over the generator's interleaved layer views, in CUDA graphs over
    ``N_LAYERS`` layers (as the decode graph runs): over the exact length (what an eager step can do), and over
    a buffer 1,024 keys longer than the valid ones with a mask built once per step from the device-side length
    (what a graph serving a growing cache must do); our kernel on the same views as the reference point."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    backends = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION}
    for head_name, (hq, hkv) in heads.items():
        for lk in lengths:
            n_buf = lk + 1024
            kv, ks, vs = kv_buffer(N_LAYERS, n_buf, hkv)
            kv_len = torch.tensor([lk], dtype=torch.int32, device="cuda")
            ar = torch.arange(n_buf, device="cuda")
            bias = torch.empty(1, 1, 1, n_buf, device="cuda", dtype=DT)
            zero, hidden = (torch.tensor(x, device="cuda", dtype=DT) for x in (0.0, float("-inf")))
            q = torch.randn(1, hq, 1, D, device="cuda", dtype=DT)
            outs = [torch.empty_like(q) for _ in range(N_LAYERS)]
            kv_bytes = 2 * lk * hkv * D * 2
            floor_us = kv_bytes / (ceil["copy_GBps"] * 1e9) * 1e6
            ref = attend_question(q, ks[0][:, :, :n_buf], vs[0][:, :, :n_buf], kv_len=kv_len).float()

            def mask_step():
                torch.where(ar < kv_len, zero, hidden, out=bias[0, 0, 0])

            cases = [("ours (kv_len on the device)", None, lambda i: attend_question(
                q, ks[i], vs[i], kv_len=kv_len, out=outs[i]), False)]
            for bname, b in backends.items():
                cases.append((f"SDPA {bname}, exact length", b, lambda i: F.scaled_dot_product_attention(
                    q, ks[i][:, :, :lk], vs[i][:, :, :lk], enable_gqa=True), False))
                cases.append((f"SDPA {bname}, buffer + mask", b, lambda i: F.scaled_dot_product_attention(
                    q, ks[i], vs[i], attn_mask=bias, enable_gqa=True), True))
            for name, b, fn, masked in cases:
                try:
                    with (sdpa_kernel([b]) if b is not None else contextlib.nullcontext()):
                        calls = ([mask_step] if masked else []) + [lambda i=i: fn(i) for i in range(N_LAYERS)]
                        mask_step()
                        err = (fn(0).float() - ref).abs().max().item()
                        us = layer_us(calls)
                except Exception as ex:  # noqa: BLE001
                    log(f"  {head_name} decode {name}: {type(ex).__name__}: {str(ex).splitlines()[0][:120]}")
                    continue
                rows.append(dict(heads=head_name, Lq=1, Lk=lk, variant=name, us=us, floor_us=floor_us,
                                 x_floor=us / floor_us, max_abs_diff_vs_ours=err,
                                 pct_copy_bw=100 * kv_bytes / (us * 1e-6) / 1e9 / ceil["copy_GBps"],
                                 TFLOPs=4 * hq * lk * D / (us * 1e-6) / 1e12))
                log(f"  {head_name:10s} decode Lk={lk} {name:34s} {us:7.1f} us {rows[-1]['pct_copy_bw']:5.1f}% copy BW"
                    f"  |diff| {err:.1e}")
            del kv, ks, vs
            torch.cuda.empty_cache()
    return rows


def paged_request(lk, lq, hkv, page, n_layers, seed=0, contiguous=False):
    """An arena of ``n_layers`` layers holding a request of ``lk`` context tokens in chunks of 100-512 tokens
    (each chunk's last page partly filled, pages shuffled; ``contiguous``: each chunk's pages consecutive, as
    the arena hands them out when it can, the chunks in shuffled order) plus a tail of ``lq`` tokens; the page
    table, the page count on the device, the query positions and fp32 cos/sin tables."""
    g = torch.Generator().manual_seed(seed)
    lens, n = [], 0
    while n < lk:
        lens.append(min(int(torch.randint(100, 513, (1,), generator=g)), lk - n))
        n += lens[-1]
    n_pages_ctx = sum(-(-x // page) for x in lens)
    n_tail = -(-(lq + 1) // page)
    total = n_pages_ctx + n_tail
    perm = torch.randperm(total, generator=g)
    if contiguous:  # chunk i's pages: a block of consecutive ids, the blocks (and the tail's) in shuffled order
        sizes = [-(-x // page) for x in lens] + [n_tail]
        order = torch.randperm(len(sizes), generator=g).tolist()
        first, at = [0] * len(sizes), 0
        for b in order:
            first[b], at = at, at + sizes[b]
        perm = torch.tensor([first[b] + j for b, n_b in enumerate(sizes) for j in range(n_b)])
    cols, start, k = [], 0, 0
    for x in lens:
        for j in range(-(-x // page)):
            cols.append((int(perm[k]), min(page, x - j * page), start + j * page, start))
            k += 1
        start += x
    for j in range(n_tail):
        cols.append((int(perm[k]), page, lk + j * page, 0))
        k += 1
    table = torch.tensor(cols, dtype=torch.int32).T.contiguous().cuda()
    arena = torch.randn(n_layers, total, page, 2, hkv, D, device="cuda", dtype=DT)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    ang = torch.arange(lk + 1, device="cuda", dtype=torch.float32)[:, None] * inv[None]
    return dict(arena=arena, table=table, n=torch.tensor([total], dtype=torch.int32, device="cuda"),
                qpos=torch.arange(lk, lk + lq, device="cuda"), cos=ang.cos().contiguous(),
                sin=ang.sin().contiguous(), pages=total, padded_tokens=total * page, n_chunks=len(lens))


PAGED_VARIANTS = [  # (name, page tokens, attend_paged knobs); appended only, so recorded commands still hold
    ("page64", 64, dict(rotate_once=True, tma=False, pair=False)),
    ("page64 rotation per page", 64, dict(rotate_once=False, tma=False, pair=False)),
    ("page64 tma", 64, dict(rotate_once=True, tma=True, pair=False)),
    ("page128", 128, dict(rotate_once=True, tma=False, pair=False)),
    ("page64 pair", 64, dict(rotate_once=True, tma=False, pair=True)),
    ("page64 pair tma", 64, dict(rotate_once=True, tma=True, pair=True)),
    # the contiguous kernel's choice for 256+ packed rows (128-row groups over 8 warps: 1.34x there); not yet timed
    ("page64 bm128 w8", 64, dict(rotate_once=True, tma=False, pair=False, block_m=128, num_warps=8)),
    ("page128 bm128 w8 tma", 128, dict(rotate_once=True, tma=True, pair=False, block_m=128, num_warps=8)),
    # whole-D key tiles (one dot per page; the rows rotated on the full width)
    ("page64 full", 64, dict(full=True)),
    ("page64 full rotation per page", 64, dict(full=True, rotate_once=False)),
    ("page64 full bm128 w8", 64, dict(full=True, block_m=128, num_warps=8)),
    ("page128 full bm128 w8", 128, dict(full=True, block_m=128, num_warps=8)),
    ("page128 full bm128 w8 tma", 128, dict(full=True, tma=True, block_m=128, num_warps=8)),
    ("page128 full bm128 w8 s2", 128, dict(full=True, block_m=128, num_warps=8, num_stages=2)),
    ("page64 full tma", 64, dict(full=True, tma=True)),
    # runs of pages sharing a delta as an outer loop, their pages as a branch-free inner loop
    ("page64 seg", 64, dict(seg=True)),
    ("page64 seg bm128 w8", 64, dict(seg=True, block_m=128, num_warps=8)),
    ("page128 seg bm128 w8", 128, dict(seg=True, block_m=128, num_warps=8)),
    ("page64 seg s2", 64, dict(seg=True, num_stages=2)),
    ("page128 seg", 128, dict(seg=True)),
    # more pipeline stages: the page-table load feeding each page's K/V address takes stages of its own (with 3
    # the K/V buffers are 2 deep for 64-row groups and 1 deep for the tails; with 5, 3 and 2)
    ("page64 s5", 64, dict(num_stages=5)),
    ("page64 full s4", 64, dict(full=True, num_stages=4)),
    ("page64 full s5", 64, dict(full=True, num_stages=5)),
    ("page64 seg s5", 64, dict(seg=True, num_stages=5)),
    ("page64 full bm128 w8 s5", 64, dict(full=True, block_m=128, num_warps=8, num_stages=5)),
    ("page128 full s5", 128, dict(full=True, num_stages=5)),
    # two or three programs per SM (a program's loop is latency-bound: ~1.9 us per page, as the contiguous
    # kernel's per 128-key tile)
    ("page64 pps2", 64, dict(programs_per_sm=2.0)),
    ("page64 pps3", 64, dict(programs_per_sm=3.0)),
    ("page64 seg pps2", 64, dict(seg=True, programs_per_sm=2.0)),
    ("page64 full pps2", 64, dict(full=True, programs_per_sm=2.0)),
    ("page64 s5 pps2", 64, dict(num_stages=5, programs_per_sm=2.0)),
    ("page64 seg w8 pps2", 64, dict(seg=True, num_warps=8, programs_per_sm=2.0)),
    ("page64 seg pps4", 64, dict(seg=True, programs_per_sm=4.0)),
    ("default", 64, {}),  # the plan's choice: seg + 2 programs per SM for a question, 5 stages for a decoded token
    ("page64 seg tma pps2", 64, dict(seg=True, tma=True, programs_per_sm=2.0)),
    ("page64 full tma s5", 64, dict(full=True, tma=True, num_stages=5)),
    ("page64 seg tma s4 pps2", 64, dict(seg=True, tma=True, num_stages=4, programs_per_sm=2.0)),
    # each chunk's pages consecutive in the arena (as PageArena hands them out when it can); "affine": the runs'
    # page ids and positions computed in the inner loop, no table load feeding a K/V address
    ("contiguous default", 64, dict(_contiguous=True)),
    ("contiguous seg affine pps2", 64, dict(_contiguous=True, seg=True, affine=True, programs_per_sm=2.0)),
    ("contiguous seg affine tma pps2", 64, dict(_contiguous=True, seg=True, affine=True, tma=True,
                                                 programs_per_sm=2.0)),
    ("contiguous seg affine s4 pps2", 64, dict(_contiguous=True, seg=True, affine=True, num_stages=4,
                                                programs_per_sm=2.0)),
    ("contiguous seg affine s5", 64, dict(_contiguous=True, seg=True, affine=True, num_stages=5)),
    # (3 stages take 115 KB of shared memory with the runs affine: one program per SM; 2 stages let two share one)
    ("contiguous seg affine s2 pps2", 64, dict(_contiguous=True, seg=True, affine=True, num_stages=2,
                                                programs_per_sm=2.0)),
    # two pages per step: 128-key tiles over a run's consecutive pages, as the contiguous kernel's (3 stages:
    # 213 KB of shared memory, one program per SM)
    ("contiguous seg affine step2", 64, dict(_contiguous=True, seg=True, affine=True, run_step=2,
                                              programs_per_sm=1.0)),
    ("contiguous seg affine step2 s2", 64, dict(_contiguous=True, seg=True, affine=True, run_step=2,
                                                 num_stages=2, programs_per_sm=1.0)),
    # ... through the copy engine: one [128, D] box per step, the contiguous kernel's loads
    ("contiguous seg affine step2 tma", 64, dict(_contiguous=True, seg=True, affine=True, run_step=2, tma=True,
                                                  programs_per_sm=1.0)),
    # the runs before every row's position without the causal test (split_mask; on in the "default" row of
    # eval/results/attn_paged_split_h200.json, off by default since): off, and on (the last entry)
    ("page64 seg pps2 split off", 64, dict(seg=True, programs_per_sm=2.0, split_mask=False)),
    # (with the split, the affine runs' two inner loops take 213 KB of shared memory: one program per SM)
    ("contiguous seg affine pps1", 64, dict(_contiguous=True, seg=True, affine=True, programs_per_sm=1.0)),
    ("page64 seg pps3", 64, dict(seg=True, programs_per_sm=3.0)),
    ("page64 seg pps2 split", 64, dict(seg=True, programs_per_sm=2.0, split_mask=True)),
]


def bench_paged(ceil, lengths, variants, heads=HEADS) -> list:
    """The zero-copy path's kernel (kernels/paged_attention.py) on the same protocol, and its correctness
    against the PyTorch reference of the same page table."""
    rows = []
    for head_name, (hq, hkv) in heads.items():
        for lk in lengths:
            kv_bytes = 2 * lk * hkv * D * 2
            for lq in (50, 1):
                flops = 4 * hq * lq * lk * D
                floor_us = max(kv_bytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12)) * 1e6
                q = torch.randn(1, hq, lq, D, device="cuda", dtype=DT)
                for name, page, kw in variants:
                    kw = dict(kw)
                    r_ = paged_request(lk, lq, hkv, page, N_LAYERS, contiguous=kw.pop("_contiguous", False))
                    outs = [torch.empty_like(q) for _ in range(N_LAYERS)]
                    args = lambda i: (q, r_["arena"][i], r_["table"], r_["n"], r_["qpos"], r_["cos"], r_["sin"])  # noqa
                    try:
                        got = attend_paged(*args(0), max_pages=r_["pages"], **kw)
                        ref = attend_paged_reference(*args(0))
                        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                        calls = [(lambda i=i: attend_paged(*args(i), max_pages=r_["pages"], out=outs[i], **kw))
                                 for i in range(N_LAYERS)]
                        us = layer_us(calls)
                    except Exception as ex:  # noqa: BLE001
                        log(f"  paged {head_name} Lq={lq} {name}: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}")
                        continue
                    r = dict(heads=head_name, Lq=lq, Lk=lk, variant="paged " + name, us=us, floor_us=floor_us,
                             x_floor=us / floor_us, kv_GBps=kv_bytes / (us * 1e-6) / 1e9,
                             pct_copy_bw=100 * kv_bytes / (us * 1e-6) / 1e9 / ceil["copy_GBps"],
                             TFLOPs=flops / (us * 1e-6) / 1e12, rel_err_vs_reference=err, ok=err < 2e-2,
                             padded_tokens=r_["padded_tokens"], n_chunks=r_["n_chunks"])
                    rows.append(r)
                    log(f"  {head_name:10s} Lq={lq:3d} Lk={lk} paged {name:12s} {us:7.1f} us  x{r['x_floor']:.2f} "
                        f"floor {r['pct_copy_bw']:5.1f}% copy BW (valid bytes; {r_['padded_tokens'] / lk - 1:.1%} "
                        f"padding) err {err:.1e}")
                    del r_, outs
                    torch.cuda.empty_cache()
    return rows


def table(ceil, rows) -> str:
    out = [f"copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s (same run)",
           "| heads | Lq | Lk | variant | us | floor us | x floor | % copy BW | TFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['heads']} | {r['Lq']} | {r['Lk']} | {r['variant']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
                   f"{r['x_floor']:.2f} | {r['pct_copy_bw']:.1f} | {r['TFLOPs']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attn_kernels.json")
    ap.add_argument("--lengths", default="32768")
    ap.add_argument("--quick", action="store_true", help="default variants only")
    ap.add_argument("--paged", action="store_true", help="also the paged (zero-copy) kernel")
    ap.add_argument("--no-contiguous", action="store_true", help="skip the contiguous kernel's rows")
    ap.add_argument("--heads", default="32/8,28/4",
                    help="head layouts, query heads / KV heads, comma-separated (default: Llama-3-8B and Qwen2-7B)")
    ap.add_argument("--decode-only", action="store_true", help="only the one-token (decode) rows")
    ap.add_argument("--paged-variants", default=None, help="indices into PAGED_VARIANTS (default all)")
    ap.add_argument("--decode-sdpa", action="store_true", help="also SDPA for a decoded token, in graphs")
    ap.add_argument("--paged-split", action="store_true",
                    help="the paged runs loop's split_mask on unless a variant says otherwise")
    args = ap.parse_args(argv)
    heads = parse_heads(args.heads)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    global QUESTION_VARIANTS, DECODE_VARIANTS
    if args.quick:
        QUESTION_VARIANTS, DECODE_VARIANTS = QUESTION_VARIANTS[:1], DECODE_VARIANTS[:1]
    if args.decode_only:
        QUESTION_VARIANTS = []
    ceil = ceilings()
    log(f"ceilings: {ceil}")
    lengths = [int(x) for x in args.lengths.split(",")]
    corr = [] if args.no_contiguous else correctness(QUESTION_VARIANTS, DECODE_VARIANTS, heads)

    def save(rows_so_far, done=False):  # after every row: a run stopped by a time limit keeps what it timed
        res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, ceilings=ceil,
                   heads={k: list(v) for k, v in heads.items()}, correctness=corr, timings=rows_so_far,
                   complete=done, command=" ".join(["python -m blockrag.eval.bench_attn_kernels"]
                                                   + (argv if argv is not None else sys.argv[1:])))
        try:
            import triton

            res["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            pass
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    rows = [] if args.no_contiguous else bench(ceil, lengths, heads, on_row=save)
    if args.decode_sdpa:
        rows += bench_decode_sdpa(ceil, lengths, heads)
        save(rows)
    if args.paged:
        if args.paged_split:
            from blockrag.attention_kv.kernels import paged_attention

            paged_attention.SPLIT_MASK = True
        pv = PAGED_VARIANTS[:1] if args.quick else PAGED_VARIANTS
        if args.paged_variants:
            pv = [PAGED_VARIANTS[int(i)] for i in args.paged_variants.split(",")]
        prow = bench_paged(ceil, lengths, pv, heads=heads)
        rows += prow
        corr += [dict(variant=r["variant"], heads=r["heads"], Lq=r["Lq"], Lk=r["Lk"], ok=r["ok"],
                      rel_err_vs_reference=r["rel_err_vs_reference"]) for r in prow]
    save(rows, done=True)
    log(table(ceil, rows))
    if not all(r["ok"] for r in corr):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()

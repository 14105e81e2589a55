"""Benchmark of attention_kv.kernels (Triton) against torch SDPA, on Llama-3-8B attention heads.

    PYTHONPATH=. python -m blockrag.eval.bench_kernel --out kernel.json [--sweep] [--quick]

Needs a CUDA GPU. In one run: (1) the device's ceilings (device-to-device copy bandwidth, bf16 matmul
rate), (2) correctness of the kernel against a float64 computation and the fp32 torch reference on random
inputs (poisoned memory, so unwritten outputs show), (3) timings with CUDA events after warm-up, median
of many runs, with L2 flushed before each run:
  (a) a 50-token question, and one decoded token, over a 2K..32K cache (32 q heads, 8 KV heads, d=128, bf16):
      ms, K/V read GB/s, % of the measured copy bandwidth, host time per call; ours (the short-question
      kernel; the general kernel for comparison; RoPE on load) vs SDPA.
  (b) BlockRank prefill: instruction 64 + N x 160-token documents + 32-token query, N = 20..200:
      TFLOP/s counting only unmasked (visible) query-key pairs, % of the measured matmul rate, vs SDPA with
      the explicit block mask (memory-efficient backend) and vs dense causal SDPA-flash (more work).
Prints a short table last and writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from blockrag.attention_kv.kernels import attend_reference, make_block_ids, visibility_mask
from blockrag.attention_kv.kernels.triton_attention import attend_triton, default_config

HQ, HKV, D = 32, 8, 128
SWEEP_DECODE = ((128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3))
SWEEP_PREFILL = ((128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3))
DT = torch.bfloat16
THETA = 500000.0  # Llama-3


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------ timing
_FLUSH = None
FLUSH_MODE = "read"  # how L2 is emptied before each timed run (see bench)


def _flush():
    """Evict L2 before a timed run. "read" sums a 256 MB buffer: L2 ends up holding clean, unrelated lines.
    "write" zeroes it instead: L2 then holds ~50 MB of dirty lines whose write-back competes with the timed
    kernel for memory bandwidth (it slowed a 134 MB K/V read by ~15-20 us on an H100)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda").fill_(1.0)
    if FLUSH_MODE == "write":
        _FLUSH.zero_()
    else:
        _FLUSH.sum()


def bench(fn, target_ms: float = 300.0, min_runs: int = 10, max_runs: int = 200) -> dict:
    """Median over many runs, CUDA events around fn only, L2 emptied before each run (``_flush``)."""
    _flush()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    n = int(min(max_runs, max(min_runs, target_ms / est)))
    st = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    en = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _flush()
        st[i].record()
        fn()
        en[i].record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in zip(st, en))
    return dict(ms=statistics.median(t), p10=t[int(0.1 * (n - 1))], p90=t[int(0.9 * (n - 1))], runs=n)


def bench_graph(fn, target_ms: float = 300.0) -> dict | None:
    """Same, but fn captured once in a CUDA graph and the graph replayed: device time without the
    Python / launch overhead of the call (what a captured decode step or model layer sees)."""
    try:
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
    except Exception as ex:  # noqa: BLE001
        log(f"    (graph capture failed: {type(ex).__name__}: {str(ex).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return None
    r = bench(g.replay, target_ms=target_ms)
    del g
    return r


def _kinfo() -> str:
    """Registers / spills of the attention kernel of the last call (empty for non-Triton calls)."""
    from blockrag.attention_kv.kernels import triton_attention as ta

    h = ta.LAST_LAUNCH.pop("question", None) or ta.LAST_LAUNCH.pop("fwd", None)
    try:
        return f"[regs {h.n_regs} spills {h.n_spills}]" if h is not None else ""
    except Exception:  # noqa: BLE001
        return ""


def cpu_us(fn, n: int = 50) -> float:
    """Host time per call with the GPU queue running ahead (launch + Python overhead)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def ceilings() -> dict:
    n = 512 * 1024 * 1024  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    r = bench(lambda: dst.copy_(src), target_ms=400)
    copy_gbs = 2 * n * 2 / (r["ms"] * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=DT)
    b = torch.randn(m, m, device="cuda", dtype=DT)
    r2 = bench(lambda: torch.matmul(a, b), target_ms=400)
    tflops = 2 * m ** 3 / (r2["ms"] * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return dict(copy_GBps=copy_gbs, copy_ms=r["ms"], matmul_TFLOPs=tflops, matmul_ms=r2["ms"])


# ------------------------------------------------------------------------------------------ correctness
def poison():
    """Fill freed allocator memory with NaN so that an unwritten output element shows up."""
    free = torch.cuda.mem_get_info()[0]
    n = min(free // 8, 2 * 1024 ** 3) // 4
    x = torch.full((n,), float("nan"), device="cuda", dtype=torch.float32)
    del x


def naive64(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[1]):  # one head at a time: memory
        s = (q[:, h].double() @ kk[:, h].transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        out[:, h] = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ vv[:, h]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def correctness(inv_freq) -> list:
    res = []

    def check(name, fn_ours, fn_ref, fn64=None, mass=False):
        poison()
        o = fn_ours()
        r = fn_ref()
        row = dict(case=name)
        if mass:
            (o, m), (r, mr) = o, r
            row["mass_max_abs_err"] = (m - mr).abs().max().item()
            row["mass_row_sum_err"] = (m.sum(-1) - 1).abs().max().item()
        row["finite"] = bool(torch.isfinite(o).all())
        row["rel_err_vs_fp32_ref"] = rel(o, r)
        if fn64 is not None:
            row["rel_err_vs_fp64"] = rel(o, fn64())
            row["ref_rel_err_vs_fp64"] = rel(r, fn64())
        row["ok"] = row["finite"] and row["rel_err_vs_fp32_ref"] < 2e-2 and row.get("mass_max_abs_err", 0) < 1e-2
        log("  check", json.dumps(row))
        res.append(row)

    torch.manual_seed(1)
    scale = 1 / math.sqrt(D)
    # (a) question block over a stitched cache, ragged blocks, RoPE on load at re-ordered positions
    Lk, Lq = 4096 + 37, 50
    ids = make_block_ids(64, [160] * 25 + [Lk - Lq - 64 - 4000], Lq, device="cuda")
    assert ids.numel() == Lk
    q = torch.randn(1, HQ, Lq, D, device="cuda", dtype=DT)
    k = torch.randn(1, HKV, Lk, D, device="cuda", dtype=DT)
    v = torch.randn(1, HKV, Lk, D, device="cuda", dtype=DT)
    mask = visibility_mask(Lq, Lk, Lk - Lq, device="cuda")
    check("question 50 x 4133, pre-rotated", lambda: attend_triton(q, k, v), lambda: attend_reference(q, k, v),
          lambda: naive64(q, k, v, mask, scale))
    check("question 50 x 4133, block ids given", lambda: attend_triton(q, k, v, q_block=ids[-Lq:], k_block=ids),
          lambda: attend_reference(q, k, v, q_block=ids[-Lq:], k_block=ids))
    qb_mixed = ids[-Lq:].clone()
    qb_mixed[:20] = 26  # first 20 question rows continue the last document: exercises the tile table
    check("question 50 x 4133, mixed q_block (table path)",
          lambda: attend_triton(q, k, v, q_block=qb_mixed, k_block=ids, chunk=5),
          lambda: attend_reference(q, k, v, q_block=qb_mixed, k_block=ids))
    for chunk in (1, 7):
        check(f"question 50 x 4133, split chunk={chunk}", lambda: attend_triton(q, k, v, chunk=chunk),
              lambda: attend_reference(q, k, v))
    kpos = torch.arange(Lk, device="cuda") + 1234
    from blockrag.attention_kv.kernels import apply_rope
    k_rot = apply_rope(k, kpos, inv_freq).to(DT)
    check("question 50 x 4133, RoPE on load (pos+1234)",
          lambda: attend_triton(q, k, v, inv_freq=inv_freq, k_positions=kpos),
          lambda: attend_reference(q, k, v, inv_freq=inv_freq, k_positions=kpos),
          lambda: naive64(q, apply_rope(k, kpos, inv_freq), v, mask, scale))
    kpos2 = torch.arange(Lk, device="cuda") + 30000  # large angles: checks the sin/cos range reduction
    for mode, impl in (("fast", "prepass"), ("fast", "fused"), ("libdevice", "fused")):
        check(f"question 50 x 4133, RoPE on load (pos+30000, {impl}, {mode} sin/cos)",
              lambda: attend_triton(q, k, v, inv_freq=inv_freq, k_positions=kpos2, rope_mode=mode, rope_impl=impl),
              lambda: attend_reference(q, k, v, inv_freq=inv_freq, k_positions=kpos2),
              lambda: naive64(q, apply_rope(k, kpos2, inv_freq), v, mask, scale))
    check("question, RoPE on load == pre-rotated (bf16-rounded) keys",
          lambda: attend_triton(q, k, v, inv_freq=inv_freq, k_positions=kpos),
          lambda: attend_reference(q, k_rot, v))
    # (b) BlockRank prefill with block mass from the last 8 query rows, N = 20 and 200
    for N in (20, 200):
        ids = make_block_ids(64, [160] * N, 32, device="cuda")
        L = ids.numel()
        q = torch.randn(1, HQ, L, D, device="cuda", dtype=DT)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=DT)
        v = torch.randn(1, HKV, L, D, device="cuda", dtype=DT)
        rows = torch.arange(L - 8, L, device="cuda")
        f64 = None
        if N == 20:
            mask = visibility_mask(L, L, 0, ids, ids, device="cuda")
            f64 = lambda: naive64(q, k, v, mask, scale)  # noqa: E731
        check(f"blockrank prefill N={N} (L={L}) + mass",
              lambda: attend_triton(q, k, v, q_start=0, q_block=ids, k_block=ids, mass_rows=rows),
              lambda: attend_reference(q, k, v, q_start=0, q_block=ids, k_block=ids, mass_rows=rows),
              (lambda: f64()) if f64 else None, mass=True)
    del q, k, v
    torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------ SDPA
def sdpa_decode_candidates(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    Lq, Lk = q.shape[2], k.shape[2]
    cb = causal_lower_right(Lq, Lk)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cb, enable_gqa=True)

    def eff():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cb, enable_gqa=True)

    G = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

    def flash_exp():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, ke, ve, attn_mask=cb)

    return [("flash, causal_lower_right, enable_gqa", flash),
            ("efficient, causal_lower_right, enable_gqa", eff),
            ("flash, causal_lower_right, K/V expanded to 32 heads", flash_exp)]


def pick_sdpa(cands, ref):
    for name, fn in cands:
        try:
            o = fn()
            torch.cuda.synchronize()
            e = rel(o, ref)
            if e < 2e-2:
                return name, fn, e
            log(f"  sdpa {name}: wrong result rel={e:.3g}")
        except Exception as ex:  # noqa: BLE001
            log(f"  sdpa {name}: unavailable ({type(ex).__name__}: {str(ex).splitlines()[0][:160]})")
    return None, None, None


# ------------------------------------------------------------------------------------------ benches
def bench_decode(ceil, inv_freq, lengths, sweep: bool, q_lens=(50, 1)) -> list:
    rows = []
    for Lq, Lk in [(a, b) for a in q_lens for b in lengths]:
        torch.manual_seed(Lk)
        q = torch.randn(1, HQ, Lq, D, device="cuda", dtype=DT)
        k = torch.randn(1, HKV, Lk, D, device="cuda", dtype=DT)
        v = torch.randn(1, HKV, Lk, D, device="cuda", dtype=DT)
        kpos = torch.arange(Lk, device="cuda", dtype=torch.int32)
        if Lq != 50:  # the single decoded token: ours (plain) vs SDPA only
            sname, sfn, se = pick_sdpa(sdpa_decode_candidates(q, k, v), attend_reference(q, k, v))
            variants = [("ours", lambda: attend_triton(q, k, v))] + ([(f"sdpa ({sname})", sfn)] if sfn else [])
            _time_question(rows, ceil, Lq, Lk, q, k, v, variants, attend_reference(q, k, v), inv_freq, None)
            del q, k, v
            torch.cuda.empty_cache()
            continue
        ids = make_block_ids(64, [160] * ((Lk - 64 - Lq) // 160), 0)
        ids = torch.cat([ids, torch.zeros(Lk - Lq - ids.numel(), dtype=ids.dtype), torch.full((Lq,), -1, dtype=ids.dtype)])
        q_blk_cpu, k_blk = ids[-Lq:], ids.cuda()
        ref = attend_reference(q, k, v)
        variants = [
            ("ours", lambda: attend_triton(q, k, v)),
            ("ours, general kernel (128-row tiles)", lambda: attend_triton(q, k, v, block_m=128)),
            ("ours, block ids (q_block on CPU)", lambda: attend_triton(q, k, v, q_block=q_blk_cpu, k_block=k_blk)),
            ("ours, RoPE on load (prepass)", lambda: attend_triton(q, k, v, inv_freq=inv_freq, k_positions=kpos)),
            ("ours, RoPE on load (fused)", lambda: attend_triton(q, k, v, inv_freq=inv_freq, k_positions=kpos,
                                                                 rope_impl="fused")),
        ]
        if sweep and Lk in (8192, 32768):
            variants.append(("ours, RoPE on load (fused), libdevice sin/cos", lambda: attend_triton(
                q, k, v, inv_freq=inv_freq, k_positions=kpos, rope_mode="libdevice", rope_impl="fused")))
            for bm, bn, nw, ns in SWEEP_DECODE:
                variants.append((f"general kernel bm{bm} bn{bn} w{nw} s{ns}", lambda bm=bm, bn=bn, nw=nw, ns=ns: attend_triton(
                    q, k, v, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)))
            variants.append(("ours, lazy rescale", lambda: attend_triton(q, k, v, lazy_rescale=True)))
            for pps in (0.5, 2.0):
                variants.append((f"ours pps{pps:g}", lambda pps=pps: attend_triton(q, k, v, programs_per_sm=pps)))
        sname, sfn, se = pick_sdpa(sdpa_decode_candidates(q, k, v), ref)
        if sfn is not None:
            variants.append((f"sdpa ({sname})", sfn))
        _time_question(rows, ceil, Lq, Lk, q, k, v, variants, ref, inv_freq, kpos)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _time_question(rows, ceil, Lq, Lk, q, k, v, variants, ref, inv_freq, kpos):
    kv_bytes = 2 * HKV * Lk * D * 2
    for name, fn in variants:
        try:
            from blockrag.attention_kv.kernels import triton_attention as ta

            ta.LAST_LAUNCH.clear()
            o = fn()
            kinfo = _kinfo()
            if "RoPE" in name:
                e = rel(o, attend_reference(q, k, v, inv_freq=inv_freq, k_positions=kpos))
            else:
                e = rel(o, ref)
            t = bench(fn)
            tg = bench_graph(fn)
            cu = cpu_us(fn)
            dev_ms = tg["ms"] if tg else t["ms"]
            gbs = kv_bytes / (dev_ms * 1e-3) / 1e9
            rows.append(dict(bench="question", Lq=Lq, Lk=Lk, impl=name, ms=t["ms"], p10=t["p10"], p90=t["p90"],
                             graph_ms=tg["ms"] if tg else None, graph_p10=tg["p10"] if tg else None,
                             graph_p90=tg["p90"] if tg else None, cpu_us=cu,
                             GBps=gbs, pct_copy=100 * gbs / ceil["copy_GBps"], rel_err=e, kernel=kinfo))
            log(f"  Lq={Lq:3d} Lk={Lk:6d} {name:44s} {kinfo} call {t['ms']:.4f} ms  graph {dev_ms:.4f} ms "
                f"[{(tg or t)['p10']:.4f}-{(tg or t)['p90']:.4f}]  cpu {cu:5.0f} us  {gbs:6.0f} GB/s "
                f"{100 * gbs / ceil['copy_GBps']:5.1f}%  err {e:.2g}")
        except Exception as ex:  # noqa: BLE001
            log(f"  Lq={Lq} Lk={Lk} {name}: FAILED {type(ex).__name__}: {ex}")
            traceback.print_exc()


def bench_prefill(ceil, Ns, sweep: bool) -> list:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for N in Ns:
        torch.manual_seed(N)
        ids = make_block_ids(64, [160] * N, 32, device="cuda")
        L = ids.numel()
        q = torch.randn(1, HQ, L, D, device="cuda", dtype=DT)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=DT)
        v = torch.randn(1, HKV, L, D, device="cuda", dtype=DT)
        mask = visibility_mask(L, L, 0, ids, ids, device="cuda")
        pairs = int(mask.sum().item())
        flops = 4 * D * HQ * pairs  # QK^T and PV, visible pairs only
        mrows = torch.arange(L - 32, L, device="cuda")
        ref = attend_reference(q, k, v, q_start=0, q_block=ids, k_block=ids) if N <= 50 else None

        def rec(name, fn, err=None, graph=True):
            t = bench(fn)
            tg = bench_graph(fn) if graph else None
            cu = cpu_us(fn, n=10)
            dev_ms = tg["ms"] if tg else t["ms"]
            tf = flops / (dev_ms * 1e-3) / 1e12
            tf_call = flops / (t["ms"] * 1e-3) / 1e12
            rows.append(dict(bench="blockrank_prefill", N=N, L=L, impl=name, ms=t["ms"], p10=t["p10"], p90=t["p90"],
                             graph_ms=tg["ms"] if tg else None, cpu_us=cu, TFLOPs=tf, TFLOPs_call=tf_call,
                             pct_matmul=100 * tf / ceil["matmul_TFLOPs"], visible_pairs=pairs,
                             density=pairs / (L * (L + 1) / 2), rel_err=err))
            log(f"  N={N:3d} L={L:5d} {name:50s} call {t['ms']:8.3f} ms  graph {dev_ms:8.3f} ms  cpu {cu:6.0f} us "
                f"{tf:6.1f} TFLOP/s (call {tf_call:6.1f})  {100 * tf / ceil['matmul_TFLOPs']:5.1f}%")

        variants = [("ours", lambda: attend_triton(q, k, v, q_start=0, q_block=ids, k_block=ids)),
                    ("ours + block mass (32 rows)", lambda: attend_triton(q, k, v, q_start=0, q_block=ids, k_block=ids,
                                                                          mass_rows=mrows, n_blocks=N + 2))]
        if sweep and N in (50, 200):
            for bm, bn, nw, ns in SWEEP_PREFILL:
                variants.append((f"general kernel bm{bm} bn{bn} w{nw} s{ns}", lambda bm=bm, bn=bn, nw=nw, ns=ns: attend_triton(
                    q, k, v, q_start=0, q_block=ids, k_block=ids, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)))
        fresh = [ids.clone() for _ in range(64)]

        def uncached():  # new ids tensor each call: builds the tile table and work plan (one host sync)
            x = fresh.pop()
            fresh.insert(0, x.add_(0))  # bump the version: cache miss
            return attend_triton(q, k, v, q_start=0, q_block=x, k_block=x)

        try:
            rec("ours, plan rebuilt every call (first layer)", uncached, graph=False)
        except Exception as ex:  # noqa: BLE001
            log(f"  N={N} uncached: FAILED {type(ex).__name__}: {ex}")
        for name, fn in variants:
            try:
                o = fn()
                if isinstance(o, tuple):
                    o = o[0]
                rec(name, fn, rel(o, ref) if ref is not None else None)
            except Exception as ex:  # noqa: BLE001
                log(f"  N={N} {name}: FAILED {type(ex).__name__}: {ex}")
                traceback.print_exc()
        # SDPA with the explicit block mask: additive bf16 mask, K/V expanded to 32 heads (both prepared
        # outside the timed region), memory-efficient backend (flash takes no arbitrary mask).
        try:
            add = torch.zeros(L, L, device="cuda", dtype=DT).masked_fill_(~mask, float("-inf"))[None, None]
            ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)

            def sdpa_mask():
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    return F.scaled_dot_product_attention(q, ke, ve, attn_mask=add)

            o = sdpa_mask()
            rec("sdpa efficient + explicit mask (K/V expanded)", sdpa_mask, rel(o, ref) if ref is not None else None,
                graph=N <= 100)
            del add, ke, ve
        except Exception as ex:  # noqa: BLE001
            log(f"  N={N} sdpa masked: FAILED {type(ex).__name__}: {str(ex)[:200]}")
        torch.cuda.empty_cache()

        def sdpa_dense():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        try:
            sdpa_dense()
            rec("sdpa flash dense causal (ignores blocks; more work)", sdpa_dense, graph=N <= 100)
        except Exception as ex:  # noqa: BLE001
            log(f"  N={N} sdpa dense gqa: FAILED {type(ex).__name__}: {str(ex)[:200]}")
            try:
                ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)

                def sdpa_dense_exp():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

                sdpa_dense_exp()
                rec("sdpa flash dense causal, K/V expanded (more work)", sdpa_dense_exp)
                del ke, ve
            except Exception as ex2:  # noqa: BLE001
                log(f"  N={N} sdpa dense: FAILED {type(ex2).__name__}: {str(ex2)[:200]}")
        del q, k, v, mask
        torch.cuda.empty_cache()
    return rows


def _f(x, fmt):
    return format(x, fmt) if x is not None else "-"


def table(ceil, dec, pre) -> str:
    lines = [f"device: {torch.cuda.get_device_name()}; measured in this run: copy {ceil['copy_GBps']:.0f} GB/s "
             f"(read+write), bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s"]
    lines.append("(a) 50-token question (Lq=50) or one decoded token (Lq=1) over a cache, Llama-3-8B heads (32q/8kv, "
                 "d=128, bf16). call = per call from Python (L2 emptied); graph = CUDA-graph replay (device time); "
                 "GB/s and % copy from blockrag.graph time")
    lines.append(f"{'Lq':>3} | {'Lk':>6} | {'impl':<50} | {'call ms':>8} | {'graph ms':>8} | {'K/V GB/s':>8} | "
                 f"{'% copy':>6} | {'host us':>7}")
    keep = ("ours", "ours, general kernel (128-row tiles)", "ours, RoPE on load (prepass)", "ours, RoPE on load (fused)")
    for r in dec:
        if r["impl"] in keep or r["impl"].startswith("sdpa"):
            lines.append(f"{r.get('Lq', 50):>3} | {r['Lk']:>6} | {r['impl'][:50]:<50} | {r['ms']:8.4f} | "
                         f"{_f(r['graph_ms'], '8.4f'):>8} | {r['GBps']:8.0f} | {r['pct_copy']:6.1f} | {r['cpu_us']:7.0f}")
    lines.append("(b) BlockRank prefill: 64 instr + N x 160 docs + 32 query (q = k = all tokens); TFLOP/s counts "
                 "visible query-key pairs only, from blockrag.graph time where captured")
    lines.append(f"{'N':>4} | {'L':>6} | {'impl':<50} | {'call ms':>8} | {'graph ms':>8} | {'TFLOP/s':>7} | {'% mm':>5}")
    for r in pre:
        if r["impl"].startswith("ours") and " bm" not in r["impl"] or r["impl"].startswith("sdpa"):
            lines.append(f"{r['N']:>4} | {r['L']:>6} | {r['impl'][:50]:<50} | {r['ms']:8.3f} | "
                         f"{_f(r['graph_ms'], '8.3f'):>8} | {r['TFLOPs']:7.1f} | {r['pct_matmul']:5.1f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernel_bench.json")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile / split configurations")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from blockrag.attention_kv.kernels import triton_attention as ta

    ta.LAST_LAUNCH.enabled = True  # opt-in record of the compiled kernels (registers / spills)
    t0 = time.time()
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                sms=torch.cuda.get_device_properties(0).multi_processor_count,
                default_config=default_config(D, DT, torch.device("cuda")))
    log("info", json.dumps(info))
    inv_freq = (1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).cuda()
    log("correctness (bf16 inputs; tolerance rel 2e-2, mass abs 1e-2):")
    checks = correctness(inv_freq)
    ok = all(c["ok"] for c in checks)
    log("correctness", "PASS" if ok else "FAIL")
    from blockrag.attention_kv.kernels import triton_attention as ta
    for name, h in ta.LAST_LAUNCH.items():
        try:
            log(f"  compiled {name}: regs {h.n_regs} spills {h.n_spills} shared {h.metadata.shared}")
        except Exception:  # noqa: BLE001
            pass
    ceil = ceilings()
    log("ceilings", json.dumps(ceil))
    lengths = [2048, 8192, 32768] if args.quick else [2048, 4096, 8192, 16384, 32768]
    Ns = [20, 200] if args.quick else [20, 50, 100, 200]
    dec = bench_decode(ceil, inv_freq, lengths, args.sweep)
    pre = bench_prefill(ceil, Ns, args.sweep)
    tab = table(ceil, dec, pre)
    res = dict(info=info, ceilings=ceil, correctness=checks, correctness_ok=ok, question=dec, prefill=pre,
               table=tab, seconds=time.time() - t0)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"\nwall {time.time() - t0:.0f} s; JSON -> {args.out}\n")
    log(tab)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

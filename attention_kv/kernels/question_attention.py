"""Triton kernel for a short block of query rows (a question, or one decoded token) over a long cache.

Entry point: :func:`attend_question` (``attend_triton`` routes short, unmasked questions here).

The general kernel (``triton_attention``) gives each program one 128-row tile of packed query rows (query
position x the query heads sharing a KV head), so a 50-token question with 4 query heads per KV head (200
rows) becomes 256 rows of tensor-core work, and a decoded token (4 rows) 128. Here the rows are cut into
64-row groups plus at most two small power-of-two tails (200 -> 3 x 64 + 16; 4 -> 16), and the keys into
slices so that the grid fills the GPU; row groups sharing a key slice are launched side by side so their
K/V reads hit L2. Each program streams its slice (through the copy engine when the call is captured in a
CUDA graph: descriptor encoding costs host time per eager launch), and the last program to finish a row
group's slices merges their partial outputs (an arrival counter; no second kernel). ``kv_len`` lets the
kernel read the number of valid keys on the device, so one captured graph serves a growing cache (the grid
is sized for the whole buffer and the kernel spreads the valid keys over all its slices). Only
tiles that overlap the question itself apply the causal mask.

Measured on an H100 and dropped (eval/bench_kernel.py): all rows in one program as three sub-tiles sharing
each K/V load (serialised softmax and matrix work: 1.9x slower), 128-row groups with tails (load imbalance),
lazy rescaling, Triton's warp-specialised loop with device-side descriptors, issuing the next tile's
scores before the softmax, folding the scale into the exponent (no gain), 64-key tiles with two programs
per SM, and one program of 256 rows over 16 warps (slower). Two K/V tile stages instead of three: 1.5x
slower, so the K/V stream, not only the per-tile matrix and softmax work, limits a program. For a decoded
token, a three-deep K/V stream (4 stages, the edge loop unpipelined: ``edge_stages=1``) was no faster than two
(H200, 32K keys: 48.2 vs 48.6 us, ``eval/results/attn_decode_edge_h200.json``).
Keys must already be rotated (callers rotate them while stitching, or ``attend_triton`` rotates first).
"""
from __future__ import annotations

import math

import torch

from .triton_common import (
    HAS_TRITON,
    LAST_LAUNCH,
    LOG2E,
    TensorDescriptor,
    _cdiv,
    _counters,
    _interpret,
    _num_sms,
    _tma_ok,
    check_tile_offsets,
    partial_buffers,
    tile_offsets_fit,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import _dot, _merge_partials, _softmax_step

MAX_ROWS = 512  # packed rows (query positions x query heads per KV head) this kernel is meant for


def row_groups(rows: int, bm: int) -> tuple[int, int, int, int]:
    """Row groups for ``rows`` packed rows: (number of full ``bm``-row groups, first tail size, second tail
    size, rows of work including padding). The remainder is covered by at most two power-of-two tails
    (>= 16 rows each, the second rounded up): 200 rows with bm=128 -> 128 + 64 + 16."""
    n_main, rem = divmod(rows, bm)

    def up(n):  # smallest power of two >= n, at least 16
        return max(16, 1 << (n - 1).bit_length())

    tails = []
    if rem:
        a = max(16, 1 << (rem.bit_length() - 1))  # largest power of two <= rem
        split = [a, up(rem - a)] if rem > a else [a]
        tails = [up(rem)] if up(rem) <= sum(split) else split
    t1, t2 = (tails + [0, 0])[:2]
    return n_main, t1, t2, n_main * bm + t1 + t2


if HAS_TRITON:

    @triton.jit
    def _q_load(Q, b, kvh, r0, G, Lq, sqb, sqh, sqm, sqd, BM: tl.constexpr, D: tl.constexpr):
        r = r0 + tl.arange(0, BM)
        i = r // G
        h = kvh * G + r % G
        ok = i < Lq
        ptrs = (Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + i.to(tl.int64)[:, None] * sqm
                + tl.arange(0, D)[None, :] * sqd)
        return tl.load(ptrs, mask=ok[:, None], other=0.0), i, h, ok

    @triton.jit
    def _q_step(acc, l_i, m_i, q, k, v, gq, offs_n, Lk, qk_scale, MASKED: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, LAZY: tl.constexpr):
        s = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        if MASKED:
            vis = (offs_n[None, :] <= gq[:, None]) & (offs_n < Lk)[None, :]
            s = tl.where(vis, s, float("-inf"))
        return _softmax_step(acc, l_i, m_i, s, v, MASKED, LAZY, DOT_PREC, UPCAST)

    @triton.jit
    def _q_finish(acc, l_i, m_i, O, PO, PL, CNT, b, h, i, ok, r0, c, bh, n_bh, R, n_ch,
                  sob, soh, som, sod, BM: tl.constexpr, D: tl.constexpr, DIRECT: tl.constexpr,
                  FOLD: tl.constexpr):
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        offs_d = tl.arange(0, D)
        o_row = O + b.to(tl.int64) * sob + h.to(tl.int64)[:, None] * soh + i.to(tl.int64)[:, None] * som
        if DIRECT:
            ptrs = o_row + offs_d[None, :] * sod
            tl.store(ptrs, out.to(O.dtype.element_ty), mask=ok[:, None])
        else:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            row = ((c * n_bh + bh) * R + r0 + tl.arange(0, BM)).to(tl.int64)
            tl.store(PO + row[:, None] * D + offs_d[None, :], out, mask=ok[:, None])
            tl.store(PL + row, lse, mask=ok)
            if FOLD:
                # The last slice to finish merges all slices of these rows (no second kernel): the barrier
                # orders every thread's stores before the release, the acquire before the loads (L2 only).
                tl.debug_barrier()
                prev = tl.atomic_add(CNT, 1, sem="acq_rel")
                if prev == n_ch - 1:
                    acc2, l, _ = _merge_partials(PO, PL, bh * R + r0 + tl.arange(0, BM), n_bh * R, n_ch, ok, BM, D)
                    res = acc2 / tl.where(l == 0.0, 1.0, l)[:, None]
                    ptrs = o_row + offs_d[None, :] * sod
                    tl.store(ptrs, res.to(O.dtype.element_ty), mask=ok[:, None])
                    tl.atomic_xchg(CNT, 0)  # ready for the next call (and for CUDA-graph replays)

    @triton.jit
    def _q_rows(Q, K, V, KD, VD, O, PO, PL, CNT, b, kvh, bh, n_bh, c, n_ch, r0, lo, mid, hi,
                sqb, sqh, sqm, sqd, skn, skd, svn, svd, sob, soh, som, sod,
                G, Lq, Lk, q_start, R, qk_scale,
                BM: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                FOLD: tl.constexpr, LAZY: tl.constexpr, EDGE_STAGES: tl.constexpr):
        q, i, h, ok = _q_load(Q, b, kvh, r0, G, Lq, sqb, sqh, sqm, sqd, BM, D)
        gq = q_start + i
        acc = tl.zeros([BM, D], tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BLOCK_N)
        for kt in range(lo, mid):  # fully visible tiles: no mask, no bounds checks
            offs_n = kt * BLOCK_N + offs_t
            if USE_TMA:
                k = KD.load([b, kvh, kt * BLOCK_N, 0]).reshape(BLOCK_N, D)
                v = VD.load([b, kvh, kt * BLOCK_N, 0]).reshape(BLOCK_N, D)
            else:
                # the tile's first key in int64, offsets inside the tile int32 (tile_offsets_fit)
                t0 = tl.cast(kt, tl.int64) * BLOCK_N
                k = tl.load(K + t0 * skn + offs_t[:, None] * skn + offs_d[None, :] * skd)
                v = tl.load(V + t0 * svn + offs_t[:, None] * svn + offs_d[None, :] * svd)
            acc, l_i, m_i = _q_step(acc, l_i, m_i, q, k, v, gq, offs_n, Lk, qk_scale, False, DOT_PREC, UPCAST, LAZY)
        # tiles overlapping the question (causal) or the end of the keys; EDGE_STAGES=1: this short loop is not
        # pipelined, so its stage buffers leave the shared memory to the main loop's (deeper) ones
        for kt in tl.range(mid, hi, num_stages=EDGE_STAGES):
            offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            if USE_TMA:  # the copy engine zero-fills rows past the buffer; rows past Lk inside it are zeroed
                k = KD.load([b, kvh, kt * BLOCK_N, 0]).reshape(BLOCK_N, D)
                v = VD.load([b, kvh, kt * BLOCK_N, 0]).reshape(BLOCK_N, D)
                v = tl.where((offs_n < Lk)[:, None], v, 0.0)
            else:
                n_ok = offs_n < Lk
                t0 = tl.cast(kt, tl.int64) * BLOCK_N
                k = tl.load(K + t0 * skn + offs_t[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None],
                            other=0.0)
                v = tl.load(V + t0 * svn + offs_t[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None],
                            other=0.0)
            acc, l_i, m_i = _q_step(acc, l_i, m_i, q, k, v, gq, offs_n, Lk, qk_scale, True, DOT_PREC, UPCAST, False)
        _q_finish(acc, l_i, m_i, O, PO, PL, CNT, b, h, i, ok, r0, c, bh, n_bh, R, n_ch, sob, soh, som, sod,
                  BM, D, DIRECT, FOLD)

    @triton.jit
    def _question_fwd(
        Q, K, V, KD, VD, O, PO, PL, CNT, LKP,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        Hkv, G, Lq, Lk, q_start, n_full, n_tiles, CH, n_ch, R, n_main, n_rg, qk_scale,
        BM: tl.constexpr, BMT: tl.constexpr, BMT2: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
        FOLD: tl.constexpr, LAZY: tl.constexpr, DYN: tl.constexpr, MAIN: tl.constexpr, EDGE_STAGES: tl.constexpr,
    ):
        if DYN:  # the number of valid keys is read from the device (CUDA-graph replays of a growing cache)
            Lk = tl.load(LKP)
            q_start = Lk - Lq
            n_tiles = tl.cdiv(Lk, BLOCK_N)
            n_full = tl.minimum((q_start + 1) // BLOCK_N, Lk // BLOCK_N)
            # the grid holds n_ch slices for the whole buffer: spread the valid keys over all of them (CH is
            # then the shortest slice allowed), so that a half-full buffer still fills the GPU
            CH = tl.maximum(tl.cdiv(n_tiles, n_ch), CH)
            n_ch = tl.cdiv(n_tiles, CH)
        # program id: row group fastest, so the row groups sharing a key slice run side by side (L2 reuse)
        pid = tl.program_id(0)
        rg = pid % n_rg
        c = pid // n_rg
        bh = tl.program_id(1)
        n_bh = tl.num_programs(1)
        b = bh // Hkv
        kvh = bh % Hkv
        lo = c * CH
        hi = tl.minimum(lo + CH, n_tiles)
        mid = tl.maximum(lo, tl.minimum(hi, n_full))  # tiles below `mid` are visible to every row
        k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
        if c < n_ch:  # (always, unless DYN: slices past the current length do nothing)
            # MAIN: whether there are full row groups at all. Without them (a decoded token) their branch is
            # not compiled: its K/V stage buffers would take shared memory the tail's branch cannot use
            if MAIN and rg < n_main:
                _q_rows(Q, k_base, v_base, KD, VD, O, PO, PL, CNT + bh * n_rg + rg, b, kvh, bh, n_bh, c, n_ch, rg * BM,
                        lo, mid, hi, sqb, sqh, sqm, sqd, skn, skd, svn, svd, sob, soh, som, sod, G, Lq, Lk, q_start, R,
                        qk_scale, BM, BLOCK_N, D, DIRECT, DOT_PREC, UPCAST, USE_TMA, FOLD, LAZY,
                        EDGE_STAGES)
            elif rg == n_main:  # the rows left over after the full groups: one or two smaller groups
                _q_rows(Q, k_base, v_base, KD, VD, O, PO, PL, CNT + bh * n_rg + rg, b, kvh, bh, n_bh, c, n_ch,
                        n_main * BM, lo, mid, hi, sqb, sqh, sqm, sqd, skn, skd, svn, svd, sob, soh, som, sod,
                        G, Lq, Lk, q_start, R, qk_scale, BMT, BLOCK_N, D, DIRECT, DOT_PREC, UPCAST, USE_TMA, FOLD, LAZY,
                        EDGE_STAGES)
            else:
                if BMT2 > 0:
                    _q_rows(Q, k_base, v_base, KD, VD, O, PO, PL, CNT + bh * n_rg + rg, b, kvh, bh, n_bh, c, n_ch,
                            n_main * BM + BMT, lo, mid, hi, sqb, sqh, sqm, sqd, skn, skd, svn, svd, sob, soh, som, sod,
                            G, Lq, Lk, q_start, R, qk_scale, BMT2, BLOCK_N, D, DIRECT, DOT_PREC, UPCAST, USE_TMA, FOLD,
                            LAZY, EDGE_STAGES)

    @triton.jit
    def _question_reduce(
        O, PO, PL, sob, soh, som, sod, Hkv, G, Lq, R, n_ch,
        BM: tl.constexpr, D: tl.constexpr,
    ):
        t = tl.program_id(0)
        bh = tl.program_id(1)
        n_bh = tl.num_programs(1)
        b = bh // Hkv
        kvh = bh % Hkv
        r = t * BM + tl.arange(0, BM)
        i = r // G
        h = kvh * G + r % G
        ok = i < Lq
        offs_d = tl.arange(0, D)
        acc, l, _ = _merge_partials(PO, PL, bh * R + r, n_bh * R, n_ch, ok, BM, D)
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64)[:, None] * soh + i.to(tl.int64)[:, None] * som
                + offs_d[None, :] * sod)
        tl.store(ptrs, out.to(O.dtype.element_ty), mask=ok[:, None])




def _descriptor(t: torch.Tensor, block_n: int):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[-1]])


def question_plan(Lq: int, Lk: int, q_start: int, G: int, n_bh: int, n_sm: int, *, block_m: int,
                  block_n: int, programs_per_sm: float = 2.0, chunk: int | None = None, min_keys: int = 512):
    """Work split: row groups x key slices x (batch, KV head) programs, about ``programs_per_sm`` per SM,
    each slice at least ``min_keys`` keys (shorter slices cost more in partial outputs than they gain)."""
    n_main, t1, t2, R = row_groups(G * Lq, block_m)
    n_rg = n_main + (t1 > 0) + (t2 > 0)
    n_tiles = _cdiv(min(Lk, q_start + Lq), block_n)
    if chunk is None:
        # rounded down: one program too many starts a second wave (a 50-token question's 48-row sibling,
        # 144 programs on 132 SMs, took 116 us instead of 74 us on an H100)
        want = max(1, int(programs_per_sm * n_sm / (n_bh * n_rg)))
        chunk = max(_cdiv(n_tiles, want), _cdiv(min_keys, block_n))
    chunk = max(1, min(chunk, n_tiles))
    n_ch = _cdiv(n_tiles, chunk)
    n_full = min((q_start + 1) // block_n, Lk // block_n)
    return dict(n_main=n_main, tail=t1 or 16, tail2=t2, R=R, n_rg=n_rg, chunk=chunk, n_ch=n_ch,
                n_tiles=n_tiles, n_full=n_full)


def attend_question(q, k, v, *, q_start: int | None = None, scale: float | None = None,
                    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, programs_per_sm: float | None = None,
                    chunk: int | None = None, tma: bool | None = None, fold: bool = True, lazy: bool = False,
                    kv_len: torch.Tensor | None = None, edge_stages: int | None = None,
                    out: torch.Tensor | None = None):
    """Causal attention of ``q`` [B, Hq, Lq, D] (global positions ``q_start..``) over rotated keys ``k``,
    ``v`` [B, Hkv, Lk, D] — every key before ``q_start`` is visible to every row. Same result as
    ``attend(q, k, v, q_start=q_start)``.

    ``kv_len`` (int32 device tensor, one element): the number of valid keys is read by the kernel at run time
    (``q_start = kv_len - Lq``; ``k``/``v`` are the whole, larger buffers), so that one CUDA graph serves a
    cache that grows between replays. The remaining arguments are tuning knobs."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if q_start is None:
        q_start = Lk - Lq
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dev = q.device
    if out is None:
        out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=dev)
    if Lq == 0:
        return out
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if tma is None:
        # The copy engine streams K/V faster (measured) but its descriptors cost ~40 us of host time per
        # launch: worth it inside a CUDA graph (encoded once), not for eager calls, which are host-bound.
        tma = capturing or _interpret()
    key = (B, Hq, Lq, D, Hkv, Lk, q_start, q.dtype, str(dev), k.stride(), v.stride(), block_m, block_n,
           num_warps, num_stages, programs_per_sm, chunk, tma, fold, lazy, kv_len is None, edge_stages)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _launch_spec(B, Hq, Lq, D, Hkv, Lk, q_start, q.dtype, dev, k, v, block_m, block_n, num_warps,
                            num_stages, programs_per_sm, chunk, tma, fold, lazy, kv_len is not None, edge_stages)
        if len(_SPECS) >= 256:
            _SPECS.pop(next(iter(_SPECS)))
        _SPECS[key] = spec
    c = spec["const"]
    if spec["check"]:
        check_tile_offsets(c["BLOCK_N"], k, v)
    n_bh, n_ch, R = B * Hkv, spec["n_ch"], spec["R"]
    po, pl = partial_buffers(spec, n_ch * n_bh * R, D, dev, capturing, out)
    use_tma = c["USE_TMA"] and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
    kd, vd = (_descriptor(k, c["BLOCK_N"]), _descriptor(v, c["BLOCK_N"])) if use_tma else (k, v)
    cnt = _counters(dev, n_bh * spec["n_rg"]) if c["FOLD"] else pl
    LAST_LAUNCH["question"] = _question_fwd[spec["grid"]](
        q, k, v, kd, vd, out, po, pl, cnt, kv_len if kv_len is not None else cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hkv, Hq // Hkv, Lq, Lk, q_start, spec["n_full"], spec["n_tiles"], spec["chunk"], n_ch, R, spec["n_main"],
        spec["n_rg"], float(scale) * LOG2E, **{**c, "USE_TMA": use_tma},
    )
    if not c["DIRECT"] and not c["FOLD"]:
        rb = 16 if spec["interp"] else 64
        _question_reduce[(_cdiv(Hq // Hkv * Lq, rb), n_bh)](
            out, po, pl, *out.stride(), Hkv, Hq // Hkv, Lq, R, n_ch, BM=rb, D=D, num_warps=4,
        )
    return out


_SPECS: dict = {}


def _launch_spec(B, Hq, Lq, D, Hkv, Lk, q_start, dtype, dev, k, v, block_m, block_n, num_warps, num_stages,
                 programs_per_sm, chunk, tma, fold, lazy, dyn, edge_stages=None) -> dict:
    """Everything about a launch that depends only on shapes and knobs (cached per shape)."""
    G = Hq // Hkv
    interp = dev.type != "cuda" or _interpret()
    if interp:
        bm, bn, nw, ns, pps = 16, 16, 4, 1, 1.0
    elif D >= 256 or dtype == torch.float32:
        bm, bn, nw, ns, pps = 64, 32, 4, 2, 1.0
    elif G * Lq >= 256:
        # 128-row groups over 8 warps: half the K/V re-reads per key slice. H200, Llama-3-8B heads, a 64-token
        # (padded) question, the generator's layout and graphs: 23.5 vs 43.1 us over 2K keys, 83.1 vs 111.3 us
        # over 32K (pps 2/4, 64-key tiles, 2 or 4 stages, 32-row groups, chunk 2/8: all slower)
        bm, bn, nw, ns, pps = 128, 128, 8, 3, 1.0
    else:  # best of a sweep on an H100 (Llama-3-8B heads, 50-token question and single decoded token)
        bm, bn, nw, ns, pps = 64, 128, 4, 3, 1.0
        if Lq == 1:
            # a decoded token: half as many key slices (the last program merges every slice's partial result,
            # one after another). H200, 32K keys, graphs: Qwen2-7B heads 39.9 vs 51.0 us, Llama-3-8B 50.8 vs
            # 52.1; equal at 2K; pps 2 / 4: 1.4-1.9x slower (eval/bench_attn_kernels.py --decode-only)
            pps = 0.5
    bm = block_m or bm
    bn = block_n or bn
    n_bh = B * Hkv
    min_keys = 4 * bn if interp else 512
    p = question_plan(Lq, Lk, q_start, G, n_bh, _num_sms(dev), block_m=bm, block_n=bn,
                      programs_per_sm=programs_per_sm or pps, chunk=chunk, min_keys=min_keys)
    if dyn:  # the kernel sizes its slices at run time; it gets the shortest slice allowed
        p["chunk"] = max(1, min(chunk or _cdiv(min_keys, bn), p["chunk"]))
    direct = p["n_ch"] == 1
    fold = fold and not direct
    if dyn and not (fold or direct):
        raise ValueError("kv_len needs the folded merge (fold=True)")
    const = dict(BM=bm, BMT=p["tail"], BMT2=p["tail2"], BLOCK_N=bn, D=D, DIRECT=direct,
                 DOT_PREC="ieee" if dtype == torch.float32 else "tf32", UPCAST=interp and dtype == torch.bfloat16,
                 USE_TMA=bool(tma and _tma_ok(k) and _tma_ok(v)), FOLD=fold, LAZY=lazy, DYN=dyn, MAIN=p["n_main"] > 0,
                 num_warps=num_warps or nw, num_stages=num_stages or ns)
    const["EDGE_STAGES"] = edge_stages or const["num_stages"]
    return dict(p, grid=(p["n_rg"] * p["n_ch"], n_bh), const=const, interp=interp, po=None, pl=None,
                check=not (tile_offsets_fit(k, bn) and tile_offsets_fit(v, bn)))

"""Triton block-sparse flash attention with GQA, RoPE-on-load, split-KV (flash-decoding) and block mass.

Design (one kernel for prefill and for the short question block):

* **GQA packing.** One program serves one KV head and a tile of BLOCK_M *packed* query rows: packed row
  r is (query position r // G, query head kvh * G + r % G). The G query heads sharing a KV head read each
  K/V tile once; a tile covers BLOCK_M / G consecutive positions, so masks stay block-structured.
* **Visible-tile lists.** For a block mask the host builds, per query tile, the sorted list of KV tiles
  that hold at least one visible key (from per-tile min/max block ids, on the device). The kernel walks
  only that list, so a BlockRank prefill (documents see the instruction and themselves) costs work
  linear in the number of documents. Without block ids (or when every query row is in the query block)
  the list is the causal range 0..ceil((q_start + last row + 1) / BLOCK_N) and no table is read.
* **Split-KV.** A query tile's list is cut into chunks of CH tiles; every (tile, chunk) is one program
  (heaviest first). Single-chunk tiles write the output directly; multi-chunk tiles write fp32 partial
  outputs + log-sum-exp, and a small reduce kernel merges them. CH is picked so that the grid holds about
  ``programs_per_sm`` programs per SM: a 50-token question over a 32K cache fills the GPU, and the
  question tile of a BlockRank prefill (which sees every key) is spread over several SMs.
* **RoPE on load.** Keys stored un-rotated are rotated in fp32 as they are loaded (HF rotate_half
  convention), then cast back to the input dtype for the tensor-core dot. The head dim is handled as two
  halves so that rotate_half is a pair of elementwise ops: s = q1.k1 + q2.k2.
* **Block mass.** A second pass recomputes scores for the requested rows, normalises them with the final
  log-sum-exp of the first pass and atomically adds per-block sums (one add per distinct block in a tile).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .question_attention import MAX_ROWS, attend_question
from .triton_common import (  # noqa: F401 - re-exported: imported from this module elsewhere
    HAS_TRITON,
    LAST_LAUNCH,
    LOG2E,
    _cdiv,
    _interpret,
    _num_sms,
    check_tile_offsets,
    tile_offsets_fit,
    tl,
    triton,
)

if HAS_TRITON:
    from .triton_common import _dot, _merge_partials, _softmax_step

try:
    from triton.language.extra import libdevice  # precise sin/cos on the GPU
except Exception:  # pragma: no cover
    libdevice = None

_BIG = 1 << 30
_BIG_C = tl.constexpr(_BIG) if HAS_TRITON else _BIG  # a global read inside @triton.jit must be constexpr


if HAS_TRITON:

    @triton.jit
    def _cos_sin(x, ROPE_MODE: tl.constexpr):
        # ROPE_MODE 1 (default): Cody-Waite reduction to [-pi, pi] with two fma, then tl.cos / tl.sin
        # (the GPU's fast approximations are accurate to ~1e-6 there; unreduced they are not, positions reach
        # 32K+). ROPE_MODE 2: libdevice cosf/sinf (precise, slower). ROPE_MODE 0: tl.cos / tl.sin as is.
        if ROPE_MODE == 2:
            c = libdevice.cos(x)
            s = libdevice.sin(x)
        elif ROPE_MODE == 1:
            n = tl.floor(x * 0.15915494309189535 + 0.5)
            r = tl.fma(n, -6.2831854820251465, x)  # fp32(2 pi)
            r = tl.fma(n, 1.7484556000744883e-07, r)  # fp32(2 pi) - 2 pi
            c = tl.cos(r)
            s = tl.sin(r)
        else:
            c = tl.cos(x)
            s = tl.sin(x)
        return c, s

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q1, q2, k_base, v_base, KB, KP, invf, TABLE, qt, n_kt, lo, hi, gq, qb,
        skn, skd, svn, svd, Lk, qk_scale,
        BLOCK_N: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        USE_TABLE: tl.constexpr, ROPE_K: tl.constexpr, ROPE_MODE: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, LAZY: tl.constexpr,
    ):
        # SPLIT: q and k handled as two halves of D (needed by rotate_half); otherwise q1 is the whole q.
        offs_d = tl.arange(0, HALF)
        offs_dv = tl.arange(0, 2 * HALF)
        for it in range(lo, hi):
            if USE_TABLE:
                kt = tl.load(TABLE + qt * n_kt + it)
            else:
                kt = it
            offs_t = tl.arange(0, BLOCK_N)
            offs_n = kt * BLOCK_N + offs_t
            # the tile's first key in int64 (past 2^31 elements in long or strided caches); offsets inside a
            # tile stay int32 (checked on the host: tile_offsets_fit)
            t0 = tl.cast(kt, tl.int64) * BLOCK_N
            v_ptrs = v_base + t0 * svn + offs_t[:, None] * svn + offs_dv[None, :] * svd
            if SPLIT:
                k_ptrs = k_base + t0 * skn + offs_t[:, None] * skn + offs_d[None, :] * skd
            else:
                k_ptrs = k_base + t0 * skn + offs_t[:, None] * skn + offs_dv[None, :] * skd
            if MASKED:
                n_ok = offs_n < Lk
                k1 = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
                if SPLIT:
                    k2 = tl.load(k_ptrs + HALF * skd, mask=n_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:  # a tile fully inside the sequence and fully visible to every row of the query tile
                k1 = tl.load(k_ptrs)
                if SPLIT:
                    k2 = tl.load(k_ptrs + HALF * skd)
                v = tl.load(v_ptrs)
            if ROPE_K:
                if MASKED:
                    kp = tl.load(KP + offs_n, mask=n_ok, other=0).to(tl.float32)
                else:
                    kp = tl.load(KP + offs_n).to(tl.float32)
                ck, sk = _cos_sin(kp[:, None] * invf[None, :], ROPE_MODE)
                k1f = k1.to(tl.float32)
                k2f = k2.to(tl.float32)
                k1 = (k1f * ck - k2f * sk).to(k1.dtype)
                k2 = (k2f * ck + k1f * sk).to(k2.dtype)
            s = _dot(q1, tl.trans(k1), DOT_PREC, UPCAST)
            if SPLIT:
                s += _dot(q2, tl.trans(k2), DOT_PREC, UPCAST)
            s = s * qk_scale
            if MASKED:
                vis = (offs_n[None, :] <= gq[:, None]) & n_ok[None, :]
                if HAS_BLOCKS:
                    kb = tl.load(KB + offs_n, mask=n_ok, other=0)
                    vis = vis & ((kb[None, :] == 0) | (qb[:, None] < 0) | (kb[None, :] == qb[:, None]))
                s = tl.where(vis, s, float("-inf"))
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, MASKED, LAZY, DOT_PREC, UPCAST)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(
        Q, K, V, O, LSE, PO, PL,
        QB, KB, QP, KP, INVF,
        TABLE, CNT, W_QT, W_C, NCH, PBASE,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, som, sod,
        Hkv, G, Lq, Lk, q_start, n_kt, CH, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr,
        HAS_BLOCKS: tl.constexpr, USE_TABLE: tl.constexpr, ROPE_K: tl.constexpr, ROPE_Q: tl.constexpr,
        STORE_LSE: tl.constexpr, ROPE_MODE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT: tl.constexpr, LAZY: tl.constexpr,
    ):
        w = tl.program_id(0)
        bh = tl.program_id(1)
        n_bh = tl.num_programs(1)
        b = bh // Hkv
        kvh = bh % Hkv
        qt = tl.load(W_QT + w)
        c = tl.load(W_C + w)
        nch = tl.load(NCH + qt)
        cnt = tl.load(CNT + qt)
        lo = c * CH
        hi = tl.minimum(lo + CH, cnt)

        offs_l = tl.arange(0, BLOCK_M)
        offs_r = qt * BLOCK_M + offs_l
        i = offs_r // G
        h = kvh * G + offs_r % G
        row_ok = i < Lq
        offs_d = tl.arange(0, HALF)
        offs_dv = tl.arange(0, 2 * HALF)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        i64 = i.to(tl.int64)
        q_row = Q + b64 * sqb + h64[:, None] * sqh + i64[:, None] * sqm

        if SPLIT:
            q_ptrs = q_row + offs_d[None, :] * sqd
            q1 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            q2 = tl.load(q_ptrs + HALF * sqd, mask=row_ok[:, None], other=0.0)
            invf = tl.load(INVF + offs_d)
        else:
            q_ptrs = q_row + offs_dv[None, :] * sqd
            q1 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            q2 = q1
            invf = tl.zeros([HALF], tl.float32)
        if ROPE_Q:
            qp = tl.load(QP + i, mask=row_ok, other=0).to(tl.float32)
            cq, sq = _cos_sin(qp[:, None] * invf[None, :], ROPE_MODE)
            q1f = q1.to(tl.float32)
            q2f = q2.to(tl.float32)
            q1 = (q1f * cq - q2f * sq).to(Q.dtype.element_ty)
            q2 = (q2f * cq + q1f * sq).to(Q.dtype.element_ty)
        gq = q_start + i
        if HAS_BLOCKS:
            qb = tl.load(QB + i, mask=row_ok, other=0)
        else:
            qb = gq

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, 2 * HALF], tl.float32)
        k_base = K + b64 * skb + kvh.to(tl.int64) * skh
        v_base = V + b64 * svb + kvh.to(tl.int64) * svh
        if USE_TABLE:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q1, q2, k_base, v_base, KB, KP, invf, TABLE, qt, n_kt, lo, hi, gq, qb,
                skn, skd, svn, svd, Lk, qk_scale,
                BLOCK_N, HALF, True, HAS_BLOCKS, True, ROPE_K, ROPE_MODE, DOT_PREC, UPCAST, SPLIT, LAZY)
        else:
            # causal range: tiles below the tile's first row (and inside Lk) need no mask at all
            i_first = (qt * BLOCK_M) // G
            n_full = tl.minimum((q_start + i_first + 1) // BLOCK_N, Lk // BLOCK_N)
            mid = tl.maximum(lo, tl.minimum(hi, n_full))
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q1, q2, k_base, v_base, KB, KP, invf, TABLE, qt, n_kt, lo, mid, gq, qb,
                skn, skd, svn, svd, Lk, qk_scale,
                BLOCK_N, HALF, False, False, False, ROPE_K, ROPE_MODE, DOT_PREC, UPCAST, SPLIT, LAZY)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q1, q2, k_base, v_base, KB, KP, invf, TABLE, qt, n_kt, mid, hi, gq, qb,
                skn, skd, svn, svd, Lk, qk_scale,
                BLOCK_N, HALF, True, False, False, ROPE_K, ROPE_MODE, DOT_PREC, UPCAST, SPLIT, LAZY)

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        if nch == 1:
            o_ptrs = O + b64 * sob + h64[:, None] * soh + i64[:, None] * som + offs_dv[None, :] * sod
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
            if STORE_LSE:
                tl.store(LSE + (b64 * Hkv * G + h64) * Lq + i64, lse, mask=row_ok)
        else:
            slot = tl.load(PBASE + qt) + c
            base = (slot * n_bh + bh).to(tl.int64) * BLOCK_M
            tl.store(PO + (base + offs_l)[:, None] * (2 * HALF) + offs_dv[None, :], out, mask=row_ok[:, None])
            tl.store(PL + base + offs_l, lse, mask=row_ok)

    @triton.jit
    def _rope_keys(
        K, KO, KP, INVF, skb, skh, skn, skd, Hkv, Lk,
        BLOCK_N: tl.constexpr, HALF: tl.constexpr, ROPE_MODE: tl.constexpr,
    ):
        # Rotates keys once into a contiguous scratch copy [B, Hkv, Lk, D] (fp32 math, stored in the input
        # dtype, exactly what the fused path feeds its dot), for the "prepass" RoPE strategy.
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hkv
        h = bh % Hkv
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        offs_d = tl.arange(0, HALF)
        ptr = (K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_n.to(tl.int64)[:, None] * skn
               + offs_d[None, :] * skd)
        k1 = tl.load(ptr, mask=n_ok[:, None], other=0.0)
        k2 = tl.load(ptr + HALF * skd, mask=n_ok[:, None], other=0.0)
        invf = tl.load(INVF + offs_d)
        kp = tl.load(KP + offs_n, mask=n_ok, other=0).to(tl.float32)
        c, s = _cos_sin(kp[:, None] * invf[None, :], ROPE_MODE)
        k1f = k1.to(tl.float32)
        k2f = k2.to(tl.float32)
        optr = KO + (bh.to(tl.int64) * Lk + offs_n[:, None]) * (2 * HALF) + offs_d[None, :]
        tl.store(optr, (k1f * c - k2f * s).to(k1.dtype), mask=n_ok[:, None])
        tl.store(optr + HALF, (k2f * c + k1f * s).to(k1.dtype), mask=n_ok[:, None])

    @triton.jit
    def _attn_reduce(
        O, LSE, PO, PL, R_QT, NCH, PBASE,
        sob, soh, som, sod,
        Hkv, G, Lq,
        BLOCK_M: tl.constexpr, D: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        t = tl.program_id(0)
        bh = tl.program_id(1)
        n_bh = tl.num_programs(1)
        b = bh // Hkv
        kvh = bh % Hkv
        qt = tl.load(R_QT + t)
        n = tl.load(NCH + qt)
        slot0 = tl.load(PBASE + qt)
        offs_l = tl.arange(0, BLOCK_M)
        offs_r = qt * BLOCK_M + offs_l
        i = offs_r // G
        h = kvh * G + offs_r % G
        row_ok = i < Lq
        offs_d = tl.arange(0, D)
        acc, l, m = _merge_partials(PO, PL, (slot0 * n_bh + bh) * BLOCK_M + offs_l, n_bh * BLOCK_M, n, row_ok,
                                    BLOCK_M, D)
        empty = l == 0.0
        l_safe = tl.where(empty, 1.0, l)
        out = acc / l_safe[:, None]
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        i64 = i.to(tl.int64)
        o_ptrs = O + b64 * sob + h64[:, None] * soh + i64[:, None] * som + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(empty, float("-inf"), m + tl.log2(l_safe))
            tl.store(LSE + (b64 * Hkv * G + h64) * Lq + i64, lse, mask=row_ok)

    @triton.jit
    def _block_mass(
        Q, K, LSE, QB, KB, QP, KP, INVF, ROWS, MASS,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        Hkv, G, Lq, Lk, q_start, R, NB, CHT, n_kt_causal, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr,
        HAS_BLOCKS: tl.constexpr, ROPE_K: tl.constexpr, ROPE_Q: tl.constexpr,
        ROPE_MODE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        kc = tl.program_id(0)
        bh = tl.program_id(1)
        rg = tl.program_id(2)
        b = bh // Hkv
        kvh = bh % Hkv
        Hq = Hkv * G
        offs_r = rg * BLOCK_M + tl.arange(0, BLOCK_M)
        sel = offs_r // G
        h = kvh * G + offs_r % G
        r_ok = sel < R
        i = tl.load(ROWS + sel, mask=r_ok, other=0)
        offs_d = tl.arange(0, HALF)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_ptrs = Q + b64 * sqb + h64[:, None] * sqh + i.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd
        q1 = tl.load(q_ptrs, mask=r_ok[:, None], other=0.0)
        q2 = tl.load(q_ptrs + HALF * sqd, mask=r_ok[:, None], other=0.0)
        if ROPE_K or ROPE_Q:
            invf = tl.load(INVF + offs_d)
        if ROPE_Q:
            qp = tl.load(QP + i, mask=r_ok, other=0).to(tl.float32)
            cq, sq = _cos_sin(qp[:, None] * invf[None, :], ROPE_MODE)
            q1f = q1.to(tl.float32)
            q2f = q2.to(tl.float32)
            q1 = (q1f * cq - q2f * sq).to(Q.dtype.element_ty)
            q2 = (q2f * cq + q1f * sq).to(Q.dtype.element_ty)
        lse = tl.load(LSE + (b64 * Hq + h64) * Lq + i, mask=r_ok, other=float("-inf"))
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        gq = q_start + i
        if HAS_BLOCKS:
            qb = tl.load(QB + i, mask=r_ok, other=0)
        k_base = K + b64 * skb + kvh.to(tl.int64) * skh
        t0 = kc * CHT
        t1 = tl.minimum(t0 + CHT, n_kt_causal)
        mass_row = MASS + ((b64 * Hq + h64) * R + sel) * NB
        for kt in range(t0, t1):
            offs_t = tl.arange(0, BLOCK_N)
            offs_n = kt * BLOCK_N + offs_t
            n_ok = offs_n < Lk
            k_ptrs = k_base + tl.cast(kt, tl.int64) * BLOCK_N * skn + offs_t[:, None] * skn + offs_d[None, :] * skd
            k1 = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            k2 = tl.load(k_ptrs + HALF * skd, mask=n_ok[:, None], other=0.0)
            if ROPE_K:
                kp = tl.load(KP + offs_n, mask=n_ok, other=0).to(tl.float32)
                ck, sk = _cos_sin(kp[:, None] * invf[None, :], ROPE_MODE)
                k1f = k1.to(tl.float32)
                k2f = k2.to(tl.float32)
                k1 = (k1f * ck - k2f * sk).to(K.dtype.element_ty)
                k2 = (k2f * ck + k1f * sk).to(K.dtype.element_ty)
            s = _dot(q1, tl.trans(k1), DOT_PREC, UPCAST)
            s += _dot(q2, tl.trans(k2), DOT_PREC, UPCAST)
            s = s * qk_scale
            vis = (offs_n[None, :] <= gq[:, None]) & n_ok[None, :] & r_ok[:, None]
            if HAS_BLOCKS:
                kb = tl.load(KB + offs_n, mask=n_ok, other=0)
                vis = vis & ((kb[None, :] == 0) | (qb[:, None] < 0) | (kb[None, :] == qb[:, None]))
                kidx = tl.where(kb < 0, NB - 1, kb)
            else:
                kidx = tl.zeros([BLOCK_N], tl.int32)
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            # one atomic add per distinct block id present in this tile (increasing order)
            cur = tl.min(tl.where(n_ok, kidx, _BIG_C), 0)
            while cur < _BIG_C:
                vals = tl.sum(tl.where((kidx == cur)[None, :], p, 0.0), 1)
                tl.atomic_add(mass_row + cur, vals, mask=r_ok & ((sel * 0 + cur) < NB))
                cur = tl.min(tl.where(n_ok & (kidx > cur), kidx, _BIG_C), 0)


# ----------------------------------------------------------------------------------------------------
# host side


def default_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes / launch parameters. Small tiles under the interpreter (speed of the CPU tests)."""
    if device.type != "cuda" or _interpret():
        return dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if D >= 256 or dtype == torch.float32:
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if D >= 128:  # best of a small sweep on an H100 (eval/bench_kernel.py --sweep)
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return dict(block_m=128, block_n=64, num_warps=4, num_stages=3)


def block_tile_table(q_block, k_block, Lq: int, Lk: int, q_start: int, G: int, block_m: int, block_n: int):
    """Per packed query tile, the ascending list of KV tiles holding at least one visible key.

    Returns (table [n_qt, n_kt] int32, cnt [n_qt] int32), both on q_block's device. The test per tile pair
    is conservative (min/max of the positive block ids on each side), the kernel applies the exact mask."""
    dev = q_block.device
    n_qt = _cdiv(G * Lq, block_m)
    n_kt = _cdiv(Lk, block_n)
    t = torch.arange(n_qt, device=dev)
    i_lo = (t * block_m) // G
    i_hi = torch.clamp(((t + 1) * block_m - 1) // G, max=Lq - 1)
    P = _cdiv(block_m, G) + 1
    idx = i_lo[:, None] + torch.arange(P, device=dev)[None, :]
    valid = idx <= i_hi[:, None]
    qv = q_block.long()[idx.clamp(max=Lq - 1)]
    qpos = valid & (qv > 0)
    qmin = torch.where(qpos, qv, torch.full_like(qv, _BIG)).amin(1)
    qmax = torch.where(qpos, qv, torch.full_like(qv, -1)).amax(1)
    qneg = (valid & (qv < 0)).any(1)
    kbp = torch.full((n_kt * block_n,), -1, dtype=torch.long, device=dev)
    kbp[:Lk] = k_block.long()
    kbp = kbp.view(n_kt, block_n)
    kzero = (kbp == 0).any(1)
    kpos = kbp > 0
    kmin = torch.where(kpos, kbp, torch.full_like(kbp, _BIG)).amin(1)
    kmax = torch.where(kpos, kbp, torch.full_like(kbp, -1)).amax(1)
    kstart = torch.arange(n_kt, device=dev) * block_n
    causal = kstart[None, :] <= (q_start + i_hi)[:, None]
    overlap = (kmin[None, :] <= qmax[:, None]) & (kmax[None, :] >= qmin[:, None])
    vis = causal & (qneg[:, None] | kzero[None, :] | overlap)
    cnt = vis.sum(1).to(torch.int32)
    table = torch.sort((~vis).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous()
    return table, cnt


def _causal_counts(Lq: int, Lk: int, q_start: int, G: int, block_m: int, block_n: int) -> np.ndarray:
    n_qt = _cdiv(G * Lq, block_m)
    t = np.arange(n_qt, dtype=np.int64)
    i_hi = np.minimum(((t + 1) * block_m - 1) // G, Lq - 1)
    last = np.clip(q_start + i_hi + 1, 0, Lk)
    return -(-last // block_n)


def _work_plan(cnt: np.ndarray, n_bh: int, n_sm: int, programs_per_sm: float, chunk: int | None,
               min_chunk: int = 4):
    """Cut each query tile's list into chunks; returns int32 arrays and sizes."""
    cnt = cnt.astype(np.int64)
    n_qt = cnt.shape[0]
    if chunk is None:
        target = max(1, int(programs_per_sm * n_sm))
        chunk = max(min_chunk, _cdiv(int(cnt.sum()) * n_bh, target))
    chunk = max(1, int(chunk))
    nch = np.maximum(1, -(-cnt // chunk))
    w_qt = np.repeat(np.arange(n_qt, dtype=np.int64), nch)
    starts = np.concatenate([[0], np.cumsum(nch)[:-1]])
    w_c = np.arange(w_qt.shape[0], dtype=np.int64) - starts[w_qt]
    length = np.minimum(chunk, cnt[w_qt] - w_c * chunk)
    order = np.argsort(-length, kind="stable")  # heaviest programs first
    w_qt, w_c = w_qt[order], w_c[order]
    multi = nch > 1
    pbase = np.zeros(n_qt, dtype=np.int64)
    pbase[multi] = np.concatenate([[0], np.cumsum(nch[multi])[:-1]]) if multi.any() else 0
    n_slots = int(nch[multi].sum())
    r_qt = np.nonzero(multi)[0]
    return dict(chunk=chunk, w_qt=w_qt, w_c=w_c, nch=nch, pbase=pbase, cnt=cnt, r_qt=r_qt, n_slots=n_slots)


_PLAN_CACHE: dict = {}
_DUMMY: dict = {}
_PLAN_CACHE_MAX = 64


def _tensor_key(t):
    if isinstance(t, torch.Tensor):
        # Inference tensors (torch.inference_mode) keep no version counter: their in-place edits go unseen,
        # so build new block-id tensors rather than editing them in place under inference mode.
        version = -1 if t.is_inference() else t._version
        return (t.data_ptr(), version, t.numel(), t.dtype, str(t.device), t.stride())
    return ("seq", tuple(int(x) for x in t))


def _cache_put(key, plan):
    if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = plan


def _dummies(dev):
    """Placeholder tensors for pointer arguments a launch does not read (no allocation per call)."""
    key = str(dev)
    if key not in _DUMMY:
        _DUMMY[key] = (torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.float32, device=dev))
    return _DUMMY[key]


def _upload_plan(plan: dict, device) -> dict:
    arrs = [plan["w_qt"], plan["w_c"], plan["nch"], plan["pbase"], plan["cnt"], plan["r_qt"]]
    sizes = [a.shape[0] for a in arrs]
    flat = torch.from_numpy(np.concatenate(arrs).astype(np.int32))
    flat = flat.to(device)
    parts = torch.split(flat, sizes)
    out = dict(plan)
    for name, t in zip(["w_qt", "w_c", "nch", "pbase", "cnt", "r_qt"], parts):
        out[name + "_t"] = t
    out["W"] = sizes[0]
    out["n_r"] = sizes[5]
    return out


def attend_triton(q, k, v, *, q_start: int | None = None, q_block=None, k_block=None, k_positions=None,
                  q_positions=None, inv_freq=None, scale: float | None = None, mass_rows=None,
                  n_blocks: int | None = None, block_m: int | None = None, block_n: int | None = None,
                  chunk: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  programs_per_sm: float | None = None, mass_chunk: int | None = None, rope_mode: str = "fast",
                  rope_impl: str = "prepass", lazy_rescale: bool = False):
    """Triton implementation of :func:`attention_kv.kernels.attend` (same semantics). The extra keyword
    arguments are tuning knobs (tile sizes, KV tiles per program ``chunk``, launch parameters).

    rope_impl: "prepass" (default) rotates the keys once, in fp32, into a scratch copy that the attention
    pass then streams straight into the tensor cores; "fused" rotates each K tile in registers inside the
    attention loop (no scratch memory, but the rotated tile round-trips through registers, spills, and
    loses Triton's load pipelining: on an H100, 50 x 32K took 0.363 ms fused vs 0.233 ms prepass vs
    0.114 ms for pre-rotated keys). Both feed the dot the same bf16 values. rope_mode: "fast"
    (range-reduced hardware sin/cos, default) or "libdevice" (same speed, measured).
    programs_per_sm: split-KV target (default 2 for block-sparse prefill, 1 otherwise)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError("Hq must be a multiple of Hkv (GQA)")
    if D < 32 or D > 256 or D & (D - 1):
        raise ValueError(f"triton backend needs a power-of-two head dim in [32, 256], got {D}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    dev = q.device
    if dev.type != "cuda" and not _interpret():
        raise RuntimeError("triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    G = Hq // Hkv
    if q_start is None:
        q_start = Lk - Lq
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qk_scale = float(scale) * LOG2E
    want_mass = mass_rows is not None
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=dev)
    if Lq == 0 or Lk == 0:
        out.zero_()
        if want_mass:
            nb = n_blocks if n_blocks is not None else 1
            return out, torch.zeros(B, Hq, len(mass_rows), nb, dtype=torch.float32, device=dev)
        return out

    cfg = default_config(D, q.dtype, dev)
    BM = block_m or cfg["block_m"]
    BN = block_n or cfg["block_n"]
    nw = num_warps or cfg["num_warps"]
    ns = num_stages or cfg["num_stages"]
    rope_mode_i = {"fast": 1, "libdevice": 2, "plain": 0}[rope_mode]
    if rope_mode_i == 2 and (libdevice is None or _interpret()):
        rope_mode_i = 1
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = _interpret() and q.dtype == torch.bfloat16
    dummy_i, dummy_f = _dummies(dev)

    has_blocks = q_block is not None and k_block is not None
    qb = kb = None
    main_blocks = False
    if has_blocks:
        # A question block (every row < 0) sees every key: plain causal, no table, block ids unused by the
        # main pass. (This check syncs when q_block lives on the GPU; pass it on the CPU to avoid that.)
        if len(q_block) != Lq or len(k_block) != Lk:
            raise ValueError("q_block must have Lq entries and k_block Lk entries")
        qkey = ("qneg", _tensor_key(q_block))
        hit = _PLAN_CACHE.get(qkey)
        if hit is None:
            q_src = q_block if isinstance(q_block, torch.Tensor) else torch.as_tensor(q_block)
            hit = (not bool((q_src < 0).all()), q_block)
            _cache_put(qkey, hit)
        main_blocks = hit[0]
        if main_blocks or want_mass:
            qb = torch.as_tensor(q_block).to(device=dev, dtype=torch.int32).contiguous()
            kb = torch.as_tensor(k_block).to(device=dev, dtype=torch.int32).contiguous()
    rope_k = inv_freq is not None
    rope_q = rope_k and q_positions is not None
    if rope_k:
        invf = inv_freq.to(device=dev, dtype=torch.float32).contiguous()
        if invf.numel() != D // 2:
            raise ValueError("inv_freq must have D/2 entries")
        kp = (k_positions if k_positions is not None else torch.arange(Lk, device=dev))
        kp = torch.as_tensor(kp).to(device=dev, dtype=torch.int32).contiguous()
        qp = (torch.as_tensor(q_positions).to(device=dev, dtype=torch.int32).contiguous() if rope_q else dummy_i)
        if rope_impl not in ("prepass", "fused"):
            raise ValueError(f"rope_impl must be 'prepass' or 'fused', got {rope_impl!r}")
        if rope_impl == "prepass":
            k_rot = torch.empty(B, Hkv, Lk, D, dtype=k.dtype, device=dev)
            RB = 64
            _rope_keys[(_cdiv(Lk, RB), B * Hkv)](
                k, k_rot, kp, invf, *k.stride(), Hkv, Lk,
                BLOCK_N=RB, HALF=D // 2, ROPE_MODE=rope_mode_i, num_warps=4,
            )
            k = k_rot
            rope_k = False
    else:
        invf = dummy_f
        kp = qp = dummy_i

    if (not main_blocks and not want_mass and not rope_k and not rope_q and block_m is None
            and G * Lq <= MAX_ROWS):
        # a short block of rows over a long cache (a question, a decoded token): the dedicated kernel
        return attend_question(q, k, v, q_start=q_start, scale=scale, block_n=block_n, num_warps=num_warps,
                               num_stages=num_stages, programs_per_sm=programs_per_sm, chunk=chunk, out=out)
    if (block_n is None and not main_blocks and not (rope_k or rope_q) and D == 128
            and q.dtype in (torch.bfloat16, torch.float16) and dev.type == "cuda" and not _interpret()):
        # causal / question-block path without in-kernel rotation: 128-key tiles measured faster on an H100
        # (50 x 32K: 0.096 vs 0.114 ms; 50 x 8K: 0.046 vs 0.048 ms; bench_kernel --sweep)
        BN = 128
    if programs_per_sm is None:
        # block-sparse prefill: more, shorter programs balance the query tile that sees every key (measured
        # 0.83 vs 1.03 ms at N=200); the causal / question path prefers about one program per SM.
        programs_per_sm = 2.0 if main_blocks else 1.0
    n_bh = B * Hkv
    n_sm = _num_sms(dev)
    n_kt = _cdiv(Lk, BN)
    check_tile_offsets(max(BN, block_n or cfg["block_n"]), k, v)
    if main_blocks:
        # The plan depends on the block ids' values: cache it on the identity (storage, version) of the
        # tensors passed, so that the layers of one forward pass (same ids) build it once. A new or
        # modified ids tensor builds a new plan (one device->host sync).
        key = ("blocks", _tensor_key(q_block), _tensor_key(k_block), Lq, Lk, q_start, G, BM, BN, n_bh, n_sm,
               programs_per_sm, chunk, str(dev))
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            table, cnt_dev = block_tile_table(qb, kb, Lq, Lk, q_start, G, BM, BN)
            cnt = cnt_dev.cpu().numpy()
            plan = _upload_plan(_work_plan(cnt, n_bh, n_sm, programs_per_sm, chunk), dev)
            plan["table"] = table
            plan["_keep"] = (q_block, k_block)  # pin the identity the key refers to
            _cache_put(key, plan)
        table = plan["table"]
    else:
        table = dummy_i
        key = (Lq, Lk, q_start, G, BM, BN, n_bh, n_sm, programs_per_sm, chunk, str(dev))
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            cnt = _causal_counts(Lq, Lk, q_start, G, BM, BN)
            plan = _upload_plan(_work_plan(cnt, n_bh, n_sm, programs_per_sm, chunk), dev)
            _cache_put(key, plan)

    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev) if want_mass else out
    if plan["n_slots"]:
        po = torch.empty(plan["n_slots"] * n_bh * BM * D, dtype=torch.float32, device=dev)
        pl = torch.empty(plan["n_slots"] * n_bh * BM, dtype=torch.float32, device=dev)
    else:
        po = pl = dummy_f

    LAST_LAUNCH["fwd"] = _attn_fwd[(plan["W"], n_bh)](
        q, k, v, out, lse, po, pl,
        qb if main_blocks else dummy_i, kb if main_blocks else dummy_i, qp, kp, invf,
        table, plan["cnt_t"], plan["w_qt_t"], plan["w_c_t"], plan["nch_t"], plan["pbase_t"],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hkv, G, Lq, Lk, q_start, n_kt, plan["chunk"], qk_scale,
        BLOCK_M=BM, BLOCK_N=BN, HALF=D // 2,
        HAS_BLOCKS=main_blocks, USE_TABLE=main_blocks, ROPE_K=rope_k, ROPE_Q=rope_q,
        STORE_LSE=want_mass, ROPE_MODE=rope_mode_i, DOT_PREC=dot_prec, UPCAST=upcast, SPLIT=rope_k or rope_q, LAZY=lazy_rescale,
        num_warps=nw, num_stages=ns,
    )
    if plan["n_r"]:
        _attn_reduce[(plan["n_r"], n_bh)](
            out, lse, po, pl, plan["r_qt_t"], plan["nch_t"], plan["pbase_t"],
            *out.stride(), Hkv, G, Lq,
            BLOCK_M=BM, D=D, STORE_LSE=want_mass, num_warps=4,
        )
    if not want_mass:
        return out

    rows = torch.as_tensor(mass_rows).to(device=dev, dtype=torch.int32).contiguous()
    R = rows.numel()
    if n_blocks is None:
        n_blocks = int(kb.max().item()) + 2 if has_blocks else 1
    mass = torch.zeros(B, Hq, R, n_blocks, dtype=torch.float32, device=dev)
    if R == 0:
        return out, mass
    MB = min(BM, max(16, triton.next_power_of_2(R * G)))
    MBN = block_n or cfg["block_n"]  # the mass pass keeps its own (measured) key tile
    n_rg = _cdiv(R * G, MB)
    n_kt_causal = min(_cdiv(Lk, MBN), _cdiv(q_start + Lq, MBN))
    if mass_chunk is None:
        mass_chunk = max(4, _cdiv(n_kt_causal * n_bh * n_rg, int(programs_per_sm * n_sm)))
    n_kc = max(1, _cdiv(n_kt_causal, mass_chunk))
    LAST_LAUNCH["mass"] = _block_mass[(n_kc, n_bh, n_rg)](
        q, k, lse, qb if has_blocks else dummy_i, kb if has_blocks else dummy_i, qp, kp, invf, rows, mass,
        *q.stride(), *k.stride(),
        Hkv, G, Lq, Lk, q_start, R, n_blocks, mass_chunk, n_kt_causal, qk_scale,
        BLOCK_M=MB, BLOCK_N=MBN, HALF=D // 2,
        HAS_BLOCKS=has_blocks, ROPE_K=rope_k, ROPE_Q=rope_q, ROPE_MODE=rope_mode_i, DOT_PREC=dot_prec, UPCAST=upcast,
        num_warps=4 if MB <= 64 else 8, num_stages=ns,
    )
    return out, mass

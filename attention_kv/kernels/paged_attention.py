"""Attention of a short block of query rows (a question, a decoded token) over K/V read through a page table.

Entry point: :func:`attend_paged` (Triton on CUDA or under ``TRITON_INTERPRET=1``; :func:`attend_paged_reference`
in PyTorch everywhere). Nothing is stitched: every passage's cache stays where it lies in a page arena
``kv[pages, PAGE, 2, Hkv, D]`` (one layer; K and V interleaved per token), and a request is a table of pages.

Page table ``table`` (int32 ``[4, capacity]``; the first ``n_pages`` columns are used), per page ``p``:
  ``table[0, p]`` arena page id, ``table[1, p]`` valid tokens in it (a chunk's last page is partly filled),
  ``table[2, p]`` the logical (RoPE) position of its first token, ``table[3, p]`` the rotation still to apply
  to its keys (``delta``): the keys were stored rotated to ``position - delta``.
Key ``j`` of page ``p`` sits at logical position ``table[2, p] + j`` and is visible to query row ``i`` iff
``j < table[1, p]`` and that position ``<= q_pos[i]`` (causal within the question / decoded tokens).

RoPE on load without touching the keys: a chunk's keys are stored rotated to their positions inside the chunk,
and ``<R(a) q, R(b + delta) k> = <R(a - delta) q, R(b) k>``, so the kernel rotates the *query* rows by
``-delta`` once per page (a ``[rows, D]`` tile in registers, cos/sin from fp32 tables) and streams K and V
untouched into the tensor cores. The question's and decoded tokens' own keys are stored at their true
positions (``delta = 0``).

The work split follows ``question_attention``: packed rows (query position x the query heads sharing a KV
head) in 64-row groups plus small tails, pages split into slices across the GPU, the number of pages read on
the device (one CUDA graph serves every request), and the last slice to finish merges the partial results.
All pointer offsets are int64.

Variants (launch-time switches, module defaults below): the query rows rotated once per run of pages sharing
a delta (a chunk; default) or for every page; pages loaded through the copy engine (TMA; inside CUDA graphs
only, where the descriptors are encoded once; off: 230-232 vs 234-241 us for a question, slower for a decoded
token) or with plain loads; one page
(default) or two pages per loop step (two per step halve the online-softmax rescales, but measured slower on an
H200: 378 vs 279 us for a 50-token question over 32K keys, ``eval/bench_attn_kernels.py --paged``); whole-D key
tiles (``full``: one dot per page, the rows rotated on the full width) measured no faster (H200, same question:
272 half-D vs 287 whole-D at 64-token pages, 322-352 with 128-row groups or 128-token pages, 549 rotating the
rows for every page: the rotation, not the dot, is the cost; ``eval/results/attn_paged_full_h200.json``); runs of
pages sharing a delta as an outer loop (``seg``: the rows rotated once per run, a branch-free inner loop), the
plan's choice for a question's rows with two programs per SM (237.9 vs 277 us), and 5 pipeline stages for a
decoded token (the page-table load feeding each K/V address takes stages of its own: 64 vs 83 us); affine runs
and the context runs' split mask, measured no faster (README "Paged (zero-copy) kernel").
"""
from __future__ import annotations

import math

import torch

from .question_attention import question_plan
from .triton_common import (
    HAS_TRITON,
    LOG2E,
    TensorDescriptor,
    _cdiv,
    _counters,
    _interpret,
    _num_sms,
    _tma_ok,
    partial_buffers,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import _dot, _merge_partials, _softmax_step


def attend_paged_reference(q, kv, table, n_pages, q_pos, cos_half, sin_half, *, scale: float | None = None):
    """PyTorch reference of :func:`attend_paged` (fp32 math): gathers the visible keys of the table (a
    transient per-call gather, the reference only), rotates them by their page's ``delta`` and attends."""
    B, Hq, Lq, D = q.shape
    if B != 1:
        raise ValueError("attend_paged serves one request (batch 1)")
    page, hkv = kv.shape[1], kv.shape[3]
    G = Hq // hkv
    n = int(n_pages) if not isinstance(n_pages, torch.Tensor) else int(n_pages.reshape(-1)[0])
    tab = table[:, :n].to(device=kv.device, dtype=torch.int64)
    j = torch.arange(page, device=kv.device)
    ok = (j[None, :] < tab[1][:, None]).reshape(-1)
    rows = (tab[0][:, None] * page + j[None, :]).reshape(-1)[ok]
    pos = (tab[2][:, None] + j[None, :]).reshape(-1)[ok]
    delta = tab[3][:, None].expand(n, page).reshape(-1)[ok]
    flat = kv.reshape(-1, 2, hkv, D)
    k = flat[rows, 0].float()  # [n_keys, Hkv, D]
    v = flat[rows, 1].float()
    c = torch.cat([cos_half[delta], cos_half[delta]], -1).to(kv.device)[:, None, :]
    s = torch.cat([sin_half[delta], sin_half[delta]], -1).to(kv.device)[:, None, :]
    half = D // 2
    k = k * c + torch.cat([-k[..., half:], k[..., :half]], -1) * s
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qf = q[0].float()  # [Hq, Lq, D]
    kk = k.permute(1, 0, 2).repeat_interleave(G, 0)  # [Hq, n_keys, D]
    vv = v.permute(1, 0, 2).repeat_interleave(G, 0)
    scores = torch.matmul(qf, kk.transpose(1, 2)) * scale
    vis = pos[None, :] <= q_pos.to(kv.device, torch.int64).view(-1)[:, None]  # [Lq, n_keys]
    scores = scores.masked_fill(~vis[None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)  # rows that see nothing -> zeros
    return torch.matmul(p, vv)[None].to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _rows_start(Q, QPOS, kvh, r0, G, Lq, sqh, sqm, BM: tl.constexpr, D: tl.constexpr):
        """A program's packed rows: query position ``i``, head ``h``, validity, row pointers, positions and
        the empty online-softmax state."""
        r = r0 + tl.arange(0, BM)
        i = r // G
        h = kvh * G + r % G
        ok = i < Lq
        q_row = Q + h.to(tl.int64)[:, None] * sqh + i.to(tl.int64)[:, None] * sqm
        qp = tl.load(QPOS + i, mask=ok, other=0).to(tl.int64)
        acc = tl.zeros([BM, D], tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        return i, h, ok, q_row, qp, acc, l_i, m_i

    @triton.jit
    def _rows_and_swapped(q_row, ok, sqd, HALF: tl.constexpr):
        """The rows ``[x1, x2]`` (fp32) and ``qs = [x2, -x1]``, so that rotating them by -delta is
        ``q * [cos, cos] + qs * [sin, sin]`` on the full width."""
        offs_d = tl.arange(0, 2 * HALF)
        sign = tl.where(offs_d < HALF, 1.0, -1.0)[None, :]
        qf = tl.load(q_row + offs_d[None, :] * sqd, mask=ok[:, None], other=0.0).to(tl.float32)
        qs = tl.load(q_row + ((offs_d + HALF) % (2 * HALF))[None, :] * sqd, mask=ok[:, None], other=0.0)
        return qf, qs.to(tl.float32) * sign

    @triton.jit
    def _page_entry(TAB, tab_stride, p):
        """(arena page, valid tokens, first position, delta) of table column ``p``."""
        pg = tl.load(TAB + p).to(tl.int64)
        cnt = tl.load(TAB + tab_stride + p)
        pos0 = tl.load(TAB + 2 * tab_stride + p).to(tl.int64)
        dl = tl.load(TAB + 3 * tab_stride + p).to(tl.int64)
        return pg, cnt, pos0, dl

    @triton.jit
    def _rotate_rows(q1, q2, COS, SIN, dl, offs_h, HALF: tl.constexpr, dtype: tl.constexpr):
        """The query rows (fp32 halves) rotated by -delta: x1' = x1 cos + x2 sin, x2' = x2 cos - x1 sin."""
        cs = tl.load(COS + dl * HALF + offs_h)[None, :]
        sn = tl.load(SIN + dl * HALF + offs_h)[None, :]
        return (q1 * cs + q2 * sn).to(dtype), (q2 * cs - q1 * sn).to(dtype)

    @triton.jit
    def _page_kv(KV, KD, VD, pg, kvh, n_bh, kv_head, tok, offs_h, offs_d, s_page, s_kv, PAGE: tl.constexpr,
                 HALF: tl.constexpr, USE_TMA: tl.constexpr):
        """K (two halves of D) and V of one page for one KV head."""
        if USE_TMA:  # the copy engine, at the page's first row of the layer seen as [tokens, 2 * Hkv * D]
            row0 = (pg * PAGE).to(tl.int32)
            k1 = KD.load([row0, kvh * (2 * HALF)])
            k2 = KD.load([row0, kvh * (2 * HALF) + HALF])
            v = VD.load([row0, (n_bh + kvh) * (2 * HALF)])
        else:
            base = kv_head + pg * s_page + tok
            k1 = tl.load(base + offs_h[None, :])
            k2 = tl.load(base + HALF + offs_h[None, :])
            v = tl.load(base + s_kv + offs_d[None, :])
        return k1, k2, v

    @triton.jit
    def _page_scores(a1, a2, k1, k2, cnt, pos0, qp, offs_t, qk_scale, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
        """Scaled scores (log2 units) of the rows over one page; -inf where hidden (past the page's valid
        tokens, or after the row's own position)."""
        s = _dot(a1, tl.trans(k1), DOT_PREC, UPCAST)
        s += _dot(a2, tl.trans(k2), DOT_PREC, UPCAST)
        s = s * qk_scale
        vis = (offs_t < cnt)[None, :] & ((pos0 + offs_t)[None, :] <= qp[:, None])
        return tl.where(vis, s, float("-inf"))

    @triton.jit
    def _paged_rows(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, CNT, kvh, bh, n_bh, c, n_ch, r0, lo, hi,
                    sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G, Lq, R, qk_scale,
                    BM: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, DIRECT: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, FOLD: tl.constexpr, ROT_ONCE: tl.constexpr,
                    USE_TMA: tl.constexpr, PAIR: tl.constexpr):
        i, h, ok, q_row, qp, acc, l_i, m_i = _rows_start(Q, QPOS, kvh, r0, G, Lq, sqh, sqm, BM, 2 * HALF)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, 2 * HALF)
        offs_t = tl.arange(0, PAGE)
        q1 = tl.load(q_row + offs_h[None, :] * sqd, mask=ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_row + (offs_h + HALF)[None, :] * sqd, mask=ok[:, None], other=0.0).to(tl.float32)
        kv_head = KV + kvh.to(tl.int64) * s_head
        tok = offs_t.to(tl.int64)[:, None] * s_tok
        a1 = q1.to(KV.dtype.element_ty)
        a2 = q2.to(KV.dtype.element_ty)
        cur = tl.full([], 0, tl.int64)  # the delta a1/a2 are rotated by (0: as loaded)
        if PAIR:
            # two pages per step: one softmax rescale per 2 * PAGE keys (a page is a short key tile)
            for p in range(lo, hi, 2):
                pb = tl.minimum(p + 1, hi - 1)
                pg, cnt, pos0, dl = _page_entry(TAB, tab_stride, p)
                pgb, cntb, posb, dlb = _page_entry(TAB, tab_stride, pb)
                cntb = tl.where(p + 1 < hi, cntb, 0)  # an odd count: the second page is all masked
                if dl != cur:
                    a1, a2 = _rotate_rows(q1, q2, COS, SIN, dl, offs_h, HALF, KV.dtype.element_ty)
                    cur = dl
                if dlb == cur:
                    b1 = a1
                    b2 = a2
                else:
                    b1, b2 = _rotate_rows(q1, q2, COS, SIN, dlb, offs_h, HALF, KV.dtype.element_ty)
                k1, k2, v = _page_kv(KV, KD, VD, pg, kvh, n_bh, kv_head, tok, offs_h, offs_d, s_page, s_kv,
                                     PAGE, HALF, USE_TMA)
                k1b, k2b, vb = _page_kv(KV, KD, VD, pgb, kvh, n_bh, kv_head, tok, offs_h, offs_d, s_page, s_kv,
                                        PAGE, HALF, USE_TMA)
                s = _page_scores(a1, a2, k1, k2, cnt, pos0, qp, offs_t, qk_scale, DOT_PREC, UPCAST)
                sb = _page_scores(b1, b2, k1b, k2b, cntb, posb, qp, offs_t, qk_scale, DOT_PREC, UPCAST)
                m_new = tl.maximum(m_i, tl.maximum(tl.max(s, 1), tl.max(sb, 1)))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                pa = tl.exp2(s - m_use[:, None])
                pbb = tl.exp2(sb - m_use[:, None])
                l_i = l_i * alpha + tl.sum(pa, 1) + tl.sum(pbb, 1)
                acc = acc * alpha[:, None] + _dot(pa.to(v.dtype), v, DOT_PREC, UPCAST)
                acc += _dot(pbb.to(vb.dtype), vb, DOT_PREC, UPCAST)
                m_i = m_new
        else:
            for p in range(lo, hi):
                pg, cnt, pos0, dl = _page_entry(TAB, tab_stride, p)
                if ROT_ONCE:
                    # pages of one chunk share their delta: rotate the rows again only when it changes
                    if dl != cur:
                        a1, a2 = _rotate_rows(q1, q2, COS, SIN, dl, offs_h, HALF, KV.dtype.element_ty)
                        cur = dl
                else:
                    a1, a2 = _rotate_rows(q1, q2, COS, SIN, dl, offs_h, HALF, KV.dtype.element_ty)
                k1, k2, v = _page_kv(KV, KD, VD, pg, kvh, n_bh, kv_head, tok, offs_h, offs_d, s_page, s_kv,
                                     PAGE, HALF, USE_TMA)
                s = _page_scores(a1, a2, k1, k2, cnt, pos0, qp, offs_t, qk_scale, DOT_PREC, UPCAST)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, True, False, DOT_PREC, UPCAST)
        _paged_finish(acc, l_i, m_i, O, PO, PL, CNT, h, i, ok, bh, n_bh, c, n_ch, r0, R, soh, som, sod, BM, HALF,
                      DIRECT)

    @triton.jit
    def _paged_finish(acc, l_i, m_i, O, PO, PL, CNT, h, i, ok, bh, n_bh, c, n_ch, r0, R, soh, som, sod,
                      BM: tl.constexpr, HALF: tl.constexpr, DIRECT: tl.constexpr):
        """The output directly (one slice) or a partial result, merged by the last slice to arrive."""
        offs_d = tl.arange(0, 2 * HALF)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_row = O + h.to(tl.int64)[:, None] * soh + i.to(tl.int64)[:, None] * som
        if DIRECT:
            tl.store(o_row + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=ok[:, None])
        else:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            row = ((c * n_bh + bh) * R + r0 + tl.arange(0, BM)).to(tl.int64)
            tl.store(PO + row[:, None] * (2 * HALF) + offs_d[None, :], out, mask=ok[:, None])
            tl.store(PL + row, lse, mask=ok)
            tl.debug_barrier()
            prev = tl.atomic_add(CNT, 1, sem="acq_rel")
            if prev == n_ch - 1:
                acc2, l2, _ = _merge_partials(PO, PL, bh * R + r0 + tl.arange(0, BM), n_bh * R, n_ch, ok, BM,
                                              2 * HALF)
                res = acc2 / tl.where(l2 == 0.0, 1.0, l2)[:, None]
                tl.store(o_row + offs_d[None, :] * sod, res.to(O.dtype.element_ty), mask=ok[:, None])
                tl.atomic_xchg(CNT, 0)  # ready for the next call (and for CUDA-graph replays)

    @triton.jit
    def _page_kv_full(KV, VD, pg, kvh, n_bh, kv_head, tok, offs_d, s_page, s_kv, PAGE: tl.constexpr,
                      HALF: tl.constexpr, USE_TMA: tl.constexpr):
        """Whole-D K and V of one page for one KV head (the copy engine reads the layer as [tokens, 2*Hkv*D])."""
        if USE_TMA:
            row0 = (pg * PAGE).to(tl.int32)
            k = VD.load([row0, kvh * (2 * HALF)])
            v = VD.load([row0, (n_bh + kvh) * (2 * HALF)])
        else:
            base = kv_head + pg * s_page + tok
            k = tl.load(base + offs_d[None, :])
            v = tl.load(base + s_kv + offs_d[None, :])
        return k, v

    @triton.jit
    def _full_page_step(acc, l_i, m_i, a, k, v, cnt, pos0, offs_t, qp, qk_scale, DOT_PREC: tl.constexpr,
                        UPCAST: tl.constexpr):
        """The online-softmax update of the (rotated) rows ``a`` over one page's whole-D ``k``/``v``, hidden keys
        masked (past the page's valid tokens, after the row's own position)."""
        s = _dot(a, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        vis = (offs_t < cnt)[None, :] & ((pos0 + offs_t)[None, :] <= qp[:, None])
        s = tl.where(vis, s, float("-inf"))
        return _softmax_step(acc, l_i, m_i, s, v, True, False, DOT_PREC, UPCAST)

    @triton.jit
    def _context_page_step(acc, l_i, m_i, a, k, v, cnt, offs_t, qk_scale, DOT_PREC: tl.constexpr,
                           UPCAST: tl.constexpr):
        """:func:`_full_page_step` for a page every row sees whole (context before all the rows' positions):
        only the keys past the page's valid tokens are hidden, by a per-key bias that joins the scale in one
        multiply-add (the per-row, per-key position test and select cost more instructions than the dots)."""
        bias = tl.where(offs_t < cnt, 0.0, float("-inf"))
        s = _dot(a, tl.trans(k), DOT_PREC, UPCAST) * qk_scale + bias[None, :]
        return _softmax_step(acc, l_i, m_i, s, v, True, False, DOT_PREC, UPCAST)

    @triton.jit
    def _run_pages(acc, l_i, m_i, a, KV, VD, TAB, tab_stride, kv_head, kvh, n_bh, p, e, pg0, pos00, cnt_last,
                   run_tokens, tok, tok_step, offs_t, offs_step, offs_d, qp, s_page, s_kv, qk_scale,
                   PAGE: tl.constexpr, HALF: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                   USE_TMA: tl.constexpr, AFFINE: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr):
        """The online-softmax updates over the pages ``p..e`` of one run (rows rotated for its delta);
        CAUSAL: some key may come after some row's position (the question's own pages), else only the
        pages' valid counts hide keys."""
        if STEP > 1:
            for j in range(p, e, STEP):
                valid = run_tokens - (j - p) * PAGE
                if USE_TMA:
                    # one box of STEP pages; rows past the run are another entry's (finite: the arena is
                    # zero-filled once) or the copy engine's zeros, and their scores are masked
                    row0 = ((pg0 + (j - p)) * PAGE).to(tl.int32)
                    k = VD.load([row0, kvh * (2 * HALF)])
                    v = VD.load([row0, (n_bh + kvh) * (2 * HALF)])
                else:
                    base = kv_head + (pg0 + (j - p)).to(tl.int64) * s_page + tok_step
                    in_run = (offs_step < valid)[:, None]
                    k = tl.load(base + offs_d[None, :], mask=in_run, other=0.0)
                    v = tl.load(base + s_kv + offs_d[None, :], mask=in_run, other=0.0)
                if CAUSAL:
                    pos0 = (pos00 + (j - p) * PAGE).to(tl.int64)
                    acc, l_i, m_i = _full_page_step(acc, l_i, m_i, a, k, v, valid, pos0, offs_step, qp, qk_scale,
                                                    DOT_PREC, UPCAST)
                else:
                    acc, l_i, m_i = _context_page_step(acc, l_i, m_i, a, k, v, valid, offs_step, qk_scale,
                                                       DOT_PREC, UPCAST)
        else:
            for j in range(p, e):
                if AFFINE:
                    pg = (pg0 + (j - p)).to(tl.int64)
                    pos0 = (pos00 + (j - p) * PAGE).to(tl.int64)
                    cnt = tl.where(j == e - 1, cnt_last, PAGE)
                else:
                    pg = tl.load(TAB + j).to(tl.int64)
                    cnt = tl.load(TAB + tab_stride + j)
                    if CAUSAL:
                        pos0 = tl.load(TAB + 2 * tab_stride + j).to(tl.int64)
                k, v = _page_kv_full(KV, VD, pg, kvh, n_bh, kv_head, tok, offs_d, s_page, s_kv, PAGE, HALF,
                                     USE_TMA)
                if CAUSAL:
                    acc, l_i, m_i = _full_page_step(acc, l_i, m_i, a, k, v, cnt, pos0, offs_t, qp, qk_scale,
                                                    DOT_PREC, UPCAST)
                else:
                    acc, l_i, m_i = _context_page_step(acc, l_i, m_i, a, k, v, cnt, offs_t, qk_scale, DOT_PREC,
                                                       UPCAST)
        return acc, l_i, m_i

    @triton.jit
    def _paged_rows_full(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, CNT, kvh, bh, n_bh, c, n_ch, r0,
                         lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G, Lq, R, qk_scale,
                         BM: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, DIRECT: tl.constexpr,
                         DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ROT_ONCE: tl.constexpr,
                         USE_TMA: tl.constexpr):
        """As :func:`_paged_rows` with whole-D key tiles (one ``[rows, D] x [D, PAGE]`` dot per page instead of
        two over the halves): the rows keep a copy with their halves swapped, so that rotating them by -delta
        is ``q * [cos, cos] + q_swapped * [sin, -sin]`` on the full width."""
        i, h, ok, q_row, qp, acc, l_i, m_i = _rows_start(Q, QPOS, kvh, r0, G, Lq, sqh, sqm, BM, 2 * HALF)
        offs_d = tl.arange(0, 2 * HALF)
        offs_t = tl.arange(0, PAGE)
        half_d = offs_d % HALF
        qf, qs = _rows_and_swapped(q_row, ok, sqd, HALF)
        kv_head = KV + kvh.to(tl.int64) * s_head
        tok = offs_t.to(tl.int64)[:, None] * s_tok
        a = qf.to(KV.dtype.element_ty)
        cur = tl.full([], 0, tl.int64)
        for p in range(lo, hi):
            pg, cnt, pos0, dl = _page_entry(TAB, tab_stride, p)
            if ROT_ONCE:
                if dl != cur:
                    cs = tl.load(COS + dl * HALF + half_d)[None, :]
                    sn = tl.load(SIN + dl * HALF + half_d)[None, :]
                    a = (qf * cs + qs * sn).to(KV.dtype.element_ty)
                    cur = dl
            else:
                cs = tl.load(COS + dl * HALF + half_d)[None, :]
                sn = tl.load(SIN + dl * HALF + half_d)[None, :]
                a = (qf * cs + qs * sn).to(KV.dtype.element_ty)
            k, v = _page_kv_full(KV, VD, pg, kvh, n_bh, kv_head, tok, offs_d, s_page, s_kv, PAGE, HALF, USE_TMA)
            acc, l_i, m_i = _full_page_step(acc, l_i, m_i, a, k, v, cnt, pos0, offs_t, qp, qk_scale, DOT_PREC, UPCAST)
        _paged_finish(acc, l_i, m_i, O, PO, PL, CNT, h, i, ok, bh, n_bh, c, n_ch, r0, R, soh, som, sod, BM, HALF,
                      DIRECT)

    @triton.jit
    def _paged_rows_seg(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, CNT, kvh, bh, n_bh, c, n_ch, r0,
                        lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G, Lq, R, qk_scale,
                        BM: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, DIRECT: tl.constexpr,
                        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SCAN: tl.constexpr, USE_TMA: tl.constexpr,
                        AFFINE: tl.constexpr, STEP: tl.constexpr, SPLIT: tl.constexpr):
        """Whole-D key tiles in two nested loops: the outer one over runs of pages sharing a delta (a chunk's
        pages; a run is cut after ``SCAN`` pages), rotating the rows once per run; the inner one over the
        run's pages with the rotated rows loop-invariant, so nothing but K/V loads, dots and the softmax is
        left in it (the flat loop's "rotate if the delta changed" branch is evaluated on every page).

        AFFINE: a run also needs consecutive arena pages and positions, every page full but its last (the
        arena gives a chunk consecutive pages when it can). The inner loop then computes each page's id,
        position and valid count from the loop index instead of loading them: a K/V address that depends on
        a load of the same iteration costs the software pipeliner stages of its own. ``STEP`` (affine runs
        only): pages per inner step, read as one tile of ``STEP * PAGE`` keys (the run's pages are consecutive
        rows of the layer), the keys past the run masked."""
        i, h, ok, q_row, qp, acc, l_i, m_i = _rows_start(Q, QPOS, kvh, r0, G, Lq, sqh, sqm, BM, 2 * HALF)
        offs_d = tl.arange(0, 2 * HALF)
        offs_t = tl.arange(0, PAGE)
        offs_s = tl.arange(0, SCAN)
        half_d = offs_d % HALF
        qf, qs = _rows_and_swapped(q_row, ok, sqd, HALF)
        kv_head = KV + kvh.to(tl.int64) * s_head
        tok = offs_t.to(tl.int64)[:, None] * s_tok
        offs_step = tl.arange(0, STEP * PAGE)
        tok_step = offs_step.to(tl.int64)[:, None] * s_tok
        DELTA = TAB + 3 * tab_stride
        q_min = tl.min(tl.where(ok, qp, 1 << 62), 0)  # the rows' first position (padding rows excluded)
        a = qf.to(KV.dtype.element_ty)
        cur = tl.full([], -1, tl.int32)  # the delta ``a`` is rotated by (none yet)
        p = lo
        while p < hi:
            dl = tl.load(DELTA + p)
            # the run's end: the first of the next SCAN pages with another delta (deltas are >= 0)
            in_s = p + offs_s < hi
            nxt = tl.load(DELTA + p + offs_s, mask=in_s, other=-1)
            if AFFINE:
                pg0 = tl.load(TAB + p)
                pos00 = tl.load(TAB + 2 * tab_stride + p)
                n_pg = tl.load(TAB + p + offs_s, mask=in_s, other=-1)
                n_pos = tl.load(TAB + 2 * tab_stride + p + offs_s, mask=in_s, other=-1)
                n_cnt = tl.load(TAB + tab_stride + p + offs_s, mask=in_s, other=0)
                same = (nxt == dl) & (n_pg == pg0 + offs_s) & (n_pos == pos00 + offs_s * PAGE)
                brk = tl.min(tl.where(same, SCAN, offs_s), 0)
                part = tl.min(tl.where(n_cnt < PAGE, offs_s, SCAN), 0)  # a partly filled page ends the run
                e = p + tl.minimum(brk, part + 1)
                cnt_last = tl.load(TAB + tab_stride + e - 1)
            else:
                e = p + tl.min(tl.where(nxt != dl, offs_s, SCAN), 0)
            # (affine runs end at a page break too, so a delta can span runs: rotate only when it changes)
            if (dl != cur) | (not AFFINE):
                cs = tl.load(COS + dl.to(tl.int64) * HALF + half_d)[None, :]
                sn = tl.load(SIN + dl.to(tl.int64) * HALF + half_d)[None, :]
                a = (qf * cs + qs * sn).to(KV.dtype.element_ty)
                cur = dl
            if AFFINE:
                run_tokens = (e - 1 - p) * PAGE + cnt_last
            else:
                pg0 = p
                pos00 = p
                cnt_last = 0
                run_tokens = 0
            causal = True
            if SPLIT:
                # the run's last key position (from the table: affine or not, pages may be partly filled)
                in_run = offs_s < e - p
                r_pos = tl.load(TAB + 2 * tab_stride + p + offs_s, mask=in_run, other=0).to(tl.int64)
                r_cnt = tl.load(TAB + tab_stride + p + offs_s, mask=in_run, other=0).to(tl.int64)
                causal = tl.max(tl.where(in_run, r_pos + r_cnt - 1, -1), 0) >= q_min
            if causal:
                acc, l_i, m_i = _run_pages(acc, l_i, m_i, a, KV, VD, TAB, tab_stride, kv_head, kvh, n_bh, p, e, pg0,
                                           pos00, cnt_last, run_tokens, tok, tok_step, offs_t, offs_step, offs_d,
                                           qp, s_page, s_kv, qk_scale, PAGE, HALF, DOT_PREC, UPCAST, USE_TMA, AFFINE,
                                           STEP, True)
            else:
                acc, l_i, m_i = _run_pages(acc, l_i, m_i, a, KV, VD, TAB, tab_stride, kv_head, kvh, n_bh, p, e, pg0,
                                           pos00, cnt_last, run_tokens, tok, tok_step, offs_t, offs_step, offs_d,
                                           qp, s_page, s_kv, qk_scale, PAGE, HALF, DOT_PREC, UPCAST, USE_TMA, AFFINE,
                                           STEP, False)
            p = e
        _paged_finish(acc, l_i, m_i, O, PO, PL, CNT, h, i, ok, bh, n_bh, c, n_ch, r0, R, soh, som, sod, BM, HALF,
                      DIRECT)

    @triton.jit
    def _paged_fwd(Q, KV, KD, VD, TAB, NP, QPOS, COS, SIN, O, PO, PL, CNT,
                   sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, tab_stride,
                   G, Lq, CH, n_ch, R, n_main, n_rg, qk_scale,
                   BM: tl.constexpr, BMT: tl.constexpr, BMT2: tl.constexpr, PAGE: tl.constexpr,
                   HALF: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                   ROT_ONCE: tl.constexpr, USE_TMA: tl.constexpr, PAIR: tl.constexpr, FULL: tl.constexpr,
                   SEG: tl.constexpr, AFFINE: tl.constexpr, STEP: tl.constexpr, SPLIT: tl.constexpr):
        # the number of pages is read on the device: the grid holds n_ch slices for the largest table, and
        # the pages of this request are spread over all of them (CH is then the shortest slice allowed)
        n_pages = tl.load(NP).to(tl.int32)
        CH = tl.maximum(tl.cdiv(n_pages, n_ch), CH)
        n_act = tl.cdiv(n_pages, CH)
        pid = tl.program_id(0)
        rg = pid % n_rg  # row group fastest: the groups sharing a slice run side by side (L2 reuse)
        c = pid // n_rg
        kvh = tl.program_id(1)
        n_bh = tl.num_programs(1)
        lo = c * CH
        hi = tl.minimum(lo + CH, n_pages)
        cnt = CNT + kvh * n_rg + rg
        if c < n_act:
            r0 = tl.where(rg < n_main, rg * BM, n_main * BM + tl.where(rg == n_main, 0, BMT))
            if SEG:
                if rg < n_main:
                    _paged_rows_seg(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh, c,
                                    n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G,
                                    Lq, R, qk_scale, BM, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, 32, USE_TMA, AFFINE,
                                    STEP, SPLIT)
                elif rg == n_main:
                    _paged_rows_seg(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh, c,
                                    n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G,
                                    Lq, R, qk_scale, BMT, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, 32, USE_TMA, AFFINE,
                                    STEP, SPLIT)
                else:
                    if BMT2 > 0:
                        _paged_rows_seg(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh,
                                        c, n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod,
                                        G, Lq, R, qk_scale, BMT2, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, 32, USE_TMA,
                                        AFFINE, STEP, SPLIT)
            elif FULL:
                if rg < n_main:
                    _paged_rows_full(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh,
                                     c, n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod,
                                     G, Lq, R, qk_scale, BM, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, ROT_ONCE, USE_TMA)
                elif rg == n_main:
                    _paged_rows_full(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh,
                                     c, n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod,
                                     G, Lq, R, qk_scale, BMT, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, ROT_ONCE, USE_TMA)
                else:
                    if BMT2 > 0:
                        _paged_rows_full(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh,
                                         n_bh, c, n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh,
                                         som, sod, G, Lq, R, qk_scale, BMT2, PAGE, HALF, DIRECT, DOT_PREC, UPCAST,
                                         ROT_ONCE, USE_TMA)
            else:
                if rg < n_main:
                    _paged_rows(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh, c,
                                n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G, Lq, R,
                                qk_scale, BM, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, True, ROT_ONCE, USE_TMA, PAIR)
                elif rg == n_main:
                    _paged_rows(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh, c,
                                n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod, G, Lq, R,
                                qk_scale, BMT, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, True, ROT_ONCE, USE_TMA, PAIR)
                else:
                    if BMT2 > 0:
                        _paged_rows(Q, KV, KD, VD, TAB, tab_stride, QPOS, COS, SIN, O, PO, PL, cnt, kvh, kvh, n_bh,
                                    c, n_act, r0, lo, hi, sqh, sqm, sqd, s_page, s_tok, s_kv, s_head, soh, som, sod,
                                    G, Lq, R, qk_scale, BMT2, PAGE, HALF, DIRECT, DOT_PREC, UPCAST, True, ROT_ONCE,
                                    USE_TMA, PAIR)


def paged_ok(q, kv) -> bool:
    """Whether the Triton kernel takes these shapes (else the reference runs)."""
    if not HAS_TRITON or not (q.is_cuda or _interpret()):
        return False
    D, page = q.shape[-1], kv.shape[1]
    return (D >= 32 and D <= 256 and not D & (D - 1) and page >= 16 and not page & (page - 1)
            and q.dtype == kv.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and kv.stride(-1) == 1 and q.shape[0] == 1)


_SPECS: dict = {}
# Rotate the query rows once per run of pages sharing a delta (a chunk) instead of once per page
ROTATE_ONCE_PER_DELTA = True
# Stream pages through the copy engine (TMA) inside CUDA graphs
USE_TMA = False
# Two pages per loop step (one online-softmax rescale per two pages)
PAIR_PAGES = False
# Whole-D key tiles (one dot per page) instead of two dots over the halves of D
FULL_D = False
# Runs of pages sharing a delta as an outer loop (rows rotated once per run), their pages as an inner loop:
# None lets the plan choose (on for a question's rows, off for a decoded token's)
SEGMENTED = None
# With the runs: a run also needs consecutive pages, whose ids and positions the inner loop then computes
AFFINE_RUNS = False
# With affine runs: pages per inner step (read as one tile)
RUN_STEP = 1
# With the runs: a run whose keys all come before every row's position (context) skips the causal test;
# only its pages' valid counts hide keys, as a bias folded into the scale. Off: 24% fewer instructions per page
# (629 -> 476 in the sm_90 SASS) but no faster (H200, 50-token question over 32K keys: 240.7 vs 239.1 us;
# eval/results/attn_paged_split_h200.json), so the loop is bound by its per-page latency, not by issue
SPLIT_MASK = False


def attend_paged(q, kv, table, n_pages, q_pos, cos_half, sin_half, *, scale: float | None = None,
                 max_pages: int | None = None, backend: str = "auto", block_m: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, rotate_once: bool | None = None,
                 tma: bool | None = None, pair: bool | None = None, full: bool | None = None,
                 seg: bool | None = None, affine: bool | None = None, run_step: int | None = None,
                 split_mask: bool | None = None, programs_per_sm: float | None = None,
                 out: torch.Tensor | None = None):
    """Attention of ``q`` [1, Hq, Lq, D] (rotated to the positions ``q_pos``, int64 device tensor [Lq]) over
    the pages of ``table`` (see the module doc) in the arena layer ``kv`` [pages, PAGE, 2, Hkv, D].

    ``n_pages``: int32/int64 device tensor of one element (read by the kernel: one CUDA graph serves every
    table) or an int. ``cos_half``/``sin_half``: fp32 ``[>= max delta + 1, D/2]`` tables of ``cos(n *
    inv_freq)``. ``max_pages``: the most pages a call of this shape will see (sizes the grid; default the
    table's capacity). Returns [1, Hq, Lq, D]."""
    if backend == "auto":
        backend = "triton" if paged_ok(q, kv) else "torch"
    if backend == "torch":
        return attend_paged_reference(q, kv, table, n_pages, q_pos, cos_half, sin_half, scale=scale)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r} (expected 'auto', 'torch' or 'triton')")
    if not paged_ok(q, kv):
        raise ValueError("attend_paged: shapes or device not supported by the Triton kernel")
    _, Hq, Lq, D = q.shape
    page, hkv = kv.shape[1], kv.shape[3]
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty(1, Hq, Lq, D, dtype=q.dtype, device=dev)
    if Lq == 0:
        return out
    if not isinstance(n_pages, torch.Tensor):
        n_pages = torch.tensor([int(n_pages)], dtype=torch.int32, device=dev)
    max_pages = int(max_pages or table.shape[1])
    # the plan's choice of loop unless one of the flat loop's variants is asked for
    flat_asked = not (rotate_once is None and pair is None and full is None)
    rotate_once = ROTATE_ONCE_PER_DELTA if rotate_once is None else rotate_once
    key = (Hq, Lq, D, hkv, page, max_pages, q.dtype, str(dev), block_m, num_warps, num_stages, programs_per_sm)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _plan(Hq, Lq, D, hkv, page, max_pages, q.dtype, dev, block_m, num_warps, num_stages,
                     programs_per_sm)
        if len(_SPECS) >= 256:
            _SPECS.pop(next(iter(_SPECS)))
        _SPECS[key] = spec
    c = spec["const"]
    use_seg = bool(seg) if seg is not None else c["SEG"] and not flat_asked
    affine = bool(AFFINE_RUNS if affine is None else affine)
    if run_step is None:
        run_step = RUN_STEP if use_seg and affine else 1
    if run_step != 1 and not (use_seg and affine and run_step > 1 and not run_step & (run_step - 1)):
        raise ValueError(f"run_step={run_step}: a power of two, with seg=True and affine=True")
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    n_ch, R = spec["n_ch"], spec["R"]
    po, pl = partial_buffers(spec, n_ch * hkv * R, D, dev, capturing, out)
    cnt = _counters(dev, hkv * spec["n_rg"])
    if tma is None:
        # descriptors cost host time per eager launch: inside CUDA graphs only (encoded once), when chosen
        tma = USE_TMA and (capturing or _interpret())
    kd = vd = kv
    tma = bool(tma) and TensorDescriptor is not None and kv.is_contiguous() and _tma_ok(kv) and kv.data_ptr() % 16 == 0
    tma = tma and page * run_step <= 256  # (a copy-engine box has at most 256 rows; else plain loads)
    if tma:
        flat = kv.view(kv.shape[0] * page, -1)  # [tokens, 2 * Hkv * D]
        kd = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [page, D // 2])
        # V, and whole-D K (STEP pages at a time in the affine runs)
        vd = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [page * run_step, D])
    _paged_fwd[(spec["n_rg"] * n_ch, hkv)](
        q, kv, kd, vd, table, n_pages, q_pos, cos_half, sin_half, out, po, pl, cnt,
        q.stride(1), q.stride(2), q.stride(3), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        out.stride(1), out.stride(2), out.stride(3), table.stride(0),
        Hq // hkv, Lq, spec["chunk"], n_ch, R, spec["n_main"], spec["n_rg"], float(scale) * LOG2E,
        ROT_ONCE=bool(rotate_once), USE_TMA=tma, PAIR=bool(PAIR_PAGES if pair is None else pair),
        FULL=bool(FULL_D if full is None else full), **{**c, "SEG": use_seg}, AFFINE=affine, STEP=run_step,
        SPLIT=bool(SPLIT_MASK if split_mask is None else split_mask))
    return out


def _plan(Hq, Lq, D, hkv, page, max_pages, dtype, dev, block_m, num_warps, num_stages, programs_per_sm=None) -> dict:
    """Row groups and page slices of a launch (depends only on shapes; cached per shape)."""
    G = Hq // hkv
    interp = dev.type != "cuda" or _interpret()
    few_rows = G * Lq <= 16  # a decoded token's rows (one tail group)
    pps = 1.0
    if interp:
        bm, nw, ns = 16, 4, 1
    elif D >= 256 or dtype == torch.float32:
        bm, nw, ns = 64, 4, 2
    elif few_rows:
        # 5 stages: the page-table load feeding each page's K/V address takes pipeline stages of its own, so
        # with 3 the tail group's K/V buffers were one deep. H200, Llama-3-8B heads, 32K keys: 64.0 vs 82.6 us
        bm, nw, ns = 64, 4, 5
    else:
        # the runs of a delta as an outer loop, two programs per SM: 237.8 vs 277.1 us for a 50-token question
        # over 32K keys (H200; 5 stages, 8 warps, 128-row groups, 128-token pages, 3 or 4 programs per SM
        # slower: eval/results/attn_paged_{seg,stages,pps}_h200.json)
        bm, nw, ns, pps = 64, 4, 3, 2.0
    seg = SEGMENTED if SEGMENTED is not None else not few_rows
    bm = block_m or bm
    min_keys = 4 * page if interp else 512
    # the plan of the contiguous question kernel, with pages as its key tiles
    p = question_plan(Lq, max_pages * page, max_pages * page - Lq, G, hkv, _num_sms(dev), block_m=bm,
                      block_n=page, programs_per_sm=programs_per_sm or pps, min_keys=min_keys)
    chunk = max(1, min(_cdiv(min_keys, page), p["chunk"]))  # the shortest slice; the kernel spreads the rest
    n_ch = p["n_ch"]
    const = dict(BM=bm, BMT=p["tail"], BMT2=p["tail2"], PAGE=page, HALF=D // 2, DIRECT=n_ch == 1,
                 DOT_PREC="ieee" if dtype == torch.float32 else "tf32", UPCAST=interp and dtype == torch.bfloat16,
                 num_warps=num_warps or nw, num_stages=num_stages or ns, SEG=bool(seg))
    return dict(n_main=p["n_main"], R=p["R"], n_rg=p["n_rg"], n_ch=n_ch, chunk=chunk, const=const, po=None,
                pl=None)

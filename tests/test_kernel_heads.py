"""The Triton attention kernels at real models' head layouts: Qwen2-7B (28 query / 4 KV heads, G = 7 query
heads per KV head: packed rows = query position x G straddle the 16-row groups) and Llama-3-8B (32 / 8,
G = 4), head dim 128.

Each kernel is checked against an independent float64 computation (and the PyTorch reference against the
same): the short-question kernel (a 50-token question, a decoded token, the number of valid keys read on
the device), ``attend_triton`` with block ids (BlockRank prefill with block mass, a question over a
stitched cache with RoPE on load), and the paged kernel over a shuffled page table. Without CUDA the
kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported; the conftest
sets it too). The interpreter runs a program's tile steps one by one: the 50-token cases use 64-row groups
and 64-key tiles (64 rows are 9 1/7 Qwen2 positions: groups still straddle positions), the decoded tokens
the interpreter's default 16-row groups. Tolerance: relative 2e-5 in fp32 (fp32 dots on both sides), 2e-2
in bf16.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from blockrag.attention_kv.kernels import attend_reference, make_block_ids  # noqa: E402
from blockrag.attention_kv.kernels.paged_attention import attend_paged, attend_paged_reference  # noqa: E402
from blockrag.attention_kv.kernels.question_attention import attend_question, row_groups  # noqa: E402
from blockrag.attention_kv.kernels.triton_attention import attend_triton  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
D = 128
HEADS = [pytest.param(28, 4, id="qwen2-7b"), pytest.param(32, 8, id="llama3-8b")]
TOL = 2e-5
BIG = dict(block_m=64, block_n=64)  # tiles of the 50-token cases (interpreter time)


# ---------------------------------------------------------------- independent float64 computation
def rope64(x, pos, inv_freq):
    """HF rotate_half RoPE in float64 (angles from fp32 position x inv_freq, as the models compute them)."""
    f = (pos.float().cpu()[:, None] * inv_freq.float().cpu()[None, :]).double()
    c, s = f.cos(), f.sin()
    x = x.double().cpu()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def attn64(q, k, v, visible, mass_idx=None, n_blocks=None, mass_rows=None):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], visible bool [Lq, Lk]; query head h reads KV head h // G.
    With mass_idx (block index of every key), also the per-block probability mass of mass_rows."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~visible.cpu(), float("-inf")), -1), nan=0.0)
    out = p @ v
    if mass_idx is None:
        return out
    pm = p[:, :, mass_rows.cpu()]
    mass = torch.zeros(*pm.shape[:3], n_blocks, dtype=torch.float64)
    return out, mass.index_add_(-1, mass_idx.cpu(), pm)


def causal(Lq, Lk, q_start):
    return torch.arange(Lk)[None, :] <= (q_start + torch.arange(Lq))[:, None]


def block_visible(q_block, k_block, q_start):
    vis = causal(len(q_block), len(k_block), q_start)
    qb, kb = q_block.long()[:, None], k_block.long()[None, :]
    return vis & ((kb == 0) | (qb < 0) | (kb == qb))


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def inv_freq(theta=1e6):
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def qkv(g, hq, hkv, Lq, Lk, dtype=torch.float32, B=1):
    q = torch.randn(B, hq, Lq, D, generator=g)
    k = torch.randn(B, hkv, Lk, D, generator=g)
    v = torch.randn(B, hkv, Lk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_packed_rows_of_seven_heads_per_kv_head():
    """50 positions x 7 heads = 350 rows: 21 groups of 16 + one tail of 16 (14 rows used); a decoded token
    (7 rows) is one 16-row group."""
    assert row_groups(350, 16) == (21, 16, 0, 352)
    assert row_groups(7, 16) == (0, 16, 0, 16)
    assert row_groups(350, 64) == (5, 32, 0, 352)


# ---------------------------------------------------------------- short-question kernel
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("Lq,kw,calls", [
    (50, dict(BIG), 1),                # one slice per row group, output written directly
    (50, dict(BIG, chunk=2), 1),       # key slices merged by the last one to arrive (arrival counters)
    (1, dict(chunk=4, fold=False), 1),  # a decoded token; slices merged by the separate reduce kernel
    (1, dict(chunk=3), 2),             # folded merge; a second call finds the counters back at zero
])
def test_question_kernel(hq, hkv, Lq, kw, calls):
    g = torch.Generator().manual_seed(hq + Lq)
    Lk = 210
    q, k, v = qkv(g, hq, hkv, Lq, Lk)
    ref = attn64(q, k, v, causal(Lq, Lk, Lk - Lq))
    assert rel(attend_reference(q, k, v), ref) < TOL
    for _ in range(calls):
        out = attend_question(q.to(DEV), k.to(DEV), v.to(DEV), **kw)
        assert out.shape == q.shape
        assert rel(out, ref) < TOL


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("Lq", [50, 1])
def test_question_kernel_length_on_device(hq, hkv, Lq):
    """kv_len: one launch planned for a 256-key buffer serves shorter caches; keys past the length are NaN
    and must not reach the output."""
    g = torch.Generator().manual_seed(7 * hq + Lq)
    L = 256
    q, k, v = qkv(g, hq, hkv, Lq, L)
    for n in ((201,) if Lq > 1 else (14, 201)):
        kd, vd = k.clone(), v.clone()
        kd[:, :, n:] = float("nan")
        vd[:, :, n:] = float("nan")
        ref = attn64(q, k[:, :, :n], v[:, :, :n], causal(Lq, n, n - Lq))
        kv_len = torch.tensor([n], dtype=torch.int32, device=DEV)
        kw = dict(BIG, chunk=2) if Lq > 1 else dict(chunk=2)
        out = attend_question(q.to(DEV), kd.to(DEV), vd.to(DEV), kv_len=kv_len, **kw)
        assert rel(out, ref) < TOL, n


@pytest.mark.skipif(HAS_CUDA, reason="bf16 at these heads is covered by the GPU tests")
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_question_kernel_bf16_decode(hq, hkv):
    g = torch.Generator().manual_seed(hq)
    q, k, v = qkv(g, hq, hkv, 1, 200, torch.bfloat16)
    ref = attn64(q, k, v, causal(1, 200, 199))
    out = attend_question(q, k, v, chunk=3)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 2e-2


# ---------------------------------------------------------------- general kernel with block ids
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_blockrank_prefill_and_mass(hq, hkv):
    """BlockRank prefill (instruction, ragged documents, query; q_block = k_block) with block mass from
    query rows and a document row, forced split-KV."""
    g = torch.Generator().manual_seed(hq)
    ids = make_block_ids(6, [23, 40, 17], 9)
    L = ids.numel()
    q, k, v = qkv(g, hq, hkv, L, L)
    rows = torch.tensor([L - 1, L - 4, 30])
    n_blocks = int(ids.max()) + 2
    mass_idx = torch.where(ids < 0, n_blocks - 1, ids).long()
    ref, mref = attn64(q, k, v, block_visible(ids, ids, 0), mass_idx, n_blocks, rows)
    d = lambda t: t.to(DEV)  # noqa: E731
    out, mass = attend_triton(d(q), d(k), d(v), q_block=d(ids), k_block=d(ids), mass_rows=d(rows), chunk=2,
                              **BIG)
    assert rel(out, ref) < TOL
    assert mass.shape == (1, hq, 3, n_blocks)
    assert (mass.double().cpu() - mref).abs().max().item() < 1e-5
    # row 30 lies in document 2: no mass on documents 1 and 3 nor on the query block
    assert mass[:, :, 2, [1, 3, 4]].abs().max().item() < 1e-7


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_question_over_stitched_cache_rope_on_load(hq, hkv):
    """A question block (ids -1; 24 tokens: 168 / 96 packed rows) over a stitched cache of un-rotated
    passages re-encoded at new positions: keys rotated first (then routed to the short-question kernel), and
    keys and question both rotated inside the general kernel (split-KV)."""
    g = torch.Generator().manual_seed(3 * hq)
    Lq = 24
    ids = make_block_ids(10, [40, 27, 53], Lq)
    Lk = ids.numel()
    q, k, v = qkv(g, hq, hkv, Lq, Lk)
    invf = inv_freq()
    kpos = torch.arange(Lk) + 2000
    qpos = kpos[-Lq:]
    vis = block_visible(ids[-Lq:], ids, Lk - Lq)
    d = lambda t: t.to(DEV)  # noqa: E731
    common = dict(q_block=d(ids[-Lq:]), k_block=d(ids), inv_freq=d(invf), k_positions=d(kpos))
    ref = attn64(q, rope64(k, kpos, invf), v, vis)
    assert rel(attend_reference(q, k, v, **{n: t.cpu() for n, t in common.items()}), ref) < TOL
    assert rel(attend_triton(d(q), d(k), d(v), block_n=64, **common), ref) < TOL
    ref_q = attn64(rope64(q, qpos, invf), rope64(k, kpos, invf), v, vis)
    out = attend_triton(d(q), d(k), d(v), q_positions=d(qpos), rope_impl="fused", chunk=2, **BIG, **common)
    assert rel(out, ref_q) < TOL


# ---------------------------------------------------------------- paged kernel
def paged_case(g, hq, hkv, lens, Lq, page=16, dtype=torch.float32):
    """An arena layer [pages, PAGE, 2, Hkv, D] holding chunks of ``lens`` tokens, each stored rotated to its
    in-chunk positions on shuffled (non-consecutive) pages, and the question's keys at their true positions;
    returns the kernel's arguments and the float64 result of the plain causal computation."""
    invf = inv_freq()
    L = sum(lens)
    chunks = lens + [Lq]
    n_arena = sum(-(-n // page) for n in chunks) + 5
    slots = torch.randperm(n_arena, generator=g)
    kv = torch.randn(n_arena, page, 2, hkv, D, generator=g)  # unused pages hold noise
    k_raw = torch.randn(1, hkv, L + Lq, D, generator=g)
    v_all = torch.randn(1, hkv, L + Lq, D, generator=g)
    cols, used, pos0 = [], 0, 0
    for ci, n in enumerate(chunks):
        question = ci == len(lens)
        delta = 0 if question else pos0
        local = torch.arange(n) + (pos0 if question else 0)  # the positions the keys are stored rotated to
        k_st = rope64(k_raw[:, :, pos0:pos0 + n], local, invf).float()[0].transpose(0, 1)  # [n, Hkv, D]
        v_st = v_all[0, :, pos0:pos0 + n].transpose(0, 1)
        for j in range(0, n, page):
            s = int(slots[used])
            used += 1
            m = min(page, n - j)
            kv[s, :m, 0], kv[s, :m, 1] = k_st[j:j + m], v_st[j:j + m]
            cols.append([s, m, pos0 + j, delta])
        pos0 += n
    table = torch.zeros(4, len(cols) + 3, dtype=torch.int32)  # spare capacity past n_pages
    table[:, : len(cols)] = torch.tensor(cols, dtype=torch.int32).T
    q_pos = torch.arange(L, L + Lq)
    q = rope64(torch.randn(1, hq, Lq, D, generator=g), q_pos, invf)
    ang = torch.arange(max(lens) + L + 1).double()[:, None] * invf.double()[None, :]
    cos_half, sin_half = ang.cos().float(), ang.sin().float()
    ref = attn64(q, rope64(k_raw, torch.arange(L + Lq), invf), v_all, causal(Lq, L + Lq, L))
    args = (q.to(dtype), kv.to(dtype), table, torch.tensor([len(cols)], dtype=torch.int32), q_pos,
            cos_half, sin_half)
    return args, ref


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("Lq,page,kw", [
    (50, 64, dict(block_m=64)),
    (1, 16, dict()),
    (1, 16, dict(rotate_once=False, pair=True)),  # rows rotated for every page; two pages per step
])
def test_paged_kernel(hq, hkv, Lq, page, kw):
    g = torch.Generator().manual_seed(hq * 10 + Lq)
    args, ref = paged_case(g, hq, hkv, [37, 80, 5, 61], Lq, page=page)
    assert rel(attend_paged_reference(*args), ref) < TOL
    out = attend_paged(*[a.to(DEV) for a in args], max_pages=args[2].shape[1], backend="triton", **kw)
    assert out.shape == args[0].shape
    assert rel(out, ref) < TOL

"""Tests of attention_kv.kernels against an independent float64 implementation.

Without CUDA the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the
kernels are defined; if another test module imported them first, the module is reloaded). Shapes are tiny
so the interpreter stays fast.

Tolerances, as ||out - ref|| / ||ref|| against float64 on the same (upcast) inputs:
  * fp32 inputs (torch reference; Triton interpreter, whose dots are exact fp32): 1e-5
  * bf16 inputs (Triton: bf16 dot operands, probabilities rounded to bf16): 2e-2
  * block mass: absolute 1e-5 (fp32), rows sum to 1 within 1e-5
"""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON and not HAS_CUDA:
    mod = sys.modules.get("blockrag.attention_kv.kernels.triton_attention")
    if mod is not None and type(mod._attn_fwd).__name__ != "InterpretedFunction":
        # the shared jitted helpers first, then the modules that bind them at import
        for name in ("triton_common", "question_attention", "paged_attention", "triton_attention"):
            m = sys.modules.get(f"blockrag.attention_kv.kernels.{name}")
            if m is not None:
                importlib.reload(m)

from blockrag.attention_kv.kernels import attend, attend_reference, make_block_ids  # noqa: E402
from blockrag.attention_kv.kernels.question_attention import attend_question, question_plan, row_groups  # noqa: E402
from blockrag.attention_kv.kernels.triton_attention import attend_triton, block_tile_table  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# ---------------------------------------------------------------- independent float64 implementation
def naive64(q, k, v, *, q_start=None, q_block=None, k_block=None, k_positions=None, q_positions=None,
            inv_freq=None, scale=None, mass_rows=None, n_blocks=None):
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q_start = Lk - Lq if q_start is None else q_start
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def rope(x, pos):
        f = pos.double().cpu()[:, None] * inv_freq.double().cpu()[None, :]
        # fp32 angle, as the HF code computes it
        f = (pos.float().cpu()[:, None] * inv_freq.float().cpu()[None, :]).double()
        c, s = torch.cos(f), torch.sin(f)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    if inv_freq is not None:
        k = rope(k, k_positions if k_positions is not None else torch.arange(Lk))
        if q_positions is not None:
            q = rope(q, q_positions)
    mask = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        for j in range(Lk):
            ok = j <= q_start + i
            if q_block is not None and k_block is not None:
                qb, kb = int(q_block[i]), int(k_block[j])
                ok = ok and (kb == 0 or qb < 0 or kb == qb)
            mask[i, j] = ok
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    P = torch.zeros(B, Hq, Lq, Lk, dtype=torch.float64)
    for h in range(Hq):
        s = q[:, h] @ k[:, h // G].transpose(-1, -2) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        P[:, h] = p
        out[:, h] = p @ v[:, h // G]
    if mass_rows is None:
        return out
    if n_blocks is None:
        n_blocks = int(k_block.max()) + 2 if k_block is not None else 1
    mass = torch.zeros(B, Hq, len(mass_rows), n_blocks, dtype=torch.float64)
    for t, r in enumerate(mass_rows.tolist()):
        for j in range(Lk):
            kb = 0 if k_block is None else int(k_block[j])
            idx = n_blocks - 1 if kb < 0 else kb
            mass[:, :, t, idx] += P[:, :, r, j]
    return out, mass


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def inv_freq_for(D, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def to_dev(*xs):
    return [x.to(DEV) if isinstance(x, torch.Tensor) else x for x in xs]


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 3, 4])
def test_question_block_over_cache(backend, G):
    """Short question (Lq=5) over a stitched cache of ragged blocks; lengths not multiples of the tile."""
    torch.manual_seed(G)
    Hkv, D = 2, 32
    ids = make_block_ids(5, [9, 14, 3], 5)
    Lk, Lq = ids.numel(), 5
    q, k, v = rand(1, Hkv * G, Lq, D), rand(1, Hkv, Lk, D), rand(1, Hkv, Lk, D)
    ref = naive64(q, k, v, q_block=ids[-Lq:], k_block=ids)
    out = attend(*to_dev(q, k, v), q_block=ids[-Lq:].to(DEV), k_block=ids.to(DEV), backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("chunk,lazy", [(1, False), (2, False), (None, True)])
def test_split_kv_matches(chunk, lazy):
    """Forced split-KV (flash-decoding partials + reduce), batch 2, causal inside the question block;
    lazy rescaling on peaked scores (running max grows by more than 2^8 along the keys)."""
    torch.manual_seed(chunk or 0)
    B, Hkv, G, D, Lk, Lq = 2, 2, 4, 32, 77, 6
    q, k, v = rand(B, Hkv * G, Lq, D), rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D)
    k = k * torch.linspace(0.1, 6.0, Lk)[None, None, :, None]
    ref = naive64(q, k, v)
    out = attend_triton(*to_dev(q, k, v), chunk=chunk, lazy_rescale=lazy)
    assert rel(out, ref) < 1e-5


def test_row_groups_cover_rows_with_little_padding():
    for bm in (16, 64, 128):
        for rows in range(1, 400):
            n_main, t1, t2, total = row_groups(rows, bm)
            assert total == n_main * bm + t1 + t2 >= rows
            assert all(t == 0 or (t >= 16 and t & (t - 1) == 0) for t in (t1, t2))
            assert total - rows < max(16, bm // 2) or rows < bm  # never a whole wasted group
    assert row_groups(200, 64) == (3, 16, 0, 208)  # 50-token question, 4 query heads per KV head
    assert row_groups(200, 128) == (1, 64, 16, 208)


def test_question_plan_fits_one_wave():
    # a grid of more programs than SMs x programs_per_sm runs a second, mostly idle wave
    for Lq in (1, 7, 16, 32, 48, 50, 64, 100, 128):
        for Lk in (2048, 8192, 32768):
            for n_sm in (108, 132):
                for pps in (1.0, 2.0):
                    p = question_plan(Lq, Lk, Lk - Lq, 4, 8, n_sm, block_m=64, block_n=128, programs_per_sm=pps)
                    assert p["n_rg"] * p["n_ch"] * 8 <= max(pps * n_sm, 8 * p["n_rg"]), (Lq, Lk, n_sm, pps, p)
                    assert p["n_ch"] * p["chunk"] >= p["n_tiles"]


@needs_triton
@pytest.mark.parametrize("G,Lq,bm,chunk,fold,tma", [
    (4, 1, 16, None, True, True),     # one decoded token: a single 16-row group
    (4, 11, 16, 1, True, True),       # 44 rows: 2 full groups + tails 16 (8 rows padded), one tile per slice
    (3, 9, 16, 2, False, True),       # separate reduce kernel
    (4, 13, 32, 3, True, False),      # plain loads instead of the copy engine; 52 rows = 32 + 16 + 16 (4 rows)
    (1, 40, 16, 1, True, True),       # no GQA, 40 rows = 2 x 16 + tail
])
def test_question_kernel(G, Lq, bm, chunk, fold, tma):
    """The short-question kernel (row groups x key slices, folded or separate merge of the slices) against
    float64, on a strided K/V view like the stitched cache's (token-major, K and V interleaved), with keys
    past the question (q_start < Lk - Lq) that no row may see."""
    torch.manual_seed(G * 100 + Lq)
    B, Hkv, D, Lk = 2, 2, 32, 150
    kv = rand(B, Lk, 2, Hkv, D)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q = rand(B, Hkv * G, Lq, D)
    q_start = 120
    ref = naive64(q, k, v, q_start=q_start)
    qd, kd, vd = to_dev(q, k, v)
    kvd = kv.to(DEV)
    kd, vd = kvd[:, :, 0].transpose(1, 2), kvd[:, :, 1].transpose(1, 2)
    for _ in range(2):  # the folded merge leaves its arrival counters at zero: a second call is still right
        out = attend_question(qd, kd, vd, q_start=q_start, block_m=bm, chunk=chunk, fold=fold, tma=tma)
        assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 3])
def test_blockrank_prefill_and_mass(backend, G):
    """BlockRank mask: instruction, ragged documents, query; block mass from the last query rows."""
    torch.manual_seed(10 + G)
    Hkv, D = 2, 32
    ids = make_block_ids(6, [11, 4, 17, 9], 7)
    L = ids.numel()
    q, k, v = rand(1, Hkv * G, L, D), rand(1, Hkv, L, D), rand(1, Hkv, L, D)
    rows = torch.tensor([L - 1, L - 3, 8, 20])  # query rows and two document rows
    ref, mref = naive64(q, k, v, q_block=ids, k_block=ids, mass_rows=rows)
    out, mass = attend(*to_dev(q, k, v), q_block=ids.to(DEV), k_block=ids.to(DEV), mass_rows=rows.to(DEV),
                       backend=backend)
    assert rel(out, ref) < 1e-5
    assert mass.shape == (1, Hkv * G, 4, 6)
    assert (mass.cpu().double() - mref).abs().max().item() < 1e-5
    assert torch.allclose(mass.sum(-1).cpu(), torch.ones(1, Hkv * G, 4), atol=1e-5)
    # document row 8 (doc 1) only puts mass on the instruction and on itself
    assert mass[:, :, 2, 2:].abs().max().item() < 1e-7


@needs_triton
def test_blockrank_documents_are_independent():
    """Changing document 2's K/V must not change document 1's or 3's outputs (block-sparse mask)."""
    torch.manual_seed(3)
    ids = make_block_ids(5, [10, 12, 8], 4)
    L = ids.numel()
    q, k, v = rand(1, 4, L, 32), rand(1, 2, L, 32), rand(1, 2, L, 32)
    a = attend_triton(*to_dev(q, k, v), q_block=ids.to(DEV), k_block=ids.to(DEV))
    k2, v2 = k.clone(), v.clone()
    d2 = ids == 2
    k2[:, :, d2] += 3.0
    v2[:, :, d2] -= 2.0
    b = attend_triton(*to_dev(q, k2, v2), q_block=ids.to(DEV), k_block=ids.to(DEV))
    same = (ids == 1) | (ids == 3) | (ids == 0)
    assert torch.equal(a[:, :, same], b[:, :, same])
    assert not torch.equal(a[:, :, ids == -1], b[:, :, ids == -1])


def test_tile_table_is_linear_in_documents():
    """The visible-tile list of a document tile holds the instruction tiles plus its own tiles only."""
    ids = make_block_ids(64, [160] * 50, 32)
    L = ids.numel()
    table, cnt = block_tile_table(ids, ids, L, L, 0, 4, 128, 64)
    cnt = cnt.tolist()
    assert max(cnt[:-2]) <= 1 + 4  # instruction tile + at most 4 tiles of a 160-token document
    assert cnt[-1] == -(-L // 64)  # the query tile sees everything
    row = table[10, : cnt[10]].tolist()
    assert row == sorted(row) and row[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope_q", [False, True])
def test_rope_on_load(backend, rope_q):
    """Keys stored un-rotated, rotated in-kernel at re-ordered positions; q rotated in-kernel or before."""
    torch.manual_seed(20 + rope_q)
    Hkv, G, D = 2, 4, 64
    ids = make_block_ids(4, [7, 13], 5)
    Lk, Lq = ids.numel(), 5
    invf = inv_freq_for(D, theta=1e5)
    kpos = torch.arange(Lk) + 1000  # re-encoded offsets, large positions
    qpos = kpos[-Lq:]
    q, k, v = rand(1, Hkv * G, Lq, D), rand(1, Hkv, Lk, D), rand(1, Hkv, Lk, D)
    ref = naive64(q, k, v, q_block=ids[-Lq:], k_block=ids, inv_freq=invf, k_positions=kpos,
                  q_positions=qpos if rope_q else None)
    out = attend(*to_dev(q, k, v), q_block=ids[-Lq:].to(DEV), k_block=ids.to(DEV), inv_freq=invf.to(DEV),
                 k_positions=kpos.to(DEV), q_positions=qpos.to(DEV) if rope_q else None, backend=backend)
    assert rel(out, ref) < 1e-5
    # rotating on load == rotating first and passing pre-rotated keys
    from blockrag.attention_kv.kernels import apply_rope

    k_rot = apply_rope(k, kpos, invf)
    q_in = apply_rope(q, qpos, invf) if rope_q else q
    out2 = attend(*to_dev(q_in, k_rot, v), q_block=ids[-Lq:].to(DEV), k_block=ids.to(DEV), backend=backend)
    assert rel(out, out2) < 1e-5


@needs_triton
@pytest.mark.parametrize("rope_impl", ["prepass", "fused"])
def test_rope_impls_agree_with_mass(rope_impl):
    """Both RoPE strategies (scratch pre-rotation / rotation inside the attention loop), with in-kernel q
    rotation, a BlockRank mask, split-KV and block mass."""
    torch.manual_seed(31)
    Hkv, G, D = 1, 4, 32
    ids = make_block_ids(5, [8, 13, 6], 6)
    L = ids.numel()
    invf = inv_freq_for(D)
    pos = torch.arange(L) + 40000
    rows = torch.tensor([L - 1, L - 2, 9])
    q, k, v = rand(1, Hkv * G, L, D), rand(1, Hkv, L, D), rand(1, Hkv, L, D)
    ref, mref = naive64(q, k, v, q_block=ids, k_block=ids, inv_freq=invf, k_positions=pos, q_positions=pos,
                        mass_rows=rows)
    out, mass = attend_triton(*to_dev(q, k, v), q_block=ids.to(DEV), k_block=ids.to(DEV), inv_freq=invf.to(DEV),
                              k_positions=pos.to(DEV), q_positions=pos.to(DEV), mass_rows=rows.to(DEV),
                              rope_impl=rope_impl, chunk=2)
    assert rel(out, ref) < 1e-5
    assert (mass.cpu().double() - mref).abs().max().item() < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    torch.manual_seed(5)
    ids = make_block_ids(3, [10, 6], 4)
    L = ids.numel()
    q, k, v = rand(1, 6, L, 32, dtype=dtype), rand(1, 2, L, 32, dtype=dtype), rand(1, 2, L, 32, dtype=dtype)
    invf = inv_freq_for(32)
    ref = naive64(q, k, v, q_block=ids, k_block=ids, inv_freq=invf)
    out = attend_triton(*to_dev(q, k, v), q_block=ids.to(DEV), k_block=ids.to(DEV), inv_freq=invf.to(DEV))
    assert out.dtype == dtype
    assert rel(out, ref) < 2e-2


def test_rows_without_visible_keys_are_zero():
    """A document row whose block has no visible key (no instruction, first token of a doc is itself: fine)
    -- here a q_start that places the row before every key it may see."""
    q, k, v = rand(1, 2, 2, 32), rand(1, 2, 6, 32), rand(1, 2, 6, 32)
    qb = torch.tensor([3, 3])
    kb = torch.tensor([1, 1, 2, 2, 3, 3])
    out = attend_reference(q, k, v, q_start=0, q_block=qb, k_block=kb)
    assert torch.equal(out, torch.zeros_like(out))
    if HAS_TRITON:
        out_t = attend_triton(*to_dev(q, k, v), q_start=0, q_block=qb.to(DEV), k_block=kb.to(DEV))
        assert torch.equal(out_t.cpu(), torch.zeros_like(out))


def test_auto_backend_on_cpu_is_torch():
    q, k, v = rand(1, 2, 3, 16), rand(1, 1, 5, 16), rand(1, 1, 5, 16)
    if not HAS_CUDA:
        out = attend(q, k, v)  # D=16 would be rejected by triton; auto must pick torch on the CPU
        assert rel(out, naive64(q, k, v)) < 1e-5


# ---------------------------------------------------------------- GPU-native (compiled Triton)
@needs_cuda
@needs_triton
@pytest.mark.parametrize("G", [1, 4])
def test_gpu_bf16_question_and_blockrank(G):
    torch.manual_seed(7)
    D, Hkv = 128, 2
    ids = make_block_ids(64, [160, 97, 201, 160, 33], 50)
    L = ids.numel()
    dt = torch.bfloat16
    q = torch.randn(1, Hkv * G, L, D, device="cuda", dtype=dt)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=dt)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=dt)
    idc = ids.cuda()
    rows = torch.arange(L - 8, L, device="cuda")
    invf = inv_freq_for(D, 5e5).cuda()
    for kw in (dict(), dict(inv_freq=invf, k_positions=torch.arange(L, device="cuda") + 7)):
        ref, mref = attend_reference(q, k, v, q_block=idc, k_block=idc, mass_rows=rows, **kw)
        out, mass = attend_triton(q, k, v, q_block=idc, k_block=idc, mass_rows=rows, **kw)
        assert rel(out, ref) < 2e-2
        assert (mass - mref).abs().max().item() < 1e-2
        qq = q[:, :, -50:]
        ref = attend_reference(qq, k, v, q_block=idc[-50:], k_block=idc, **kw)
        for chunk in (None, 1, 3):
            out = attend_triton(qq, k, v, q_block=idc[-50:], k_block=idc, chunk=chunk, **kw)
            assert rel(out, ref) < 2e-2


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_gpu_question_kernel(dt):
    """Compiled short-question kernel (copy-engine loads, folded merge) at Llama-3-8B head shapes."""
    torch.manual_seed(3)
    for Lq, Lk in ((1, 3001), (50, 4133), (50, 70)):
        q = torch.randn(1, 32, Lq, 128, device="cuda", dtype=dt)
        k = torch.randn(1, 8, Lk, 128, device="cuda", dtype=dt)
        v = torch.randn(1, 8, Lk, 128, device="cuda", dtype=dt)
        ref = attend_reference(q, k, v)
        for kw in (dict(), dict(fold=False), dict(tma=False), dict(chunk=1)):
            assert rel(attend_question(q, k, v, **kw), ref) < 2e-2


@needs_triton
@pytest.mark.parametrize("tma", [True, False])
def test_question_kernel_length_on_device(tma):
    """kv_len read by the kernel: one launch configuration (planned for the whole buffer) serves every length;
    keys past the length are garbage (NaN) and must not leak into the result."""
    torch.manual_seed(5)
    B, Hkv, G, D, L = 1, 2, 4, 32, 160
    kv = rand(B, L, 2, Hkv, D)
    q = rand(B, Hkv * G, 1, D)
    kvd = kv.clone().to(DEV)  # (on the CPU, .to() alone would alias kv)
    for n in (1, 17, 64, 159, 160):
        kvd[:, n:] = float("nan")
        kd, vd = kvd[:, :, 0].transpose(1, 2), kvd[:, :, 1].transpose(1, 2)
        ref = naive64(q, kv[:, :n, 0].transpose(1, 2), kv[:, :n, 1].transpose(1, 2))
        kv_len = torch.tensor([n], dtype=torch.int32, device=DEV)
        out = attend_question(q.to(DEV), kd, vd, kv_len=kv_len, block_m=16, chunk=2, tma=tma)
        assert rel(out, ref) < 1e-5, n
        kvd[:, n:] = kv[:, n:].to(DEV)

"""Offsets past 2^31 elements in the Triton kernels (attention, short question, in-place RoPE).

On the CPU the kernels run under the Triton interpreter over sparse memory-mapped files: the buffers are
several GB of address space, but only the pages the test writes exist. A kernel that computed e.g.
``layer * layer_stride`` in int32 would wrap to a negative offset there (and crash or read the wrong rows).
The GPU test allocates a real 8B-shaped cache of 40,000 tokens (5.2 GB) and skips without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from blockrag.attention_kv.kernels import attend_reference  # noqa: E402
from blockrag.attention_kv.kernels.question_attention import attend_question  # noqa: E402
from blockrag.attention_kv.kernels.triton_attention import (  # noqa: E402
    attend_triton,
    check_tile_offsets,
    tile_offsets_fit,
)
from blockrag.attention_kv.rope import _rope_rows_triton, cos_sin, rope_rows_  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _interpreted() -> bool:
    from blockrag.attention_kv.kernels import triton_attention as ta

    return type(ta._attn_fwd).__name__ == "InterpretedFunction"


needs_interpreter = pytest.mark.skipif(HAS_CUDA, reason="CPU-only (interpreter) test")


def sparse_buffer(path, n_elems: int, dtype=torch.float32) -> torch.Tensor:
    """A flat tensor of ``n_elems`` over a sparse file: untouched pages cost neither disk nor memory."""
    size = n_elems * torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(size)
    return torch.from_file(str(path), shared=True, size=n_elems, dtype=dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ host helpers
class _Layout:
    """Shape and strides only (a view of a buffer too large to allocate in a test)."""

    def __init__(self, shape, strides):
        self.shape, self._strides = shape, strides

    def stride(self, i):
        return self._strides[i]


def test_tile_offsets_fit():
    # the generator's cache layout (token-major, K and V interleaved), 8B shape, 128K tokens: int32 inside tiles
    kv = _Layout((1, 8, 131072, 128), (0, 128, 2 * 8 * 128, 1))
    assert tile_offsets_fit(kv, 128)
    huge = _Layout((1, 8, 4, 128), (0, 128, 2 ** 25, 1))  # key stride 32M elements
    assert not tile_offsets_fit(huge, 128)
    assert tile_offsets_fit(huge, 16) == ((16 - 1) * 2 ** 25 + 127 < 2 ** 31)
    with pytest.raises(ValueError, match="key stride"):
        check_tile_offsets(128, kv, huge)


def test_offsets_of_the_8b_cache_pass_int32():
    """The case the kernels must survive: 32 layers x 2 x 40,000 tokens x 8 heads x 128 > 2^31 elements."""
    layers, max_len, hkv, d = 32, 40_000, 8, 128
    layer_stride = max_len * 2 * hkv * d
    assert (layers - 1) * layer_stride >= 2 ** 31
    # int32 arithmetic would wrap: the offset of the last layer's first row comes out negative
    wrapped = ((layers - 1) * layer_stride + 2 ** 31) % 2 ** 32 - 2 ** 31
    assert wrapped < 0


# ------------------------------------------------------------------------------------------ interpreter
@needs_interpreter
def test_rope_rows_kernel_past_2_31_elements(tmp_path):
    """The in-place RoPE kernel over an 8B-shaped cache of 40,000 tokens (2.6e9 elements, bf16)."""
    assert _interpreted()
    layers, max_len, hkv, d = 32, 40_000, 8, 128
    n = layers * max_len * 2 * hkv * d
    assert n > 2 ** 31
    kv = sparse_buffer(tmp_path / "kv.bin", n, torch.bfloat16).view(layers, 1, max_len, 2, hkv, d)
    k = kv[:, :, :, 0]
    start, end = max_len - 3, max_len
    torch.manual_seed(0)
    rows = torch.randn(layers, 1, end - start, hkv, d).to(torch.bfloat16)
    k[:, :, start:end] = rows
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    c, s = cos_sin(torch.arange(max_len), inv_freq)
    cos_half, sin_half = c[:, : d // 2].contiguous(), s[:, : d // 2].contiguous()
    _rope_rows_triton(k, cos_half, sin_half, start, end)
    got = k[:, :, start:end].clone()
    ref = rows.clone()
    rope_rows_(ref.view(layers, 1, end - start, hkv, d), cos_half[start:end], sin_half[start:end], 0, end - start)
    assert not torch.equal(got, rows)  # rotated ...
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)  # ... as torch does (bf16 ulps)
    assert torch.count_nonzero(k[:, :, start - 2: start]) == 0  # nothing written before the rows


def _strided_pair(buf, shape, strides, v_offset):
    k = buf.as_strided(shape, strides, 0)
    v = buf.as_strided(shape, strides, v_offset)
    return k, v


@needs_interpreter
@pytest.mark.parametrize("tma", [True, False])
def test_question_kernel_batch_offset_past_2_31(tmp_path, tma):
    """Three requests whose caches lie 2^30 elements apart: the third starts past 2^31 (batch offset)."""
    assert _interpreted()
    B, Hkv, G, D, Lk, Lq = 3, 2, 2, 32, 48, 5
    sb = 2 ** 30 + 64  # batch stride fits int32; 2 * sb does not
    kv, kvd = _filled_pair(tmp_path, B, Hkv, D, Lk, sb)
    q = torch.randn(B, Hkv * G, Lq, D)
    out = attend_question(q, *kv, tma=tma, chunk=1)
    ref = attend_reference(q, *kvd)
    assert rel(out, ref) < 1e-5


def _filled_pair(tmp_path, B, Hkv, D, Lk, sb):
    """K/V views [B, Hkv, Lk, D] (token-major, K and V interleaved per token) with batch stride ``sb`` over a
    sparse file, filled with random values; also dense copies for the reference."""
    tok = 2 * Hkv * D
    buf = sparse_buffer(tmp_path / "kv.bin", (B - 1) * sb + Lk * tok)
    k, v = _strided_pair(buf, (B, Hkv, Lk, D), (sb, D, tok, 1), Hkv * D)
    torch.manual_seed(1)
    kd, vd = torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    k.copy_(kd)
    v.copy_(vd)
    return (k, v), (kd, vd)


@needs_interpreter
def test_general_kernel_offsets_past_2_31(tmp_path):
    """The general kernel (block ids, RoPE in-kernel, block mass) with the same > 2^31 batch offsets."""
    assert _interpreted()
    from blockrag.attention_kv.kernels import make_block_ids

    B, Hkv, G, D, Lq = 3, 2, 2, 32, 6
    ids = make_block_ids(8, [16, 12], Lq)
    Lk = ids.numel()
    (k, v), (kd, vd) = _filled_pair(tmp_path, B, Hkv, D, Lk, 2 ** 30 + 64)
    q = torch.randn(B, Hkv * G, Lk, D)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    pos = torch.arange(Lk)
    rows = torch.tensor([Lk - 2, Lk - 1])
    kw = dict(q_start=0, q_block=ids, k_block=ids, inv_freq=inv_freq, k_positions=pos, q_positions=pos,
              mass_rows=rows)
    out, mass = attend_triton(q, k, v, rope_impl="fused", **kw)
    ref, ref_mass = attend_reference(q, kd, vd, **kw)
    assert rel(out, ref) < 1e-5
    assert (mass - ref_mass).abs().max().item() < 1e-5
    out2, _ = attend_triton(q, k, v, rope_impl="prepass", **kw)
    assert rel(out2, ref) < 1e-5


@needs_interpreter
def test_question_kernel_key_offset_past_2_31(tmp_path):
    """Keys 2^24 elements apart (a very strided view): key 128 starts past 2^31 (first-key offset in int64)."""
    assert _interpreted()
    Hkv, G, D, Lk, Lq = 1, 2, 32, 136, 3
    stride = 2 ** 24 + 32
    buf = sparse_buffer(tmp_path / "kv.bin", (Lk - 1) * stride + 2 * D)
    k, v = _strided_pair(buf, (1, Hkv, Lk, D), (0, D, stride, 1), D)
    torch.manual_seed(2)
    kd, vd = torch.randn(1, Hkv, Lk, D), torch.randn(1, Hkv, Lk, D)
    k.copy_(kd)
    v.copy_(vd)
    q = torch.randn(1, Hkv * G, Lq, D)
    out = attend_question(q, k, v, tma=False, chunk=3)
    assert rel(out, attend_reference(q, kd, vd)) < 1e-5


# ------------------------------------------------------------------------------------------ GPU
@needs_cuda
def test_gpu_8b_cache_past_2_31_elements():
    """An 8B-shaped cache of 40,000 tokens (the issue's crash): RoPE over the last layers' rows, and the
    question kernel on the last layer with the length on the device, against the torch computation."""
    layers, max_len, hkv, d, hq = 32, 40_000, 8, 128, 32
    dev = "cuda"
    kv = torch.empty(layers, 1, max_len, 2, hkv, d, dtype=torch.bfloat16, device=dev)
    assert kv.numel() > 2 ** 31
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    torch.manual_seed(0)
    start, end = max_len - 300, max_len - 100
    rows = torch.randn(layers, 1, end - start, hkv, d, device=dev).to(torch.bfloat16)
    k[:, :, start:end] = rows
    v[:, :, start:end] = rows.flip(-1)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d))
    c, s = cos_sin(torch.arange(max_len, device=dev), inv_freq)
    cos_half, sin_half = c[:, : d // 2].contiguous(), s[:, : d // 2].contiguous()
    rope_rows_(k, cos_half, sin_half, start, end)
    torch.cuda.synchronize()
    ref = rows.float()
    x1, x2 = ref[..., : d // 2], ref[..., d // 2:]
    cc, ss = cos_half[start:end][None, None, :, None], sin_half[start:end][None, None, :, None]
    ref = torch.cat([x1 * cc - x2 * ss, x2 * cc + x1 * ss], -1).to(torch.bfloat16)
    torch.testing.assert_close(k[:, :, start:end].float(), ref.float(), rtol=1e-2, atol=1e-2)
    # fill the last layer and attend over 39,900 keys with a 50-token question and with one decoded token
    kv[-1, :, :start].normal_()
    kl, vl = k[-1].transpose(1, 2), v[-1].transpose(1, 2)  # [1, Hkv, max_len, D] strided views
    n = end
    for lq in (50, 1):
        q = torch.randn(1, hq, lq, d, device=dev, dtype=torch.bfloat16)
        kv_len = torch.tensor([n], dtype=torch.int32, device=dev)
        out = attend_question(q, kl, vl, kv_len=kv_len)
        ref_o = torch.nn.functional.scaled_dot_product_attention(
            q.float(), kl[:, :, :n].float(), vl[:, :, :n].float(), enable_gqa=True,
            attn_mask=torch.ones(lq, n, dtype=torch.bool, device=dev).tril(n - lq))
        assert rel(out, ref_o) < 2e-2


@needs_cuda
def test_gpu_batch_offsets_past_2_31_elements():
    """Three requests' caches 2^30 elements apart (4.3 GB): the third lies past 2^31 elements."""
    Hkv, G, D, Lk, Lq, dev = 8, 4, 128, 4096, 50, "cuda"
    sb = 2 ** 30 + 128
    tok = 2 * Hkv * D
    buf = torch.empty(2 * sb + Lk * tok, dtype=torch.bfloat16, device=dev)
    k = buf.as_strided((3, Hkv, Lk, D), (sb, D, tok, 1), 0)
    v = buf.as_strided((3, Hkv, Lk, D), (sb, D, tok, 1), Hkv * D)
    for b in range(3):
        k[b].normal_()
        v[b].normal_()
    q = torch.randn(3, Hkv * G, Lq, D, device=dev, dtype=torch.bfloat16)
    ref = attend_reference(q, k.contiguous(), v.contiguous())
    assert rel(attend_question(q, k, v), ref) < 2e-2
    assert rel(attend_triton(q, k, v, block_m=128), ref) < 2e-2  # the general kernel (a 128-row tile)
    del buf
    torch.cuda.empty_cache()

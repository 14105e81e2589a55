"""RoPE helpers (HF ``rotate_half`` convention), always computed in fp32.

A model's RoPE parameters come from the model seam (``ModelAdapter.inv_freq``). Keys are stored *un-rotated*; they are rotated to their stitched (contiguous) positions either here
(:func:`rotate`) or by the attention kernel as it loads them (``attend(..., inv_freq=, k_positions=)``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """fp32 (cos, sin) of shape [len(positions), D] for integer positions."""
    freqs = positions.to(device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """Apply RoPE to ``x [..., T, D]`` with cos/sin ``[T, D]`` (fp32 math)."""
    xf = x.float()
    y = xf * cos + rotate_half(xf) * sin
    return y.to(out_dtype or x.dtype)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype=None,
             scaling: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`rotate` (rotation by -theta; divides out ``scaling**2`` when cos/sin carry it)."""
    xf = x.float()
    y = xf * cos - rotate_half(xf) * sin
    if scaling != 1.0:
        y = y / (scaling * scaling)
    return y.to(out_dtype or x.dtype)


try:  # in-place RoPE over a token range of stitched K buffers (one pass; used when rope="stitch")
    import triton
    import triton.language as tl

    @triton.jit
    def _rotated_copy(src, dst, COS, SIN, cs, m, HALF: tl.constexpr):
        """dst = src rotated (two halves of HALF columns) by the fp32 tables at offsets ``cs`` (dst may be src)."""
        x1 = tl.load(src, mask=m).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m).to(tl.float32)
        c = tl.load(COS + cs, mask=m, other=1.0)
        s = tl.load(SIN + cs, mask=m, other=0.0)
        tl.store(dst, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_rows_kernel(k_ptr, cos_ptr, sin_ptr, layer_stride, tok_stride, head_stride, start, end,
                          HALF: tl.constexpr, HKV: tl.constexpr, HKV_P2: tl.constexpr, BT: tl.constexpr):
        # BT tokens x all KV heads of one layer per program (one token per program was launch-bound: ~1M
        # programs for a 32K-token context of an 8B model)
        t = start + tl.program_id(0) * BT + tl.arange(0, BT)
        layer = tl.program_id(1).to(tl.int64)
        h = tl.arange(0, HKV_P2)
        d = tl.arange(0, HALF)
        m = (t < end)[:, None, None] & (h < HKV)[None, :, None]
        # int64: layer * layer_stride passes 2^31 elements for an 8B model's cache past ~33K tokens
        t64 = t.to(tl.int64)
        base = (k_ptr + layer * layer_stride + t64[:, None, None] * tok_stride + h[None, :, None] * head_stride
                + d[None, None, :])
        _rotated_copy(base, base, cos_ptr, sin_ptr, t64[:, None, None] * HALF + d[None, None, :], m, HALF)

    @triton.jit
    def _stitch_kernel(DST, SRC_ADDR, N_TOK, DST_POS, COS, SIN, dst_layer_stride, dst_tok_stride, layer0,
                       HKV: tl.constexpr, HKV_P2: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr):
        # BT tokens of one chunk, one layer: K rotated to its stitched position, V copied (one pass)
        tb = tl.program_id(0)
        c = tl.program_id(1)
        layer = tl.program_id(2).to(tl.int64) + layer0
        n = tl.load(N_TOK + c)
        if tb * BT < n:
            # the chunk's own tensor (chunks are separate allocations: their addresses come in a table)
            src = tl.load(SRC_ADDR + c).to(tl.pointer_type(DST.dtype.element_ty))
            pos0 = tl.load(DST_POS + c)
            t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
            h = tl.arange(0, HKV_P2)
            d = tl.arange(0, HALF)
            m = (t < n)[:, None, None] & (h < HKV)[None, :, None]
            row = 2 * HKV * 2 * HALF  # elements per token: K and V of every KV head
            inner = h[None, :, None] * (2 * HALF) + d[None, None, :]
            s = src + layer * n * row + t[:, None, None] * row + inner
            p = pos0 + t
            o = DST + layer * dst_layer_stride + p[:, None, None] * dst_tok_stride + inner
            _rotated_copy(s, o, COS, SIN, p[:, None, None] * HALF + d[None, None, :], m, HALF)
            vo = HKV * 2 * HALF
            tl.store(o + vo, tl.load(s + vo, mask=m), mask=m)
            tl.store(o + vo + HALF, tl.load(s + vo + HALF, mask=m), mask=m)

    _HAS_TRITON = True
except Exception:  # pragma: no cover
    _HAS_TRITON = False


def _interpret() -> bool:
    from .kernels.triton_common import _interpret as interpret  # the one reading of TRITON_INTERPRET

    return interpret()


STITCH_TOKENS, STITCH_WARPS = 8, 4  # tokens x (K and V of every KV head) per program, warps per program


def stitch_rotated_(kv: torch.Tensor, parts: list, start: int, cos_half: torch.Tensor,
                    sin_half: torch.Tensor, *, block_tokens: int | None = None, num_warps: int | None = None,
                    layer_groups: Sequence[tuple[int, int]] | None = None,
                    after_group: Callable[[int], None] | None = None) -> int:
    """Copy the blocks ``parts`` (tensors ``[layers, n, 2, Hkv, D]`` with un-rotated K, on ``kv``'s device) into
    ``kv [layers, 1, max_len, 2, Hkv, D]`` at positions ``start..`` with K rotated to those positions, in one
    pass over the bytes (a concatenation and then a RoPE pass read and wrote the keys twice, and
    ``torch.cat`` into the strided buffer ran at about a third of copy bandwidth on an H200). Returns the
    end position.

    ``layer_groups``: ``(first, end)`` layer ranges copied one launch each, in order (default: all layers in
    one launch); ``after_group(g)`` runs on the host after group ``g`` is queued (a staged load records its
    event there)."""
    n = [int(p.shape[1]) for p in parts]
    end = start + sum(n)
    nl = kv.shape[0]
    groups = list(layer_groups) if layer_groups is not None else [(0, nl)]
    if end == start:
        for g in range(len(groups)):
            if after_group is not None:
                after_group(g)
        return end
    use_triton = _HAS_TRITON and (kv.is_cuda or _interpret()) and all(
        p.is_contiguous() and p.dtype == kv.dtype for p in parts) and kv.stride(-1) == 1 and kv.stride(4) == kv.shape[5] \
        and kv.stride(3) == kv.shape[4] * kv.shape[5]
    if use_triton:
        offs = [start]
        for x in n[:-1]:
            offs.append(offs[-1] + x)
        table = torch.tensor([[p.data_ptr() for p in parts], n, offs], dtype=torch.int64).to(kv.device)
        hkv, d = kv.shape[4], kv.shape[5]
        bt = block_tokens or STITCH_TOKENS
    for g, (l0, l1) in enumerate(groups):
        if l1 > l0 and use_triton:
            _stitch_kernel[(triton.cdiv(max(n), bt), len(parts), l1 - l0)](
                kv, table[0], table[1], table[2], cos_half, sin_half, kv.stride(0), kv.stride(2), l0,
                HKV=hkv, HKV_P2=triton.next_power_of_2(hkv), HALF=d // 2, BT=bt, num_warps=num_warps or STITCH_WARPS)
        elif l1 > l0:
            torch.cat([p[l0:l1] for p in parts], dim=1, out=kv[l0:l1, 0, start:end])
            rope_rows_(kv[l0:l1, :, :, 0], cos_half, sin_half, start, end)
        if after_group is not None:
            after_group(g)
    return end


def rope_rows_(k: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, start: int, end: int) -> None:
    """Rotate in place ``k[layers, 1, max_len, Hkv, D]`` (any strides, last dim contiguous) at positions
    ``start..end`` with fp32 tables ``[max_len, D/2]``."""
    if end <= start:
        return
    if k.is_cuda and _HAS_TRITON:
        _rope_rows_triton(k, cos_half, sin_half, start, end)
        return
    c = torch.cat([cos_half[start:end]] * 2, -1)[:, None, :]
    s = torch.cat([sin_half[start:end]] * 2, -1)[:, None, :]
    x = k[:, :, start:end]
    x.copy_(rotate(x, c, s))


def _rope_rows_triton(k: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, start: int, end: int) -> None:
    """The Triton launch of :func:`rope_rows_` (also runs under ``TRITON_INTERPRET=1`` on the CPU, for tests)."""
    nl, _, _, hkv, d = k.shape
    if k.stride(-1) != 1:
        raise ValueError("rope_rows_ needs a contiguous last (head) dimension")
    bt = 16
    _rope_rows_kernel[(triton.cdiv(end - start, bt), nl)](
        k, cos_half, sin_half, k.stride(0), k.stride(2), k.stride(3), start, end,
        HALF=d // 2, HKV=hkv, HKV_P2=triton.next_power_of_2(hkv), BT=bt, num_warps=4)

"""Fused elementwise pieces of a decoder layer, for the model seam's fused forward (``ModelAdapter.fuse``).

A Llama/Qwen2 layer run from its ``nn.Module`` pieces launches ~45 GPU kernels (the RMSNorm alone is six,
RoPE in fp32 eight per tensor); in a one-token decode step or a short question each is a few microseconds
of launch latency for very little work, and they added up to about as much time as reading the weights
(8B shape, H200). Here each is one kernel:

* :func:`rms_norm` — ``weight * (x * rsqrt(mean(x^2) + eps))`` (HF's rounding: normalised in fp32, cast to
  the model dtype, then scaled by the weight).
* :func:`rope_` — RoPE of the query and key heads of a fused q/k/v projection output, in place, fp32 math
  (as :func:`attention_kv.rope.rotate`).
* :func:`silu_mul` — ``silu(gate) * up`` of a fused gate/up projection output (HF's rounding: the
  activation is cast to the model dtype before the product).

Each has a PyTorch path (CPU, autograd, ``torch.compile`` traces it) giving the same values; the Triton
kernels run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no Triton: the PyTorch paths only
    HAS_TRITON = False


def _use_triton(x: torch.Tensor) -> bool:
    if not HAS_TRITON or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():  # inductor fuses the PyTorch path itself
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, sx, sy, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / N
        y = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=m, other=0.0)
        tl.store(Y + row * sy + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(X, COS, SIN, sx_tok, sc_tok, n_heads, HALF: tl.constexpr, BH: tl.constexpr):
        # one token x BH heads per program; heads are consecutive blocks of 2 * HALF columns of the row
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        d = tl.arange(0, HALF)
        m = (h < n_heads)[:, None]
        base = X + t * sx_tok + h.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
        c = tl.load(COS + t * sc_tok + d)[None, :]
        s = tl.load(SIN + t * sc_tok + d)[None, :]
        tl.store(base, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=m)
        tl.store(base + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, s_gu, s_out, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        g = tl.load(GU + row * s_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * s_gu + N + cols, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty)
        tl.store(OUT + row * s_out + cols, (a.to(tl.float32) * u).to(OUT.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D [rows, last] view (no copy; the last dimension must be contiguous)."""
    if x.stride(-1) != 1:
        raise ValueError("the last dimension must be contiguous")
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x [..., N]`` with ``weight [N]`` (a new tensor of ``x``'s dtype and shape)."""
    if not _use_triton(x):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return weight * y
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    o2 = out.view(-1, x.shape[-1])
    N = x.shape[-1]
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, o2, x2.stride(0), o2.stride(0), N, float(eps),
                                     BLOCK=triton.next_power_of_2(N), num_warps=4 if N <= 4096 else 8)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
    """Rotate in place the first ``n_heads`` heads (``head_dim`` columns each) of every token row of ``x``
    ``[B, L, W]`` (a fused projection output) by fp32 tables ``cos``/``sin`` ``[B or 1, 1, L, head_dim]``
    (:meth:`ModelAdapter.rope`; HF ``rotate_half`` convention)."""
    if n_heads == 0:
        return
    B, L, _ = x.shape
    if not _use_triton(x):
        part = x[..., :n_heads * head_dim].view(B, L, n_heads, head_dim)
        c, s = cos[:, 0, :, None, :], sin[:, 0, :, None, :]
        xf = part.float()
        half = head_dim // 2
        rot = torch.cat((-xf[..., half:], xf[..., :half]), -1)
        part.copy_(xf * c + rot * s)
        return
    half = head_dim // 2
    # per-token tables [B * L, half] (the two halves of cos/sin are equal)
    c = cos[:, 0, :, :half].expand(B, L, half).reshape(B * L, half)
    s = sin[:, 0, :, :half].expand(B, L, half).reshape(B * L, half)
    if c.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    x2 = _rows(x)
    bh = min(16, triton.next_power_of_2(n_heads))
    _rope_kernel[(x2.shape[0], triton.cdiv(n_heads, bh))](x2, c, s, x2.stride(0), c.stride(0), n_heads,
                                                           HALF=half, BH=bh, num_warps=4)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of ``gu [..., 2N]`` = ``[g | u]`` -> ``[..., N]``."""
    N = gu.shape[-1] // 2
    if not _use_triton(gu):
        g, u = gu[..., :N], gu[..., N:]
        return torch.nn.functional.silu(g) * u
    g2 = _rows(gu)
    out = torch.empty(*gu.shape[:-1], N, dtype=gu.dtype, device=gu.device)
    o2 = out.view(-1, N)
    block = min(4096, triton.next_power_of_2(N))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(N, block))](g2, o2, g2.stride(0), o2.stride(0), N, BLOCK=block,
                                                           num_warps=4)
    return out

"""Block-structured attention masks and a plain PyTorch reference of the ``attend`` contract.

Block ids: 0 = shared prefix (seen by everyone), 1..N = passages (each sees the prefix and itself),
-1 = question / decoding block (sees everything before it). A key ``j`` is visible to query row
``i`` (global index ``q_start + i``) iff ``j <= q_start + i`` and
``(k_block[j] == 0 or q_block[i] < 0 or k_block[j] == q_block[i])``.
"""
from __future__ import annotations

import math

import torch

from .rope import cos_sin, rotate


def block_ids(prefix_len: int, chunk_lens: list[int], question_len: int = 0, device=None) -> torch.Tensor:
    """int32 block id per position for ``prefix + chunks + question``."""
    parts = [torch.zeros(prefix_len, dtype=torch.int32)]
    for i, n in enumerate(chunk_lens):
        parts.append(torch.full((n,), i + 1, dtype=torch.int32))
    parts.append(torch.full((question_len,), -1, dtype=torch.int32))
    return torch.cat(parts).to(device)


def visibility(q_rows: torch.Tensor, k_len: int, q_block: torch.Tensor | None = None,
               k_block: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [Lq, Lk]: True where query row (global index ``q_rows[i]``) may attend key ``j``."""
    j = torch.arange(k_len, device=q_rows.device)
    vis = j[None, :] <= q_rows[:, None]
    if k_block is not None and q_block is not None:
        kb = k_block.to(q_rows.device)[None, :]
        qb = q_block.to(q_rows.device)[:, None]
        vis = vis & ((kb == 0) | (qb < 0) | (kb == qb))
    return vis


def block_mask_4d(blocks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive [1, 1, L, L] mask for a full forward pass with block attention (HF 4D-mask form)."""
    L = blocks.numel()
    vis = visibility(torch.arange(L, device=blocks.device), L, blocks, blocks)
    mask = torch.zeros(L, L, dtype=dtype, device=blocks.device)
    mask.masked_fill_(~vis, torch.finfo(dtype).min)
    return mask[None, None]


def attend_reference(q, k, v, *, q_start=None, q_block=None, k_block=None, k_positions=None, q_positions=None,
                     inv_freq=None, scale=None, mass_rows=None, n_blocks=None, backend="torch",
                     q_rows=None):
    """PyTorch implementation of the ``attention_kv.kernels.attend`` contract (fp32 softmax).

    Extra (not in the kernel API): ``q_rows`` — explicit global indices of the query rows, for
    non-contiguous rows (CacheBlend's recomputed tokens). ``mass_rows``/``n_blocks`` are not supported here.
    """
    if mass_rows is not None:
        raise NotImplementedError("attend_reference: mass_rows is served by attention_kv.kernels")
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if q_rows is None:
        q_start = Lk - Lq if q_start is None else q_start
        q_rows = torch.arange(q_start, q_start + Lq, device=q.device)
    if inv_freq is not None:
        if k_positions is None:
            k_positions = torch.arange(Lk, device=k.device)
        cos, sin = cos_sin(k_positions, inv_freq.to(k.device))
        k = rotate(k, cos, sin, out_dtype=q.dtype)
        if q_positions is not None:
            cq, sq = cos_sin(q_positions, inv_freq.to(q.device))
            q = rotate(q, cq, sq)
    vis = visibility(q_rows, Lk, q_block, k_block)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=vis[None, None], scale=scale, enable_gqa=Hq != k.shape[1])
    rep = Hq // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis[None, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vf).to(q.dtype)


def get_attend():
    """The project's kernel entry point if present, else the reference."""
    try:
        from .kernels import attend  # type: ignore[attr-defined]
        return attend
    except ImportError:
        return attend_reference

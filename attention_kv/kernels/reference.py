"""PyTorch reference for :func:`attention_kv.kernels.attend`.

Plain and explicit: build the boolean visibility mask, rotate keys (and optionally queries) in fp32,
softmax in fp32, then ``P @ V``. Works on any device. Query rows are processed in chunks so that the
score matrix never exceeds a memory budget (a 32K x 32K prefill can be checked on a GPU).

Conventions (shared with the Triton kernel):
  * Query row i has global index ``q_start + i``; key j has global index j.
  * Key j is visible to query i iff ``j <= q_start + i`` and
    ``k_block[j] == 0 or q_block[i] < 0 or k_block[j] == q_block[i]``.
  * A query row that sees no key at all outputs zeros (and has zero block mass).
  * Block mass: index ``b`` for block id ``b >= 0``; the query block (any negative id) maps to ``n_blocks - 1``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "attend_reference",
    "apply_rope",
    "visibility_mask",
    "make_block_ids",
    "default_n_blocks",
]


def make_block_ids(prefix_len: int, doc_lens, query_len: int = 0, *, device=None) -> torch.Tensor:
    """Block ids for ``[prefix | doc_1 | ... | doc_N | query]``: 0 for the shared prefix / instruction,
    1..N for the documents, -1 for the query block. Returns an int32 tensor of the total length.

    For a BlockRank prefill pass ``q_block = k_block = ids``; for a question block over a stitched cache
    pass ``k_block = ids`` and ``q_block = ids[-Lq:]``."""
    parts = [torch.zeros(int(prefix_len), dtype=torch.int32)]
    for i, n in enumerate(doc_lens):
        parts.append(torch.full((int(n),), i + 1, dtype=torch.int32))
    parts.append(torch.full((int(query_len),), -1, dtype=torch.int32))
    ids = torch.cat(parts)
    return ids.to(device) if device is not None else ids


def default_n_blocks(k_block: torch.Tensor | None) -> int:
    """``max(k_block) + 2`` (documents 0..max plus one slot for the query block); 1 without block ids."""
    if k_block is None:
        return 1
    return int(k_block.max().item()) + 2 if k_block.numel() else 1


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF ``rotate_half`` RoPE in fp32. x: [..., L, D]; positions: [L]; inv_freq: [D/2]. Returns fp32."""
    x = x.float()
    freqs = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq.to(
        device=x.device, dtype=torch.float32
    )[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def visibility_mask(Lq: int, Lk: int, q_start: int, q_block=None, k_block=None, device=None) -> torch.Tensor:
    """Boolean [Lq, Lk] mask (True = visible) of the rule above."""
    qi = torch.arange(Lq, device=device)[:, None] + q_start
    kj = torch.arange(Lk, device=device)[None, :]
    mask = kj <= qi
    if q_block is not None and k_block is not None:
        qb = q_block.to(device=device, dtype=torch.int64)[:, None]
        kb = k_block.to(device=device, dtype=torch.int64)[None, :]
        mask = mask & ((kb == 0) | (qb < 0) | (kb == qb))
    return mask


def attend_reference(q, k, v, *, q_start: int | None = None, q_block=None, k_block=None,
                     k_positions=None, q_positions=None, inv_freq=None, scale: float | None = None,
                     mass_rows=None, n_blocks: int | None = None, row_chunk: int | None = None):
    """Reference implementation of :func:`attention_kv.kernels.attend` (fp32 math, any device)."""
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    assert Bk == B and Dk == D and v.shape == k.shape, "k/v must be [B, Hkv, Lk, D] matching q"
    assert Hq % Hkv == 0, "Hq must be a multiple of Hkv (GQA)"
    G = Hq // Hkv
    dev = q.device
    if q_start is None:
        q_start = Lk - Lq
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    kf = k.float()
    qf = q.float()
    if inv_freq is not None:
        kpos = k_positions if k_positions is not None else torch.arange(Lk, device=dev)
        kf = apply_rope(kf, kpos.to(dev), inv_freq)
        if q_positions is not None:
            qf = apply_rope(qf, q_positions.to(dev), inv_freq)
    vf = v.float()
    # GQA: query head h reads kv head h // G.
    kf = kf.repeat_interleave(G, dim=1)
    vf = vf.repeat_interleave(G, dim=1)

    if q_block is None or k_block is None:
        q_block = k_block = None

    want_mass = mass_rows is not None
    if want_mass:
        mass_rows = torch.as_tensor(mass_rows, device=dev, dtype=torch.long)
        if n_blocks is None:
            n_blocks = default_n_blocks(k_block)
        if k_block is None:
            kidx = torch.zeros(Lk, dtype=torch.long, device=dev)
        else:
            kb = k_block.to(device=dev, dtype=torch.long)
            kidx = torch.where(kb < 0, torch.full_like(kb, n_blocks - 1), kb)
        mass = torch.zeros(B, Hq, mass_rows.numel(), n_blocks, dtype=torch.float32, device=dev)

    if row_chunk is None:
        # keep the fp32 score chunk under ~1 GiB
        row_chunk = max(1, min(Lq, (1 << 28) // max(1, B * Hq * Lk)))
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=dev)
    for r0 in range(0, Lq, row_chunk):
        r1 = min(Lq, r0 + row_chunk)
        mask = visibility_mask(r1 - r0, Lk, q_start + r0,
                               None if q_block is None else q_block[r0:r1], k_block, device=dev)
        s = torch.matmul(qf[:, :, r0:r1], kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.nan_to_num(p, nan=0.0)  # rows that see nothing -> zeros
        out[:, :, r0:r1] = torch.matmul(p, vf)
        if want_mass:
            for t, row in enumerate(mass_rows.tolist()):
                if r0 <= row < r1:
                    mass[:, :, t].index_add_(-1, kidx, p[:, :, row - r0])
    out = out.to(q.dtype)
    if want_mass:
        return out, mass
    return out

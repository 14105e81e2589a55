"""blockrag's attention kernel: block-structured (TurboRAG / Block-Attention / BlockRank) attention with
GQA, RoPE applied to keys on load, split-KV for a short question block over a long cache, and per-block
attention mass.

    from blockrag.attention_kv.kernels import attend, make_block_ids
    ids = make_block_ids(prefix_len, doc_lens, query_len)          # 0 prefix, 1..N docs, -1 query
    out = attend(q, k, v, q_block=ids[-Lq:], k_block=ids)          # q: [B,Hq,Lq,D], k/v: [B,Hkv,Lk,D]
    out, mass = attend(q, k, v, q_block=ids, k_block=ids, mass_rows=rows)   # BlockRank relevance

Backends: "torch" (reference, fp32 math, any device), "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
"auto" (triton on CUDA when the shape is supported, torch otherwise).
"""
from __future__ import annotations

import torch

from .reference import (
    apply_rope,
    attend_reference,
    default_n_blocks,
    make_block_ids,
    visibility_mask,
)
from .triton_attention import attend_triton
from .triton_common import HAS_TRITON

__all__ = [
    "attend",
    "attend_reference",
    "attend_triton",
    "make_block_ids",
    "question_block_ids",
    "blockrank_block_ids",
    "visibility_mask",
    "apply_rope",
    "default_n_blocks",
    "HAS_TRITON",
]


def question_block_ids(k_block: torch.Tensor, Lq: int) -> torch.Tensor:
    """q_block for a question of Lq tokens appended at the end of a stitched cache: all -1."""
    return torch.full((Lq,), -1, dtype=torch.int32, device=k_block.device)


def blockrank_block_ids(instruction_len: int, doc_lens, query_len: int, *, device=None):
    """(q_block, k_block) for a BlockRank prefill of [instruction | docs | query] (same ids on both sides)."""
    ids = make_block_ids(instruction_len, doc_lens, query_len, device=device)
    return ids, ids


def _triton_ok(q, k, v) -> bool:
    if not HAS_TRITON or q.device.type != "cuda":
        return False
    D = q.shape[-1]
    if D < 32 or D > 256 or D & (D - 1):
        return False
    return q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def attend(q, k, v, *, q_start: int | None = None, q_block=None, k_block=None,
           k_positions=None, q_positions=None, inv_freq=None, scale: float | None = None,
           mass_rows=None, n_blocks: int | None = None, backend: str = "auto"):
    """q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (Hq % Hkv == 0, GQA). Returns out [B, Hq, Lq, D]
    (and, when mass_rows is given, also mass [B, Hq, len(mass_rows), n_blocks]).
    Query row i has global index q_start + i in the key sequence (default q_start = Lk - Lq);
    key j has global index j. Visibility: key j visible to query i iff j <= q_start + i AND
    (k_block[j] == 0 or q_block[i] < 0 or k_block[j] == q_block[i]).
    Block ids: 0 = shared prefix / instruction (seen by all), 1..N = passages/documents (see only block 0 and
    themselves), -1 = question/query block (sees everything before it, causal within itself).
    q_block / k_block None => plain causal attention (all keys visible subject to the causal rule).
    RoPE on load: if inv_freq (fp32 [D/2]) is given, keys are stored UN-rotated and are rotated inside the kernel
    at k_positions (int [Lk]) in fp32 (HF rotate_half convention: x*cos + rotate_half(x)*sin, cos/sin of
    pos*inv_freq repeated twice along D); if q_positions is also given, q is rotated in-kernel too, else q is
    assumed already rotated.
    mass_rows: LongTensor of query-row indices; returns, per head, the softmax attention probability mass
    each key block receives from those rows (sum over keys of the block; blocks indexed 0..n_blocks-1 where the
    query block -1 maps to index n_blocks-1). BlockRank reads document relevance from this.
    backend: "torch" (reference, any device, fp32 math), "triton" (GPU, or CPU under TRITON_INTERPRET=1), "auto"
    (triton on CUDA, torch otherwise).

    Rows that see no key at all return zeros. Default n_blocks = max(k_block) + 2 (1 without block ids);
    k_positions defaults to arange(Lk) when inv_freq is given."""
    kwargs = dict(q_start=q_start, q_block=q_block, k_block=k_block, k_positions=k_positions,
                  q_positions=q_positions, inv_freq=inv_freq, scale=scale, mass_rows=mass_rows,
                  n_blocks=n_blocks)
    if backend == "auto":
        backend = "triton" if _triton_ok(q, k, v) else "torch"
    if backend == "torch":
        return attend_reference(q, k, v, **kwargs)
    if backend == "triton":
        return attend_triton(q, k, v, **kwargs)
    raise ValueError(f"unknown backend {backend!r} (expected 'auto', 'torch' or 'triton')")

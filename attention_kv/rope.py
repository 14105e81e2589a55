"""RoPE helpers (HF ``rotate_half`` convention), always computed in fp32.

Keys are stored *un-rotated*; they are rotated to their stitched (contiguous) positions either here
(:func:`rotate`) or by the attention kernel as it loads them (``attend(..., inv_freq=, k_positions=)``).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_params(model) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [D/2], attention_scaling) of an HF Llama/Qwen2/Mistral-style model."""
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise TypeError(f"{type(model).__name__}: no rotary_emb module; only RoPE models are supported")
    return rot.inv_freq.detach().float(), float(getattr(rot, "attention_scaling", 1.0))


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

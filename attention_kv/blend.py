"""CacheBlend for a stitched cache: recompute the K/V of the context tokens whose cached values deviate
most (selective recompute), reuse the rest. Entry point: :func:`blend_prefill`."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .block_cache import BlockKVCache
from .model import ModelAdapter


@torch.no_grad()
def blend_prefill(model, cache: BlockKVCache, ctx_ids: torch.Tensor, q_ids: torch.Tensor, ratio: float = 0.15,
                  check_layer: int = 1, logits_to_keep: int = 1, select: str = "dev*attn",
                  chunk_starts: Sequence[int] = (), sink_tokens: int = 0, gradual: float = 1.0,
                  probe: bool = False, reattend: bool = False, carry: bool = False,
                  n_score: int | None = None):
    """CacheBlend over a loaded ``cache`` holding the stitched context (positions ``0..len(ctx_ids)``).

    Layers ``0..check_layer`` recompute every token with full causal attention (as CacheBlend does; these
    layers are not part of ``ratio``). At ``check_layer`` the recomputed K/V are compared with the cached ones
    (same RoPE frame); tokens are ranked by that deviation (``select="dev"``, CacheBlend), by the question's
    attention to them at the check layer (``"attn"``), or by the product (``"dev*attn"``, default), and only
    the top-ranked context tokens (plus the question) go through the later layers, each attending causally to
    the whole stitched cache (fresh K/V for recomputed tokens, cached for the rest), their K/V overwriting the
    cache.

    What ``ratio`` counts: the mean, over the post-check layers ``check_layer+1..L-1``, of the number of
    context tokens (shared prefix + passages, question excluded) that go through a layer (attention + MLP),
    divided by the number of context tokens: at most ``floor(ratio * Lc)`` tokens on average (exactly that
    many per layer with ``gradual=1``); the returned ``n_selected`` is that mean. Not counted: the question
    rows (recomputed in every mode) and, with ``carry``, one K/V projection (no attention, no MLP) per token
    when it leaves the set.

    ``gradual > 1`` (CacheBlend's gradual filtering): the first recomputed layer takes ``gradual * ratio`` of
    the context, later layers keep the highest-ranked tokens of the previous layer's set, shrinking linearly
    so that the mean over recomputed layers is ``ratio`` (to zero over the first layers, question only after,
    when ``gradual > 2``); the re-ranking weighs each token's K/V deviation at that layer by the question's
    attention at the check layer, or (``reattend=True``) at that layer, on the partly updated cache.
    ``carry=True``: a token dropped before layer ``l`` still gets its exact layer-``l`` K/V, projected from
    the fresh hidden state it has at that point (instead of the stale cached K/V at that one layer).
    ``n_score``: only the first ``n_score`` question rows score the context (the rest, e.g. a teacher-forced
    answer appended to the question, are recomputed but must not influence which tokens are chosen).
    ``probe=True`` also projects the check layer's output to the next layer's K/V (no attention, cheap) and
    adds that deviation. ``sink_tokens`` forces the first tokens of every chunk (``chunk_starts``: context
    offsets) into the selection, inside the budget.
    Returns (logits, n_selected) — n_selected is the mean number of context tokens per recomputed layer.

    Defaults used by ``Generator`` (``blend_opts``): ``dev*attn``, ``check_layer=1``, ``gradual=2.5``,
    ``reattend``, ``carry``. On SmolLM2-135M (eval/bench_kv_quality.py) the selection rule barely matters
    beyond that (an oracle ranking by the true full-prefill K/V deviation x question attention did no
    better); the schedule (gradual filtering) and ``carry`` did.
    """
    ad = ModelAdapter.of(model)
    Lc, Lq = ctx_ids.numel(), q_ids.numel()
    N = Lc + Lq
    ns = Lq if n_score is None else max(1, min(Lq, n_score))  # question rows that score the context
    ids = torch.cat([ctx_ids, q_ids])[None]
    h = ad.embed(ids)
    pos = torch.arange(N, device=ids.device)
    cos, sin = ad.rope(pos)  # [1, 1, N, D]: rows are indexed on dim 2
    n_layers = ad.n_layers
    probe = probe and check_layer + 1 < n_layers
    old_kv = _old_kv(cache, check_layer, Lc, None)
    old_next = _old_kv(cache, check_layer + 1, Lc, None) if probe else None
    cache.begin(0, N, layers=(0, check_layer + 1))
    for l in range(check_layer + 1):
        if l == check_layer:
            h_in = h
        h = ad.layer(l, h, (cos, sin), cache.attend)
    new_kv = cache.kv[check_layer, 0, :Lc].float()
    dev = _kv_dev(new_kv, old_kv)
    if probe:
        dev = dev + _kv_dev(_project_kv(ad, check_layer + 1, h[:, :Lc], cos[:, :, :Lc], sin[:, :, :Lc]), old_next)
    if select in ("attn", "dev*attn"):
        qs = slice(Lc, Lc + ns)
        att = _question_attention(ad, check_layer, h_in[:, qs], cos[:, :, qs], sin[:, :, qs],
                                  cache.k[check_layer, 0, :Lc], False, cache.inv_freq)  # rewritten: rotated
        dev = att if select == "attn" else dev / dev.mean().clamp_min(1e-12) * att
    n_sel = min(Lc, int(math.floor(ratio * Lc + 1e-9)))  # at most ratio of the context per layer
    if sink_tokens > 0 and n_sel > 0 and n_sel < Lc:
        forced = torch.zeros(Lc, dtype=torch.bool, device=dev.device)
        for s0 in chunk_starts:
            forced[s0:min(Lc, s0 + sink_tokens)] = True
        dev = torch.where(forced, dev.max() + 1.0 + dev, dev)
    n_rec = n_layers - check_layer - 1
    sizes = _schedule(n_sel, Lc, n_rec, gradual)
    n0 = sizes[0] if sizes else n_sel
    sel = torch.topk(dev, n0).indices.sort().values if n0 > 0 else dev.new_zeros(0, dtype=torch.long)
    q_rows = torch.arange(Lc, N, device=ids.device)
    rows = torch.cat([sel, q_rows])
    h = h[:, rows]
    for i, l in enumerate(range(check_layer + 1, n_layers)):
        if i > 0 and sizes[i] < sel.numel():  # gradual filtering: keep the highest-ranked at the last layer
            keep = torch.topk(layer_dev, sizes[i]).indices.sort().values
            if carry:  # dropped tokens: their exact K/V at this layer, from the fresh input hidden state
                dmask = torch.ones(sel.numel(), dtype=torch.bool, device=sel.device)
                dmask[keep] = False
                drop = sel[dmask]
                kv_new = _project_kv(ad, l, h[:, :sel.numel()][:, dmask], cos[:, :, drop], sin[:, :, drop])
                cache.kv[l, 0].index_copy_(0, drop, kv_new.to(cache.kv.dtype))
                if cache.rope == "kernel":  # written rotated (as the forward writes recomputed keys)
                    cache.kpos[l].index_fill_(0, drop, 0)
            keep_rows = torch.cat([keep, torch.arange(sel.numel(), rows.numel(), device=ids.device)])
            sel, rows, h = sel[keep], rows[keep_rows], h[:, keep_rows]
        cache_old = _old_kv(cache, l, Lc, sel) if i + 1 < len(sizes) and sizes[i + 1] < sel.numel() else None
        h_q = h[:, -Lq:][:, :ns]  # the scoring question rows (the context rows come first)
        cache.begin(rows=rows, kv_len=N, layers=(l, l + 1))
        h = ad.layer(l, h, (cos[:, :, rows], sin[:, :, rows]), cache.attend)
        if cache_old is not None:
            layer_dev = _kv_dev(cache.kv[l, 0, sel].float(), cache_old)
            if select == "dev*attn":
                if reattend:  # the question's attention at this layer (on the partly updated cache)
                    k_l = _old_kv(cache, l, Lc, None)[:, 0]
                    att = _question_attention(ad, l, h_q, cos[:, :, Lc:Lc + ns], sin[:, :, Lc:Lc + ns], k_l,
                                              False, cache.inv_freq)
                layer_dev = layer_dev * att[sel]
    cache.length = N
    cache._rows = None
    n_mean = int(round(sum(sizes) / len(sizes))) if sizes else n_sel
    return ad.logits(h, logits_to_keep)[0], n_mean


def _schedule(n_sel: int, Lc: int, n_rec: int, gradual: float) -> list[int]:
    """Context tokens recomputed per post-check layer: constant ``n_sel``, or (``gradual > 1``) linearly
    decreasing from ``gradual * n_sel`` (to zero when ``gradual > 2``), clipped to ``0..Lc``. Integers,
    never increasing (the sets are nested), summing to at most ``n_sel * n_rec`` (mean <= ``n_sel``)."""
    if n_rec <= 0:
        return []
    if gradual <= 1.0 or n_rec == 1 or n_sel >= Lc:
        return [min(n_sel, Lc)] * n_rec
    total = n_sel * n_rec
    a = min(Lc, gradual * n_sel, total)
    b = 2 * n_sel - a
    if b >= 0:  # a -> b over all recomputed layers
        sizes = [a + (b - a) * i / (n_rec - 1) for i in range(n_rec)]
    else:  # a -> 0 over the first m layers, none after (m >= 2 since a <= total)
        m = 2 * total / a
        sizes = [max(0.0, a * (1 - i / (m - 1))) for i in range(n_rec)]
    f = total / sum(sizes)  # exact mean before rounding
    sizes = [min(float(Lc), s * f) for s in sizes]
    out = [int(math.floor(s + 1e-9)) for s in sizes]
    rem = total - sum(out)
    for i, s in enumerate(sizes):  # round the earliest fractional entries up: stays non-increasing
        if rem <= 0:
            break
        if s - out[i] > 1e-9:
            out[i] += 1
            rem -= 1
    return out


def _old_kv(cache: BlockKVCache, layer: int, Lc: int, rows):
    """Cached context K/V of ``layer`` (fp32 copy, keys in the rotated frame), all or ``rows``."""
    kv = cache.kv[layer, 0, :Lc] if rows is None else cache.kv[layer, 0, rows]
    kv = kv.float().clone()  # [n, 2, Hkv, D]
    if cache.rope == "kernel":  # cached context keys are un-rotated: compare in the rotated frame
        from .rope import cos_sin, rotate

        p = torch.arange(Lc, device=kv.device) if rows is None else rows
        kp = cache.kpos[layer, p]
        c, s_ = cos_sin(p, cache.inv_freq)
        rot = rotate(kv[:, 0].transpose(0, 1), c, s_, torch.float32).transpose(0, 1)
        kv[:, 0] = torch.where((kp != 0)[:, None, None], rot, kv[:, 0])
    return kv


def _kv_dev(new_kv: torch.Tensor, old_kv: torch.Tensor) -> torch.Tensor:
    """Per-token deviation, K and V each normalised by their mean squared norm. [n, 2, H, D] -> [n]."""
    d = (new_kv - old_kv).pow(2).sum(dim=(-1, -2))  # [n, 2]
    d = d / old_kv.pow(2).sum(dim=(-1, -2)).mean(0).clamp_min(1e-12)
    return d.sum(-1)


def _project_kv(ad: ModelAdapter, layer: int, h, cos, sin) -> torch.Tensor:
    """K (rotated) and V of ``layer`` for hidden states ``h`` [1, n, hidden] -> [n, 2, Hkv, D] fp32."""
    k, v = ad.kv(layer, h, cos, sin)
    return torch.stack([k[0].float().transpose(0, 1), v[0].float().transpose(0, 1)], dim=1)


def _question_attention(ad: ModelAdapter, layer: int, h_q, cos_q, sin_q, k_ctx, unrotated: bool, inv_freq):
    """Mean (over heads and question rows) attention probability of the question on each context token at
    ``layer``, from the layer's own q projection."""
    from .rope import cos_sin, rotate

    q, _, _ = ad.qkv(layer, h_q)
    q = rotate(q.float(), cos_q, sin_q)  # [1, Hq, Lq, D]
    k = k_ctx.float().transpose(0, 1)  # [Hkv, Lc, D]
    if unrotated:
        cc, ss = cos_sin(torch.arange(k.shape[1], device=k.device), inv_freq)
        k = rotate(k, cc, ss, torch.float32)
    rep = q.shape[1] // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)[None]
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * ad.scale, dim=-1)  # question sees all context
    return p.mean(dim=(0, 1, 2))

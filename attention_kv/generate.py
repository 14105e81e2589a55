"""Cached generation: ``Generator(model_name).generate(question, chunks, mode=...)``.

Modes
  ``full``   ordinary prefill of ``prefix + passages + question`` (HF SDPA path), then decoding.
  ``turbo``  TurboRAG / Block-Attention: passages' K/V come from the :class:`KVCacheStore`, are stitched
  ``block``  after the shared prefix at contiguous positions (RoPE in fp32, once while stitching or by
             the kernel as keys are loaded), and only the question block is prefilled (``block`` is the same computation;
             the papers differ in fine-tuning, not inference).
  ``blend``  CacheBlend: like ``turbo`` but the first layers (up to ``check_layer``) are recomputed for all
             tokens, the ``blend_ratio`` of context tokens whose K/V deviate most from the cache there
             (weighted by the question's attention to them) are recomputed in the later layers (attending
             causally to the full, partly updated cache), the rest reused. Gradual filtering
             (``Generator.blend_opts["gradual"]``): more tokens in the first recomputed layers, re-ranked by
             their deviation at each layer and shrinking, the mean per layer staying ``blend_ratio``.
Every mode builds ``input_ids`` from stored per-chunk token ids (no re-tokenisation of joined text).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache_store import ChunkKV, KVCacheStore
from .hf_integration import BlockKVCache, forward_block, use_blockrag_attention

MODES = ("full", "turbo", "block", "blend")


@dataclass
class GenerationResult:
    answer: str
    token_ids: list[int]
    mode: str
    chunk_ids: list[str]
    ttft_ms: float
    decode_tokens_per_s: float
    n_context_tokens: int
    n_question_tokens: int
    n_recomputed: int = 0
    timings: dict = field(default_factory=dict)


class GenerationStream:
    """Iterator over text pieces; ``.result`` holds the :class:`GenerationResult` once exhausted."""

    def __init__(self, it: Iterator):
        self._it = it
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            item = next(self._it)
            if isinstance(item, GenerationResult):
                self.result = item
                raise StopIteration
            return item


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Entry point. ``Generator(model_name=None, *, cache_dir=None, model=None, tokenizer=None, device=None,
    dtype=None, store=None, system_prompt=None, quant=None, kv_dtype=None, rope="stitch")``.

    ``generate(question, chunks, mode="turbo", max_new_tokens=64, stream=False, blend_ratio=0.15,
    check_layer=1)`` -> :class:`GenerationResult` (or :class:`GenerationStream` with ``stream=True``).
    Chunks are ``rag.documents.Chunk``-like (``.id``, ``.text``, ``.token_ids``); missing caches are
    built on the fly (and stored).
    """

    def __init__(self, model_name: str | None = None, *, cache_dir: str | Path | None = None, model=None,
                 tokenizer=None, device: str | None = None, dtype=None, store: KVCacheStore | None = None,
                 system_prompt: str | None = None, quant: str | None = None, kv_dtype=None,
                 rope: str = "stitch"):
        if model is None:
            from rag.models import load_generator

            model, tok = load_generator(model_name, dtype=dtype, device=device)
            tokenizer = tokenizer or tok
        self.model, self.tokenizer = model.eval(), tokenizer
        use_blockrag_attention(self.model)
        self.device = next(model.parameters()).device
        if store is None:
            if cache_dir is None:
                from rag.models import cache_dir as _cd

                from .cache_store import config_revision
                cache_dir = _cd() / "kv" / config_revision(model)
                if system_prompt:
                    import hashlib
                    cache_dir = Path(str(cache_dir) + "-" + hashlib.sha256(system_prompt.encode()).hexdigest()[:8])
                if quant:
                    cache_dir = Path(str(cache_dir) + "-" + quant)
            store = KVCacheStore(cache_dir, model, tokenizer, system_prompt=system_prompt, quant=quant,
                                 dtype=kv_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32))
        self.store = store
        # "stitch": context keys rotated once while stitching (measured faster with the current kernel);
        # "kernel": left un-rotated, the attention kernel rotates them as it loads them
        self.rope = rope
        self.blend_select = "dev*attn"  # CacheBlend token selection: "dev" (K/V deviation), "attn", "dev*attn"
        # CacheBlend options (see blend_prefill); gradual filtering + per-layer question attention measured best
        # on SmolLM2-135M (eval/bench_kv_quality.py); {"gradual": 1.0, "reattend": False} = fixed selection
        self.blend_opts = {"sink_tokens": 0, "gradual": 2.5, "probe": False, "reattend": True}
        self.eos_ids = set()
        for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id:
                self.eos_ids.add(t)

    # ------------------------------------------------------------------ public API
    def generate(self, question: str, chunks: Sequence, mode: str = "turbo", max_new_tokens: int = 64,
                 stream: bool = False, blend_ratio: float = 0.15, check_layer: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        it = self._run(question, list(chunks), mode, max_new_tokens, blend_ratio, check_layer)
        s = GenerationStream(it)
        if stream:
            return s
        for _ in s:
            pass
        return s.result

    @torch.no_grad()
    def prefill(self, question: str, chunks: Sequence, mode: str, blend_ratio: float = 0.15,
                check_layer: int = 1, extra_ids: Sequence[int] = (), cache_max_len: int | None = None,
                blend_select: str | None = None):
        """Prefill only; returns (logits [T, V] for the question (+extra) tokens, state dict).

        ``extra_ids`` are appended after the question (teacher forcing of an answer).
        """
        store = self.store
        q_ids = store.question_ids(question) + list(extra_ids)
        block_ids = [store.chunk_token_ids(c) for c in chunks]
        ctx_ids = list(store.prefix_ids) + [t for b in block_ids for t in b]
        Lc, Lq = len(ctx_ids), len(q_ids)
        dev = self.device
        info = {"n_context": Lc, "n_question": Lq, "n_recomputed": 0}
        if mode == "full":
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([ctx_ids + q_ids], device=dev)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=Lq)
            info["cache"] = cache
            info["length"] = Lc + Lq
            return out.logits[0], info
        parts = [store.prefix_kv()] + store.get_many(chunks)
        cache = BlockKVCache(self.model, cache_max_len or (Lc + Lq + 256), device=dev, rope=self.rope)
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        cache.load(parts, 0, stream=stream)
        info["cache"] = cache
        q = torch.tensor(q_ids, device=dev)
        if mode in ("turbo", "block"):
            logits = forward_block(self.model, cache, q, Lc, logits_to_keep=Lq)[0]
        else:
            starts, off = [], len(store.prefix_ids)
            for b in block_ids:
                starts.append(off)
                off += len(b)
            logits, nsel = blend_prefill(self.model, cache, torch.tensor(ctx_ids, device=dev), q,
                                         blend_ratio, check_layer, logits_to_keep=Lq,
                                         select=blend_select or self.blend_select, chunk_starts=starts,
                                         **self.blend_opts)
            info["n_recomputed"] = nsel
        cache.drop_events()
        info["length"] = cache.length
        return logits, info

    # ------------------------------------------------------------------ internals
    @torch.no_grad()
    def _step(self, mode: str, cache, token: int, pos: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        if mode == "full":
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[pos]], device=self.device))
            return out.logits[0, -1]
        return forward_block(self.model, cache, ids[0], pos)[0, -1]

    def _run(self, question, chunks, mode, max_new_tokens, blend_ratio, check_layer):
        t0 = time.perf_counter()
        logits, info = self.prefill(question, chunks, mode, blend_ratio, check_layer,
                                    cache_max_len=None)
        cache = info["cache"]
        tok = int(logits[-1].argmax())
        _sync(self.device)
        t_first = time.perf_counter()
        out_ids = [tok]
        text_so_far = ""
        piece = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        if tok not in self.eos_ids:
            yield piece
            text_so_far = piece
        pos = info["length"]
        if mode != "full" and cache.max_len < pos + max_new_tokens:
            pass  # max_len reserved 256 tokens; generation stops at the buffer's end
        while len(out_ids) < max_new_tokens and tok not in self.eos_ids:
            if mode != "full" and pos >= cache.max_len:
                break
            logits = self._step(mode, cache, tok, pos)
            pos += 1
            tok = int(logits.argmax())
            out_ids.append(tok)
            if tok in self.eos_ids:
                break
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                yield text[len(text_so_far):]
                text_so_far = text
        _sync(self.device)
        t_end = time.perf_counter()
        n_dec = len(out_ids) - 1
        ids = [t for t in out_ids if t not in self.eos_ids]
        yield GenerationResult(
            answer=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids, mode=mode,
            chunk_ids=[c.id for c in chunks], ttft_ms=(t_first - t0) * 1e3,
            decode_tokens_per_s=(n_dec / (t_end - t_first)) if n_dec and t_end > t_first else 0.0,
            n_context_tokens=info["n_context"], n_question_tokens=info["n_question"],
            n_recomputed=info["n_recomputed"],
            timings={"prefill_ms": (t_first - t0) * 1e3, "decode_ms": (t_end - t_first) * 1e3})


@torch.no_grad()
def blend_prefill(model, cache: BlockKVCache, ctx_ids: torch.Tensor, q_ids: torch.Tensor, ratio: float = 0.15,
                  check_layer: int = 1, logits_to_keep: int = 1, select: str = "dev*attn",
                  chunk_starts: Sequence[int] = (), sink_tokens: int = 0, gradual: float = 1.0,
                  probe: bool = False, reattend: bool = False):
    """CacheBlend over a loaded ``cache`` holding the stitched context (positions ``0..len(ctx_ids)``).

    Layers ``0..check_layer`` recompute every token with full causal attention; at ``check_layer`` the
    recomputed K/V are compared with the cached ones (same RoPE frame); tokens are ranked by that deviation
    (``select="dev"``, CacheBlend), by the question's attention to them at the check layer (``"attn"``), or by
    the product (``"dev*attn"``, default: measured best on SmolLM2, see eval/bench_kv_quality.py), and only the
    top ``ratio`` deviating context tokens (plus the question) go through the later layers, each attending
    causally to the whole stitched cache (fresh K/V for recomputed tokens, cached for the rest), their K/V
    overwriting the cache.

    ``probe=True`` also projects the check layer's output to the next layer's K/V (no attention, cheap) and
    adds that deviation. ``sink_tokens`` forces the first tokens of every chunk (``chunk_starts``: context
    offsets) into the selection, inside the budget. ``gradual > 1`` (CacheBlend's gradual filtering): the
    first recomputed layer takes ``gradual * ratio`` of the context, later layers keep the most deviating
    of the previous layer's set, shrinking linearly so that the mean over recomputed layers is ``ratio``
    (linearly to zero over the first layers, question only after, when ``gradual > 2``); the re-ranking
    weighs each token's K/V deviation at that layer by the question's attention at the check layer, or
    (``reattend=True``) at that layer, on the partly updated cache.
    Returns (logits, n_selected) — n_selected is the mean number of context tokens per recomputed layer.
    """
    base = getattr(model, "model", model)
    Lc, Lq = ctx_ids.numel(), q_ids.numel()
    N = Lc + Lq
    ids = torch.cat([ctx_ids, q_ids])[None]
    h = base.embed_tokens(ids)
    pos = torch.arange(N, device=ids.device)[None]
    cos, sin = base.rotary_emb(h, pos)
    layers = base.layers
    n_layers = len(layers)
    probe = probe and check_layer + 1 < n_layers
    old_kv = _old_kv(cache, check_layer, Lc, None)
    old_next = _old_kv(cache, check_layer + 1, Lc, None) if probe else None
    cache.begin(0, N, layers=(0, check_layer + 1))
    for l in range(check_layer + 1):
        if l == check_layer:
            h_in = h
        h = _layer(layers[l], h, (cos, sin), pos, cache)
    new_kv = cache.kv[check_layer, 0, :Lc].float()
    dev = _kv_dev(new_kv, old_kv)
    if probe:
        dev = dev + _kv_dev(_project_kv(layers[check_layer + 1], h[:, :Lc], cos[:, :Lc], sin[:, :Lc]), old_next)
    if select in ("attn", "dev*attn"):
        att = _question_attention(layers[check_layer], h_in[:, Lc:], cos[:, Lc:], sin[:, Lc:],
                                  cache.k[check_layer, 0, :Lc], False, cache.inv_freq)  # rewritten: HF-rotated
        dev = att if select == "attn" else dev / dev.mean().clamp_min(1e-12) * att
    n_sel = min(Lc, int(math.ceil(ratio * Lc)))
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
        if i > 0 and sizes[i] < sel.numel():  # gradual filtering: keep the most deviating at the last layer
            keep = torch.topk(layer_dev, sizes[i]).indices.sort().values
            keep_rows = torch.cat([keep, torch.arange(sel.numel(), rows.numel(), device=ids.device)])
            sel, rows, h = sel[keep], rows[keep_rows], h[:, keep_rows]
        cache_old = _old_kv(cache, l, Lc, sel) if i + 1 < len(sizes) and sizes[i + 1] < sel.numel() else None
        h_q = h[:, -Lq:]
        cache.begin(rows=rows, kv_len=N, layers=(l, l + 1))
        h = _layer(layers[l], h, (cos[:, rows], sin[:, rows]), rows[None], cache)
        if cache_old is not None:
            layer_dev = _kv_dev(cache.kv[l, 0, sel].float(), cache_old)
            if select == "dev*attn":
                if reattend:  # the question's attention at this layer (on the partly updated cache)
                    k_l = _old_kv(cache, l, Lc, None)[:, 0]
                    att = _question_attention(layers[l], h_q, cos[:, Lc:], sin[:, Lc:], k_l, False, cache.inv_freq)
                layer_dev = layer_dev * att[sel]
    cache.length = N
    cache._rows = None
    h = base.norm(h[:, -logits_to_keep:])
    n_mean = int(round(sum(sizes) / len(sizes))) if sizes else n_sel
    return model.lm_head(h)[0], n_mean


def _schedule(n_sel: int, Lc: int, n_rec: int, gradual: float) -> list[int]:
    """Context tokens recomputed per post-check layer: constant ``n_sel``, or (``gradual > 1``) linearly
    decreasing from ``gradual * n_sel``, with mean ``n_sel`` (clipped to ``0..Lc``)."""
    if n_rec <= 0:
        return []
    if gradual <= 1.0 or n_rec == 1 or n_sel >= Lc:
        return [n_sel] * n_rec
    a = min(Lc, gradual * n_sel)
    b = 2 * n_sel - a
    if b >= 0:  # a -> b over all recomputed layers
        sizes = [a + (b - a) * i / (n_rec - 1) for i in range(n_rec)]
    else:  # a -> 0 over the first m layers, none after (mean still n_sel)
        m = max(2.0, 2 * n_sel * n_rec / a)
        sizes = [max(0.0, a * (1 - i / (m - 1))) for i in range(n_rec)]
    return [max(0, min(Lc, int(round(s)))) for s in sizes]


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


def _project_kv(layer, h, cos, sin) -> torch.Tensor:
    """K (rotated) and V of ``layer`` for hidden states ``h`` [1, n, hidden] -> [n, 2, Hkv, D] fp32."""
    from .rope import rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    k = attn.k_proj(x).view(1, x.shape[1], -1, hd).float()
    v = attn.v_proj(x).view(1, x.shape[1], -1, hd).float()
    c, s_ = cos[:, :, None].float(), sin[:, :, None].float()
    k = k * c + rotate_half(k) * s_
    return torch.stack([k[0], v[0]], dim=1)


def _question_attention(layer, h_q, cos_q, sin_q, k_ctx, unrotated: bool, inv_freq):
    """Mean (over heads and question rows) attention probability of the question on each context token at
    ``layer``, from the layer's own q projection (Llama/Qwen2/Mistral module names)."""
    from .rope import cos_sin, rotate, rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(h_q)
    hd = attn.head_dim
    q = attn.q_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2).float()  # [1, Hq, Lq, D]
    c, s_ = cos_q[:, None].float(), sin_q[:, None].float()
    q = q * c + rotate_half(q) * s_
    k = k_ctx.float().transpose(0, 1)  # [Hkv, Lc, D]
    if unrotated:
        cc, ss = cos_sin(torch.arange(k.shape[1], device=k.device), inv_freq)
        k = rotate(k, cc, ss, torch.float32)
    rep = q.shape[1] // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)[None]
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scaling, dim=-1)  # question sees all context
    return p.mean(dim=(0, 1, 2))


def _layer(layer, h, pe, pos, cache):
    out = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                position_embeddings=pe, blockrag_cache=cache)
    return out[0] if isinstance(out, tuple) else out

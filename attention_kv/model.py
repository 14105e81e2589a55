"""The model seam: the only module that knows how a Hugging Face causal LM is put together.

Everything in blockrag that runs a decoder beyond ``from_pretrained`` / config / tokenizer (cache encoding,
the cached generator, CacheBlend, BlockRank, MRAG, the fine-tuning losses) goes through a
:class:`ModelAdapter`. It reads the model's dimensions and RoPE parameters, and runs the model's own
``nn.Module`` pieces (embedding, per-layer norms, q/k/v/o projections, MLP, final norm, ``lm_head``), so
that weights, dtypes, devices and peft-wrapped ``Linear`` layers are the model's, but it uses none of
transformers' attention, cache or mask machinery: attention is a callback of the caller's choice.

    ad = ModelAdapter.of(model)
    logits = ad.forward(ids, positions, attend, logits_rows=1)

``attend(layer, q, k, v) -> out`` receives ``q [B, Hq, L, D]`` and ``k, v [B, Hkv, L, D]`` of the
current tokens (``q`` and ``k`` rotated to ``positions``; with ``rotate_keys=False`` the keys come
un-rotated, for callers that store them that way and rotate them in the attention kernel) and returns the
attention output ``[B, Hq, L, D]``. It may write K/V into a cache, call ``attention_kv.kernels.attend``,
record attention mass or per-head outputs, or raise to stop the forward early.

Supported families (``config.model_type``): Llama, Mistral, Qwen2 (q/k/v biases). RoPE: the plain,
linear and Llama-3 variants (they only change ``inv_freq``); variants that rescale cos/sin or depend on
the sequence length (YaRN, LongRoPE, dynamic NTK) are refused at construction. Mistral / Qwen2
sliding-window attention is not implemented: :attr:`ModelAdapter.max_context` is the window and callers
refuse longer sequences. Upgrading transformers is a change to this module only.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from .rope import rotate

FAMILIES = ("llama", "mistral", "qwen2")
# RoPE variants whose only effect is a different inv_freq (cos/sin unscaled, independent of the length)
_ROPE_TYPES = ("default", "linear", "llama3")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedModel(ValueError):
    """The model's family or RoPE variant is not one the seam reproduces."""


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     visible: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention of ``q`` over ``k, v`` (same tokens, causal), or with an explicit bool ``visible``
    mask ``[Lq, Lk]`` / ``[B, 1, Lq, Lk]`` (True = may attend). GQA by ``enable_gqa``."""
    gqa = q.shape[1] != k.shape[1]
    if visible is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                                                enable_gqa=gqa)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                                            enable_gqa=gqa)


class ModelAdapter:
    """A loaded HF causal LM seen as dims + pieces + one decoder forward with an attention callback.

    Build with :meth:`of` (one adapter per model object). Attributes: ``n_layers``, ``n_heads``,
    ``n_kv_heads``, ``head_dim``, ``hidden_size``, ``vocab_size``, ``scale`` (softmax scale), ``family``,
    ``max_context`` (None, or the sliding window beyond which results would differ from the model's).
    """

    def __init__(self, model):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        cfg = lm.config
        family = getattr(cfg, "model_type", None)
        if family not in FAMILIES:
            raise UnsupportedModel(f"model family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
        inner = getattr(lm, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(lm, "lm_head"):
            raise UnsupportedModel(f"{type(lm).__name__}: expected a causal LM with .model.layers and .lm_head")
        self.model, self.lm, self.inner = model, lm, inner
        self.family = family
        self.layers = inner.layers
        self.n_layers = len(self.layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        attn0 = self.layers[0].self_attn
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self._check_rope(inner)
        self.max_context = self._sliding_window(cfg)
        self._fused = None  # per layer (qkv weight, qkv bias, gate/up weight, modules) once fuse() ran

    # ---------------------------------------------------------------- construction
    @classmethod
    def of(cls, model) -> "ModelAdapter":
        """The adapter of ``model`` (an adapter passes through; one adapter is kept per model object)."""
        if isinstance(model, ModelAdapter):
            return model
        ad = model.__dict__.get("_blockrag_adapter")
        if ad is None or ad.model is not model:
            ad = cls(model)
            model.__dict__["_blockrag_adapter"] = ad  # plain attribute: not a submodule, not in state_dict
        return ad

    def _check_rope(self, inner) -> None:
        rot = getattr(inner, "rotary_emb", None)
        if rot is None or not hasattr(rot, "inv_freq"):
            raise UnsupportedModel(f"{type(self.lm).__name__}: no rotary embedding; only RoPE models are supported")
        kind = getattr(rot, "rope_type", "default")
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        if kind not in _ROPE_TYPES or scaling != 1.0:
            raise UnsupportedModel(f"RoPE variant {kind!r} (attention scaling {scaling}) is not supported; "
                                   f"supported: {', '.join(_ROPE_TYPES)} (cos/sin unscaled)")
        self._rot = rot

    @staticmethod
    def _sliding_window(cfg) -> Optional[int]:
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return None
        types = getattr(cfg, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None  # Qwen2 with use_sliding_window=False: every layer is full attention
        return int(window)

    # ---------------------------------------------------------------- dims and parameters
    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """fp32 ``[head_dim / 2]`` RoPE inverse frequencies (on the model's device)."""
        return self._rot.inv_freq.detach().float()

    def check_length(self, n_positions: int) -> None:
        """Refuse sequences whose positions reach the sliding window (not implemented)."""
        if self.max_context is not None and n_positions > self.max_context:
            raise ValueError(f"{self.family} sliding-window attention (window {self.max_context}) is not "
                             f"implemented: at most {self.max_context} positions, got {n_positions}")

    # ---------------------------------------------------------------- pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, L, hidden]`` of ``ids [B, L]`` (or ``[L]``, batch of one)."""
        return self.inner.embed_tokens(ids if ids.dim() == 2 else ids.view(1, -1))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) ``[1 or B, 1, L, D]`` for integer positions ``[L]`` or ``[B, L]`` (no host sync)."""
        inv = self.inv_freq
        p = positions if positions.dim() == 2 else positions.view(1, -1)
        f = p.to(device=inv.device, dtype=torch.float32)[..., None] * inv
        emb = torch.cat((f, f), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def qkv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm + q/k/v projections (biases, optional q/k norms) of ``h [B, L, hidden]``:
        un-rotated ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` in the model's dtype."""
        blk = self.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        B, L, _ = x.shape
        q = attn.q_proj(x).view(B, L, -1, self.head_dim)
        k = attn.k_proj(x).view(B, L, -1, self.head_dim)
        v = attn.v_proj(x).view(B, L, -1, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # per-head norms before RoPE (later families)
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x [B, H, L, D]`` with tables from :meth:`rope` (fp32 math, result in ``x``'s dtype)."""
        return rotate(x, cos, sin)

    def kv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated K and V ``[B, Hkv, L, D]`` of ``layer`` for hidden states ``h`` (no attention, no MLP)."""
        _, k, v = self.qkv(layer, h)
        return rotate(k, cos, sin), v

    def layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: Attend | None,
              rotate_keys: bool = True) -> torch.Tensor:
        """One decoder layer: ``h + o_proj(attend(...))``, then ``+ mlp(post_norm(.))``. ``attend=None``:
        plain causal self-attention over the given tokens."""
        blk = self.layers[layer]
        q, k, v = self.qkv(layer, h)
        cos, sin = rope
        q = rotate(q, cos, sin)
        if rotate_keys:
            k = rotate(k, cos, sin)
        out = causal_attention(q, k, v, self.scale) if attend is None else attend(layer, q, k, v)
        B, _, L, _ = out.shape
        h = h + blk.self_attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))
        return h + blk.mlp(blk.post_attention_layernorm(h))

    # ---------------------------------------------------------------- the fused forward
    def fuse(self) -> bool:
        """Put each layer's q/k/v projection weights (and biases) in one tensor and its gate/up weights in
        another, the modules' own parameters becoming views of them (no extra memory; HF's forward, state
        dicts and ``load_state_dict`` see the same values), so that :meth:`hidden_states` without autograd runs
        a layer as two norms, four matrix products and two small fused kernels (:mod:`attention_kv.layer_ops`)
        instead of ~45 kernels. Returns False, changing nothing, for layers it does not reproduce (not plain
        ``nn.Linear`` projections, q/k norms, an activation other than SiLU)."""
        if self._fused is not None:
            return True
        act = getattr(self.lm.config, "hidden_act", None)
        plain = torch.nn.Linear
        for blk in self.layers:
            a, m = blk.self_attn, blk.mlp
            mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if (act != "silu" or any(type(x) is not plain for x in mods) or getattr(a, "q_norm", None) is not None
                    or any(not hasattr(n, "variance_epsilon")
                           for n in (blk.input_layernorm, blk.post_attention_layernorm))
                    or a.o_proj.bias is not None or m.down_proj.bias is not None
                    or len({x.bias is None for x in mods[:3]}) != 1):
                return False
        fused = []
        with torch.no_grad():
            for blk in self.layers:
                a, m = blk.self_attn, blk.mlp
                w_qkv = _share([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                b_qkv = None if a.q_proj.bias is None else _share([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                w_gu = _share([m.gate_proj.weight, m.up_proj.weight])
                fused.append((w_qkv, b_qkv, w_gu, (a.q_proj, m.gate_proj)))
        self._fused = fused
        self._fused_ptrs = self._param_ptrs()
        return True

    def _param_ptrs(self) -> tuple:
        """Where every fused parameter's data lies (a replaced ``.data`` — a LoRA merge, a dtype cast — moves it)."""
        out = []
        for blk in self.layers:
            a, m = blk.self_attn, blk.mlp
            for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                out.append(mod.weight.data_ptr())
                if mod.bias is not None:
                    out.append(mod.bias.data_ptr())
        return tuple(out)

    def _fast(self) -> bool:
        """Whether :meth:`hidden_states` runs the fused layers: fused, no autograd, modules not replaced since.
        Parameters whose data were replaced after fusing (the fused tensors would be stale) are fused again
        (outside graph capture; during one the plain layers run)."""
        f = self._fused
        if f is None or torch.is_grad_enabled():
            return False
        blk = self.layers[0]
        if not (blk.self_attn.q_proj is f[0][3][0] and blk.mlp.gate_proj is f[0][3][1]):
            return False
        if self._param_ptrs() != self._fused_ptrs:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return False
            self._fused = None
            return self.fuse()
        return True

    def _fused_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     attend: Attend | None, rotate_keys: bool) -> torch.Tensor:
        """:meth:`layer` over the fused weights (same values up to rounding order)."""
        from . import layer_ops

        blk = self.layers[layer]
        w_qkv, b_qkv, w_gu, _ = self._fused[layer]
        B, L, _ = h.shape
        D, Hq, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        ln = blk.input_layernorm
        qkv = torch.nn.functional.linear(layer_ops.rms_norm(h, ln.weight, ln.variance_epsilon), w_qkv, b_qkv)
        cos, sin = rope
        layer_ops.rope_(qkv, cos, sin, Hq + Hkv if rotate_keys else Hq, D)  # the q heads, then the k heads
        heads = qkv.view(B, L, Hq + 2 * Hkv, D).transpose(1, 2)  # [B, H, L, D] views
        q, k, v = heads[:, :Hq], heads[:, Hq:Hq + Hkv], heads[:, Hq + Hkv:]
        out = causal_attention(q, k, v, self.scale) if attend is None else attend(layer, q, k, v)
        # the residual adds ride in the products, in place (an out-of-place addmm first copies its input: two
        # extra kernels per layer); h is this forward's own residual stream (hidden_states made it)
        h2, o = h.view(B * L, -1), out.transpose(1, 2).reshape(B * L, -1)
        h2.addmm_(o, blk.self_attn.o_proj.weight.t())
        pn = blk.post_attention_layernorm
        act = layer_ops.silu_mul(torch.nn.functional.linear(layer_ops.rms_norm(h, pn.weight, pn.variance_epsilon),
                                                            w_gu))
        h2.addmm_(act.view(B * L, -1), blk.mlp.down_proj.weight.t())
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(h)

    def logits(self, h: torch.Tensor, rows=None) -> torch.Tensor:
        """``lm_head(norm(h))`` on selected rows: ``None`` all, an int n the last n, or an index tensor."""
        if isinstance(rows, int):
            h = h[:, h.shape[1] - rows:]
        elif rows is not None:
            h = h[:, rows]
        return self.lm.lm_head(self.inner.norm(h))

    # ---------------------------------------------------------------- the decoder forward
    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend | None = None,
                      layers: int | None = None, rotate_keys: bool = True) -> torch.Tensor:
        """Residual stream ``[B, L, hidden]`` after the first ``layers`` decoder layers (default all; before
        the final norm) for ``ids [B, L]`` at ``positions [L]`` (shared by the batch) or ``[B, L]``."""
        h = self.embed(ids)
        rope = self.rope(positions)
        fused = self._fast()
        layer = self._fused_layer if fused else self.layer
        if fused and (h._base is not None or not h.is_contiguous()):
            h = h.clone(memory_format=torch.contiguous_format)  # the fused layers add into the stream in place
        for l in range(self.n_layers if layers is None else layers):
            h = layer(l, h, rope, attend, rotate_keys)
        return h

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend | None = None,
                logits_rows=None, rotate_keys: bool = True) -> torch.Tensor:
        """Logits ``[B, R, vocab]`` of the whole decoder (``logits_rows`` as in :meth:`logits`)."""
        return self.logits(self.hidden_states(ids, positions, attend, rotate_keys=rotate_keys), logits_rows)

    # ---------------------------------------------------------------- HF's own (public) forward
    def new_hf_cache(self):
        """An empty transformers ``DynamicCache`` for :meth:`hf_forward`."""
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def hf_forward(self, ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
                   logits_rows: int = 1) -> torch.Tensor:
        """transformers' own forward (its attention implementation, ``cache`` a :meth:`new_hf_cache`):
        logits ``[B, logits_rows, vocab]``. The reference path (``full`` mode), public API only."""
        kw = {"logits_to_keep": logits_rows}
        if positions is not None:
            kw["position_ids"] = positions if positions.dim() == 2 else positions.view(1, -1)
        if cache is not None:
            kw[self._cache_kw] = cache
            kw["use_cache"] = True
        return self.model(input_ids=ids, **kw).logits

    @functools.cached_property
    def _cache_kw(self) -> str:
        params = inspect.signature(type(self.lm).forward).parameters
        return "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x


def _share(params) -> torch.Tensor:
    """One tensor holding ``params`` (concatenated on dim 0), each parameter's data becoming its view."""
    whole = torch.cat([p.detach() for p in params], 0)
    off = 0
    for p in params:
        n = p.shape[0]
        p.data = whole[off:off + n]
        off += n
    return whole


def adapter(model) -> ModelAdapter:
    """Shorthand for :meth:`ModelAdapter.of`."""
    return ModelAdapter.of(model)

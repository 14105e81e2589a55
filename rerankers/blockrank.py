"""BlockRank: in-context ranking read from attention, with block-sparse attention (Gupta et al., 2025).

Prompt (token blocks, built from ids so the block boundaries are exact)::

    block 0   instruction   <|im_start|>system ...<|im_end|><|im_start|>user\\n{INSTRUCTION}\\n
    block 1..N documents    "Passage: {doc text, truncated to doc_tokens}\\n"      (one block per document)
    block -1  query         "Query: {query}\\n{QUESTION}<|im_end|>\\n<|im_start|>assistant\\n{ANSWER_PREFIX}"

The query block ends where the model's answer (the best passage) would begin. Models without a chat
template get the same text without the chat markers.

Attention (block-sparse): each document sees the instruction and itself (causal); the query sees
everything. Positions: the instruction takes 0..I-1, *every* document starts at I (so a document's
keys and values do not depend on which other documents are ranked, nor on their order), the query
starts after the longest document. Consequently a document's K/V at every layer can be computed once
and reused (``kv_cache=``, see :class:`DocKVCache`; the attention_kv cache store can be plugged in by
anything with ``get(key)`` / ``put(key, value)``), and ranking N cached documents costs the query block only.

Relevance: at ``layer`` (0-based; a middle layer), the attention probabilities of the last
``query_rows`` query tokens are summed per document block (``attend(..., mass_rows=...)`` of
:mod:`attention_kv.kernels`), renormalised over the document tokens ("softmax over the documents'
tokens"), averaged over heads and rows. No decoding; layers above ``layer`` are never run, and at
``layer`` itself only the projections needed for the query rows' attention are used.

The forward is the model seam's decoder forward (:class:`attention_kv.model.ModelAdapter`: Llama,
Mistral, Qwen2) with an attention callback that routes each phase (instruction, batched documents,
query; or the flat full-causal baseline) to :func:`attention_kv.kernels.attend` (``attn="kernel"``;
Triton on CUDA, PyTorch reference otherwise) or to ``torch.nn.functional.scaled_dot_product_attention``
(``attn="sdpa"``). The block mass is always read through ``attend``.

Fine-tuning: :mod:`rerankers.finetune` (LM loss on the answer + the paper's contrastive loss on this
attention, through this same block-sparse forward, as a LoRA adapter). ``model_name`` may be the reranker
folder it writes: its base model with the adapter merged (a private copy, never the generator's), and its
``layer``, ``query_rows``, ``doc_tokens`` and ``fuse_weight`` (interpolation with the first-stage rank)::

    python -m blockrag.rerankers.finetune --kind blockrank --data ../shared/datasets/scifact \
        --candidates runs/scifact_rerank_cands.json --out runs/blockrank-ft
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from blockrag.models import LazyGenerator

from blockrag.retrievers.base import Hit

from .base import rank_items

INSTRUCTION = ("Below are passages, then a query. Find the passage that is most relevant to the query "
               "(the one that best supports or refutes it).")
QUESTION = "Which passage is most relevant to the query?"
ANSWER_PREFIX = "The most relevant passage is:"
SYSTEM = "You are a careful search engine that ranks passages by relevance."

class _Stop(Exception):
    """Raised inside the last needed layer: nothing above it is computed."""


# -- attention backends --------------------------------------------------------------------------------
def _kernel_attend():
    try:
        from blockrag.attention_kv.kernels import attend  # noqa: WPS433 - lazy: the kernel lands separately
        return attend
    except Exception:  # noqa: BLE001 - missing or half-written module: fall back to our reference
        return _attend_fallback


def _attend_fallback(q, k, v, *, q_start=None, q_block=None, k_block=None, scale=None, mass_rows=None,
                     n_blocks=None, backend="torch", **_):
    """Minimal reference of ``attention_kv.kernels.attend`` (used only when that module is absent)."""
    import torch

    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    G = Hq // k.shape[1]
    q_start = Lk - Lq if q_start is None else q_start
    scale = D ** -0.5 if scale is None else scale
    kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    qi = torch.arange(Lq, device=q.device)[:, None] + q_start
    kj = torch.arange(Lk, device=q.device)[None, :]
    vis = kj <= qi
    if q_block is not None and k_block is not None:
        qb, kb = q_block.long()[:, None], k_block.long()[None, :]
        vis = vis & ((kb == 0) | (qb < 0) | (kb == qb))
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~vis, float("-inf")), -1), nan=0.0)
    out = torch.matmul(p, vf).to(q.dtype)
    if mass_rows is None:
        return out
    nb = n_blocks if n_blocks is not None else (int(k_block.max()) + 2 if k_block is not None else 1)
    kb = torch.zeros(Lk, dtype=torch.long, device=q.device) if k_block is None else k_block.long()
    kb = torch.where(kb < 0, torch.full_like(kb, nb - 1), kb)
    rows = torch.as_tensor(mass_rows, device=q.device, dtype=torch.long)
    mass = torch.zeros(B, Hq, len(rows), nb, device=q.device)
    mass.index_add_(-1, kb, p[:, :, rows])
    return out, mass


def _sdpa_causal(q, k, v, q_start: int, scale: float):
    """Causal attention where query row i sits at key index q_start + i (bottom-right aligned if q_start = Lk - Lq)."""
    import torch
    import torch.nn.functional as F

    Lq, Lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_start == 0 and Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_start == Lk - Lq:
        from torch.nn.attention.bias import causal_lower_right

        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), scale=scale,
                                                  enable_gqa=gqa)
        except Exception:  # noqa: BLE001 - older torch: explicit mask below
            pass
    mask = torch.arange(Lk, device=q.device)[None, :] <= (torch.arange(Lq, device=q.device)[:, None] + q_start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@dataclass
class _Plan:
    """What the attention callback does in the current forward pass."""

    phase: str                      # "prefix" | "docs" | "query" | "flat"
    stop_layer: int                 # layer whose attention yields the mass (nothing above it runs)
    attn: str                       # "kernel" | "sdpa"
    prefix_kv: dict = field(default_factory=dict)   # layer -> (k, v) [1, Hkv, I, D]
    doc_kv: dict = field(default_factory=dict)      # layer -> (k, v) [Nb, Hkv, Ld, D]   (docs phase output)
    ctx_kv: dict = field(default_factory=dict)      # layer -> (k, v) [1, Hkv, T_ctx, D] (query phase input)
    mass_rows: Any = None           # query-block row indices whose mass is read
    k_block: Any = None             # block ids of the keys the mass rows see (query / flat phases)
    q_block: Any = None             # flat phase only: block ids of the queries (None = full causal)
    n_blocks: int | None = None
    mass_layers: tuple = ()         # extra layers whose mass is recorded too (layer sweep)
    mass: dict = field(default_factory=dict)        # layer -> [B, H, R, n_blocks]
    warned: bool = False
    run_through: bool = False       # query phase: compute the last layer's output too (fine-tuning LM loss)


def _blockrank_attention(plan: _Plan, scale: float, layer: int, query, key, value):
    """The seam's attention callback for one BlockRank phase: q/k/v arrive after RoPE, [B, H, L, D]."""
    import torch

    attend = _kernel_attend()
    last = layer == plan.stop_layer

    def safe_attend(*a, **kw):
        if plan.attn == "sdpa":                    # SDPA run: read the few mass rows with the reference
            return attend(*a, backend="torch", **kw) if attend is not _attend_fallback else attend(*a, **kw)
        try:
            return attend(*a, **kw)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot take this shape: reference path
            if not plan.warned:
                warnings.warn(f"attention kernel failed ({err!r}); using the PyTorch reference")
                plan.warned = True
            return _attend_fallback(*a, **kw) if attend is _attend_fallback else attend(*a, backend="torch", **kw)

    def out_attn(q, k, v, q_start):
        if plan.attn == "sdpa":
            return _sdpa_causal(q, k, v, q_start, scale)
        return safe_attend(q, k, v, q_start=q_start, scale=scale)

    def record_mass(k, v, q_rows_start):
        rows = plan.mass_rows
        r0 = int(rows[0])
        qr = query[:, :, r0:int(rows[-1]) + 1]
        q_block = torch.full((qr.shape[2],), -1, dtype=torch.int32, device=query.device)  # query rows see all
        _, mass = safe_attend(qr, k, v, q_start=q_rows_start + r0, q_block=q_block, k_block=plan.k_block, scale=scale,
                         mass_rows=torch.as_tensor(rows, device=query.device) - r0, n_blocks=plan.n_blocks)
        plan.mass[layer] = mass.float()

    if plan.phase == "prefix":
        plan.prefix_kv[layer] = (key, value)
        if last:
            raise _Stop
        out = out_attn(query, key, value, 0)
    elif plan.phase == "docs":
        plan.doc_kv[layer] = (key, value)
        if last:
            raise _Stop
        pk, pv = plan.prefix_kv[layer]
        n = key.shape[0]
        k = torch.cat([pk.expand(n, -1, -1, -1), key], dim=2)
        v = torch.cat([pv.expand(n, -1, -1, -1), value], dim=2)
        out = out_attn(query, k, v, pk.shape[2])
    elif plan.phase in ("query", "flat"):
        if plan.phase == "query":
            ck, cv = plan.ctx_kv[layer]
            k, v = torch.cat([ck, key], dim=2), torch.cat([cv, value], dim=2)
        else:
            k, v = key, value
        q_start = k.shape[2] - query.shape[2]
        if last or layer in plan.mass_layers:
            record_mass(k, v, q_start)
        if last and not plan.run_through:
            raise _Stop
        if plan.phase == "flat" and plan.q_block is not None:
            out = safe_attend(query, k, v, q_start=q_start, q_block=plan.q_block, k_block=plan.k_block, scale=scale)
        else:
            out = out_attn(query, k, v, q_start)
    else:  # pragma: no cover
        raise ValueError(plan.phase)
    return out


# -- KV reuse -------------------------------------------------------------------------------------------
class DocKVCache:
    """In-memory LRU of per-document K/V (all layers up to the scoring layer). Anything with the same
    ``get(key)`` / ``put(key, value)`` pair (e.g. the attention_kv store) can replace it."""

    def __init__(self, max_items: int = 2048):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        if key in self._d:
            self._d.move_to_end(key)
            self.hits += 1
            return self._d[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_items:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


# -- the reranker ---------------------------------------------------------------------------------------
@dataclass
class BlockPrompt:
    instruction: list[int]
    docs: list[list[int]]
    query: list[int]
    tail: int                       # how many trailing query tokens are "answer-side" rows


class BlockRankReranker(LazyGenerator):
    """``rerank(query, items, k)`` -> hits sorted by attention relevance (see module docstring)."""

    name = "blockrank"

    def __init__(self, model_name: str | None = None, layer: int | None = None, doc_tokens: int = 160,
                 query_tokens: int = 128, query_rows: str | int | None = None, attn: str = "auto",
                 doc_batch: int = 32, kv_cache: Any = None, model=None, tokenizer=None,
                 instruction: str = INSTRUCTION, question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX):
        from .finetune import folder_settings

        self.model_name = model_name
        self._model, self._tokenizer = model, tokenizer
        self.fuse_weight = None
        self._folder, settings = folder_settings(model_name, self.name)
        if self._folder is not None:           # a fine-tuned folder brings its own weights and settings
            self._model = self._tokenizer = None
            layer = settings.get("layer") if layer is None else layer
            query_rows = settings.get("query_rows") if query_rows is None else query_rows
            doc_tokens = settings.get("doc_tokens", doc_tokens)
            self.fuse_weight = settings.get("fuse_weight")
        self._layer = layer
        self.doc_tokens, self.query_tokens = doc_tokens, query_tokens
        self._query_rows = query_rows
        self.attn = attn
        self.doc_batch = doc_batch
        self.kv_cache = kv_cache
        self.instruction, self.question, self.answer_prefix = instruction, question, answer_prefix
        self._instr_cache: dict = {}
        self._chat = None

    # -- model ------------------------------------------------------------------------------------
    def _load(self):
        if self._model is None and self._folder is not None:
            from .finetune import load_folder

            self._model, self._tokenizer = load_folder(self._folder)
        return super()._load()

    @property
    def adapter(self):
        """The model seam over the loaded model (:class:`attention_kv.model.ModelAdapter`)."""
        from blockrag.attention_kv.model import ModelAdapter

        return ModelAdapter.of(self.model)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def layer(self) -> int:
        """Scoring layer (0-based). Default: the SciFact-train choice for SmolLM2-135M (layer 17 of 30, see
        eval/bench_blockrank), else the paper's relative depth (layer 20 of 32)."""
        if self._layer is None:
            tuned = _tuned(self.model.config)
            return tuned[0] if tuned else int(round(self.n_layers * 20 / 32))
        return self._layer + self.n_layers if self._layer < 0 else self._layer

    def _attn_mode(self) -> str:
        if self.attn in ("kernel", "sdpa"):
            return self.attn
        import torch

        # auto: the project kernel on CUDA (Triton); on CPU torch SDPA is faster than the reference path
        return "kernel" if torch.cuda.is_available() and next(self.model.parameters()).is_cuda else "sdpa"

    # -- prompt -------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _has_chat(self) -> bool:
        if self._chat is None:                  # get_vocab() builds the whole vocabulary dict: ask once
            self._chat = bool(getattr(self.tokenizer, "chat_template", None)) and \
                "<|im_start|>" in self.tokenizer.get_vocab()
        return self._chat

    def build_prompt(self, query: str, doc_texts: Sequence[str]) -> BlockPrompt:
        if self._has_chat():
            instr = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{self.instruction}\n\n")
            tail = f"\n{self.question}<|im_end|>\n<|im_start|>assistant\n{self.answer_prefix}"
        else:
            instr = f"{SYSTEM}\n{self.instruction}\n\n"
            tail = f"\n{self.question}\nAnswer: {self.answer_prefix}"
        key = (instr, self.doc_tokens)
        if key not in self._instr_cache:
            self._instr_cache[key] = (self._ids(instr), self._ids("Passage: "), self._ids("\n"))
        instr_ids, pre, nl = self._instr_cache[key]
        docs = [pre + self._ids(t)[:self.doc_tokens] + nl for t in doc_texts]
        tail_ids = self._ids(tail)
        query_ids = self._ids("Query: ") + self._ids(query)[:self.query_tokens] + tail_ids
        return BlockPrompt(instr_ids, docs, query_ids, len(tail_ids))

    @property
    def query_rows(self):
        """Which query-block rows give the relevance: "tail" (the answer-side tokens after the query text),
        "all", or the last n. Default (None): the SciFact-tuned choice for known models, else "tail"."""
        if self._query_rows is None:
            tuned = _tuned(self.model.config)
            return tuned[1] if tuned else "tail"
        return self._query_rows

    @query_rows.setter
    def query_rows(self, value):
        self._query_rows = value

    def _rows(self, prompt: BlockPrompt) -> list[int]:
        Lq = len(prompt.query)
        if self.query_rows == "all":
            return list(range(Lq))
        if self.query_rows == "tail":
            return list(range(Lq - prompt.tail, Lq))
        n = int(self.query_rows)
        return list(range(max(0, Lq - n), Lq))

    # -- public API ---------------------------------------------------------------------------------
    def rerank(self, query: str, items: Sequence, k: int | None = None,
               texts: Mapping[str, str] | Callable[[str], str] | None = None) -> list[Hit]:
        """``items``: chunks (``.id``/``.text``), ``(id, text)`` pairs, or hits/ids with ``texts`` to look them up."""
        from .finetune import fuse

        return rank_items(lambda q, docs, ids: fuse(self.score(q, docs, ids=ids), self.fuse_weight), query, items, k,
                          texts)

    def score(self, query: str, doc_texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        prompt = self.build_prompt(query, doc_texts)
        keys = None
        if self.kv_cache is not None:
            keys = [self._cache_key(prompt, d) for d in prompt.docs]
        mass = self.mass_ids(prompt, self.layer, cache_keys=keys)[self.layer]
        return relevance(mass, len(prompt.docs))

    def _cache_key(self, prompt: BlockPrompt, doc: list[int]) -> str:
        h = hashlib.sha256()
        h.update(str((getattr(self.model.config, "_name_or_path", ""), str(self._folder), self.layer,
                      self._attn_mode())).encode())                  # a fine-tuned folder: other K/V
        h.update(np.asarray(prompt.instruction, np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(doc, np.int64).tobytes())
        return h.hexdigest()[:32]

    # -- forward ------------------------------------------------------------------------------------
    def _run(self, plan: _Plan, ids, positions):
        """Run decoder layers 0..plan.stop_layer over ``ids`` [B, L] at ``positions`` [L] through the seam;
        returns the hidden states, or None when the plan stopped inside its last layer."""
        ad = self.adapter
        ad.check_length(int(positions.max()) + 1)
        attend = functools.partial(_blockrank_attention, plan, ad.scale)
        try:
            return ad.hidden_states(ids, positions, attend, layers=plan.stop_layer + 1)
        except _Stop:
            return None

    def mass_ids(self, prompt: BlockPrompt, layer: int, mass_layers: Sequence[int] = (),
                 cache_keys: Sequence[str] | None = None, rows: Sequence[int] | None = None,
                 return_hidden: bool = False):
        """Block-sparse forward. Returns {layer: mass [H, R, N + 2]} (block 0 instruction, 1..N docs, last = query).

        ``rows`` overrides the query rows read; ``return_hidden=True`` (fine-tuning) runs the query block
        through ``layer`` inclusive and also returns its hidden states [1, Lq, hidden] (before the final norm)."""
        import torch

        query_rows = None if rows is None else list(rows)
        model = self.model
        dev = next(model.parameters()).device
        stop = max([layer, *mass_layers])
        mode = self._attn_mode()
        I, N = len(prompt.instruction), len(prompt.docs)
        grad = torch.is_grad_enabled()
        # 1. instruction block
        plan = _Plan("prefix", stop, mode)
        self._run(plan, torch.tensor([prompt.instruction], device=dev), torch.arange(I, device=dev))
        prefix_kv = plan.prefix_kv
        # 2. documents, batched; each starts at position I; cached K/V reused
        pieces: list = []          # (doc indices, {layer: (k, v) [1, Hkv, tokens, D]}) in context order
        done = set()
        if cache_keys is not None:
            for i, key in enumerate(cache_keys):
                got = self.kv_cache.get(key)
                if got is not None:
                    pieces.append(([i], {l: got[l] for l in range(stop + 1)}))
                    done.add(i)
        todo = [i for i in range(N) if i not in done]
        pad = 0
        if self._tokenizer is not None and self._tokenizer.pad_token_id is not None:
            pad = self._tokenizer.pad_token_id
        for b0 in range(0, len(todo), self.doc_batch):
            rows = todo[b0:b0 + self.doc_batch]
            lens = [len(prompt.docs[i]) for i in rows]
            width = max(lens)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            for j, i in enumerate(rows):            # right padding: real tokens never see the pads (causal)
                x[j, :lens[j]] = torch.tensor(prompt.docs[i])
            plan = _Plan("docs", stop, mode, prefix_kv=prefix_kv)
            self._run(plan, x.to(dev), torch.arange(I, I + width, device=dev))
            valid = None
            if min(lens) < width:                   # drop the pads: flat indices of real tokens
                valid = torch.cat([torch.arange(j * width, j * width + n) for j, n in enumerate(lens)]).to(dev)
            flat = {}
            for l in range(stop + 1):
                kb, vb = plan.doc_kv[l]             # [Nb, Hkv, W, D] -> [1, Hkv, sum(lens), D]
                nb, hkv, w, d = kb.shape
                kf = kb.transpose(0, 1).reshape(hkv, nb * w, d)
                vf = vb.transpose(0, 1).reshape(hkv, nb * w, d)
                if valid is not None:
                    kf, vf = kf[:, valid], vf[:, valid]
                flat[l] = (kf.unsqueeze(0), vf.unsqueeze(0))
            pieces.append((rows, flat))
            if cache_keys is not None:
                for j, i in enumerate(rows):
                    n = lens[j]
                    self.kv_cache.put(cache_keys[i], [(plan.doc_kv[l][0][j:j + 1, :, :n].clone(),
                                                       plan.doc_kv[l][1][j:j + 1, :, :n].clone())
                                                      for l in range(stop + 1)])
        # 3. query block over [instruction | docs (context order) | itself]
        order = [i for idx, _ in pieces for i in idx]
        doc_lens = [len(d) for d in prompt.docs]
        ctx = {}
        for l in range(stop + 1):
            ctx[l] = (torch.cat([prefix_kv[l][0]] + [p[l][0] for _, p in pieces], dim=2),
                      torch.cat([prefix_kv[l][1]] + [p[l][1] for _, p in pieces], dim=2))
        Lq = len(prompt.query)
        rows = query_rows if query_rows is not None else self._rows(prompt)
        block = torch.cat([torch.zeros(I, dtype=torch.int32)]
                          + [torch.full((doc_lens[i],), i + 1, dtype=torch.int32) for i in order]
                          + [torch.full((Lq,), -1, dtype=torch.int32)]).to(dev)
        plan = _Plan("query", stop, mode, ctx_kv=ctx, mass_rows=rows, k_block=block, n_blocks=N + 2,
                     mass_layers=tuple(mass_layers), run_through=return_hidden)
        q0 = I + max(doc_lens)
        h = self._run(plan, torch.tensor([prompt.query], device=dev), torch.arange(q0, q0 + Lq, device=dev))
        mass = {l: m[0] for l, m in plan.mass.items()}
        return (mass, h) if return_hidden else mass

    def mass_full(self, prompt: BlockPrompt, layer: int, mass_layers: Sequence[int] = (),
                  block_sparse: bool = False) -> dict[int, Any]:
        """Baseline: one flat sequence [instruction | docs | query] at contiguous positions, full causal
        attention (``block_sparse=True``: the same flat sequence with the BlockRank visibility and
        BlockRank positions, through ``attend``'s block ids — a slow reference used by the tests)."""
        import torch

        dev = next(self.model.parameters()).device
        stop = max([layer, *mass_layers])
        I, N, Lq = len(prompt.instruction), len(prompt.docs), len(prompt.query)
        doc_lens = [len(d) for d in prompt.docs]
        ids = prompt.instruction + [t for d in prompt.docs for t in d] + prompt.query
        block = _block_ids(I, doc_lens, Lq, dev)
        if block_sparse:
            q0 = I + max(doc_lens)
            pos = torch.cat([torch.arange(I)] + [torch.arange(I, I + n) for n in doc_lens]
                            + [torch.arange(q0, q0 + Lq)]).to(dev)
        else:
            pos = torch.arange(len(ids), device=dev)
        T = len(ids)
        rows = [T - Lq + r for r in self._rows(prompt)]
        plan = _Plan("flat", stop, "kernel" if block_sparse else self._attn_mode(), mass_rows=rows, k_block=block,
                     q_block=block if block_sparse else None, n_blocks=N + 2, mass_layers=tuple(mass_layers))
        self._run(plan, torch.tensor([ids], device=dev), pos)
        return {l: m[0] for l, m in plan.mass.items()}


def _tuned(cfg):
    """(layer, query_rows) chosen on SciFact train for known models (SmolLM2-135M: 22 tune queries, top-100)."""
    if getattr(cfg, "model_type", "") == "llama" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30:
        return 17, "all"
    return None


def _block_ids(I: int, doc_lens: Sequence[int], Lq: int, device):
    import torch

    parts = [torch.zeros(I, dtype=torch.int32)]
    parts += [torch.full((n,), i + 1, dtype=torch.int32) for i, n in enumerate(doc_lens)]
    parts.append(torch.full((Lq,), -1, dtype=torch.int32))
    return torch.cat(parts).to(device)


def relevance(mass, n_docs: int) -> np.ndarray:
    """mass [H, R, N + 2] -> per-document relevance: renormalise over document tokens, mean over heads and rows."""
    docs = mass[..., 1:n_docs + 1].float()
    docs = docs / docs.sum(-1, keepdim=True).clamp_min(1e-30)
    return docs.mean(dim=(0, 1)).detach().cpu().numpy()

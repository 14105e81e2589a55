"""Multi-Head RAG: one embedding per attention head of a decoder, one vector index per head, voting.

Embeddings
----------
A text is run once through a causal LM (the offline SmolLM2-135M-Instruct by default; any Llama, Mistral
or Qwen2 decoder, run through the model seam :class:`attention_kv.model.ModelAdapter`). Two things are
read at the **last token** of the prompt:

* **per-head embeddings**: the input of ``o_proj`` of the chosen layer (``layer=-1``: the last one),
  i.e. the attention output that the seam's attention callback returns: the concatenation of the heads'
  attention outputs, ``[n_heads * head_dim]``; it is split into ``n_heads`` vectors of ``head_dim`` (9 x 64 for SmolLM2);
* **single embedding**: the model's final hidden state (after the final norm) at the last token
  (``pooling="last"``, the default) or its mean over the prompt tokens (``pooling="mean"``).

Every vector is L2-normalised and searched by inner product (cosine) in a
:class:`retrievers.vector_index.VectorIndex` (flat, exact) — one index per head, one per slice of the
single embedding (Split-RAG), one for the single embedding itself.

Prompt format (documents and queries share it, so the last token plays the same role for both)::

    Text: {text, truncated to max_doc_tokens / max_query_tokens tokens}
    In summary, this text is about

The text is truncated *before* the suffix is appended, so the last token is always " about".
No chat template and no BOS token (SmolLM2's tokenizer adds none).

Head weights and voting (Besta et al., Multi-Head RAG)
-----------------------------------------------------
``s_i = (mean L2 norm of head i's document embeddings) x (mean pairwise cosine distance among them)``.
The mean pairwise cosine similarity over all ordered pairs ``j != l`` is computed exactly, in O(n d):
``(||sum_j u_j||^2 - n) / (n (n - 1))`` for unit vectors ``u_j`` — no pair sampling is needed, and the
weights are recomputed exactly after every ``add`` / ``delete``.
At query time head ``i`` returns its top ``per_head_k`` (default: ``k``) documents; the document at rank
``r`` (0-based) gets ``s_i * 2**-r``; the final top-k is by total vote (ties: best single head score).

Modes: ``"mrag"`` (per-head voting), ``"split"`` (Split-RAG: the same voting over ``n_slices``
equal slices of the single embedding, weights computed the same way on the slices), ``"single"``
(plain cosine on the single embedding). One index holds all three; ``retrieve(..., mode=...)`` may
override the default mode per call, so they can be compared on one encoding pass.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from blockrag.attention_kv.model import causal_attention
from blockrag.models import LazyGenerator

from blockrag.retrievers.base import BatchFromSingle, Hit

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DOC_TEMPLATE = "Text: {text}\nIn summary, this text is about"
QUERY_TEMPLATE = "Text: {text}\nIn summary, this text is about"
MODES = ("mrag", "split", "single")


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(x, axis=-1)
    return (x / np.maximum(norms, 1e-12)[..., None]).astype(np.float32), norms.astype(np.float32)


def head_weights(norms: np.ndarray, units: np.ndarray) -> np.ndarray:
    """``s_i`` per head: mean L2 norm x mean pairwise cosine distance (exact, all pairs j != l).

    ``norms``: [n, H] raw norms; ``units``: [n, H, D] unit vectors. Returns [H] (zeros when n < 2).
    """
    n = units.shape[0]
    if n < 2:
        return np.zeros(units.shape[1], np.float32)
    total = units.astype(np.float64).sum(axis=0)                     # [H, D]
    mean_cos = ((total ** 2).sum(-1) - n) / (n * (n - 1))             # mean over ordered pairs j != l
    return (norms.astype(np.float64).mean(0) * (1.0 - mean_cos)).astype(np.float32)


def vote(head_hits: Sequence[Sequence[tuple[str, float]]], weights: Sequence[float], k: int) -> list[Hit]:
    """Multi-head voting: the document at rank r (0-based) in head i gets ``weights[i] * 2**-r``."""
    totals: dict[str, float] = {}
    best: dict[str, float] = {}
    for hits, w in zip(head_hits, weights):
        for rank, (doc_id, score) in enumerate(hits):
            totals[doc_id] = totals.get(doc_id, 0.0) + float(w) * 2.0 ** -rank
            best[doc_id] = max(best.get(doc_id, -np.inf), score)
    order = sorted(totals, key=lambda d: (-totals[d], -best[d], d))
    return [Hit(d, totals[d]) for d in order[:k]]


class HeadEncoder(LazyGenerator):
    """Runs a causal LM over prompts and returns per-head (o_proj input) and single embeddings."""

    def __init__(self, model_name: str | None = None, layers: Sequence[int] = (-1,), pooling: str = "last",
                 batch_size: int = 16, max_doc_tokens: int = 128, max_query_tokens: int = 256,
                 model=None, tokenizer=None, dtype=None, device: str | None = None):
        if pooling not in {"last", "mean"}:
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.model_name = model_name
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_doc_tokens, self.max_query_tokens = max_doc_tokens, max_query_tokens
        self._model, self._tokenizer = model, tokenizer
        self._dtype, self._device = dtype, device
        self._layers_req = list(layers)

    # -- lazy model --------------------------------------------------------------------------------
    @property
    def adapter(self):
        """The model seam over the loaded model."""
        from blockrag.attention_kv.model import ModelAdapter

        return ModelAdapter.of(self.model)

    def layer_index(self, layer: int) -> int:
        n = self.adapter.n_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} out of range for a model with {n} layers")
        return idx

    @property
    def layers(self) -> list[int]:
        return [self.layer_index(l) for l in self._layers_req]

    @property
    def n_heads(self) -> int:
        return self.adapter.n_heads

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    # -- prompts -----------------------------------------------------------------------------------
    def prompt_ids(self, text: str, kind: str = "doc") -> list[int]:
        tok = self.tokenizer
        template = DOC_TEMPLATE if kind == "doc" else QUERY_TEMPLATE
        budget = self.max_doc_tokens if kind == "doc" else self.max_query_tokens
        prefix, suffix = template.split("{text}")
        body = tok(text, add_special_tokens=False)["input_ids"][:budget]
        return (tok(prefix, add_special_tokens=False)["input_ids"] + body
                + tok(suffix, add_special_tokens=False)["input_ids"])

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], kind: str = "doc", progress: bool | None = None
               ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Returns ({layer: [n, H, D] per-head embeddings}, [n, hidden] single embeddings), unnormalised."""
        import torch
        from tqdm.auto import tqdm

        model, tok = self._load()
        ad = self.adapter
        layers = self.layers
        ids = [self.prompt_ids(t, kind) for t in texts]
        order = np.argsort([-len(x) for x in ids], kind="stable")   # length-sorted batches: little padding
        n, H, D = len(texts), self.n_heads, self.head_dim
        heads = {l: np.zeros((n, H, D), np.float32) for l in layers}
        single = np.zeros((n, self.hidden_size), np.float32)
        captured: dict[int, torch.Tensor] = {}
        wanted = set(layers)

        def attend(layer, q, k, v):  # plain causal attention; keep the per-head outputs (o_proj's input)
            out = causal_attention(q, k, v, ad.scale)
            if layer in wanted:
                captured[layer] = out
            return out

        device = ad.device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        show = progress if progress is not None else n > 4 * self.batch_size
        with torch.inference_mode(), tqdm(total=n, desc=f"mrag encode {kind}s", disable=not show) as bar:
            for start in range(0, n, self.batch_size):
                rows = order[start:start + self.batch_size]
                lens = [len(ids[r]) for r in rows]
                width = max(lens)
                x = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, r in enumerate(rows):        # right padding: causal rows never see the pads
                    x[j, :lens[j]] = torch.tensor(ids[r])
                    mask[j, :lens[j]] = 1
                ad.check_length(width)
                # right padding + causal attention: real tokens never see the pads, no mask needed
                h = ad.hidden_states(x.to(device), torch.arange(width, device=device), attend)
                last = torch.tensor(lens, device=device) - 1
                ar = torch.arange(len(rows), device=device)
                hidden = ad.final_norm(h).float()
                if self.pooling == "last":
                    s = hidden[ar, last]
                else:
                    m = mask.to(device).unsqueeze(-1).float()
                    s = (hidden * m).sum(1) / m.sum(1)
                single[rows] = s.cpu().numpy()
                for l in layers:  # [B, H, T, D] at each row's last token -> [B, H, D]
                    heads[l][rows] = captured[l][ar, :, last].float().cpu().numpy()
                bar.update(len(rows))
        return heads, single


class _Space:
    """One family of sub-embeddings (heads, or slices): unit vectors, norms, weights and one index each."""

    def __init__(self, n_sub: int, dim: int, index_kind: str = "flat"):
        self.n_sub, self.dim = n_sub, dim
        try:
            from blockrag.retrievers.vector_index import VectorIndex

            self.indexes = [VectorIndex(dim, kind=index_kind) for _ in range(n_sub)]
        except ImportError:  # no faiss (e.g. a bare GPU box): exact numpy search, not persisted
            log.warning("faiss not available: MRAG falls back to exact numpy search")
            self.indexes = [_NumpyIndex(self, i) for i in range(n_sub)]
        self.units = np.zeros((0, n_sub, dim), np.float32)
        self.norms = np.zeros((0, n_sub), np.float32)
        self.weights = np.zeros(n_sub, np.float32)

    def add(self, ids: list[str], raw: np.ndarray, rows: list[int]) -> None:
        units, norms = _unit(raw)
        self.units = np.concatenate([self.units, units])
        self.norms = np.concatenate([self.norms, norms])
        for i, index in enumerate(self.indexes):
            index.add(ids, units[:, i])

    def keep(self, mask: np.ndarray, deleted: list[str]) -> None:
        self.units, self.norms = self.units[mask], self.norms[mask]
        for index in self.indexes:
            index.delete(deleted)

    def refresh(self) -> None:
        self.weights = head_weights(self.norms, self.units)

    def search(self, q: np.ndarray, k: int) -> list[list[list[tuple[str, float]]]]:
        """q: [nq, n_sub, dim] -> per query, per sub-space, hits."""
        per_sub = [index.search(q[:, i], k) for i, index in enumerate(self.indexes)]
        return [[per_sub[i][j] for i in range(self.n_sub)] for j in range(len(q))]


class _NumpyIndex:
    """Exact inner-product search over one sub-space of a :class:`_Space` (fallback without faiss)."""

    def __init__(self, space: "_Space", sub: int):
        self.space, self.sub, self.ids = space, sub, []

    def add(self, ids, vectors) -> None:
        self.ids.extend(ids)

    def delete(self, ids) -> None:
        gone = set(ids)
        self.ids = [i for i in self.ids if i not in gone]

    def search(self, q: np.ndarray, k: int):
        mat = self.space.units[:, self.sub]
        scores = np.atleast_2d(q) @ mat.T
        out = []
        for row in scores:
            top = np.argsort(-row, kind="stable")[:k]
            out.append([(self.ids[j], float(row[j])) for j in top])
        return out

    def save(self, folder) -> None:
        raise RuntimeError("saving an MRAG index needs faiss (pip install faiss-cpu)")


class MRAGRetriever(BatchFromSingle):
    """Multi-head retriever; implements ``Retriever`` and ``Index`` (build/add/delete/save/load/manifest)."""

    def __init__(self, model_name: str | None = None, layer: int = -1, mode: str = "mrag", name: str | None = None,
                 pooling: str = "last", n_slices: int | None = None, per_head_k: int | None = None,
                 batch_size: int = 16, max_doc_tokens: int = 128, max_query_tokens: int = 256,
                 index_kind: str = "flat", model=None, tokenizer=None, encoder: HeadEncoder | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model_name = model_name
        self.layer, self.mode, self.pooling = layer, mode, pooling
        self.name = name or f"mrag-{mode}"
        self.n_slices, self.per_head_k, self.index_kind = n_slices, per_head_k, index_kind
        self.encoder = encoder or HeadEncoder(model_name, layers=(layer,), pooling=pooling, batch_size=batch_size,
                                              max_doc_tokens=max_doc_tokens, max_query_tokens=max_query_tokens,
                                              model=model, tokenizer=tokenizer)
        self.ids: list[str] = []
        self.heads: _Space | None = None
        self.slices: _Space | None = None
        self.single: _Space | None = None

    # -- Index -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def build(self, chunks: Sequence) -> "MRAGRetriever":
        self.ids, self.heads, self.slices, self.single = [], None, None, None
        self.add(chunks)
        return self

    def add(self, chunks: Sequence) -> None:
        chunks = list(chunks)
        if not chunks:
            return
        heads, single = self.encoder.encode([c.text for c in chunks], kind="doc")
        self.add_embeddings([c.id for c in chunks], heads[self.encoder.layer_index(self.layer)], single)

    def add_embeddings(self, ids: Sequence[str], heads: np.ndarray, single: np.ndarray) -> None:
        """Add precomputed embeddings (``heads`` [n, H, D], ``single`` [n, hidden]); replaces existing ids."""
        ids = [str(i) for i in ids]
        present = set(self.ids)
        replaced = [i for i in ids if i in present]
        if replaced:
            self._delete(replaced)
        if self.heads is None:
            n, H, D = heads.shape
            S = self.n_slices or H
            if single.shape[1] % S:
                raise ValueError(f"single embedding of {single.shape[1]} dims does not split into {S} slices")
            self.n_slices = S
            self.heads = _Space(H, D, self.index_kind)
            self.slices = _Space(S, single.shape[1] // S, self.index_kind)
            self.single = _Space(1, single.shape[1], self.index_kind)
        rows = list(range(len(self.ids), len(self.ids) + len(ids)))
        self.heads.add(ids, heads.astype(np.float32), rows)
        self.slices.add(ids, single.reshape(len(ids), self.n_slices, -1).astype(np.float32), rows)
        self.single.add(ids, single[:, None, :].astype(np.float32), rows)
        self.ids.extend(ids)
        self._refresh()

    def delete(self, chunk_ids: Sequence[str]) -> None:
        self._delete([str(c) for c in chunk_ids])
        self._refresh()

    def _delete(self, chunk_ids: list[str]) -> None:
        gone = set(chunk_ids)
        if not gone or self.heads is None:
            return
        mask = np.array([i not in gone for i in self.ids], dtype=bool)
        deleted = [i for i in self.ids if i in gone]
        for space in (self.heads, self.slices, self.single):
            space.keep(mask, deleted)
        self.ids = [i for i in self.ids if i not in gone]

    def _refresh(self) -> None:
        for space in (self.heads, self.slices, self.single):
            if space is not None:
                space.refresh()

    @property
    def head_weights(self) -> np.ndarray:
        return self.heads.weights if self.heads is not None else np.zeros(0, np.float32)

    @property
    def slice_weights(self) -> np.ndarray:
        return self.slices.weights if self.slices is not None else np.zeros(0, np.float32)

    # -- Retriever ---------------------------------------------------------------------------------
    def encode_queries(self, queries: Sequence[str], progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        heads, single = self.encoder.encode(list(queries), kind="query", progress=progress)
        return heads[self.encoder.layer_index(self.layer)], single

    def search_encoded(self, heads: np.ndarray, single: np.ndarray, k: int = 10, mode: str | None = None
                       ) -> list[list[Hit]]:
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.heads is None or not self.ids:
            return [[] for _ in range(len(single))]
        per = self.per_head_k or k
        if mode == "single":
            res = self.single.search(single[:, None, :].astype(np.float32), k)
            return [[Hit(d, s) for d, s in r[0]] for r in res]
        if mode == "mrag":
            space, q = self.heads, heads
        else:
            space, q = self.slices, single.reshape(len(single), self.n_slices, -1)
        q, _ = _unit(q.astype(np.float32))
        return [vote(r, space.weights, k) for r in space.search(q, per)]

    def retrieve(self, query: str, k: int = 10, mode: str | None = None) -> list[Hit]:
        return self.retrieve_batch([query], k, mode=mode)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10, mode: str | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        heads, single = self.encode_queries(queries)
        return self.search_encoded(heads, single, k, mode)

    # -- persistence -------------------------------------------------------------------------------
    def manifest(self) -> dict:
        from blockrag.models import model_revision, resolve_generator, tokenizer_hash

        enc = self.encoder
        try:
            revision = model_revision(resolve_generator(self.model_name))
        except Exception:  # noqa: BLE001 - a model passed in as an object may have no resolvable name
            revision = None
        return {
            "kind": "mrag", "name": self.name, "format_version": FORMAT_VERSION,
            "model": self.model_name or "default-generator",
            "revision": revision,
            "tokenizer_hash": tokenizer_hash(enc.tokenizer),
            "layer": enc.layer_index(self.layer), "mode": self.mode, "pooling": self.pooling,
            "n_heads": self.heads.n_sub if self.heads else enc.n_heads,
            "head_dim": self.heads.dim if self.heads else enc.head_dim,
            "n_slices": self.n_slices, "dim": self.single.dim if self.single else enc.hidden_size,
            "max_doc_tokens": enc.max_doc_tokens, "max_query_tokens": enc.max_query_tokens,
            "doc_template": DOC_TEMPLATE, "query_template": QUERY_TEMPLATE,
            "per_head_k": self.per_head_k, "index_kind": self.index_kind, "count": len(self.ids),
            "head_weights": [float(w) for w in self.head_weights],
        }

    def save(self, folder: str | Path) -> None:
        from blockrag.retrievers.vector_index import atomic_folder_write

        manifest = self.manifest()

        def write(tmp: Path):
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (tmp / "ids.json").write_text(json.dumps(self.ids))
            if self.heads is None:
                return
            for tag, space in (("head", self.heads), ("slice", self.slices), ("single", self.single)):
                np.savez(tmp / f"{tag}_stats.npz", units=space.units, norms=space.norms)
                for i, index in enumerate(space.indexes):
                    index.save(tmp / f"{tag}_{i}")

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path, model_name: str | None = None, model=None, tokenizer=None,
             **kwargs) -> "MRAGRetriever":
        """Open a saved index; fails fast when ``model_name`` or the tokenizer differs from the saved one."""
        from blockrag.retrievers.vector_index import VectorIndex
        from blockrag.models import tokenizer_hash

        folder = Path(folder)
        man = json.loads((folder / "manifest.json").read_text())
        if man.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: MRAG index format {man.get('format_version')}, expected {FORMAT_VERSION}")
        saved_model = None if man["model"] == "default-generator" else man["model"]
        if model_name is not None and model_name != saved_model:
            raise ValueError(f"{folder}: index was built with model {man['model']!r}, not {model_name!r}")
        self = cls(saved_model, layer=man["layer"], mode=kwargs.pop("mode", man["mode"]), name=man["name"],
                   pooling=man["pooling"], n_slices=man["n_slices"], per_head_k=man["per_head_k"],
                   max_doc_tokens=man["max_doc_tokens"], max_query_tokens=man["max_query_tokens"],
                   index_kind=man["index_kind"], model=model, tokenizer=tokenizer, **kwargs)
        if tokenizer is None:
            from blockrag.models import load_tokenizer

            tokenizer = load_tokenizer(saved_model)
        if tokenizer_hash(tokenizer) != man["tokenizer_hash"]:
            raise ValueError(f"{folder}: tokenizer differs from the one the index was built with")
        self.ids = json.loads((folder / "ids.json").read_text())
        if (folder / "head_stats.npz").exists():
            spaces = {}
            for tag in ("head", "slice", "single"):
                stats = np.load(folder / f"{tag}_stats.npz")
                n_sub, dim = stats["units"].shape[1:]
                space = _Space.__new__(_Space)
                space.n_sub, space.dim = int(n_sub), int(dim)
                space.units, space.norms = stats["units"], stats["norms"]
                space.indexes = [VectorIndex.load(folder / f"{tag}_{i}") for i in range(space.n_sub)]
                space.refresh()
                spaces[tag] = space
            self.heads, self.slices, self.single = spaces["head"], spaces["slice"], spaces["single"]
        return self

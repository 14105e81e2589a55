"""The one table of names: retrievers, rerankers and index kinds, shared by the CLI, Pipeline, Collection and eval.

    from blockrag import registry
    registry.retriever_names()                   # ['bm25', 'dense', 'hybrid', ..., 'ppr']
    r = registry.retriever(collection, "local")  # a graph-RAG mode, like `blockrag query --mode local`
    rr = registry.reranker("blockrank")          # loads its LLM lazily (shared per process)
    cls = registry.index_class("dense")

Retriever names: ``bm25``, ``dense``, ``mrag``, ``graph`` (the index of that name, searched directly),
``hybrid`` (reciprocal-rank fusion of bm25 + dense), ``score-fusion`` (normalised score fusion of the
same), the graph modes ``local``, ``global``, ``mix``, ``naive``, ``path``, ``ppr`` and ``graph-hybrid``
(every graph mode also as ``graph-MODE``), and any index name of the collection (e.g. a second dense index
built with ``build_index("dense", name="dense-e5", ...)``). Unknown names raise :class:`UnknownName`, whose
message is one line listing the known names.

New entries are one call (at import of this module, or from a plugin): :func:`register_retriever`,
:func:`register_reranker`, :func:`register_index`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["RegistryError", "UnknownName", "MissingIndex", "RetrieverSpec", "RerankerSpec", "retriever",
           "reranker", "retriever_names", "reranker_names", "index_kinds", "index_class", "retriever_spec",
           "reranker_spec", "register_retriever", "register_reranker", "register_index", "graph_mode_name",
           "RerankerWarning"]


class RegistryError(ValueError):
    """A name the registry cannot serve; ``str(err)`` is one line fit for a command-line error."""


class UnknownName(RegistryError):
    """An unknown retriever, reranker or index kind."""


class MissingIndex(RegistryError):
    """A known retriever whose index is not in the collection."""


def _load(target: str | Callable) -> Callable:
    """``"module:attr"`` -> the attribute (imported on first use, so optional extras stay optional)."""
    if callable(target):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _one_of(what: str, name: str, known) -> UnknownName:
    return UnknownName(f"unknown {what} {name!r}; choose from {', '.join(known)}")


# ------------------------------------------------------------------------------------------- indexes
# kind -> "module:Class"; each class has build(chunks), add, delete, save(folder), load(folder), manifest().
_INDEX_KINDS: dict[str, str | Callable] = {
    "bm25": "blockrag.retrievers.bm25:BM25Retriever",
    "dense": "blockrag.retrievers.dense:DenseRetriever",
    "mrag": "blockrag.retrievers.mrag:MRAGRetriever",
    "graph": "blockrag.graph.index:GraphIndex",
    "kv": "blockrag.attention_kv.index:KVIndex",
}
INDEX_KINDS = _INDEX_KINDS  # read-only view for callers that test membership


def register_index(kind: str, target: str | Callable) -> None:
    """Add an index kind (``"module:Class"`` or the class)."""
    _INDEX_KINDS[kind] = target


def index_kinds() -> list[str]:
    """Index kinds a collection can build (``blockrag index --index KIND``)."""
    return list(_INDEX_KINDS)


def index_class(kind: str):
    """The class of index ``kind``."""
    if kind not in _INDEX_KINDS:
        raise _one_of("index kind", kind, sorted(_INDEX_KINDS))
    return _load(_INDEX_KINDS[kind])


# ---------------------------------------------------------------------------------------- retrievers
@dataclass(frozen=True)
class RetrieverSpec:
    """A named retriever: ``build(collection, **opts)``; ``needs``: index names it reads (all of them, or with
    ``any_of`` at least one); ``parts``: the retriever names a fusion combines (eval reports them beside it)."""

    name: str
    build: Callable[..., Any]
    needs: tuple[str, ...] = ()
    any_of: bool = False
    parts: tuple[str, ...] = ()
    help: str = ""


_RETRIEVERS: dict[str, RetrieverSpec] = {}
_ALIASES: dict[str, str] = {}


def register_retriever(name: str, build: Callable[..., Any], needs: tuple[str, ...] = (), any_of: bool = False,
                       parts: tuple[str, ...] = (), help: str = "", aliases: tuple[str, ...] = ()) -> None:
    """Add a retriever name; ``build(collection, **opts)`` returns an object with ``retrieve``/``retrieve_batch``."""
    _RETRIEVERS[name] = RetrieverSpec(name, build, tuple(needs), any_of, tuple(parts), help)
    for alias in aliases:
        _ALIASES[alias] = name


def retriever_names(aliases: bool = False) -> list[str]:
    """The registered retriever names (``aliases=True`` adds e.g. ``graph-local``); any index name works too."""
    return list(_RETRIEVERS) + (sorted(_ALIASES) if aliases else [])


def retriever_spec(name: str) -> RetrieverSpec:
    """The entry of a registered name or alias (not of a bare index name)."""
    spec = _RETRIEVERS.get(_ALIASES.get(name, name))
    if spec is None:
        raise _one_of("retriever", name, retriever_names())
    return spec


def retriever(collection, name: str = "hybrid", **opts):
    """The retriever called ``name`` over ``collection`` (options go to its constructor)."""
    canonical = _ALIASES.get(name, name)
    spec = _RETRIEVERS.get(canonical)
    if spec is None:
        index = collection.indexes.get(name)
        if index is not None and hasattr(index, "retrieve"):
            return index
        extra = [n for n, i in collection.indexes.items() if n not in _RETRIEVERS and hasattr(i, "retrieve")]
        if index is not None:
            raise RegistryError(f"index {name!r} is not a retriever; choose from "
                                f"{', '.join(retriever_names() + extra)}")
        raise _one_of("retriever", name, retriever_names() + extra)
    have = [n for n in spec.needs if n in collection.indexes]
    if spec.needs and (not have if spec.any_of else len(have) < len(spec.needs)):
        missing = [n for n in spec.needs if n not in collection.indexes]
        want = " and/or ".join(spec.needs) if spec.any_of else " and ".join(missing)
        built = ", ".join(sorted(collection.indexes)) or "none"
        raise MissingIndex(f"retriever {name!r} needs a {want} index, which this store does not have "
                           f"(it has: {built}); add one with `blockrag index PATH --index {missing[0]}`")
    return spec.build(collection, **opts)


def _index_retriever(kind: str):
    def build(collection, model: str | None = None, **opts):
        index = collection.index(kind, model=model)
        if not opts:
            return index
        if not hasattr(index, "retriever"):
            raise RegistryError(f"retriever {kind!r} takes no options (got {', '.join(sorted(opts))})")
        return index.retriever(**opts)
    return build


def _fusion(fuse: str):
    def build(collection, rrf_k: int = 60, weights=None, **opts):
        from blockrag.retrievers import fusion

        parts = [collection.index(n) for n in ("bm25", "dense") if n in collection.indexes]
        if fuse == "rrf":
            return fusion.RRF(parts, k=rrf_k, weights=weights, **opts)
        return fusion.ScoreFusion(parts, weights=weights, **opts)
    return build


def _graph(mode: str):
    def build(collection, index_name: str = "graph", **opts):
        from blockrag.graph import retriever_for  # deferred: spaCy and networkx are optional

        return retriever_for(collection, mode=mode, index_name=index_name, **opts)
    return build


GRAPH_MODES = ("local", "global", "hybrid", "mix", "naive", "path", "ppr")  # = blockrag.graph.query.MODES


def graph_mode_name(mode: str) -> str:
    """The retriever name of a graph mode (``hybrid`` -> ``graph-hybrid``; the others are their own name)."""
    if mode not in GRAPH_MODES:
        raise _one_of("graph mode", mode, GRAPH_MODES)
    return "graph-hybrid" if mode == "hybrid" else mode


register_retriever("bm25", _index_retriever("bm25"), needs=("bm25",), help="BM25 over the bm25 index")
register_retriever("dense", _index_retriever("dense"), needs=("dense",), help="dense vectors (faiss)")
register_retriever("hybrid", _fusion("rrf"), needs=("bm25", "dense"), any_of=True, parts=("bm25", "dense"),
                   help="reciprocal-rank fusion of bm25 + dense")
register_retriever("score-fusion", _fusion("score"), needs=("bm25", "dense"), any_of=True,
                   parts=("bm25", "dense"), help="normalised score fusion of bm25 + dense")
register_retriever("mrag", _index_retriever("mrag"), needs=("mrag",), help="multi-head attention embeddings")
register_retriever("graph", _index_retriever("graph"), needs=("graph",), help="the graph index's default mode")
for _mode in GRAPH_MODES:
    register_retriever(graph_mode_name(_mode), _graph(_mode), needs=("graph",), help=f"graph RAG, {_mode} mode",
                       aliases=() if _mode == "hybrid" else (f"graph-{_mode}",))


# ----------------------------------------------------------------------------------------- rerankers
@dataclass(frozen=True)
class RerankerSpec:
    """A named reranker: ``target`` is ``"module:Class"`` (or a factory); ``llm``: it runs the generator LLM,
    so it takes ``model_name`` (and ``model``/``tokenizer``) and shares the process's loaded copy."""

    name: str
    target: str | Callable
    llm: bool = True
    help: str = ""
    warning: str = ""  # printed when chosen: a measured loss on the project's benchmark (see eval beir --rerank)


_RERANKERS: dict[str, RerankerSpec] = {}


def register_reranker(name: str, target: str | Callable, llm: bool = True, help: str = "",
                      warning: str = "") -> None:
    """Add a reranker name; ``target(**opts)`` returns an object with ``rerank(query, chunks, k)``;
    ``warning`` (a measured loss, say) is shown whenever the name is chosen."""
    _RERANKERS[name] = RerankerSpec(name, target, llm, help, warning)


def reranker_names() -> list[str]:
    """The registered reranker names."""
    return list(_RERANKERS)


def reranker_spec(name: str) -> RerankerSpec:
    if name not in _RERANKERS:
        raise _one_of("reranker", name, reranker_names())
    return _RERANKERS[name]


def reranker(name: str, **opts):
    """The reranker called ``name`` (options go to its constructor, e.g. ``model_name``)."""
    spec = reranker_spec(name)
    if spec.warning:
        import warnings

        warnings.warn(f"reranker {name!r}: {spec.warning}", RerankerWarning, stacklevel=2)
    return _load(spec.target)(**opts)


class RerankerWarning(UserWarning):
    """A reranker whose measured gain on the project's benchmark is negative was chosen."""


# Measured on SciFact train's held-back half (405 queries, hybrid top-20; eval/results/blockrank_ft_scifact.json):
# zero-shot both lower the first stage, and the fine-tuned BlockRank gains only when fused with the first-stage
# rank; so neither is a default and choosing one warns.
register_reranker("blockrank", "blockrag.rerankers.blockrank:BlockRankReranker",
                  help="relevance read from in-context attention (one forward for all candidates)",
                  warning="with the default model (SmolLM2-135M, zero-shot) it lowered SciFact train nDCG@10: "
                          "0.704 -> 0.485 over hybrid top-20 (held-back half, 405 queries). Fine-tuned "
                          "(--rerank-model blockrank-scifact, fused with the first-stage rank) 0.704 -> 0.712 "
                          "(+0.008, 95% CI +0.001..+0.015); its attention score alone 0.545")
register_reranker("pointwise", "blockrag.rerankers.pointwise:PointwiseReranker",
                  help="LLM yes/no judgement per candidate",
                  warning="with the default model (SmolLM2-135M, zero-shot) it lowered SciFact train nDCG@10: "
                          "0.708 -> 0.301 over hybrid top-20 (20 queries), 0.337 -> 0.217 over bm25 top-10 "
                          "(15 queries); no fine-tuned pointwise model has been measured")
register_reranker("cross-encoder", "blockrag.rerankers.cross_encoder:CrossEncoderReranker", llm=False,
                  help="a sentence-transformers CrossEncoder (model_name or BLOCKRAG_CROSS_ENCODER; none ships)")

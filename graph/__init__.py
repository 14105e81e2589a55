"""Graph RAG: entity/relation extraction, an incremental networkx graph store, LightRAG query modes,
PathRAG paths and HippoRAG-style personalized PageRank; every mode is a retriever.

    from blockrag.graph import GraphIndex, GraphRetriever
    index = GraphIndex()              # spaCy extractor (regex fallback), all-MiniLM-L6-v2 vectors
    index.build(chunks)               # or index.add(chunks) / index.delete(chunk_ids)
    hits = GraphRetriever(index, mode="ppr").retrieve("who founded ...", k=10)
"""
from .extract import Entity, Extractor, RegexExtractor, Relation, SpacyExtractor, default_extractor, normalise_name
from .index import BuildReport, GraphIndex, HashEmbedder
from .query import MODES, GraphContext, GraphRetriever

__all__ = ["Entity", "Relation", "Extractor", "SpacyExtractor", "RegexExtractor", "default_extractor",
           "normalise_name", "GraphIndex", "BuildReport", "HashEmbedder", "GraphRetriever", "GraphContext", "MODES",
           "retriever_for"]


def retriever_for(collection, mode: str = "ppr", index_name: str = "graph", **kwargs) -> GraphRetriever:
    """A graph-mode retriever over a Collection's graph index. Names map to modes in one place,
    :mod:`blockrag.registry` (``registry.retriever(collection, "local")``, ``--mode local``, ``Pipeline``)."""
    return GraphRetriever(collection.index(index_name), mode=mode, collection=collection, **kwargs)

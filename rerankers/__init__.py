"""Rerankers: BlockRank (relevance read from block-sparse in-context attention) and a pointwise LLM baseline.

    from blockrag.rerankers import BlockRankReranker
    hits = BlockRankReranker().rerank(query, chunks, k=10)
"""
from .blockrank import BlockRankReranker, DocKVCache
from .pointwise import PointwiseReranker

__all__ = ["BlockRankReranker", "DocKVCache", "PointwiseReranker"]

"""Rerankers: BlockRank (relevance read from block-sparse in-context attention), a pointwise LLM baseline, and a
sentence-transformers cross-encoder (for users who have one).

    from blockrag.rerankers import BlockRankReranker
    hits = BlockRankReranker().rerank(query, chunks, k=10)
"""
from .blockrank import BlockRankReranker, DocKVCache
from .cross_encoder import CrossEncoderReranker
from .pointwise import PointwiseReranker

__all__ = ["BlockRankReranker", "CrossEncoderReranker", "DocKVCache", "PointwiseReranker"]

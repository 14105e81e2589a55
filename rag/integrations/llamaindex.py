"""A LlamaIndex retriever over a :class:`blockrag.Collection` (``pip install blockrag[llamaindex]``).

    from blockrag.integrations.llamaindex import BlockragRetriever

    retriever = BlockragRetriever(collection, retriever="hybrid", k=4)
    for hit in retriever.retrieve("Who founded the bank?"):      # NodeWithScore
        hit.score, hit.node.metadata["doc_id"], hit.node.get_content()

It plugs into LlamaIndex's query engines (``RetrieverQueryEngine.from_args(retriever, llm=...)``).
"""
from __future__ import annotations

import asyncio

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode


class BlockragRetriever(BaseRetriever):
    """Nodes (``TextNode``, id = chunk id) with metadata ``source``, ``doc_id``, ``chunk_id``, ``title``,
    ``position``, ``rank``, and the retriever's score."""

    def __init__(self, collection, retriever: str = "hybrid", k: int = 4, reranker: str | None = None, **kwargs):
        from blockrag.pipeline import Pipeline

        self._collection, self._spec = collection, (retriever, k, reranker)
        self._pipeline = Pipeline(collection, retriever, k=k, reranker=reranker)
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        from blockrag.pipeline import Pipeline

        refresh = getattr(self._collection, "refresh", None)
        if refresh is not None and refresh():  # reloaded indexes: the pipeline held the previous ones
            retriever, k, reranker = self._spec
            self._pipeline = Pipeline(self._collection, retriever, k=k, reranker=reranker)
        retrieval = self._pipeline.retrieve(query_bundle.query_str, self._spec[1])
        docs, out = {}, []
        for p in retrieval.passages:
            if p.doc_id not in docs:
                docs[p.doc_id] = self._collection.store.document(p.doc_id)
            doc = docs[p.doc_id]
            meta = {**p.chunk.metadata, "doc_id": p.doc_id, "chunk_id": p.chunk_id, "position": p.chunk.position,
                    "rank": p.rank, "title": doc.title if doc else p.chunk.metadata.get("title", ""),
                    "source": (doc.metadata.get("source") if doc else None) or p.doc_id}
            node = TextNode(id_=p.chunk_id, text=p.text, metadata=meta)
            out.append(NodeWithScore(node=node, score=float(p.score)))
        return out

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)

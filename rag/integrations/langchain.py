"""LangChain adapters: a retriever over a Collection, and the cached generator as a Runnable.

    from blockrag.integrations.langchain import BlockragRetriever, CachedPrompt, CachedGenerator

    retriever = BlockragRetriever(collection=collection, retriever="hybrid", k=4)
    docs = retriever.invoke("Who founded the bank?")          # metadata: source, doc_id, chunk_id, score, ...

    chain = {"documents": retriever, "question": RunnablePassthrough()} | CachedPrompt() | CachedGenerator(collection)
    chain.invoke("Who founded the bank?")                     # answered from the passages' stored KV caches

``CachedPrompt`` renders a normal prompt (so any LangChain LLM or chat model can stand in for
``CachedGenerator``), and also carries the question and the retrieved passages, which is what lets
``CachedGenerator`` reuse their precomputed KV caches instead of prefilling the prompt's text.
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document as LCDocument
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict, PrivateAttr

from blockrag.documents import Chunk, to_langchain

DEFAULT_TEMPLATE = "Answer the question from the passages.\n\n{passages}\n\nQuestion: {question}\nAnswer:"


class BlockragRetriever(BaseRetriever):
    """A LangChain retriever over a :class:`blockrag.Collection` (through :class:`blockrag.Pipeline`, so a
    reranker given by name works too). Each Document carries metadata ``source`` (the document's own
    ``source``, e.g. its file, else its id), ``doc_id``, ``chunk_id``, ``score``, ``rank``, ``title``,
    ``position``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    collection: Any
    retriever: str = "hybrid"
    k: int = 4
    reranker: str | None = None
    _pipeline: Any = PrivateAttr(default=None)

    def _pipe(self):
        if self._pipeline is None:
            from blockrag.pipeline import Pipeline

            self._pipeline = Pipeline(self.collection, self.retriever, k=self.k, reranker=self.reranker)
        return self._pipeline

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[LCDocument]:
        refresh = getattr(self.collection, "refresh", None)
        if refresh is not None and refresh():
            self._pipeline = None  # the indexes were reloaded: the pipeline holds the previous ones
        retrieval = self._pipe().retrieve(query, self.k)
        out, docs = [], {}
        for passage in retrieval.passages:
            lc = to_langchain(passage)
            if passage.doc_id not in docs:
                docs[passage.doc_id] = self.collection.store.document(passage.doc_id)
            doc = docs[passage.doc_id]
            if doc is not None:
                lc.metadata["title"] = doc.title
                if doc.metadata.get("source"):
                    lc.metadata["source"] = doc.metadata["source"]
            out.append(lc)
        return out

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[LCDocument]:
        # retrieval is CPU-bound (BM25 scoring, an embedding): off the event loop
        return await asyncio.to_thread(self._get_relevant_documents, query,
                                       run_manager=run_manager.get_sync())


def format_passages(documents: list[LCDocument]) -> str:
    """``[1] title\\ntext`` blocks, numbered as they were retrieved."""
    parts = []
    for i, d in enumerate(documents, 1):
        title = d.metadata.get("title") or d.metadata.get("doc_id") or ""
        parts.append(f"[{i}] {title}\n{d.page_content}".strip())
    return "\n\n".join(parts)


class CachedPromptValue(PromptValue):
    """A prompt (text / one human message, for any LLM) that also carries the question and its passages."""

    text: str
    question: str
    documents: list[LCDocument]

    def to_string(self) -> str:
        return self.text

    def to_messages(self) -> list[BaseMessage]:
        return [HumanMessage(content=self.text)]


class CachedPrompt(Runnable):
    """``{"question": str, "documents": [Document]}`` (``context`` is accepted for ``documents``) ->
    :class:`CachedPromptValue`; ``template`` has ``{passages}`` and ``{question}``."""

    def __init__(self, template: str = DEFAULT_TEMPLATE):
        self.template = template

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs) -> CachedPromptValue:
        if not isinstance(input, dict) or "question" not in input:
            raise TypeError("CachedPrompt takes {'question': str, 'documents': [Document]}")
        documents = list(input.get("documents", input.get("context")) or [])
        question = str(input["question"])
        text = self.template.format(passages=format_passages(documents), question=question)
        return CachedPromptValue(text=text, question=question, documents=documents)


class CachedGenerator(Runnable):
    """The cached generator as a Runnable: input a :class:`CachedPromptValue` or a
    ``{"question", "documents"}`` dict (answered over the passages' KV caches, looked up by ``chunk_id``
    in ``collection``; passages from elsewhere are encoded on the fly), or a plain string / PromptValue
    (answered as a question without passages). Output: the answer text; ``stream`` yields text pieces.

    ``generator``: a :class:`blockrag.Generator`; default: the collection's ``kv`` index's. One generation at
    a time per Generator: calls are serialised by a lock (``batch`` works, it is not faster)."""

    def __init__(self, collection=None, generator=None, mode: str = "turbo", max_new_tokens: int = 64):
        import threading

        if generator is None:
            if collection is None or "kv" not in collection.indexes:
                raise ValueError("CachedGenerator needs a generator, or a collection with a kv index")
            generator = collection.index("kv").generator()
        self.collection, self.generator = collection, generator
        self.mode, self.max_new_tokens = mode, max_new_tokens
        self._lock = threading.Lock()

    def _question_and_chunks(self, input) -> tuple[str, list]:
        if isinstance(input, CachedPromptValue):
            return input.question, self._chunks(input.documents)
        if isinstance(input, dict):
            return str(input["question"]), self._chunks(list(input.get("documents", input.get("context")) or []))
        if isinstance(input, PromptValue):
            return input.to_string(), []
        if isinstance(input, str):
            return input, []
        raise TypeError(f"CachedGenerator cannot answer a {type(input).__name__}")

    def _chunks(self, documents: list[LCDocument]) -> list:
        ids = [d.metadata.get("chunk_id") for d in documents]
        stored = {}
        if self.collection is not None and any(ids):
            stored = {c.id: c for c in self.collection.get_chunks([i for i in ids if i])}
        out = []
        for i, (cid, d) in enumerate(zip(ids, documents)):
            if cid in stored:
                out.append(stored[cid])
            else:  # not from this store: its KV cache is computed (and kept) on first use
                tokens = self.generator.tokenizer.encode(d.page_content, add_special_tokens=False)
                out.append(Chunk(id=cid or f"lc-{i}", doc_id=str(d.metadata.get("doc_id", d.id or i)),
                                 position=int(d.metadata.get("position", 0)), text=d.page_content,
                                 token_ids=tokens))
        return out

    def invoke(self, input, config: RunnableConfig | None = None, **kwargs) -> str:
        return "".join(self.stream(input, config, **kwargs)).strip()

    def stream(self, input, config: RunnableConfig | None = None, **kwargs) -> Iterator[str]:
        question, chunks = self._question_and_chunks(input)
        with self._lock:
            pieces = self.generator.generate(question, chunks, mode=kwargs.get("mode", self.mode),
                                             max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
                                             stream=True)
            yield from pieces

    async def ainvoke(self, input, config: RunnableConfig | None = None, **kwargs) -> str:
        return await asyncio.to_thread(self.invoke, input, config, **kwargs)

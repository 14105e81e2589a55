"""A LangChain chain over a blockrag store: retriever -> prompt -> the cached generator.

    python -m examples.langchain_qa --store .blockrag/store "Who founded the savings bank?"

Build the store first with a kv index: ``blockrag index docs/ --store .blockrag/store --index bm25 --index kv``.
The generator answers from the passages' KV caches computed at indexing time; swap ``CachedGenerator`` for
any LangChain LLM or chat model and the same chain sends it the rendered prompt instead.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--store", default=".blockrag/store")
    p.add_argument("--retriever", default="hybrid")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from langchain_core.runnables import RunnablePassthrough

    from blockrag import Collection
    from blockrag.integrations.langchain import BlockragRetriever, CachedGenerator, CachedPrompt

    collection = Collection(args.store)
    retriever = BlockragRetriever(collection=collection, retriever=args.retriever, k=args.k)
    chain = ({"documents": retriever, "question": RunnablePassthrough()} | CachedPrompt()
             | CachedGenerator(collection, mode=args.mode, max_new_tokens=args.max_new_tokens))
    for piece in chain.stream(args.question):
        print(piece, end="", flush=True)
    print()
    for doc in retriever.invoke(args.question):
        m = doc.metadata
        print(f"  [{m['rank']}] {m['title'] or m['doc_id']} ({m['source']}, chunk {m['chunk_id']}, score {m['score']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

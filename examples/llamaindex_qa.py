"""A LlamaIndex retriever over a blockrag store (``pip install blockrag[llamaindex]``).

    python -m examples.llamaindex_qa --store .blockrag/store "Who founded the savings bank?"

The retriever returns LlamaIndex ``NodeWithScore`` objects, so it drops into a ``RetrieverQueryEngine``
with any LlamaIndex LLM; here the hits are printed.
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
    args = p.parse_args(argv)

    from blockrag import Collection
    from blockrag.integrations.llamaindex import BlockragRetriever

    retriever = BlockragRetriever(Collection(args.store), retriever=args.retriever, k=args.k)
    for hit in retriever.retrieve(args.question):
        m = hit.node.metadata
        text = " ".join(hit.node.get_content().split())[:100]
        print(f"{m['rank']:>2}. {hit.score:8.4f}  {m['title'] or m['doc_id']} [{m['source']}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

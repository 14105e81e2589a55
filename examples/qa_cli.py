"""Interactive question answering over a store, streaming the answer as it is decoded.

    python -m examples.qa_cli --store .blockrag/store [--mode turbo] [--retriever hybrid] [--rerank blockrank]

Build the store first, e.g. ``blockrag index my_docs/ --store .blockrag/store``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from blockrag import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".blockrag/store")
    p.add_argument("--retriever", default="hybrid", help=", ".join(registry.retriever_names()))
    p.add_argument("--rerank", choices=registry.reranker_names(), default=None)
    p.add_argument("--mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--generator", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from blockrag.collection import Collection
    from blockrag.pipeline import Pipeline, collection_generator

    collection = Collection(args.store)
    try:
        retriever = registry.retriever(collection, args.retriever)  # a bad name fails before the model loads
        pipe = Pipeline(collection, retriever, k=args.k, reranker=args.rerank,
                        generator=collection_generator(collection, args.generator), mode=args.mode,
                        max_new_tokens=args.max_new_tokens)
    except registry.RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("Ask a question (empty line to quit).")
    for line in sys.stdin:
        question = line.strip()
        if not question:
            break
        answer = pipe.ask(question, stream=lambda t: print(t, end="", flush=True))
        print()
        for hit in answer.hits:
            print(f"  [{hit.doc_id}] {hit.score:.3f} {' '.join(hit.text.split())[:100]}")
        print("  " + "  ".join(f"{k}={v:.1f}" for k, v in answer.timings.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Interactive question answering over a store, streaming the answer as it is decoded.

    python -m examples.qa_cli --store .blockrag/store [--mode turbo] [--retriever hybrid]

Build the store first, e.g. ``blockrag index my_docs/ --store .blockrag/store``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".blockrag/store")
    p.add_argument("--retriever", default="hybrid")
    p.add_argument("--mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--generator", default=None)
    args = p.parse_args(argv)

    from blockrag.attention_kv import Generator
    from blockrag.collection import Collection
    from blockrag.pipeline import Pipeline

    collection = Collection(args.store)
    generator = Generator(args.generator, cache_dir=f"{args.store}/kv")
    pipe = Pipeline(collection, args.retriever, k=args.k, generator=generator, mode=args.mode)
    print("Ask a question (empty line to quit).")
    for line in sys.stdin:
        question = line.strip()
        if not question:
            break
        answer = pipe.ask(question, stream=lambda t: print(t, end="", flush=True))
        print()
        for chunk in answer.chunks:
            print(f"  [{chunk.doc_id}] {' '.join(chunk.text.split())[:100]}")
        print("  " + "  ".join(f"{k}={v:.1f}" for k, v in answer.timings.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Indexing throughput: the plain path against Ray with 1 and 2 encoder workers, in the same run.

    python -m blockrag.eval.bench_ray_index --docs 500

Each path indexes the same synthetic documents into a fresh store with bm25 + dense (the installed MiniLM
embedder) + kv (a random tiny Llama with SmolLM2's tokenizer by default: the data path is measured, not a
model's FLOPs; ``--generator NAME`` for a real one, ``--no-kv`` to leave it out). Timed: from the call
(``add_documents`` / ``ray_index``) to the commit, so Ray's share includes its actors starting and loading
their models; the local cluster's start (``ray.init``) is reported apart. The stores are then compared
(chunk ids, dense vectors within 1e-5, KV file names).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("amber river stone copper lighthouse kelp bread harbor mountain valley glass iron tide lantern salt "
         "orchard quarry falcon meadow cedar archive bridge canal ember forest garden island").split()


def documents(n: int, words: int, seed: int = 0):
    from blockrag.documents import Document

    rng = random.Random(seed)
    return [Document(id=f"doc{i:06d}", title=f"Document {i}",
                     text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words * 3 // 2))))
            for i in range(n)]


def new_store(folder: Path, generator: str | None, chunk_tokens: int):
    from blockrag.collection import Collection

    c = Collection(folder, chunk_tokens=chunk_tokens, overlap=16, progress=False)
    c.build_index("bm25")
    c.build_index("dense")
    if generator:
        c.build_index("kv", model_name=generator)
    return c


def run(args) -> dict:
    import numpy as np

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ray-index-"))
    generator = None
    if not args.no_kv:
        if args.generator:
            generator = args.generator
        else:
            from blockrag.eval.bench_ray_serve import tiny_generator

            generator = tiny_generator(work / "tiny-llama")
    docs = documents(args.docs, args.words, args.seed)
    rows, stores = [], {}

    c = new_store(work / "plain", generator, args.chunk_tokens)
    t = time.perf_counter()
    rep = c.add_documents(docs)
    rows.append({"path": "plain", "workers": "-", "seconds": time.perf_counter() - t, "chunks": rep.chunks_added})
    stores["plain"] = c

    import ray

    from blockrag.distributed import ray_index

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t
    for workers in args.workers:
        c = new_store(work / f"ray{workers}", generator, args.chunk_tokens)
        t = time.perf_counter()
        rep = ray_index(c, docs, workers=workers, shard_docs=args.shard_docs, progress=False)
        rows.append({"path": "ray", "workers": workers, "seconds": time.perf_counter() - t,
                     "chunks": rep.chunks_added})
        stores[f"ray{workers}"] = c
    ray.shutdown()

    ref = stores["plain"]
    ids = ref.store.chunk_ids()
    same = {}
    for name, c in stores.items():
        v = c.index("dense").index.vectors(ids) if c.store.chunk_ids() == ids else None
        kv = sorted(p.name for p in (c.store.folder / "indexes").glob("kv*/cache/chunks/*.safetensors"))
        ref_kv = sorted(p.name for p in (ref.store.folder / "indexes").glob("kv*/cache/chunks/*.safetensors"))
        same[name] = bool(v is not None and np.allclose(v, ref.index("dense").index.vectors(ids), atol=1e-5)
                          and kv == ref_kv)
    for r in rows:
        r["docs_per_s"] = args.docs / r["seconds"]
        r["same_as_plain"] = same["plain" if r["path"] == "plain" else f"ray{r['workers']}"]
    return {"rows": rows, "ray_init_s": ray_start, "docs": args.docs, "kv": generator is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=500)
    p.add_argument("--words", type=int, default=120, help="mean words per document")
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-docs", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--generator", default=None, help="kv model (default: a random tiny Llama)")
    p.add_argument("--no-kv", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = run(args)
    print(f"{args.docs} documents, {out['rows'][0]['chunks']} chunks, bm25 + dense{' + kv' if out['kv'] else ''}; "
          f"local Ray cluster of {args.cpus} CPUs started in {out['ray_init_s']:.1f}s (not counted)")
    print(f"{'path':<6} {'workers':>7} {'seconds':>8} {'docs/s':>8}  same store as plain")
    for r in out["rows"]:
        print(f"{r['path']:<6} {r['workers']:>7} {r['seconds']:>8.1f} {r['docs_per_s']:>8.1f}  {r['same_as_plain']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

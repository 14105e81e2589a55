"""Cache-aware routing vs round-robin over generator replicas on Ray (blockrag.distributed.serving).

    python -m blockrag.eval.bench_ray_serve --passages 200 --requests 300 --replicas 2

Builds a store of synthetic passages with precomputed KV (a random tiny Llama by default, ``--generator``
for a real one), starts the replicas once, and replays one seeded workload through each routing policy:
each request carries ``k`` distinct passages drawn from a Zipf law over the passages (exponent ``--zipf``),
sent by ``--clients`` concurrent clients. Every replica's fast tier holds ``--tier-fraction`` of the
corpus's KV bytes (emptied between policies). Reported per policy: the fast-tier hit rate (passage look-ups
served by the replica's own tier, not the shared folder), median and p99 request latency (client side),
requests per replica.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("amber river stone copper lighthouse kelp bread harbor mountain valley glass iron tide lantern salt "
         "orchard quarry falcon meadow cedar").split()


def zipf_workload(n_passages: int, n_requests: int, k: int, s: float, seed: int = 0) -> list[list[int]]:
    """Seeded requests of ``k`` distinct passage indices, each drawn with probability ~ 1/rank^s (ranks a
    random permutation of the passages)."""
    rng = random.Random(seed)
    order = list(range(n_passages))
    rng.shuffle(order)
    weights = [1.0 / (r + 1) ** s for r in range(n_passages)]
    out = []
    for _ in range(n_requests):
        picked: list[int] = []
        while len(picked) < min(k, n_passages):
            p = order[rng.choices(range(n_passages), weights)[0]]
            if p not in picked:
                picked.append(p)
        out.append(picked)
    return out


def topic_workload(n_passages: int, n_requests: int, k: int, s: float, seed: int = 0) -> list[list[int]]:
    """Seeded requests from a Zipf law over *topics* (``n_passages // k * 2`` of them), each topic a fixed
    set of ``k`` passages: the same question (or its paraphrases) retrieving the same passages."""
    rng = random.Random(seed + 1)
    topics = [rng.sample(range(n_passages), min(k, n_passages)) for _ in range(max(1, n_passages // k * 2))]
    return [list(topics[t[0]]) for t in zipf_workload(len(topics), n_requests, 1, s, seed)]


WORKLOADS = {"passages": zipf_workload, "topics": topic_workload}


def tiny_generator(folder: Path) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockrag.models import load_tokenizer

    if (folder / "config.json").exists():  # a --workdir reused: keep the model its caches were built with
        return str(folder)
    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def build_store(folder: Path, n_passages: int, generator: str, seed: int = 0):
    """A store of ``n_passages`` one-chunk documents with a bm25 and a precomputed kv index."""
    from blockrag.collection import Collection
    from blockrag.documents import Document

    rng = random.Random(seed)
    c = Collection(folder, chunk_tokens=64, overlap=0, progress=False)
    c.build_index("bm25")
    c.build_index("kv", model_name=generator)
    c.add_documents([Document(id=f"p{i:05d}", text=" ".join(rng.choice(WORDS) for _ in range(40)))
                     for i in range(n_passages)])
    return c


def replay(pool, chunks: list, workload: list[list[int]], routing: str, clients: int,
           max_new_tokens: int) -> dict:
    """One policy over the workload (fresh fast tiers): hit rate, latency percentiles, requests per replica."""
    pool.reset(routing)
    lat, hits, misses = [], 0, 0
    per = [0] * len(pool.replicas)

    def one(req):
        t = time.perf_counter()
        out = pool.generate_routed("Which passage mentions the copper lighthouse?", [chunks[i] for i in req],
                                   mode="turbo", max_new_tokens=max_new_tokens)
        return (time.perf_counter() - t) * 1e3, out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for ms, out in ex.map(one, workload):
            lat.append(ms)
            hits += out["hits"]
            misses += out["misses"]
            per[out["replica"]] += 1
    wall = time.perf_counter() - t0
    lat.sort()
    return {"routing": routing, "hit_rate": hits / max(1, hits + misses), "hits": hits, "misses": misses,
            "p50_ms": statistics.median(lat), "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "requests_per_s": len(workload) / wall, "per_replica": per}


def run(args) -> list[dict]:
    import ray

    from blockrag.distributed.serving import ReplicaPool

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ray-serve-"))
    generator = args.generator or tiny_generator(work / "tiny-llama")
    c = build_store(work / "store", args.passages, generator, args.seed)
    chunks = c.get_chunks(c.store.chunk_ids())
    files = list((c.store.folder / "indexes").glob("kv*/cache/chunks/*.safetensors"))
    tier_bytes = int(args.tier_fraction * sum(f.stat().st_size for f in files))
    c.close()
    if not ray.is_initialized():
        ray.init(address=args.address, num_cpus=None if args.address else args.cpus, include_dashboard=False,
                 log_to_driver=False)
    pool = ReplicaPool(str(work / "store"), replicas=args.replicas, tier_bytes=tier_bytes)
    workload = WORKLOADS[args.workload](len(chunks), args.requests, args.k, args.zipf, args.seed)
    replay(pool, chunks, workload[: max(4, args.requests // 20)], "round-robin", args.clients,
           args.max_new_tokens)  # warm-up: first-call costs out of both measurements
    rows = [replay(pool, chunks, workload, routing, args.clients, args.max_new_tokens)
            for routing in ("round-robin", "cache-aware")]
    pool.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--k", type=int, default=4, help="passages per request")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of passage (or topic) popularity")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="passages",
                   help="passages: each request draws k passages from a Zipf law over passages; topics: a Zipf "
                        "law over topics, each a fixed set of k passages")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--tier-fraction", type=float, default=0.1, help="each replica's fast tier, share of the corpus KV")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--generator", default=None, help="model folder or name (default: a random tiny Llama)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: a local one)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    p.add_argument("--workdir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(f"{args.replicas} replicas, {args.passages} passages, {args.requests} requests x {args.k} passages, "
          f"Zipf s={args.zipf} over {args.workload}, {args.clients} clients, fast tier {args.tier_fraction:.0%} of the corpus each")
    print(f"{'routing':<12} {'hit rate':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}  per replica")
    for r in rows:
        print(f"{r['routing']:<12} {r['hit_rate']:>8.3f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['requests_per_s']:>7.1f}  {r['per_replica']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generator replicas on Ray behind one endpoint, with cache-aware routing.

    pool = ReplicaPool("my_store", replicas=2, routing="cache-aware")   # Ray actors, one model each
    result = pool.generate(question, chunks, mode="turbo")              # like Generator.generate
    Engine(config, generator=pool)                                      # what `blockrag serve --ray` does

Every replica reads the store's precomputed passage caches (the *shared tier*: the KV index's folder, on
a filesystem every replica mounts) through its own fast tier (a GPU's memory where the replica has one,
else host RAM), a byte-budgeted LRU :class:`~blockrag.attention_kv.tiers.MemoryTier`. A passage missing
from both is computed on the spot (prefill of that passage after the shared prefix) and stored.

:class:`Router`: ``cache-aware`` sends a request to the replica whose fast tier holds most of its passages
(each replica reports what its tier holds after every request; the router counts the passages of a request
in flight as held by the replica it went to), ties and requests no replica holds go to the least loaded
one, and a replica more than ``max_imbalance`` requests busier than the least loaded is passed over;
``round-robin`` is the comparison.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from blockrag.attention_kv.tiers import LocalDirBackend

ROUTINGS = ("cache-aware", "round-robin")


class StoreFolderBackend(LocalDirBackend):
    """The KV index's own cache folder as a tier backend: ``<cache>/chunks/<key>.safetensors`` (the files
    the store writes at indexing time; a passage computed on a miss is written the same way)."""

    def _path(self, key: str) -> Path:
        from blockrag.attention_kv.tiers import _check_key

        return self.root / (_check_key(key) + ".safetensors")

    def entries(self) -> list[tuple[str, int]]:
        out = []
        for p in self.root.glob("*.safetensors"):
            try:
                out.append((p.stem, p.stat().st_size))
            except FileNotFoundError:
                continue
        return out


class Router:
    """Picks a replica for each request (thread-safe): ``pick(chunk_ids) -> replica``, then
    ``done(replica, chunk_ids, resident_ids)`` with what that replica's fast tier holds afterwards."""

    def __init__(self, n: int, routing: str = "cache-aware", max_imbalance: int = 2):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        if n < 1:
            raise ValueError(f"need at least one replica, not {n}")
        self.n, self.routing, self.max_imbalance = n, routing, max_imbalance
        self.load = [0] * n
        self.resident: list[set] = [set() for _ in range(n)]  # as last reported by each replica
        self._pending = [Counter() for _ in range(n)]  # passages of the requests in flight there
        self.sent = [0] * n
        self._next = 0
        self._lock = threading.Lock()

    def pick(self, chunk_ids: Sequence[str]) -> int:
        ids = set(chunk_ids)
        with self._lock:
            least = min(range(self.n), key=lambda i: (self.load[i], self.sent[i]))
            if self.routing == "round-robin":
                choice = self._next % self.n
                self._next += 1
            else:
                scores = [sum(1 for c in ids if c in self.resident[i] or c in self._pending[i])
                          for i in range(self.n)]
                best = max(scores)
                choice = least if best == 0 else min((i for i in range(self.n) if scores[i] == best),
                                                     key=lambda i: (self.load[i], self.sent[i]))
                if self.load[choice] - self.load[least] > self.max_imbalance:
                    choice = least
            self.load[choice] += 1
            self.sent[choice] += 1
            self._pending[choice].update(ids)  # held there once it runs: followers of this request go there too
            return choice

    def done(self, replica: int, chunk_ids: Sequence[str], resident_ids: Sequence[str] | None) -> None:
        """``chunk_ids``: the request's (as given to :meth:`pick`); ``resident_ids``: what the replica's fast
        tier holds now (None: unknown, e.g. the call failed)."""
        with self._lock:
            self.load[replica] -= 1
            self._pending[replica].subtract(set(chunk_ids))
            self._pending[replica] = +self._pending[replica]  # drop the zero counts
            if resident_ids is not None:
                self.resident[replica] = set(resident_ids)


class GeneratorReplica:
    """Ray actor: one Generator over the store's KV index, reading the shared tier through its own fast tier
    of ``tier_bytes`` (GPU memory where it has a GPU, else host RAM)."""

    def __init__(self, store: str, kv_index: str = "kv", tier_bytes: int = 1 << 30, threads: int | None = None,
                 policy: str = "lru"):
        import torch

        from blockrag.attention_kv.cache_store import KVCacheStore
        from blockrag.attention_kv.generate import Generator
        from blockrag.attention_kv.tiers import BlobTier, MemoryTier, TierStack
        from blockrag.collection import Collection
        from blockrag.models import shared_generator

        if threads:
            torch.set_num_threads(threads)
        collection = Collection(store, progress=False)
        kv = collection.index(kv_index)
        on_gpu = torch.cuda.is_available()
        model, tok = shared_generator(kv.model_name, device="cuda" if on_gpu else "cpu", adapter=kv.adapter)
        self.tier = MemoryTier(tier_bytes, policy, device="cuda" if on_gpu else "cpu", name="gpu" if on_gpu else "host")
        cache = kv.folder / "cache"
        tiers = TierStack([self.tier, BlobTier(StoreFolderBackend(cache / "chunks"), None, policy, scan=False,
                                               name="shared")])
        self.store = KVCacheStore(cache, model, tok, system_prompt=kv.system_prompt, quant=kv.quant,
                                  dtype=torch.bfloat16 if on_gpu else torch.float32, model_name=kv.model_name,
                                  kv_policy="on-demand", tiers=tiers)
        self.generator = Generator(model=model, tokenizer=tok, store=self.store, system_prompt=kv.system_prompt,
                                   quant=kv.quant)
        self._ids: dict[str, str] = {}  # tier key -> chunk id (the router speaks chunk ids)
        collection.close()

    def generate(self, question: str, chunks: list[dict], mode: str = "turbo", max_new_tokens: int = 64,
                 **kwargs) -> dict:
        """The GenerationResult plus this request's fast-tier hits/misses and what the tier now holds."""
        from blockrag.documents import Chunk

        chunks = [Chunk(**c) for c in chunks]
        for c in chunks:
            self._ids[self.store.key(c)] = c.id
        hits, misses = self.tier.hits, self.tier.misses
        t = time.perf_counter()
        result = self.generator.generate(question, chunks, mode=mode, max_new_tokens=max_new_tokens, **kwargs)
        return {"result": result, "hits": self.tier.hits - hits, "misses": self.tier.misses - misses,
                "ms": (time.perf_counter() - t) * 1e3, "resident": [self._ids[k] for k in self.tier.keys()
                                                                   if k in self._ids]}

    def reset(self) -> None:
        """Empty the fast tier and zero its counters (between benchmark runs)."""
        for key in self.tier.keys():
            self.tier.discard(key)
        self.tier.reset_stats()

    def stats(self) -> dict:
        return self.tier.stats()


class _PoolStore:
    """``chunk in pool.store``: a replica's fast tier holds it (as last reported), for the server's metrics."""

    def __init__(self, router: Router):
        self.router = router

    def __contains__(self, chunk) -> bool:
        return any(chunk.id in r for r in self.router.resident)


class _OnePiece:
    """A GenerationStream over a remote answer: the whole text as one piece (replicas do not stream yet)."""

    def __init__(self, result):
        self.result = result
        self._pieces = [result.answer] if result.answer else []

    def __iter__(self):
        return iter(self._pieces)


class ReplicaPool:
    """N :class:`GeneratorReplica` actors behind one ``generate`` (the Generator's call), routed by a
    :class:`Router`. ``concurrent = True`` tells the server to run one generation per replica at a time."""

    concurrent = True

    def __init__(self, store: str, replicas: int = 2, routing: str = "cache-aware", tier_bytes: int = 1 << 30,
                 address: str | None = None, kv_index: str = "kv", max_imbalance: int = 2):
        from .indexing import require_ray

        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=address)  # None: RAY_ADDRESS, else a new local cluster
        self.ray = ray
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus >= replicas else {"num_cpus": max(1, cpus // replicas)}
        actor = ray.remote(GeneratorReplica).options(**opts)
        threads = None if gpus >= replicas else opts["num_cpus"]
        self.replicas = [actor.remote(str(store), kv_index, tier_bytes, threads) for _ in range(replicas)]
        ray.get([r.stats.remote() for r in self.replicas])  # loaded (and failed loudly) before serving
        self.router = Router(replicas, routing, max_imbalance)
        self.store = _PoolStore(self.router)
        self.concurrency = replicas

    def generate(self, question: str, chunks: Sequence, mode: str = "turbo", max_new_tokens: int = 64,
                 stream: bool = False, **kwargs):
        """Like :meth:`Generator.generate` (``stream=True`` yields the answer as one piece); the reply's
        routing facts are in ``result.timings`` (``replica``, ``tier_hits``, ``tier_misses``)."""
        out = self.generate_routed(question, chunks, mode=mode, max_new_tokens=max_new_tokens, **kwargs)
        result = out["result"]
        result.timings = {**(result.timings or {}), "replica": out["replica"], "tier_hits": out["hits"],
                          "tier_misses": out["misses"]}
        return _OnePiece(result) if stream else result

    def generate_routed(self, question: str, chunks: Sequence, **kwargs) -> dict:
        """The replica's reply dict (result, hits, misses, ms, resident) plus ``replica``."""
        ids = [c.id for c in chunks]
        router = self.router
        i = router.pick(ids)
        resident = None
        try:
            out = self.ray.get(self.replicas[i].generate.remote(question, [asdict(c) for c in chunks], **kwargs))
            resident = out["resident"]
        finally:
            router.done(i, ids, resident)
        return {**out, "replica": i}

    def reset(self, routing: str | None = None) -> None:
        """Empty every replica's fast tier; start a new router (``routing`` given: with that policy)."""
        self.ray.get([r.reset.remote() for r in self.replicas])
        self.router = Router(len(self.replicas), routing or self.router.routing, self.router.max_imbalance)
        self.store = _PoolStore(self.router)

    def stats(self) -> list[dict]:
        return self.ray.get([r.stats.remote() for r in self.replicas])

    def close(self) -> None:
        for r in self.replicas:
            self.ray.kill(r)
        self.replicas = []

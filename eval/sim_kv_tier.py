"""Sizing model for the KV tier: hit rate per tier and TTFT distribution from corpus size, passages per question,
popularity and tier sizes/bandwidths.

Hit rates (independent-reference model; every request of a question is a draw from the popularity law):

* LRU, one tier: Che's approximation — an item with request rate ``l_i`` is cached with probability
  ``1 - exp(-l_i T)`` where the characteristic time ``T`` solves ``sum_i (1 - exp(-l_i T)) = C``.
* LRU, a stack: a tier sees only the misses of the faster tiers (that is how :class:`TierStack` behaves:
  a slower tier is read, and so touched, only when every faster tier missed), approximated as an
  independent stream of rates ``l_i * P(miss above)`` and solved the same way, tier by tier.
* LFU: the tier holds the items its stream requests most (top-C of the filtered rates).
* A tier filled before serving (``prefilled``, the precompute policy) holds the most popular items that fit.
* Finite runs: a tier cannot hold an item the run has not requested yet, so ``T`` is capped by the number of
  requests seen (``elapsed_requests``) — what makes an unbounded tier of an on-demand run fill up gradually.

Large corpora are binned by popularity rank (ranks above 10,000 in geometric bins of 0.1%), so 100M passages
cost as much as ~20K items.

TTFT of one question (Monte Carlo over questions; each passage lands in a tier with its item's
probabilities): transfers overlap each other and the computation of missing passages, so
``ttft = question_s + max(disk bytes / disk bandwidth + latency, remote ..., host->GPU bytes / PCIe,
missing tokens / prefill rate)``, ``serial=True`` adds them instead. Queueing is not modelled (TTFT of a
GPU that is not saturated). GPUs needed for a question rate: GPU-seconds per question (question forward,
prefill of missing passages, ``answer_tokens`` decoded in batches of ``decode_batch`` where each step reads
the weights once and every sequence's KV) over a utilisation target.

CLI: ``python -m blockrag.eval.sim_kv_tier --table`` (the 1M / 100M Llama-3-8B table),
``python -m blockrag.eval.sim_kv_tier --passages 1e6 --zipf 0.9 --k 10 ...`` (one configuration),
``python -m blockrag.eval.sim_kv_tier --check`` (prediction vs a real :class:`TierStack` run).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GiB, TiB, PiB = 1 << 30, 1 << 40, 1 << 50


# ----------------------------------------------------------------------------- popularity
@dataclass
class Popularity:
    """Items grouped in bins of equal per-request probability: ``p[b]`` for each of ``n[b]`` items."""

    p: np.ndarray
    n: np.ndarray

    @property
    def items(self) -> int:
        return int(self.n.sum())

    @classmethod
    def zipf(cls, n_items: int, s: float, exact_ranks: int = 10_000, ratio: float = 1.001) -> "Popularity":
        """Zipf law ``p(rank) ~ rank^-s`` over ``n_items``; ranks above ``exact_ranks`` binned geometrically."""
        if n_items < 1 or s < 0:
            raise ValueError("zipf: need n_items >= 1 and exponent >= 0")
        head = np.arange(1, min(n_items, exact_ranks) + 1, dtype=np.float64)
        starts, counts = [head], [np.ones_like(head)]
        if n_items > exact_ranks:
            edges = [exact_ranks + 1]
            while edges[-1] <= n_items:
                edges.append(max(edges[-1] + 1, math.ceil(edges[-1] * ratio)))
            edges = np.minimum(np.array(edges, dtype=np.float64), n_items + 1)
            lo, hi = edges[:-1], edges[1:]
            keep = hi > lo
            lo, hi = lo[keep], hi[keep]
            mid = np.sqrt(lo * (hi - 1))  # representative rank of the bin
            starts.append(mid)
            counts.append(hi - lo)
        ranks, n = np.concatenate(starts), np.concatenate(counts)
        w = ranks ** -s
        # normalise with the exact sum over the bins' ranks (integral correction inside bins is negligible)
        p = w / float((w * n).sum())
        return cls(p, n)

    def distinct_per_question(self, k: int) -> "Popularity":
        """Per-request shares when a question draws ``k`` *distinct* passages (successive sampling): item i is
        in a question with probability ``1 - exp(-p_i t)``, ``t`` chosen so that a question holds k items;
        the most popular items are flattened (a passage appears at most once per question)."""
        if k <= 1:
            return self
        t = _solve_T(self.p, self.n, float(k))
        incl = -np.expm1(-self.p * t)
        return Popularity(incl / float((incl * self.n).sum()), self.n)

    @classmethod
    def from_trace(cls, questions: list[list[str]]) -> "Popularity":
        """Empirical per-request frequencies of a trace (one list of passage ids per question)."""
        from collections import Counter

        c = Counter(pid for q in questions for pid in q)
        if not c:
            raise ValueError("empty trace")
        f = np.array(sorted(c.values(), reverse=True), dtype=np.float64)
        return cls(f / f.sum(), np.ones_like(f))


def read_trace(path: str | Path) -> list[list[str]]:
    """A trace file: one question per line, its passage ids separated by whitespace (or a JSON list)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line) if line.startswith("[") else line.split())
    return out


# ----------------------------------------------------------------------------- hit rates
@dataclass
class TierSpec:
    """One tier: capacity (None = unbounded), read bandwidth/latency, and how its entries are stored."""

    name: str
    capacity_bytes: float | None
    read_GBps: float = 0.0  # 0 = free (the GPU tier: data is already where attention reads it)
    latency_s: float = 0.0
    int8: bool = False
    policy: str = "lru"
    prefilled: bool = False
    over_pcie: bool = True  # the data crosses host->GPU after being read


def _solve_T(rate: np.ndarray, n: np.ndarray, capacity: float) -> float:
    """Che's characteristic time: sum n*(1-exp(-rate*T)) = capacity (capacity < items with rate > 0)."""
    lo, hi = 0.0, 1.0
    fill = lambda T: float((n * -np.expm1(-rate * T)).sum())  # noqa: E731
    while fill(hi) < capacity:
        hi *= 2
        if hi > 1e30:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fill(mid) < capacity else (lo, mid)
        if hi - lo <= 1e-9 * hi:
            break
    return 0.5 * (lo + hi)


def _top(rate: np.ndarray, n: np.ndarray, capacity: float) -> np.ndarray:
    """Fraction of each bin held when a tier keeps the ``capacity`` items of highest rate."""
    order = np.argsort(-rate, kind="stable")
    held = np.zeros_like(rate)
    cum = np.cumsum(n[order])
    before = cum - n[order]
    frac = np.clip((capacity - before) / n[order], 0.0, 1.0)
    held[order] = frac * (rate[order] > 0)
    return held


def residency(pop: Popularity, capacities_items: list[float | None], policies: list[str],
              prefilled: list[bool] | None = None, elapsed_requests: float | None = None) -> np.ndarray:
    """``in[j, b]``: probability that tier j holds an item of bin b (when the faster tiers missed)."""
    prefilled = prefilled or [False] * len(capacities_items)
    rate = pop.p.copy()  # requests per request, of the stream this tier sees
    # written through: an item enters every tier on its first request, so after ``elapsed_requests`` an
    # on-demand tier can only hold what was seen at all (conditioned on the faster tiers having missed)
    seen = None if elapsed_requests is None else -np.expm1(-pop.p * elapsed_requests)
    upper = np.zeros_like(rate)  # P(some faster tier holds the item)
    out = []
    for cap, pol, pre in zip(capacities_items, policies, prefilled):
        if pre:
            held = _top(pop.p, pop.n, math.inf if cap is None else cap)  # filled by global popularity
        elif pol == "lfu":
            held = _top(rate, pop.n, math.inf if cap is None else cap)
        elif pol == "lru":
            n_live = float(pop.n[rate > 0].sum())
            T = math.inf if cap is None or cap >= n_live else _solve_T(rate, pop.n, cap)
            held = np.ones_like(rate) if math.isinf(T) else -np.expm1(-rate * T)
            held = held * (rate > 0)
        else:
            raise ValueError(f"policy must be 'lru' or 'lfu', not {pol!r}")
        if seen is not None and not pre:
            held = np.minimum(held, np.clip((seen - upper) / np.maximum(1 - upper, 1e-12), 0.0, 1.0))
        out.append(held)
        rate = rate * (1.0 - held)
        upper = 1 - (1 - upper) * (1 - held)
    return np.array(out)


def hit_rates(pop: Popularity, res: np.ndarray) -> dict:
    """Share of all requests served by each tier, and the miss share (computed on demand)."""
    reach = np.ones_like(pop.p)
    shares = []
    for held in res:
        shares.append(float((pop.n * pop.p * reach * held).sum()))
        reach = reach * (1 - held)
    return {"tiers": shares, "miss": float((pop.n * pop.p * reach).sum())}


# ----------------------------------------------------------------------------- model and hardware
@dataclass
class ModelShape:
    """KV size and compute speed of the generator (defaults: Llama-3-8B, bf16)."""

    kv_bytes_per_token: int = 32 * 8 * 128 * 2 * 2  # layers x KV heads x dim x (K, V) x bf16 = 128 KiB
    int8_scale_bytes: int = 32 * 2 * 8 * 128 * 4  # fp32 per-channel scales of one int8 chunk
    weight_bytes: float = 16.06e9
    prefill_tokens_per_s: float = 32_000.0  # H100, HF prefill of 2K-4K tokens (eval/results/ttft_h100.json)
    question_s: float = 0.0114  # H100, cached TTFT at 8K context, question as one CUDA graph (same file)
    hbm_GBps: float = 3026.0  # H100 device copy bandwidth measured in the kernel benchmark

    def passage_bytes(self, tokens: int, int8: bool) -> float:
        return tokens * self.kv_bytes_per_token / 2 + self.int8_scale_bytes if int8 else tokens * self.kv_bytes_per_token


@dataclass
class Scenario:
    """One sizing question. Capacities are bytes (None: unbounded)."""

    passages: int
    zipf: float = 0.9
    k: int = 10
    passage_tokens: int = 512
    tiers: list = field(default_factory=list)  # TierSpec, fastest first
    pcie_GBps: float = 55.0  # H100 pinned host->device, measured in eval/results/ttft_h100.json
    questions_per_s: float = 100.0
    answer_tokens: int = 128
    decode_batch: int = 32
    utilisation: float = 0.7
    serial: bool = False
    model: ModelShape = field(default_factory=ModelShape)
    trace: list | None = None


def default_tiers(gpu_bytes=80 * GiB, host_bytes=256 * GiB, disk_bytes=3.5 * TiB, remote_bytes=None,
                  remote_prefilled=True, policy="lru") -> list[TierSpec]:
    """One generator replica = one GPU and its share of an 8-GPU node: GPU tier 80 GiB of HBM (bf16, read in
    place; 141 GB H200 less weights and working memory), host RAM 256 GiB (bf16, over PCIe), one local NVMe
    drive 3.5 TiB (int8, 6 GB/s, 0.1 ms), a remote object store shared by every replica (int8, 2.5 GB/s =
    an eighth of a 200 Gb/s NIC, 20 ms to first byte)."""
    return [TierSpec("gpu", gpu_bytes, 0.0, 0.0, False, policy, over_pcie=False),
            TierSpec("host", host_bytes, 0.0, 0.0, False, policy),
            TierSpec("disk", disk_bytes, 6.0, 1e-4, True, policy),
            TierSpec("remote", remote_bytes, 2.5, 0.020, True, policy, prefilled=remote_prefilled)]


def predict(sc: Scenario, n_questions: int = 20_000, seed: int = 0, elapsed_requests: float | None = None) -> dict:
    """Hit rate per tier, TTFT median/p99 (s), storage per tier, GPU-seconds per question and GPUs needed."""
    m = sc.model
    pop = Popularity.from_trace(sc.trace) if sc.trace else Popularity.zipf(sc.passages, sc.zipf).distinct_per_question(sc.k)
    sizes = [m.passage_bytes(sc.passage_tokens, t.int8) for t in sc.tiers]
    caps = [None if t.capacity_bytes is None else t.capacity_bytes / s for t, s in zip(sc.tiers, sizes)]
    res = residency(pop, caps, [t.policy for t in sc.tiers], [t.prefilled for t in sc.tiers], elapsed_requests)
    hits = hit_rates(pop, res)

    # Monte Carlo over questions: k passage draws, each resolved to a tier with its bin's probabilities
    rng = np.random.default_rng(seed)
    bins = rng.choice(len(pop.p), size=(n_questions, sc.k), p=pop.p * pop.n / (pop.p * pop.n).sum())
    u = rng.random((n_questions, sc.k))
    where = np.full((n_questions, sc.k), len(sc.tiers))  # index len(tiers) = miss
    reach = np.ones((n_questions, sc.k))
    undecided = np.ones((n_questions, sc.k), dtype=bool)
    acc = np.zeros((n_questions, sc.k))
    for j in range(len(sc.tiers)):
        pj = reach * res[j][bins]
        hit = undecided & (u < acc + pj)
        where[hit] = j
        undecided &= ~hit
        acc += pj
        reach = reach * (1 - res[j][bins])
    parts = []
    pcie_bytes = np.zeros(n_questions)
    for j, t in enumerate(sc.tiers):
        cnt = (where == j).sum(1)
        if t.over_pcie:  # int8 crosses as int8 and is dequantised on the GPU
            pcie_bytes += cnt * sizes[j]
        if t.read_GBps > 0:
            parts.append(np.where(cnt > 0, cnt * sizes[j] / (t.read_GBps * 1e9) + t.latency_s, 0.0))
    parts.append(pcie_bytes / (sc.pcie_GBps * 1e9))
    n_miss = (where == len(sc.tiers)).sum(1)
    compute = n_miss * sc.passage_tokens / m.prefill_tokens_per_s
    parts.append(compute)
    stack = np.stack(parts)
    ttft = m.question_s + (stack.sum(0) if sc.serial else stack.max(0))

    ctx_bytes = sc.k * m.passage_bytes(sc.passage_tokens, False)
    step = (m.weight_bytes + sc.decode_batch * ctx_bytes) / (m.hbm_GBps * 1e9)
    gpu_s = m.question_s + float(compute.mean()) + sc.answer_tokens * step / sc.decode_batch
    stored = []
    for t, s, c in zip(sc.tiers, sizes, caps):
        items = pop.items if c is None else min(c, pop.items)
        stored.append(items * s)
    return {
        "passages": pop.items, "zipf": None if sc.trace else sc.zipf, "k": sc.k,
        "tiers": [t.name for t in sc.tiers],
        "hit_rate": dict(zip([t.name for t in sc.tiers], hits["tiers"])), "miss_rate": hits["miss"],
        "stored_bytes": dict(zip([t.name for t in sc.tiers], stored)),
        "corpus_bytes_bf16": pop.items * m.passage_bytes(sc.passage_tokens, False),
        "ttft_median_s": float(np.median(ttft)), "ttft_p99_s": float(np.quantile(ttft, 0.99)),
        "gpu_s_per_question": gpu_s,
        "questions_per_s": sc.questions_per_s,
        "gpus_needed": math.ceil(sc.questions_per_s * gpu_s / sc.utilisation),
        "precompute_gpu_hours": pop.items * sc.passage_tokens / m.prefill_tokens_per_s / 3600,
    }


# ----------------------------------------------------------------------------- a real run to check against
def measure(passages: int = 2000, zipf: float = 0.9, k: int = 5, capacities: tuple = (100, 400, None),
            policy: str = "lru", warmup_questions: int = 3000, questions: int = 3000, seed: int = 0,
            folder: str | Path | None = None) -> dict:
    """Run a real :class:`TierStack` (host RAM -> local folder -> fsspec memory store, capacities in entries,
    tiny entries, on-demand compute) on a Zipf workload; return measured and predicted request shares.

    A question draws ``k`` distinct passages (popularity ``rank^-zipf``). Counters start after the warm-up;
    the prediction caps each tier's characteristic time by the requests seen at the middle of the window.
    """
    import tempfile
    import uuid

    import torch

    from blockrag.attention_kv.cache_store import ChunkKV
    from blockrag.attention_kv.tiers import BlobTier, FsspecBackend, LocalDirBackend, MemoryTier, TierStack, to_bytes

    def entry(i: int) -> ChunkKV:
        return ChunkKV(torch.full((2,), i, dtype=torch.int32), torch.full((1, 2, 2, 1, 4), float(i % 97)))

    mem_size, blob_size = entry(0).nbytes, len(to_bytes(entry(0)))
    keys = [f"{i:032x}" for i in range(passages)]
    tmp = tempfile.TemporaryDirectory() if folder is None else None
    root = Path(folder or tmp.name)
    budgets = [None if c is None else c * (mem_size if j == 0 else blob_size) for j, c in enumerate(capacities)]
    tiers = [MemoryTier(budgets[0], policy, name="host")]
    for j, b in enumerate(budgets[1:], 1):
        backend = LocalDirBackend(root / f"t{j}") if j < len(budgets) - 1 else FsspecBackend(f"memory://sim-{uuid.uuid4().hex}")
        tiers.append(BlobTier(backend, b, policy, name=f"t{j}"))
    stack = TierStack(tiers, compute=lambda key: entry(int(key, 16)))
    rng = np.random.default_rng(seed)
    w = np.arange(1, passages + 1, dtype=np.float64) ** -zipf
    w /= w.sum()
    perm = rng.permutation(passages)  # popularity rank -> passage id, so ids carry no order

    def run(nq: int) -> None:
        # k distinct draws per question: the k largest of log w + Gumbel noise (sampling without replacement)
        g = np.log(w)[None, :] - np.log(-np.log(rng.random((nq, passages))))
        for row in np.argpartition(-g, k - 1, axis=1)[:, :k]:
            for r in row:
                stack.get(keys[perm[r]])

    run(warmup_questions)
    stack.reset_stats()
    run(questions)
    total = questions * k
    measured = [t.hits / total for t in tiers]
    mem_miss = stack.computed / total
    if tmp is not None:
        tmp.cleanup()
    pop = Popularity.zipf(passages, zipf).distinct_per_question(k)
    res = residency(pop, list(capacities), [policy] * len(capacities),
                    elapsed_requests=(warmup_questions + questions / 2) * k)
    pred = hit_rates(pop, res)
    return {"measured": measured + [mem_miss], "predicted": pred["tiers"] + [pred["miss"]],
            "labels": [t.name for t in tiers] + ["computed"], "policy": policy, "passages": passages,
            "zipf": zipf, "k": k, "capacities": list(capacities)}


# ----------------------------------------------------------------------------- the README table
def table(questions_per_s: float = 100.0, n_questions: int = 20_000) -> list[dict]:
    """Llama-3-8B shape, 512-token passages, k=10, one 8-GPU node's tiers; 1M and 100M passages."""
    rows = []
    for n, zipf, remote, label in [
        (1_000_000, 0.9, None, "1M, precomputed, remote holds all"),
        (1_000_000, 0.9, 0, "1M, on-demand, no remote"),
        (1_000_000, 0.7, None, "1M, precomputed, zipf 0.7"),
        (100_000_000, 0.9, 1 * PiB, "100M, remote 1 PiB (most popular)"),
        (100_000_000, 0.9, 0, "100M, on-demand, no remote"),
        (100_000_000, 0.7, 1 * PiB, "100M, remote 1 PiB, zipf 0.7"),
    ]:
        tiers = default_tiers(remote_bytes=remote)
        if remote == 0:
            tiers = tiers[:3]
        sc = Scenario(passages=n, zipf=zipf, tiers=tiers, questions_per_s=questions_per_s)
        r = predict(sc, n_questions=n_questions)
        r["label"] = label
        rows.append(r)
    return rows


def _fmt_bytes(b: float) -> str:
    for unit, v in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB)):
        if b >= v:
            return f"{b / v:.1f} {unit}"
    return f"{b / (1 << 20):.0f} MiB"


def markdown(rows: list[dict]) -> str:
    names = ["gpu", "host", "disk", "remote"]
    q = rows[0]["questions_per_s"] if rows else 0
    head = ("| scenario | stored gpu / host / disk / remote | hit gpu / host / disk / remote | computed | "
            f"TTFT median ms | TTFT p99 ms | GPU-s per question | GPUs at {q:g} q/s | precompute GPU-h |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        st = " / ".join(_fmt_bytes(r["stored_bytes"][t]) if t in r["stored_bytes"] else "-" for t in names)
        hr = " / ".join(f"{100 * r['hit_rate'][t]:.1f}%" if t in r["hit_rate"] else "-" for t in names)
        lines.append(f"| {r['label']} | {st} | {hr} | {100 * r['miss_rate']:.1f}% | {1e3 * r['ttft_median_s']:.1f} | "
                     f"{1e3 * r['ttft_p99_s']:.1f} | {r['gpu_s_per_question']:.3f} | {r['gpus_needed']} | "
                     f"{r['precompute_gpu_hours']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="the 1M / 100M Llama-3-8B table (markdown)")
    ap.add_argument("--check", action="store_true", help="predicted vs a real TierStack run at small scale")
    ap.add_argument("--passages", type=float, default=1e6)
    ap.add_argument("--zipf", type=float, default=0.9)
    ap.add_argument("--trace", help="trace file: one question per line, passage ids separated by spaces")
    ap.add_argument("--k", type=int, default=10, help="passages per question")
    ap.add_argument("--passage-tokens", type=int, default=512)
    ap.add_argument("--gpu-gib", type=float, default=80)
    ap.add_argument("--host-gib", type=float, default=256)
    ap.add_argument("--disk-gib", type=float, default=3.5 * 1024)
    ap.add_argument("--remote-gib", type=float, default=-1, help="-1: unbounded, 0: no remote tier")
    ap.add_argument("--on-demand", action="store_true", help="remote tier fills on misses (else prefilled)")
    ap.add_argument("--policy", choices=["lru", "lfu"], default="lru")
    ap.add_argument("--pcie-gbps", type=float, default=55.0)
    ap.add_argument("--disk-gbps", type=float, default=6.0)
    ap.add_argument("--remote-gbps", type=float, default=2.5)
    ap.add_argument("--qps", type=float, default=100.0, help="questions per second (for GPUs needed)")
    ap.add_argument("--serial", action="store_true", help="transfers and compute one after the other")
    ap.add_argument("--questions", type=int, default=20_000, help="Monte Carlo questions")
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args(argv)
    if a.check:
        out = [measure(policy=p) for p in ("lru", "lfu")]
        for r in out:
            print(f"{r['policy']}: " + ", ".join(f"{l} measured {100 * m:.1f}% predicted {100 * p:.1f}%"
                                                 for l, m, p in zip(r["labels"], r["measured"], r["predicted"])))
    elif a.table:
        out = table(a.qps, a.questions)
        print(markdown(out))
    else:
        rb = None if a.remote_gib < 0 else a.remote_gib * GiB
        tiers = default_tiers(a.gpu_gib * GiB, a.host_gib * GiB, a.disk_gib * GiB, rb, not a.on_demand, a.policy)
        tiers[2].read_GBps, tiers[3].read_GBps = a.disk_gbps, a.remote_gbps
        if a.remote_gib == 0:
            tiers = tiers[:3]
        sc = Scenario(passages=int(a.passages), zipf=a.zipf, k=a.k, passage_tokens=a.passage_tokens, tiers=tiers,
                      pcie_GBps=a.pcie_gbps, questions_per_s=a.qps, serial=a.serial,
                      trace=read_trace(a.trace) if a.trace else None)
        out = predict(sc, a.questions)
        out["assumptions"] = {"model": asdict(sc.model), "tiers": [asdict(t) for t in tiers],
                              "pcie_GBps": sc.pcie_GBps, "answer_tokens": sc.answer_tokens,
                              "decode_batch": sc.decode_batch, "utilisation": sc.utilisation}
        print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

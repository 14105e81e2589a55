"""KV tiers: backends (folder, shared folder, fsspec memory/file), atomic immutable entries, LRU/LFU eviction
order, compute-once on a miss, int8 slow tiers, two processes sharing one tier."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import threading

import pytest
import torch

pytest.importorskip("safetensors")

from blockrag.attention_kv.cache_store import ChunkKV  # noqa: E402
from blockrag.attention_kv.tiers import (BlobTier, CorruptEntry, FsspecBackend, LocalDirBackend,  # noqa: E402
                                         MemoryTier, SharedFSBackend, TierStack, from_bytes, to_bytes)


def _key(i: int) -> str:
    return hashlib.sha256(f"chunk-{i}".encode()).hexdigest()[:32]


def _entry(key: str, tokens: int = 8, dtype=torch.bfloat16) -> ChunkKV:
    """Deterministic from the key, so any process can check what it read."""
    g = torch.Generator().manual_seed(int(key[:8], 16))
    return ChunkKV(torch.randint(0, 1000, (tokens,), generator=g, dtype=torch.int32),
                   torch.randn(2, tokens, 2, 2, 16, generator=g).to(dtype))


def _same(a: ChunkKV, b: ChunkKV) -> bool:
    return (torch.equal(a.token_ids, b.token_ids) and a.kv.dtype == b.kv.dtype and torch.equal(a.kv, b.kv)
            and (a.scale is None) == (b.scale is None))


BACKENDS = ["dir", "shared", "memory", "file"]


def _backend(kind: str, tmp_path):
    if kind == "dir":
        return LocalDirBackend(tmp_path / "dir")
    if kind == "shared":
        return SharedFSBackend(tmp_path / "shared")
    if kind == "memory":
        return FsspecBackend(f"memory://kvtest-{tmp_path.name}")
    return FsspecBackend(f"file://{tmp_path / 'fs'}")


def test_bytes_roundtrip_and_corruption():
    e = _entry(_key(1))
    assert _same(from_bytes(to_bytes(e)), e)
    q = ChunkKV(e.token_ids, torch.zeros(2, 8, 2, 2, 16, dtype=torch.int8), torch.ones(2, 1, 2, 2, 16))
    back = from_bytes(to_bytes(q))
    assert back.scale is not None and torch.equal(back.scale, q.scale)
    data = to_bytes(e)
    with pytest.raises(CorruptEntry):
        from_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptEntry):
        from_bytes(b"not a safetensors blob")


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_roundtrip(kind, tmp_path):
    b = _backend(kind, tmp_path)
    keys = [_key(i) for i in range(5)]
    assert b.read(keys[0]) is None
    for k in keys:
        b.write(k, to_bytes(_entry(k)))
    b.write(keys[0], to_bytes(_entry(keys[0])))  # immutable: rewriting is harmless
    assert sorted(k for k, _ in b.entries()) == sorted(keys)  # no temporary files listed
    for k in keys:
        assert _same(from_bytes(b.read(k)), _entry(k))
    b.delete(keys[1])
    b.delete(keys[1])
    assert b.read(keys[1]) is None and len(b.entries()) == 4
    with pytest.raises(ValueError, match="bad KV entry key"):
        b.read("../escape")
    if kind in ("dir", "shared"):
        assert not list((b.root).rglob("*.tmp"))
    # a tier reopened on the same storage finds the entries
    t = BlobTier(_backend(kind, tmp_path) if kind != "memory" else b)
    assert len(t) == 4 and _same(t.get(keys[2]), _entry(keys[2]))


def _fill(tier, keys):
    for k in keys:
        tier.put(k, _entry(k))


@pytest.mark.parametrize("make", ["memory", "blob"])
def test_lru_eviction_order(make, tmp_path):
    size = _entry(_key(0)).nbytes if make == "memory" else len(to_bytes(_entry(_key(0))))
    tier = (MemoryTier(3 * size, "lru") if make == "memory"
            else BlobTier(LocalDirBackend(tmp_path / "d"), 3 * size, "lru"))
    a, b, c, d, e = (_key(i) for i in range(5))
    _fill(tier, [a, b, c])
    assert tier.get(a) is not None  # a is now the most recent
    tier.put(d, _entry(d))
    assert b not in tier and {a, c, d} <= set(tier._sizes)
    tier.get(c)
    tier.put(e, _entry(e))  # a is the least recent now
    assert a not in tier and c in tier and d in tier and e in tier
    assert tier.evictions == 2 and tier.used_bytes <= 3 * size
    if make == "blob":  # evicted means deleted from the storage
        assert tier.backend.read(a) is None and tier.backend.read(b) is None


@pytest.mark.parametrize("make", ["memory", "blob"])
def test_lfu_eviction_order(make, tmp_path):
    size = _entry(_key(0)).nbytes if make == "memory" else len(to_bytes(_entry(_key(0))))
    tier = (MemoryTier(3 * size, "lfu") if make == "memory"
            else BlobTier(LocalDirBackend(tmp_path / "d"), 3 * size, "lfu"))
    a, b, c, d, e, f = (_key(i) for i in range(6))
    _fill(tier, [a, b, c])
    for _ in range(3):
        tier.get(a)
    tier.get(c)  # counts: a 4, b 1, c 2
    tier.put(d, _entry(d))
    assert b not in tier  # the least frequently used, although not the least recent
    tier.put(e, _entry(e))  # d (count 1) goes before c (2)
    assert d not in tier and a in tier and c in tier and e in tier
    tier.get(e)
    tier.get(e)  # e 3, c 2: c goes next
    tier.put(f, _entry(f))
    assert c not in tier and a in tier and e in tier and f in tier


def test_lfu_remembers_evicted_counts():
    size = _entry(_key(0)).nbytes
    tier = MemoryTier(2 * size, "lfu")
    a, b, c, d = (_key(i) for i in range(4))
    _fill(tier, [a, b])
    for _ in range(5):
        tier.get(a)
    tier.discard(a)  # deleted, not evicted: its count is gone
    _fill(tier, [a, c])  # b (1) goes; a is back as a newcomer (1)
    tier.get(c)  # c 2, a 1
    for _ in range(5):
        tier.get(a)  # a 6
    tier.put(d, _entry(d))  # c (2) is evicted, its count kept
    assert c not in tier and a in tier and d in tier
    tier.put(c, _entry(c))  # c returns with 2 + 1: d (1) is the victim, not c
    assert d not in tier and c in tier and a in tier


def test_entry_larger_than_budget_is_served_not_stored():
    tier = MemoryTier(10, "lru")
    k = _key(0)
    assert _same(tier.put(k, _entry(k)), _entry(k)) and k not in tier and tier.used_bytes == 0
    with pytest.raises(ValueError, match="eviction policy"):
        MemoryTier(10, "fifo")
    with pytest.raises(ValueError, match="quant"):
        MemoryTier(10, quant="int4")


def test_miss_computes_once_and_promotes(tmp_path):
    calls = []

    def compute(key):
        calls.append(key)
        return _entry(key)

    size = _entry(_key(0)).nbytes
    stack = TierStack.default(tmp_path / "disk", ram_bytes=2 * size, disk_bytes=None,
                              remote=f"memory://kvstack-{tmp_path.name}", compute=compute)
    k = _key(7)
    for _ in range(4):
        assert _same(stack.get(k), _entry(k))
    assert calls == [k] and stack.computed == 1
    host, disk, remote = stack.tiers
    assert host.hits == 3 and disk.hits == 0 and k in disk and k in remote  # written through
    # push k out of RAM: the next read comes from disk, is promoted, and computes nothing
    stack.get(_key(8))
    stack.get(_key(9))
    assert k not in host
    assert _same(stack.get(k), _entry(k)) and disk.hits == 1 and k in host and len(calls) == 3
    # a fresh stack over the same disk + remote (another replica) computes nothing either
    other = TierStack.default(tmp_path / "disk", ram_bytes=2 * size, remote=f"memory://kvstack-{tmp_path.name}",
                              compute=compute)
    assert _same(other.get(_key(8)), _entry(_key(8))) and len(calls) == 3
    # only in the remote tier: served from there and copied into disk and RAM
    disk.discard(_key(9))
    host.discard(_key(9))
    ent, where = stack.lookup(_key(9))
    assert where == 2 and _same(ent, _entry(_key(9))) and _key(9) in disk and _key(9) in host
    with pytest.raises(KeyError, match="no compute callback"):
        TierStack([MemoryTier()]).get(_key(1))


def test_concurrent_threads_compute_once():
    calls = []
    gate = threading.Event()

    def compute(key):
        calls.append(key)
        gate.wait(5)  # hold the computation until every thread is waiting on it
        return _entry(key)

    stack = TierStack([MemoryTier(1 << 20)], compute=compute)
    k = _key(3)
    out = []
    threads = [threading.Thread(target=lambda: out.append(stack.get(k))) for _ in range(8)]
    for t in threads:
        t.start()
    while not calls:
        pass
    gate.set()
    for t in threads:
        t.join()
    assert calls == [k] and len(out) == 8 and all(_same(o, _entry(k)) for o in out)


def test_int8_slow_tiers(tmp_path):
    size = _entry(_key(0), dtype=torch.float32).nbytes
    stack = TierStack.default(tmp_path / "disk", ram_bytes=size, slow_quant="int8",
                              compute=lambda key: _entry(key, dtype=torch.float32))
    a, b = _key(1), _key(2)
    assert stack.get(a).scale is None  # RAM keeps the full-precision form
    stack.get(b)  # a leaves RAM
    disk = stack.tiers[1]
    assert len(disk) == 2 and disk.used_bytes / 2 < size / 2  # int8 + scales + header: under half of fp32
    back = stack.get(a)
    ref = _entry(a, dtype=torch.float32).kv
    assert back.kv.dtype == torch.int8 and back.scale is not None
    step = ref.abs().amax(dim=1, keepdim=True) / 127  # per-channel quantisation step
    assert ((back.dequant(torch.float32) - ref).abs() <= step / 2 + 1e-6).all()


# ----------------------------------------------------------------------------- two processes, one tier
def _worker(kind: str, root: str, seed: int, n_ops: int, n_keys: int, budget, out, barrier):
    import random

    backend = LocalDirBackend(root) if kind == "dir" else FsspecBackend(f"file://{root}")
    tier = BlobTier(backend, budget, "lru")
    rng = random.Random(seed)
    barrier.wait(60)  # both processes run their operations at the same time
    written, corrupt, lost, hits = set(), 0, 0, 0
    for _ in range(n_ops):
        k = _key(rng.randrange(n_keys))
        if rng.random() < 0.5:
            tier.put(k, _entry(k, tokens=256))  # 64 KiB entries: several write() calls each
            written.add(k)
            continue
        got = tier.get(k)
        if got is None:
            lost += budget is None and k in written  # unbounded: nothing may vanish
            continue
        hits += 1
        corrupt += not _same(got, _entry(k, tokens=256))
    out.put({"seed": seed, "written": sorted(written), "corrupt": corrupt + tier.corrupt, "lost": lost,
             "hits": hits})


@pytest.mark.parametrize("kind,budget", [("dir", None), ("file", None), ("dir", 12 * 66_000)])
def test_two_processes_share_one_tier(kind, budget, tmp_path):
    """Two processes x 500 random put/get on 40 keys: no read ever returns wrong bytes, and (unbounded)
    nothing written is ever missing; with a budget both evict concurrently and reads may miss, never corrupt."""
    ctx = mp.get_context("forkserver")  # a fresh interpreter (no forked torch threads), torch imported once
    ctx.set_forkserver_preload(["tests.test_kv_tiers"])
    out = ctx.Queue()
    root = str(tmp_path / "tier")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(kind, root, s, 500, 40, budget, out, barrier)) for s in (1, 2)]
    for p in procs:
        p.start()
    res = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(r["corrupt"] for r in res) == 0
    assert sum(r["hits"] for r in res) > 50  # the readers really read
    backend = LocalDirBackend(root) if kind == "dir" else FsspecBackend(f"file://{root}")
    if budget is None:
        assert sum(r["lost"] for r in res) == 0
        written = set(res[0]["written"]) | set(res[1]["written"])
        for k in written:  # every entry either process wrote is there, whole
            assert _same(from_bytes(backend.read(k)), _entry(k, tokens=256))
    for k, _ in backend.entries():
        from_bytes(backend.read(k))  # whatever is left decodes
    assert not [p for p in (tmp_path / "tier").rglob("*.tmp") if p.is_file()]  # no temporaries left


# ----------------------------------------------------------------------------- the store over the tiers
@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    try:
        from blockrag.models import load_tokenizer

        return load_tokenizer()
    except Exception as e:  # pragma: no cover - no local SmolLM2 tokenizer
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")


TEXTS = ["Ada Lovelace lives in Paris and writes programs.", "Bob works at Acme in Lyon.",
         "The Acme factory makes rockets and anvils."]
QUESTION = "Where does Ada live?"


def test_on_demand_answers_like_precompute(tok, tmp_path):
    """Passages never encoded at indexing time are computed when a question needs them (through a host ->
    disk -> fsspec-memory stack, or the store's own folder) and give the precomputed path's logits."""
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.documents import Chunk
    from tests.tiny_models import tiny_llama

    model = tiny_llama(seed=5, layers=3, vocab=len(tok))
    chunks = [Chunk(id=f"c{i}", doc_id=f"d{i}", position=0, text=t,
                    token_ids=tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(TEXTS)]
    pre = KVCacheStore(tmp_path / "pre", model, tok, dtype=torch.float32)
    assert pre.add(chunks) == 3
    ref, _ = Generator(model=model, tokenizer=tok, store=pre).prefill(QUESTION, chunks, mode="turbo")

    stack = TierStack.default(tmp_path / "disk", ram_bytes=1 << 20, remote=f"memory://od-{tmp_path.name}")
    od = KVCacheStore(tmp_path / "od", model, tok, dtype=torch.float32, kv_policy="on-demand", tiers=stack)
    assert od.add(chunks) == 0 and len(od) == 3 and not any(c in od for c in chunks)  # recorded, not encoded
    gen = Generator(model=model, tokenizer=tok, store=od)
    got, _ = gen.prefill(QUESTION, chunks, mode="turbo")
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    assert all(c in od for c in chunks) and stack.tiers[2].bytes_written > 0
    n = stack.computed
    again, _ = gen.prefill(QUESTION, chunks, mode="turbo")
    assert stack.computed == n and torch.equal(again, got)  # served from the tiers now
    # another replica over the same disk and remote computes nothing
    stack2 = TierStack.default(tmp_path / "disk", ram_bytes=1 << 20, remote=f"memory://od-{tmp_path.name}")
    od2 = KVCacheStore(tmp_path / "od2", model, tok, dtype=torch.float32, kv_policy="on-demand", tiers=stack2)
    for c in chunks:
        assert torch.equal(od2.get(c).kv, od.get(c).kv)
    assert stack2.computed == 0
    # on-demand without tiers: the store's own folder fills on the first question
    plain = KVCacheStore(tmp_path / "plain", model, tok, dtype=torch.float32, kv_policy="on-demand")
    assert plain.add(chunks) == 0 and chunks[0] not in plain
    got2, _ = Generator(model=model, tokenizer=tok, store=plain).prefill(QUESTION, chunks, mode="turbo")
    assert torch.allclose(got2, ref, atol=1e-5, rtol=0) and all(c in plain for c in chunks)
    # one entry computed alone equals the batched encoding
    assert torch.allclose(plain._compute(chunks[1]).kv, pre.get(chunks[1]).kv, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kv_policy"):
        KVCacheStore(tmp_path / "bad", model, tok, kv_policy="lazy")

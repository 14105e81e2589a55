"""Cache size buckets, buffer growth, question padding and warm-up of the Generator.

CPU: the bucket arithmetic, one shared allocation seen by caches of several sizes, growth, and the padded
question block computed eagerly (same logits and answers as the unpadded, unshared path). GPU (skips
without CUDA): warmed graphs serve a request with no capture, padded question graphs give the eager
answers, and an unwarmed bucket is captured before use (never an eager fallback).
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS

pytest.importorskip("transformers")

TOL = 2e-3
TEXTS = [
    "The lighthouse of Merrowgate has a copper roof and a red door.",
    "Its keeper, Ada Flint, rows to the mainland every second Tuesday.",
    "The lamp was converted to electricity in 1931 and automated in 1987.",
    "Merrowgate harbour freezes over about one winter in ten.",
    "Ferries leave for the island of Stroma at nine and at four.",
    "A museum in the old fog-signal house shows the original lens.",
]
QUESTION = "What roof does the lighthouse have?"


def test_size_buckets():
    from blockrag.attention_kv.generate import question_bucket, size_bucket, size_buckets

    assert size_buckets(131072) == [4096, 8192, 16384, 32768, 65536, 131072]
    assert size_buckets(40000) == [4096, 8192, 16384, 32768, 40000]
    assert size_buckets(1000) == [1000]
    assert size_buckets(300, min_bucket=64) == [64, 128, 256, 300]
    assert size_bucket(4096, 131072) == 4096 and size_bucket(4097, 131072) == 8192
    assert size_bucket(131072, 131072) == 131072 and size_bucket(131073, 131072) is None
    assert [question_bucket(n) for n in (1, 16, 17, 50, 256)] == [16, 16, 32, 64, 256]
    assert question_bucket(257) is None
    with pytest.raises(ValueError):
        size_buckets(0)


def test_cache_bytes_of_the_8b_shape():
    from blockrag.attention_kv.generate import kv_bytes

    class Dims:  # Llama-3-8B: 32 layers, 8 KV heads of 128
        n_layers, n_kv_heads, head_dim = 32, 8, 128

    assert kv_bytes(Dims, 131072, torch.bfloat16) == 16 * 2 ** 30  # 16 GiB at 128K tokens
    assert kv_bytes(Dims, 32768, torch.bfloat16) == 4 * 2 ** 30


@pytest.fixture
def tiny(tokenizer):
    return MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa"), tokenizer


def _chunks(tok, texts):
    from blockrag.documents import Chunk

    return [Chunk(id=f"c{i}", doc_id="d", position=i, text=t,
                  token_ids=tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(texts)]


def test_caches_share_one_allocation(tiny):
    from blockrag.attention_kv.block_cache import BlockKVCache

    model, _ = tiny
    big = BlockKVCache(model, 256, rope="stitch")
    small = BlockKVCache(model, 64, rope="stitch", kv=big.kv)
    assert small.kv.data_ptr() == big.kv.data_ptr() and small.max_len == 64 and small.kv.shape[2] == 64
    small.kv[:, :, 3].fill_(7.0)
    assert bool((big.kv[:, :, 3] == 7.0).all())
    with pytest.raises(ValueError, match="does not hold"):
        BlockKVCache(model, 512, rope="stitch", kv=big.kv)
    # device positions are allocated once: graphs captured earlier keep reading the same tensor
    p1 = small.device_positions(1)
    p2 = small.device_positions(300)
    assert p1.data_ptr() == p2.data_ptr()
    with pytest.raises(ValueError, match="at most"):
        small.device_positions(10 ** 6)


@torch.no_grad()
def test_decode_through_sdpa_masks_the_keys_past_the_device_length(tiny):
    """A device-positioned decoded token with ``decode_sdpa`` (what the SDPA decode graph captures): attention
    over the whole buffer with the keys past ``dev_len`` masked equals attention over the valid keys alone;
    the mask is built at layer 0 and follows ``dev_len`` from one step to the next."""
    from blockrag.attention_kv.block_cache import BlockKVCache
    from blockrag.attention_kv.masks import attend_reference

    model, _ = tiny
    cache = BlockKVCache(model, 64, rope="stitch")
    g = torch.Generator().manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(cache.kv.dtype))
    hq, hkv, d = model.config.num_attention_heads, model.config.num_key_value_heads, cache.head_dim
    cache.decode_sdpa = True
    for pos in (20, 21, 47):
        cache.begin_device(1)
        cache.set_device_positions(pos, 1)
        for layer in (0, 1):
            q, k, v = (torch.randn(1, h, 1, d, generator=g) for h in (hq, hkv, hkv))
            got = cache.attend(layer, q, k, v)
            kk = cache.k[layer, :, :pos + 1].transpose(1, 2).float()  # the new key written at pos
            vv = cache.v[layer, :, :pos + 1].transpose(1, 2).float()
            assert torch.equal(kk[:, :, pos], k[:, :, 0].to(kk.dtype))
            want = attend_reference(q, kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1),
                                    q_start=pos, scale=cache.scale)
            assert (got.float() - want).abs().max().item() < 1e-5, (pos, layer)
        cache.end_device()


def test_sdpa_decode_graph_that_cannot_be_built_leaves_our_kernel(tiny, tmp_path):
    """A decode graph through SDPA that fails to build (here: no CUDA; on a GPU: no cuDNN attention for the
    shapes) warns once and switches the SDPA decode off; the kernel's graphs still raise as before."""
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = tiny
    gen = Generator(model=model, tokenizer=tok, store=KVCacheStore(tmp_path / "kv", model, tok))
    gen.share_buffers = True
    with pytest.warns(UserWarning, match="decode through SDPA unavailable"):
        assert gen._graph_for(128, 1, sdpa=True) is None
    assert gen._decode_sdpa_failed and (128, 1, "sdpa") not in gen._graphs
    with pytest.raises(RuntimeError, match="CUDA"):
        gen._graph_for(128, 1)


@torch.no_grad()
def test_buckets_grow_and_padded_questions_match_on_cpu(tiny, tmp_path):
    """The bucketed shared buffer (switched on for the CPU) with padded question blocks gives the logits and
    answers of fresh, exact-size buffers; the allocation grows to the largest bucket used and caches of one
    bucket are reused."""
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = tiny
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    plain = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False)
    plain.share_buffers = plain.pad_questions = False
    gen = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False, max_cache_len=1024)
    gen.share_buffers = gen.pad_questions = True
    gen.min_bucket = 64
    chunks = _chunks(tok, TEXTS)
    seen = []
    for n in (1, 6, 2):
        ref, _ = plain.prefill(QUESTION, chunks[:n], "turbo")
        got, info = gen.prefill(QUESTION, chunks[:n], "turbo", room=8)
        assert info["question_bucket"] == 16 and info["n_question"] < 16  # padded
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < TOL
        a = gen.generate(QUESTION, chunks[:n], max_new_tokens=6)
        b = plain.generate(QUESTION, chunks[:n], max_new_tokens=6)
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0
        assert a.timings["cache_bucket"] == info["bucket"]  # (room 8 vs 6 new tokens: the same bucket)
        seen.append((info["bucket"], gen.cache_memory()["buffer_tokens"]))
    (b1, t1), (b6, t6), (b2, t2) = seen
    assert b1 < b6 and t1 == b1 and t6 == b6  # grew to the larger bucket
    assert t2 == t6 and b2 <= b6  # a smaller request afterwards uses a view of the grown allocation
    mem = gen.cache_memory()
    assert mem["buffer_bytes"] == mem["max_bytes"] * t6 // 1024 and set(mem["buckets"]) >= {b2, b6}
    c1, _ = gen._cache_for(b6, None)
    c2, _ = gen._cache_for(b6, None)
    assert c1 is c2
    # past max_cache_len: a fresh buffer (and a warning), never a crash
    with pytest.warns(UserWarning, match="max_cache_len"):
        cache, bucket = gen._cache_for(5000, None)
    assert bucket is None and cache.max_len == 5000
    assert gen.warmup() == {"buckets": [], "question_buckets": [], "graphs": 0, "seconds": 0.0, "cache_bytes": 0}


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_gpu_warmed_buckets_replay_graphs_with_padded_questions(tokenizer, tmp_path):
    from blockrag.attention_kv import Generator, KVCacheStore

    model = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa").cuda()
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    eager = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False)
    gen = Generator(model=model, tokenizer=tokenizer, store=store, max_cache_len=2048)
    gen.paged = False  # the stitched buffer in size buckets (the paged path has its own tests: test_paged.py)
    gen.min_bucket = 128
    rep = gen.warmup(buckets=[128, 256], question_lengths=[16, 32])
    # per bucket: the decode step and two question lengths (the SDPA decode graph needs cuDNN's attention,
    # which has no fp32: its capture warns and is left out)
    assert rep["buckets"] == [128, 256] and rep["question_buckets"] == [16, 32] and rep["graphs"] == 6
    assert gen._decode_sdpa_failed
    chunks = _chunks(tokenizer, TEXTS)
    for question in (QUESTION, "Who keeps the lighthouse and how often does she row to the mainland?"):
        for n in (1, 3):
            a = gen.generate(question, chunks[:n], max_new_tokens=8)
            b = eager.generate(question, chunks[:n], max_new_tokens=8)
            assert a.timings["question_graph"] and a.timings["decode_graph"]
            assert a.timings["graph_capture_ms"] == 0.0  # warmed: nothing captured
            assert a.token_ids == b.token_ids
    # an unwarmed bucket: captured before its first use, still graphed
    many = _chunks(tokenizer, TEXTS * 8)
    a = gen.generate(QUESTION, many, max_new_tokens=8)
    b = eager.generate(QUESTION, many, max_new_tokens=8)
    assert a.timings["cache_bucket"] > 256 and a.timings["graph_capture_ms"] > 0
    assert a.timings["question_graph"] and a.timings["decode_graph"] and a.token_ids == b.token_ids
    # the stitching copy staged on a side stream (the question graph waits per layer group) or not: equal
    loads = gen._stages.loads
    for staged in (True, False):
        gen.staged_stitch = staged
        a = gen.generate(QUESTION, many, max_new_tokens=8)
        assert a.timings["question_graph"] and a.token_ids == b.token_ids
        assert not gen._stages.pending
    assert gen._stages.loads == loads + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_gpu_decode_through_cudnn_sdpa(tokenizer, tmp_path, monkeypatch):
    """bf16: the masked cuDNN attention of a decoded token over the generator's interleaved buffer equals the
    attention over the valid keys (fp32 reference). fp32 (no cuDNN attention): the SDPA decode graph cannot be
    built, the Generator warns once and decodes through our kernel's graph with the eager tokens."""
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv import generate as gm
    from blockrag.attention_kv.block_cache import BlockKVCache
    from blockrag.attention_kv.masks import attend_reference

    model = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa").cuda()
    half = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa").cuda().to(torch.bfloat16)
    cache = BlockKVCache(half, 256, rope="stitch")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g, device="cuda").to(cache.kv.dtype))
    hq, hkv, d = half.config.num_attention_heads, half.config.num_key_value_heads, cache.head_dim
    cache.decode_sdpa = True
    for pos in (30, 200):
        cache.begin_device(1)
        cache.set_device_positions(pos, 1)
        q, k, v = (torch.randn(1, h, 1, d, generator=g, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        got = cache.attend(0, q, k, v)
        kk = cache.k[0, :, :pos + 1].transpose(1, 2).float().repeat_interleave(hq // hkv, 1)
        vv = cache.v[0, :, :pos + 1].transpose(1, 2).float().repeat_interleave(hq // hkv, 1)
        want = attend_reference(q.float(), kk, vv, q_start=pos, scale=cache.scale)
        assert (got.float() - want).abs().max().item() < 2e-2, pos
        cache.end_device()
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    eager = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False)
    gen = Generator(model=model, tokenizer=tokenizer, store=store, max_cache_len=2048)
    gen.paged = False
    gen.min_bucket = 128
    monkeypatch.setattr(gm, "DECODE_SDPA_FILL", 0.0)  # any context would take SDPA
    chunks = _chunks(tokenizer, TEXTS)
    with pytest.warns(UserWarning, match="decode through SDPA unavailable"):
        a = gen.generate(QUESTION, chunks, max_new_tokens=12)
    b = eager.generate(QUESTION, chunks, max_new_tokens=12)
    assert a.timings["decode_graph"] and not a.timings["decode_sdpa"] and a.token_ids == b.token_ids


def test_store_keys_are_memoised_per_content(tiny, tmp_path):
    """The per-request store keys come from a memo keyed on the chunk's id and token ids: equal to the
    store's own keys, and a chunk whose ids change (or another store) gets its own key."""
    from dataclasses import replace

    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = tiny
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    gen = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False)
    chunks = _chunks(tok, TEXTS[:3])
    assert [gen._store_key(c) for c in chunks] == [store.key(c) for c in chunks]
    assert [gen._store_key(c) for c in chunks] == [store.key(c) for c in chunks]  # from the memo
    edited = replace(chunks[0], token_ids=chunks[0].token_ids[:-1])
    assert gen._store_key(edited) == store.key(edited) != store.key(chunks[0])
    other = KVCacheStore(tmp_path / "kv2", model, tok, dtype=torch.float32, prefix="Another prefix.")
    gen.store = other
    assert gen._store_key(chunks[1]) == other.key(chunks[1]) != store.key(chunks[1])
    # the same object: memoised by identity, yet a new token_ids list (or an edited end) gets a new key
    gen.store = store
    c = chunks[2]
    assert gen._store_key(c) == store.key(c)
    c.token_ids = c.token_ids[:-1]
    assert gen._store_key(c) == store.key(c) != store.key(_chunks(tok, TEXTS[2:3])[0])
    c.token_ids[-1] = (c.token_ids[-1] + 1) % len(tok)  # edited in place at its end
    assert gen._store_key(c) == store.key(c)


@torch.no_grad()
def test_context_stitched_before_the_question_is_tokenised(tiny, tmp_path):
    """With the device tier (switched on for the CPU) the context is stitched before the question is tokenised
    when every question bucket falls in one size bucket: same logits and answers as the plain path; near a
    bucket boundary (and for a question longer than every bucket) the usual order runs."""
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = tiny
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    plain = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False)
    plain.share_buffers = plain.pad_questions = False
    gen = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False, max_cache_len=2048,
                    device_cache_bytes=1 << 30)
    gen.share_buffers = gen.pad_questions = True
    gen.min_bucket = 1024  # one bucket below max_cache_len holds the context with every question bucket
    chunks = _chunks(tok, TEXTS)
    early = []
    orig = gen._stitch_early
    gen._stitch_early = lambda *a: early.append(orig(*a)) or early[-1]
    for n in (1, 6):
        ref, _ = plain.prefill(QUESTION, chunks[:n], "turbo")
        got, info = gen.prefill(QUESTION, chunks[:n], "turbo", room=8)
        assert early[-1] is not None and info["bucket"] == early[-1][1]
        assert (got - ref).abs().max().item() < TOL
        assert gen.generate(QUESTION, chunks[:n], max_new_tokens=6).token_ids == \
            plain.generate(QUESTION, chunks[:n], max_new_tokens=6).token_ids
    long_q = " ".join(["why"] * 400) + "?"  # past the largest question bucket: restitched into a larger bucket
    ref, _ = plain.prefill(long_q, chunks[:2], "turbo")
    got, info = gen.prefill(long_q, chunks[:2], "turbo", room=8)
    assert info["question_bucket"] is None and (got - ref).abs().max().item() < TOL
    gen.min_bucket = 64  # buckets of 64, 128, ...: the question buckets span several
    # the buffer (grown above) holds them all: stitched early into the shortest question's bucket and read from
    # the larger bucket a longer question needs (a view of the same buffer), without restitching
    mid_q = " ".join(["why"] * 100) + "?"
    for q in (QUESTION, mid_q):
        ref, _ = plain.prefill(q, chunks[:1], "turbo")
        got, info = gen.prefill(q, chunks[:1], "turbo", room=8)
        assert early[-1] is not None and (got - ref).abs().max().item() < TOL
    assert info["bucket"] > early[-1][1]  # mid_q moved to a larger bucket
    assert gen.generate(mid_q, chunks[:1], max_new_tokens=6).token_ids == \
        plain.generate(mid_q, chunks[:1], max_new_tokens=6).token_ids
    # a buffer that would have to grow for the largest question bucket: the usual order
    fresh = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False, max_cache_len=2048,
                      device_cache_bytes=1 << 30)
    fresh.share_buffers = fresh.pad_questions = True
    fresh.min_bucket = 64
    assert fresh._stitch_early(chunks[:1], 40, 8, None) is None


def test_question_ids_from_the_backend_equal_the_tokenizer_call(tiny, tmp_path):
    """The store tokenises questions through the fast tokenizer's backend once it agreed on the first one: the
    same ids as the tokenizer's own call for every question (and the call itself when the backend disagrees)."""
    from blockrag.attention_kv import KVCacheStore

    model, tok = tiny
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    qs = [QUESTION, "  leading spaces and ünïcödé?", "tabs\tand\nnew lines", "<|im_end|> inside", ""]
    want = [tok(store.question_template.format(question=q), add_special_tokens=False)["input_ids"] for q in qs]
    assert [store.question_ids(q) for q in qs] == want
    assert store._fast_encode not in (None, False)  # the backend is in use after the first question
    store._fast_encode = False
    assert [store.question_ids(q) for q in qs] == want

"""attention_kv on CPU with the real SmolLM2-135M-Instruct (fp32 model, fp32 KV caches for exactness).

Tolerances: fp32 end to end, so question-block logits agree with the reference to ~1e-4 absolute
(logits are O(10)); we assert max |diff| < 2e-3.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

TOL = 2e-3
TEXTS = [
    "Zorblat Industries is headquartered in Vrendale, a river port on the Ulm.",
    "Mira Kesh works for Zorblat Industries as a chemist and was born in Trosk.",
    "The mayor of Vrendale is Tomas Ulk, elected in 2011.",
]
QUESTION = "Which company does Mira Kesh work for?"


@pytest.fixture(scope="module")
def smol():
    from blockrag.models import ModelNotAvailable, load_generator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared CPU
    try:
        model, tok = load_generator(None, dtype=torch.float32, device="cpu")
    except (ModelNotAvailable, OSError, ImportError) as err:  # pragma: no cover
        pytest.skip(f"SmolLM2 not available: {err}")
    yield model, tok
    torch.set_num_threads(threads)


def _chunks(tok, texts=TEXTS):
    from blockrag.documents import Chunk

    return [Chunk(id=f"c{i}", doc_id="d", position=i, text=t,
                  token_ids=tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(texts)]


def _gen(smol, tmp_path, **kw):
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = smol
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32, **kw)
    return Generator(model=model, tokenizer=tok, store=store)


@torch.no_grad()
def test_turbo_equals_block_masked_full_forward(smol, tmp_path):
    """No shared prefix: each passage sees only itself, so the cached pass is exactly a full forward with
    the block mask at contiguous positions (RoPE relative => un-rotated caches are position-free)."""
    from blockrag.attention_kv.masks import block_ids, block_mask_4d

    model, tok = smol
    gen = _gen(smol, tmp_path, prefix="")
    chunks = _chunks(tok)
    logits, info = gen.prefill(QUESTION, chunks, "turbo")
    blocks = [gen.store.chunk_token_ids(c) for c in chunks]
    q_ids = gen.store.question_ids(QUESTION)
    ids = torch.tensor([[t for b in blocks for t in b] + q_ids])
    bid = block_ids(0, [len(b) for b in blocks], len(q_ids))
    mask = block_mask_4d(bid, torch.float32)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    ref = ref[-len(q_ids):]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < TOL
    # 'block' is the same computation
    logits_b, _ = gen.prefill(QUESTION, chunks, "block")
    assert torch.equal(logits_b, logits)


@torch.no_grad()
def test_turbo_equals_hf_stitched_cache(smol, tmp_path):
    """With the shared prefix: each chunk encoded by plain HF after the prefix, keys re-rotated in float64 to
    contiguous positions, HF's own DynamicCache + question forward (SDPA) == our turbo path."""
    from blockrag.attention_kv.model import ModelAdapter
    from blockrag.attention_kv.rope import cos_sin, rotate_half

    model, tok = smol
    gen = _gen(smol, tmp_path)
    chunks = _chunks(tok)
    logits, _ = gen.prefill(QUESTION, chunks, "turbo")
    P = len(gen.store.prefix_ids)
    ad = ModelAdapter.of(model)
    inv = ad.inv_freq.double()

    def rot(x, pos, sign):
        c, s = cos_sin(pos, inv.float())
        f = pos.double()[:, None] * inv[None]
        e = torch.cat([f, f], -1)
        return x * e.cos() + sign * rotate_half(x) * e.sin()

    ks = [[] for _ in range(model.config.num_hidden_layers)]
    vs = [[] for _ in range(model.config.num_hidden_layers)]
    off = P
    for i, c in enumerate(chunks):
        ids = gen.store.prefix_ids + gen.store.chunk_token_ids(c)
        dc = ad.new_hf_cache()
        ad.hf_forward(torch.tensor([ids]), dc)  # HF's own forward fills its DynamicCache
        n = len(ids) - P
        for l, layer in enumerate(dc.layers):
            k, v = layer.keys.double(), layer.values
            if i == 0:
                ks[l].append(k[:, :, :P])
                vs[l].append(v[:, :, :P])
            ku = rot(k[:, :, P:], torch.arange(P, P + n), -1.0)
            ks[l].append(rot(ku, torch.arange(off, off + n), 1.0))
            vs[l].append(v[:, :, P:])
        off += n
    cache = ad.new_hf_cache()
    for l in range(len(ks)):
        cache.update(torch.cat(ks[l], 2).float(), torch.cat(vs[l], 2), l)
    q_ids = gen.store.question_ids(QUESTION)
    ref = ad.hf_forward(torch.tensor([q_ids]), cache, torch.arange(off, off + len(q_ids)), len(q_ids))[0]
    assert (logits - ref).abs().max().item() < TOL
    gen.rope = "stitch"  # rotate once while stitching instead of in the kernel
    logits_s, _ = gen.prefill(QUESTION, chunks, "turbo")
    assert (logits_s - ref).abs().max().item() < TOL
    gen.rope = "kernel"


@torch.no_grad()
def test_blend_full_recompute_equals_full(smol, tmp_path):
    model, tok = smol
    gen = _gen(smol, tmp_path)
    chunks = _chunks(tok)
    full, _ = gen.prefill(QUESTION, chunks, "full")
    blend, info = gen.prefill(QUESTION, chunks, "blend", blend_ratio=1.0)
    assert info["n_recomputed"] == info["n_context"]
    assert (blend - full).abs().max().item() < TOL
    turbo, _ = gen.prefill(QUESTION, chunks, "turbo")
    partial, info = gen.prefill(QUESTION, chunks, "blend", blend_ratio=0.15)
    assert 0 < info["n_recomputed"] < info["n_context"]
    # partial recompute moves the logits towards full
    assert (partial - full).abs().mean() < (turbo - full).abs().mean()


def test_generate_api_streaming(smol, tmp_path):
    model, tok = smol
    gen = _gen(smol, tmp_path)
    chunks = _chunks(tok)
    res = gen.generate(QUESTION, chunks, mode="turbo", max_new_tokens=6)
    assert res.mode == "turbo" and res.chunk_ids == ["c0", "c1", "c2"]
    assert res.ttft_ms > 0 and 0 < len(res.token_ids) <= 6
    s = gen.generate(QUESTION, chunks, mode="turbo", max_new_tokens=6, stream=True)
    pieces = list(s)
    assert s.result is not None and "".join(pieces).strip() == s.result.answer == res.answer
    full = gen.generate(QUESTION, chunks, mode="full", max_new_tokens=6)
    assert full.n_context_tokens == res.n_context_tokens
    with pytest.raises(ValueError):
        gen.generate(QUESTION, chunks, mode="nope")


@torch.no_grad()
def test_device_tier_matches_host_path(smol, tmp_path):
    """The device tier (dequantised chunk caches on the model's device, stitched by one concatenation) gives
    the same logits as per-layer loading from the store, and evicts least-recently-used chunks beyond its
    budget (never those of the current request)."""
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = smol
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    chunks = _chunks(tok)
    plain = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=0)
    tiered = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=1 << 30)
    ref, _ = plain.prefill(QUESTION, chunks, "turbo")
    got, _ = tiered.prefill(QUESTION, chunks, "turbo")
    assert (got - ref).abs().max().item() < 1e-5
    assert len(tiered._dev_tier) == len(chunks) + 1  # + the shared prefix
    small = Generator(model=model, tokenizer=tok, store=store, device_cache_bytes=1)
    small.prefill(QUESTION, chunks[:2], "turbo")
    got, _ = small.prefill(QUESTION, chunks[1:], "turbo")  # chunk 0 is evicted, chunks 1-2 stay
    assert set(small._dev_tier) == {"prefix"} | {store.key(c) for c in chunks[1:]}
    ref, _ = plain.prefill(QUESTION, chunks[1:], "turbo")
    assert (got - ref).abs().max().item() < 1e-5


def test_failed_compilation_falls_back_to_the_plain_graph(monkeypatch):
    """compile_decode / compile_question are optimisations: a torch.compile failure warns, switches the
    option off and captures the uncompiled graph (the graph class is faked: no GPU needed)."""
    import blockrag.attention_kv.generate as gen_mod
    from blockrag.attention_kv.generate import Generator

    made = []

    class FakeGraph:
        def __init__(self, model, cache, n=1, compile=False, select_row=False):
            if compile:
                raise RuntimeError("inductor unavailable")
            made.append(n)

    monkeypatch.setattr(gen_mod, "GraphedStep", FakeGraph)
    g = Generator.__new__(Generator)  # only the fields _graph reads
    g.model, g.compile_decode, g.compile_question = None, True, True
    with pytest.warns(UserWarning, match="compile_decode"):
        assert isinstance(g._graph(None, 1, "compile_decode"), FakeGraph)
    assert made == [1] and g.compile_decode is False and g.compile_question is True
    with pytest.warns(UserWarning, match="compile_question"):
        g._graph(None, 7, "compile_question")
    assert made == [1, 7] and g.compile_question is False

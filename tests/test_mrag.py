"""Multi-Head RAG: voting, exact head weights, incremental updates, save/load, modes."""
import itertools

import numpy as np
import pytest
import torch

from blockrag.documents import Chunk
from blockrag.retrievers.mrag import HeadEncoder, MRAGRetriever, head_weights, vote


def test_vote_toy():
    # head 0 (weight 1): a, b, c ; head 1 (weight 2): c, a ; head 2 (weight 0.5): b
    hits = [[("a", .9), ("b", .8), ("c", .7)], [("c", .9), ("a", .5)], [("b", .3)]]
    out = vote(hits, [1.0, 2.0, 0.5], k=3)
    # a: 1 + 2*0.5 = 2.0 ; b: 0.5 + 0.5 = 1.0 ; c: 0.25 + 2 = 2.25
    assert [h.chunk_id for h in out] == ["c", "a", "b"]
    assert np.allclose([h.score for h in out], [2.25, 2.0, 1.0])
    assert [h.chunk_id for h in vote(hits, [1.0, 2.0, 0.5], k=1)] == ["c"]


def test_head_weights_exact_against_pairs():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(7, 3, 5)).astype(np.float32)
    norms = np.linalg.norm(raw, axis=-1)
    units = raw / norms[..., None]
    got = head_weights(norms, units)
    for h in range(3):
        d = [1 - units[i, h] @ units[j, h] for i, j in itertools.permutations(range(7), 2)]
        assert np.isclose(got[h], norms[:, h].mean() * np.mean(d), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_encoder(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    return HeadEncoder(layers=(-1,), model=model, tokenizer=tokenizer, batch_size=3, max_doc_tokens=32)


def chunks(texts, prefix="c"):
    return [Chunk(id=f"{prefix}{i}", doc_id=f"{prefix}{i}", position=0, text=t) for i, t in enumerate(texts)]


TEXTS = ["cats purr and sleep", "the stock market fell", "rain in spain", "python code compiles",
         "a cat sat on the mat", "bonds and equities", "weather forecast: rain", "compilers and parsers"]


def test_hook_captures_o_proj_input(tiny_encoder):
    heads, single = tiny_encoder.encode(TEXTS[:4])
    assert heads[1].shape == (4, 4, 12) and single.shape == (4, 48)
    # recompute one text alone (no padding) and compare: batching/padding must not change embeddings
    h1, s1 = tiny_encoder.encode([TEXTS[2]])
    assert np.allclose(h1[1][0], heads[1][2], atol=1e-5) and np.allclose(s1[0], single[2], atol=1e-5)
    # reference: HF's own forward, o_proj's input captured by a forward pre-hook, final hidden state
    model = tiny_encoder.model
    ids = torch.tensor([tiny_encoder.prompt_ids(TEXTS[2])])
    got = {}
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: got.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            ref_single = model.model(input_ids=ids).last_hidden_state[0, -1]
    finally:
        hook.remove()
    ref_heads = got["x"][0, -1].reshape(4, 12)
    assert np.allclose(h1[1][0], ref_heads.numpy(), atol=1e-5)
    assert np.allclose(s1[0], ref_single.numpy(), atol=1e-5)


def test_retriever_modes_updates_save_load(tiny_encoder, tmp_path):
    r = MRAGRetriever(encoder=tiny_encoder, name="mrag-test")
    r.build(chunks(TEXTS))
    assert len(r) == 8 and r.head_weights.shape == (4,) and (r.head_weights > 0).all()
    for mode in ("mrag", "split", "single"):
        hits = r.retrieve(TEXTS[0], k=3, mode=mode)
        assert len(hits) == 3
    assert r.retrieve(TEXTS[0], k=1, mode="single")[0].chunk_id == "c0"   # identical text ranks first

    # incremental add + delete == fresh build (weights recomputed exactly)
    inc = MRAGRetriever(encoder=tiny_encoder)
    inc.build(chunks(TEXTS[:5]))
    inc.add(chunks(TEXTS[5:], prefix="x"))
    inc.delete(["c1", "x0"])
    fresh = MRAGRetriever(encoder=tiny_encoder)
    keep = [c for c in chunks(TEXTS[:5]) + chunks(TEXTS[5:], prefix="x") if c.id not in {"c1", "x0"}]
    fresh.build(keep)
    assert np.allclose(inc.head_weights, fresh.head_weights, rtol=1e-5)
    assert np.allclose(inc.slice_weights, fresh.slice_weights, rtol=1e-5)
    q = "rain and weather"
    assert [h.chunk_id for h in inc.retrieve(q, 4)] == [h.chunk_id for h in fresh.retrieve(q, 4)]

    # save / load round trip
    r.save(tmp_path / "mrag")
    loaded = MRAGRetriever.load(tmp_path / "mrag", model=tiny_encoder.model, tokenizer=tiny_encoder.tokenizer)
    man = loaded.manifest()
    assert man["count"] == 8 and man["n_heads"] == 4 and man["layer"] == 1 and man["kind"] == "mrag"
    for mode in ("mrag", "split", "single"):
        a = r.retrieve(q, 4, mode=mode)
        b = loaded.retrieve(q, 4, mode=mode)
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    with pytest.raises(ValueError):
        MRAGRetriever.load(tmp_path / "mrag", model_name="some/other-model")

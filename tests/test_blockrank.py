"""BlockRank: block-sparse path == dense forward with the equivalent explicit 4D mask; KV reuse; invariance."""
import random

import pytest
import torch
from tiny_models import tiny_llama as _tiny_llama

from blockrag.rerankers.blockrank import BlockPrompt, BlockRankReranker, DocKVCache, relevance


def tiny_llama(seed=0):
    return _tiny_llama(seed, layers=4)


def rand_prompt(rng, n_docs=5, tail=3):
    ids = lambda n: [rng.randrange(3, 300) for _ in range(n)]  # noqa: E731
    return BlockPrompt(ids(7), [ids(rng.randrange(2, 15)) for _ in range(n_docs)], ids(6), tail)


def dense_mass(model, prompt: BlockPrompt, layer: int, rows):
    """Reference: HF eager forward over the flat sequence with an explicit additive 4D mask + BlockRank positions."""
    I, Lq = len(prompt.instruction), len(prompt.query)
    lens = [len(d) for d in prompt.docs]
    ids = prompt.instruction + [t for d in prompt.docs for t in d] + prompt.query
    block = [0] * I + [i + 1 for i, n in enumerate(lens) for _ in range(n)] + [-1] * Lq
    T = len(ids)
    b = torch.tensor(block)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    vis = causal & ((b[None, :] == 0) | (b[:, None] < 0) | (b[None, :] == b[:, None]))
    mask = torch.zeros(1, 1, T, T).masked_fill(~vis, torch.finfo(torch.float32).min)
    q0 = I + max(lens)
    pos = torch.cat([torch.arange(I)] + [torch.arange(I, I + n) for n in lens] + [torch.arange(q0, q0 + Lq)])
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=pos[None],
                          output_attentions=True)
    att = out.attentions[layer][0]                         # [H, T, T]
    sel = att[:, [T - Lq + r for r in rows]]               # [H, R, T]
    n_blocks = len(lens) + 2
    kidx = torch.where(b < 0, torch.full_like(b, n_blocks - 1), b)
    mass = torch.zeros(sel.shape[0], sel.shape[1], n_blocks).index_add_(-1, kidx, sel)
    return mass


@pytest.mark.parametrize("attn", ["sdpa", "kernel"])
def test_block_sparse_equals_dense_4d_mask(attn):
    model = tiny_llama()
    rng = random.Random(1)
    for layer in (1, 3):
        prompt = rand_prompt(rng)
        br = BlockRankReranker(model=model, tokenizer=None, layer=layer, attn=attn, query_rows="all", doc_batch=2)
        with torch.inference_mode():
            got = br.mass_ids(prompt, layer)[layer]
        ref = dense_mass(model, prompt, layer, list(range(len(prompt.query))))
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        # and the slow flat path through attend's block ids agrees too
        with torch.inference_mode():
            flat = br.mass_full(prompt, layer, block_sparse=True)[layer]
        assert torch.allclose(flat, ref, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_block_sparse_equals_dense_other_families(family):
    """The same equality through the seam for Qwen2 (q/k/v biases) and Mistral."""
    from tiny_models import MODELS

    model = MODELS[family](seed=2)
    prompt = rand_prompt(random.Random(4))
    br = BlockRankReranker(model=model, tokenizer=None, layer=1, attn="sdpa", query_rows="all", doc_batch=3)
    with torch.inference_mode():
        got = br.mass_ids(prompt, 1)[1]
    ref = dense_mass(model, prompt, 1, list(range(len(prompt.query))))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_kv_reuse_and_permutation_invariance():
    model = tiny_llama(2)
    rng = random.Random(3)
    prompt = rand_prompt(rng, n_docs=6)
    br = BlockRankReranker(model=model, tokenizer=None, layer=2, attn="sdpa", query_rows=3, doc_batch=4)
    with torch.inference_mode():
        base = relevance(br.mass_ids(prompt, 2)[2], 6)
        cache = DocKVCache()
        keys = [f"d{i}" for i in range(6)]
        br.kv_cache = cache
        # half the documents cached first: mixed cached / computed context
        half = BlockPrompt(prompt.instruction, prompt.docs[:3], prompt.query, prompt.tail)
        br.mass_ids(half, 2, cache_keys=keys[:3])
        mixed = relevance(br.mass_ids(prompt, 2, cache_keys=keys)[2], 6)
        assert cache.hits == 3
        allc = relevance(br.mass_ids(prompt, 2, cache_keys=keys)[2], 6)
        assert cache.hits == 9
        br.kv_cache = None
        perm = list(range(6))
        random.Random(0).shuffle(perm)
        shuffled = BlockPrompt(prompt.instruction, [prompt.docs[i] for i in perm], prompt.query, prompt.tail)
        sh = relevance(br.mass_ids(shuffled, 2)[2], 6)
    assert abs(base.sum() - 1) < 1e-5
    assert torch.allclose(torch.tensor(mixed), torch.tensor(base), atol=1e-6)
    assert torch.allclose(torch.tensor(allc), torch.tensor(base), atol=1e-6)
    assert torch.allclose(torch.tensor(sh), torch.tensor(base[perm]), atol=1e-5)


@pytest.mark.slow
def test_smollm2_rerank_api_small():
    from blockrag.documents import Chunk
    from blockrag.models import ModelNotAvailable, load_generator

    try:
        model, tok = load_generator(device="cpu")
    except ModelNotAvailable as err:  # like the other SmolLM2 tests: skipped where the model is not installed
        pytest.skip(str(err))
    br = BlockRankReranker(model=model, tokenizer=tok, layer=8, doc_tokens=24)
    chunks = [Chunk(id="a", doc_id="a", position=0, text="The Eiffel Tower is in Paris, France."),
              Chunk(id="b", doc_id="b", position=0, text="Bananas are rich in potassium."),
              Chunk(id="c", doc_id="c", position=0, text="Mount Everest is the highest mountain.")]
    hits = br.rerank("Where is the Eiffel Tower?", chunks, k=2)
    assert len(hits) == 2 and {h.chunk_id for h in hits} <= {"a", "b", "c"}
    assert hits[0].score >= hits[1].score
    # same scores for (id, text) pairs and for ids looked up in a mapping
    texts = {c.id: c.text for c in chunks}
    again = br.rerank("Where is the Eiffel Tower?", ["a", "b", "c"], k=2, texts=texts)
    assert [h.chunk_id for h in again] == [h.chunk_id for h in hits]

    from blockrag.rerankers.pointwise import PointwiseReranker

    pw = PointwiseReranker(model=model, tokenizer=tok, doc_tokens=24)
    ph = pw.rerank("Where is the Eiffel Tower?", chunks)
    assert ph[0].chunk_id == "a"      # the easy case: yes/no log-odds puts the answer first


def test_finetune_step_gradients():
    from blockrag.rerankers.finetune import blockrank_loss

    model = tiny_llama(4)
    model.train()
    rng = random.Random(5)
    prompt = rand_prompt(rng, n_docs=4)
    br = BlockRankReranker(model=model, tokenizer=None, layer=2, attn="sdpa", query_rows="tail")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        loss, lm, con = blockrank_loss(br, prompt, answer=[5, 6, 7], positives=[1], layers=(2,), lam=1.0,
                                       temperature=0.1)
        opt.zero_grad()
        loss.backward()
        assert model.model.layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0   # contrastive reaches layer 2's q
        opt.step()
        losses.append(float(loss))
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]

"""CUDA-graph replays of the question forward and of decode steps (positions and cache length on the device)
equal the eager forward, across contexts of different lengths held in the same buffer. Needs a GPU;
fp32 model, so the tolerance is tight (max |logit diff| < 1e-3 on logits of size ~1)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama as _tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_llama():
    return _tiny_llama(0, layers=3, hidden=128, head_dim=32).to("cuda")


@torch.no_grad()
def test_graphed_question_and_decode_match_eager():
    from blockrag.attention_kv.block_cache import BlockKVCache, GraphedStep, forward_block

    model = tiny_llama()
    cache = BlockKVCache(model, 512, rope="stitch")
    g = torch.Generator().manual_seed(1)
    q_graph = decode_graph = None
    for L in (37, 200, 129):  # one pair of graphs serves every context length
        ctx = torch.randint(3, 300, (L,), generator=g).cuda()
        q = torch.randint(3, 300, (6,), generator=g).cuda()
        forward_block(model, cache, ctx, 0)  # the context's K/V (plain causal prefill)
        eager = forward_block(model, cache, q, L)[0, -1]
        toks = [int(eager.argmax())]
        eager_steps = []
        for i in range(3):
            eager_steps.append(forward_block(model, cache, torch.tensor([toks[-1]], device="cuda"), L + 6 + i)[0, -1])
            toks.append(int(eager_steps[-1].argmax()))
        if q_graph is None:
            q_graph, decode_graph = GraphedStep(model, cache, n=6), GraphedStep(model, cache, n=1)
        forward_block(model, cache, ctx, 0)
        got = q_graph.replay(q, L)[0][0]
        assert (got - eager).abs().max().item() < 1e-3
        for i in range(3):
            got = decode_graph.replay(toks[i], L + 6 + i)[0][0]
            assert (got - eager_steps[i]).abs().max().item() < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_run_ahead_decode_equals_step_by_step(fused):
    """GraphedStep.run_ahead (each step queued before the previous token is read, positions advanced on the
    device) gives the same tokens as eager greedy steps, with plain and fused layers (ModelAdapter.fuse)."""
    from blockrag.attention_kv.block_cache import BlockKVCache, GraphedStep, forward_block
    from blockrag.attention_kv.model import ModelAdapter

    model = tiny_llama()
    if fused:
        assert ModelAdapter.of(model).fuse()
    cache = BlockKVCache(model, 512, rope="stitch")
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, 300, (90,), generator=g).cuda()
    step = GraphedStep(model, cache, n=1)
    assert step.advances
    forward_block(model, cache, ctx, 0)
    toks = [int(forward_block(model, cache, ctx[-1:], 90)[0, -1].argmax())]
    for i in range(12):
        toks.append(int(forward_block(model, cache, torch.tensor([toks[-1]], device="cuda"), 91 + i)[0, -1].argmax()))
    forward_block(model, cache, ctx, 0)
    forward_block(model, cache, ctx[-1:], 90)
    assert list(step.run_ahead(toks[0], 91, 12)) == toks[1:]
    it = step.run_ahead(toks[0], 91, 12)  # stopped early, then a fresh run from the same place
    assert [next(it) for _ in range(3)] == toks[1:4]
    it.close()
    assert list(step.run_ahead(toks[0], 91, 5)) == toks[1:6]
    with pytest.raises(ValueError):
        list(step.run_ahead(toks[0], 500, 20))


@torch.no_grad()
def test_compiled_decode_step_matches_eager():
    """torch.compile (inductor) inside the captured decode step: same logits as the eager step."""
    from blockrag.attention_kv.block_cache import BlockKVCache, GraphedStep, forward_block

    model = tiny_llama()
    cache = BlockKVCache(model, 512, rope="stitch")
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(3, 300, (150,), generator=g).cuda()
    forward_block(model, cache, ctx, 0)
    eager = forward_block(model, cache, ctx[-1:], 150)[0, -1]
    step = GraphedStep(model, cache, n=1, compile=True)
    forward_block(model, cache, ctx, 0)
    got = step.replay(ctx[-1:], 150)[0][0]
    assert (got - eager).abs().max().item() < 1e-3
    torch._dynamo.reset()


@torch.no_grad()
def test_cached_forward_on_gpu_equals_hf_forward():
    """On the GPU (Triton kernel, both RoPE placements): a causal prefill into the stitched buffer through the
    seam, then a question block, gives HF's own forward's logits. fp32 weights, but the kernel's fp32 dots may
    run in TF32: max |diff| < 2e-2 on logits of size ~1."""
    from blockrag.attention_kv.block_cache import BlockKVCache, forward_block

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (180,), generator=g).cuda()
    ref = model(input_ids=ids[None]).logits[0, -8:]
    for rope in ("stitch", "kernel"):
        cache = BlockKVCache(model, 256, rope=rope)
        forward_block(model, cache, ids[:172], 0)
        got = forward_block(model, cache, ids[172:], 172, logits_to_keep=8)[0]
        assert (got - ref).abs().max().item() < 2e-2, rope

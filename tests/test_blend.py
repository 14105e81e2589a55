"""CacheBlend (attention_kv/blend.py) on a tiny random Llama, CPU, fp32: exactness where it must be exact,
the recompute budget, and that a teacher-forced answer does not change the selection (``n_score``)."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama as _tiny_llama

pytest.importorskip("transformers")

TOL = 1e-4


def tiny_llama(seed=0, layers=6):
    return _tiny_llama(seed, layers=layers)


class _Part:  # the ChunkKV fields BlockKVCache.load uses
    def __init__(self, kv):
        self.kv, self.scale = kv, None

    @property
    def n_tokens(self):
        return self.kv.shape[1]


@torch.no_grad()
def chunk_part(model, ids):
    """A chunk's cache as the KV store keeps it: encoded alone, keys un-rotated. -> kv[L, n, 2, Hkv, D]."""
    from blockrag.attention_kv.model import ModelAdapter
    from blockrag.attention_kv.rope import cos_sin, unrotate

    ad = ModelAdapter.of(model)
    dc = ad.new_hf_cache()
    ad.hf_forward(torch.tensor([ids]), dc)  # HF's own forward fills its DynamicCache
    inv_freq = ad.inv_freq
    c, s = cos_sin(torch.arange(len(ids)), inv_freq)
    kv = []
    for lay in dc.layers:
        k = unrotate(lay.keys[0].float(), c, s)  # [Hkv, n, D]
        kv.append(torch.stack([k.transpose(0, 1), lay.values[0].transpose(0, 1).float()], dim=1))
    return _Part(torch.stack(kv))


@torch.no_grad()
def run_blend(model, chunks, q, rope="stitch", **kw):
    from blockrag.attention_kv.blend import blend_prefill
    from blockrag.attention_kv.block_cache import BlockKVCache

    ctx = [t for c in chunks for t in c]
    cache = BlockKVCache(model, len(ctx) + len(q) + 4, rope=rope)
    cache.load([chunk_part(model, c) for c in chunks], 0)
    run_blend.cache = cache
    starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    return blend_prefill(model, cache, torch.tensor(ctx), torch.tensor(q), logits_to_keep=len(q),
                         chunk_starts=starts, **kw)


@torch.no_grad()
def full_logits(model, chunks, q):
    ids = torch.tensor([[t for c in chunks for t in c] + q])
    return model(input_ids=ids).logits[0, -len(q):]


def _ids(rng, n):
    return [int(x) for x in torch.randint(3, 300, (n,), generator=rng)]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    rng = torch.Generator().manual_seed(1)
    chunks = [_ids(rng, n) for n in (9, 14, 11, 17)]
    return model, chunks, _ids(rng, 6)


@pytest.mark.parametrize("rope", ["stitch", "kernel"])
@pytest.mark.parametrize("carry", [False, True])
def test_single_chunk_is_exact(setup, rope, carry):
    """One chunk: the stitched cache is the full cache, so any selection, with gradual filtering and the
    K/V carried for dropped tokens (written in the right RoPE frame, at the right rows), is exact."""
    model, chunks, q = setup
    one = [chunks[0] + chunks[1]]
    logits, n = run_blend(model, one, q, rope=rope, ratio=0.3, gradual=2.5, reattend=True, carry=carry)
    assert (logits - full_logits(model, one, q)).abs().max().item() < TOL
    assert 0 < n <= 0.3 * len(one[0])


@pytest.mark.parametrize("rope", ["stitch", "kernel"])
def test_full_ratio_recovers_full_forward(setup, rope):
    model, chunks, q = setup
    logits, _ = run_blend(model, chunks, q, rope=rope, ratio=1.0, carry=True)
    assert (logits - full_logits(model, chunks, q)).abs().max().item() < TOL


def test_partial_blend_moves_toward_full(setup):
    """Several chunks: turbo (ratio 0) differs from full; the default blend options at 30% get closer."""
    model, chunks, q = setup
    ref = full_logits(model, chunks, q)
    err0 = (run_blend(model, chunks, q, ratio=0.0)[0] - ref).abs().mean().item()
    err = (run_blend(model, chunks, q, ratio=0.3, gradual=2.5, reattend=True, carry=True)[0] - ref).abs().mean()
    assert err0 > 10 * TOL
    assert err.item() < err0


def test_carry_writes_only_the_drop_layer(setup):
    """carry=True: a token's K/V differ from the stitched cache only on a contiguous run of layers from
    the first recomputed one (the layers it went through + the one it was dropped at), never after."""
    from blockrag.attention_kv.block_cache import BlockKVCache

    model, chunks, q = setup
    Lc = sum(len(c) for c in chunks)
    orig = BlockKVCache(model, Lc + len(q) + 4, rope="stitch")
    orig.load([chunk_part(model, c) for c in chunks], 0)
    runs = {}
    for carry in (False, True):
        run_blend(model, chunks, q, ratio=0.2, gradual=2.5, reattend=True, carry=carry)
        d = (run_blend.cache.kv[:, 0, :Lc] - orig.kv[:, 0, :Lc]).abs().amax(dim=(-1, -2, -3))  # [L, Lc]
        runs[carry] = (d > 1e-5)[2:, len(chunks[0]):]  # post-check layers; chunk 0's cache is exact anyway
    assert not torch.equal(runs[False], runs[True]), "carry had no effect"
    for carry, changed in runs.items():
        depth = changed.sum(0)
        first_unchanged = torch.arange(changed.shape[0])[:, None] >= depth[None, :]
        assert not (changed & first_unchanged).any(), f"carry={carry}: K/V changed after a token left the set"
    assert runs[True].sum() > runs[False].sum()


@pytest.mark.parametrize("gradual", [1.0, 1.5, 2.5, 4.0])
def test_schedule_budget(gradual):
    from blockrag.attention_kv.blend import _schedule

    for lc, n_rec, ratio in [(300, 28, 0.15), (57, 5, 0.3), (1000, 3, 0.05)]:
        n_sel = math.floor(ratio * lc)
        sizes = _schedule(n_sel, lc, n_rec, gradual)
        assert len(sizes) == n_rec
        assert all(a >= b for a, b in zip(sizes, sizes[1:])), "nested sets: never grows"
        assert sum(sizes) <= n_sel * n_rec, "mean per layer within the budget"
        assert sum(sizes) >= n_sel * n_rec - n_rec
        assert all(0 <= x <= lc for x in sizes)


@pytest.mark.parametrize("select", ["attn", "dev*attn"])
def test_answer_rows_do_not_steer_selection(setup, select):
    """With n_score = question length, appending a teacher-forced answer leaves the question rows' logits
    (which are causal, so depend only on the selection) unchanged."""
    model, chunks, q = setup
    rng = torch.Generator().manual_seed(7)
    ans = _ids(rng, 30)
    kw = dict(ratio=0.15, gradual=2.5, reattend=True, carry=True, select=select)
    base, _ = run_blend(model, chunks, q, **kw)
    with_ans, _ = run_blend(model, chunks, q + ans, n_score=len(q), **kw)
    assert (with_ans[:len(q)] - base).abs().max().item() < TOL

"""Zero-copy stitching: attention through a page table (kernels/paged_attention.py, paged_cache.py).

Every check compares with the plain full computation: the passages' un-rotated keys stitched at contiguous
positions, rotated there in fp32 (``apply_rope``), and ``attend_reference`` (causal), against the paged
arena where each chunk's keys were rotated to their in-chunk positions and the kernel owes them a rotation
by their page's ``delta`` (applied to the query rows). Tolerances: 2e-5 in fp32 (both sides fp32 math), 3e-2
in bf16 (the query rows are rounded to bf16 after their rotation, keys once at storage).

CPU: the Triton kernel under ``TRITON_INTERPRET=1`` and the PyTorch reference (small shapes, fast), the
arena's LRU, offsets past 2^31 elements (a sparse memory-mapped arena), and the Generator's paged turbo
path against its stitched path. GPU (skips without CUDA): Llama-3-8B and Qwen2-7B heads in bf16, and the
graphed Generator against the eager stitched one.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from blockrag.attention_kv.kernels.paged_attention import attend_paged, attend_paged_reference  # noqa: E402
from blockrag.attention_kv.kernels.reference import apply_rope, attend_reference  # noqa: E402
from blockrag.attention_kv.paged_cache import PageArena, PagedKVCache  # noqa: E402
from blockrag.attention_kv.rope import cos_sin  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class _Dims:
    """What PagedKVCache reads from a model (through ModelAdapter.of: an object with these attributes)."""

    def __init__(self, n_layers, hq, hkv, d):
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = n_layers, hq, hkv, d
        self.scale = d ** -0.5
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def _cache(dims, arena, max_pos=4096, tail=64):
    from blockrag.attention_kv import model as seam

    orig = seam.ModelAdapter.of
    seam.ModelAdapter.of = staticmethod(lambda m: m)  # the dims object stands in for a model
    try:
        return PagedKVCache(dims, arena, max_pos, tail_tokens=tail)
    finally:
        seam.ModelAdapter.of = orig


def _setup(lens, Lq, hq, hkv, d, page, dtype, seed=0, n_pages=None, filler=3):
    """An arena holding chunks of ``lens`` tokens (with other entries between them), a request over them,
    ``Lq`` question rows in the tail; returns (q, arena layer, cache, full-computation output)."""
    g = torch.Generator().manual_seed(seed)
    dims = _Dims(1, hq, hkv, d)
    need = sum(-(-n // page) for n in lens) * 2 + filler * 4 + 16
    arena = PageArena(1, hkv, d, n_pages or need, page, dtype, DEV)
    cache = _cache(dims, arena, max_pos=max(4096, sum(lens) + Lq + 64))  # (cos/sin tables cover every delta)
    raw = [torch.randn(1, n, 2, hkv, d, generator=g).to(DEV, dtype) for n in lens]
    parts = []
    for i, r in enumerate(raw):
        parts.append(arena.put(f"c{i}", r, cache.cos, cache.sin))
        if i < filler:  # entries between the request's chunks: its pages are not consecutive
            arena.put(f"other{i}", torch.randn(1, 2 * page - 3, 2, hkv, d, generator=g).to(DEV, dtype),
                      cache.cos, cache.sin)
    L = sum(lens)
    cache.set_request(parts, L)
    inv = dims.inv_freq.to(DEV)
    pos = torch.arange(L, L + Lq, device=DEV)
    qk = torch.randn(1, hkv, Lq, d, generator=g).to(DEV)
    qv = torch.randn(1, hkv, Lq, d, generator=g).to(DEV, dtype)
    qk_rot = apply_rope(qk, pos, inv).to(dtype)
    cache.begin(L, Lq)
    flat = arena.kv[0].view(-1, 2, hkv, d)
    flat.index_copy_(0, cache.meta[1 + Lq:1 + 2 * Lq], torch.stack([qk_rot[0].transpose(0, 1),
                                                                      qv[0].transpose(0, 1)], 1))
    q = apply_rope(torch.randn(1, hq, Lq, d, generator=g).to(DEV), pos, inv).to(dtype)
    # the plain full computation: stitched un-rotated keys rotated at their contiguous positions
    k_all = torch.cat([r[0, :, 0] for r in raw], 0).permute(1, 0, 2)[None].float()
    v_all = torch.cat([r[0, :, 1] for r in raw], 0).permute(1, 0, 2)[None].float()
    k = torch.cat([apply_rope(k_all, torch.arange(L, device=DEV), inv), qk_rot.float()], 2)
    v = torch.cat([v_all, qv.float()], 2)
    full = attend_reference(q.float(), k, v)
    return q, arena.kv[0], cache, full


def _run(q, layer, cache, backend):
    n = q.shape[2]
    return attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half, cache.sin_half,
                        max_pages=cache.capacity, backend=backend)


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------ CPU (interpreter)
@pytest.mark.parametrize("hq,hkv,Lq", [(4, 2, 3), (4, 2, 1), (7, 1, 2)])  # GQA 2, one decoded token, Qwen2's 7
def test_paged_kernel_matches_full_computation(hq, hkv, Lq):
    q, layer, cache, full = _setup([5, 20, 7, 33, 16], Lq, hq, hkv, 32, 16, torch.float32)
    ref = _run(q, layer, cache, "torch")
    assert _err(ref, full) < 2e-5
    got = _run(q, layer, cache, "triton")
    assert _err(got, full) < 2e-5
    n = q.shape[2]
    got = attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half,
                       cache.sin_half, max_pages=cache.capacity, backend="triton", pair=True)
    assert _err(got, full) < 2e-5
    for kw in (dict(full=True), dict(full=True, rotate_once=False), dict(seg=True),  # whole-D key tiles
               dict(seg=True, affine=True), dict(seg=True, affine=True, run_step=2)):
        got = attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half,
                           cache.sin_half, max_pages=cache.capacity, backend="triton", **kw)
        assert _err(got, full) < 2e-5, kw


def test_paged_kernel_bf16_and_many_slices():
    """bf16, and enough pages that the work is split into several slices merged by the last one."""
    q, layer, cache, full = _setup([40, 3, 64, 17, 50, 29], 5, 4, 2, 32, 16, torch.bfloat16, seed=1)
    assert cache.n_ctx_pages >= 12
    got = _run(q, layer, cache, "triton")
    assert _err(got, full) < 3e-2
    assert _err(_run(q, layer, cache, "torch"), full) < 3e-2
    n = q.shape[2]
    # the variants: query rows rotated for every page, pages through the copy engine, two pages per step
    for kw in (dict(rotate_once=False), dict(tma=True), dict(pair=True), dict(pair=True, tma=True),
               dict(full=True), dict(full=True, tma=True), dict(full=True, rotate_once=False), dict(seg=True),
               dict(seg=True, tma=True), dict(seg=True, affine=True), dict(seg=True, affine=True, tma=True),
               dict(seg=True, affine=True, run_step=2), dict(seg=True, affine=True, run_step=4),
               dict(seg=True, affine=True, run_step=2, tma=True)):
        got = attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half,
                           cache.sin_half, max_pages=cache.capacity, backend="triton", **kw)
        assert _err(got, full) < 3e-2, kw


def test_context_runs_skip_the_causal_test_only_when_every_row_sees_them():
    """``split_mask``: a run of pages wholly before every row's position is masked by its valid counts alone.
    With the rows' positions moved into the context (some context keys then come after some rows), the runs
    that reach past the first row's position still take the causal test: same answer as the reference."""
    q, layer, cache, full = _setup([40, 3, 64, 17, 50, 29], 9, 4, 2, 32, 16, torch.float32, seed=7)
    n = q.shape[2]
    args = (q, layer, cache.table, cache.meta[:1])
    for kw in (dict(seg=True), dict(seg=True, affine=True), dict(seg=True, affine=True, run_step=2)):
        for split in (True, False):
            got = attend_paged(*args, cache.meta[1:1 + n], cache.cos_half, cache.sin_half, max_pages=cache.capacity,
                               backend="triton", split_mask=split, **kw)
            assert _err(got, full) < 2e-5, (kw, split)
    early = torch.tensor([5, 30, 60, 61, 100, 130, 150, 180, 200], device=DEV)  # inside the 203-token context
    ref = attend_paged_reference(*args, early, cache.cos_half, cache.sin_half)
    for kw in (dict(seg=True), dict(seg=True, affine=True)):
        got = attend_paged(*args, early, cache.cos_half, cache.sin_half, max_pages=cache.capacity,
                           backend="triton", split_mask=True, **kw)
        assert _err(got, ref) < 2e-5, kw


def test_arena_gives_an_entry_consecutive_pages_when_it_can():
    arena = PageArena(1, 1, 16, 12, 16, torch.float32, "cpu")
    c, s = cos_sin(torch.arange(128), 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    kv = lambda n: torch.randn(1, n, 2, 1, 16)  # noqa: E731
    for name, n in (("a", 16), ("b", 32), ("c", 16), ("d", 48)):  # pages 0 | 1-2 | 3 | 4-6
        arena.put(name, kv(n), c, s)
    arena.entries.pop("a"), arena.entries.pop("c")  # as evictions do: their pages go back to the free list
    arena._free.extend([0, 3])
    # free: 0, 3, 7-11; three pages come from the run 7-9, not from 0, 3, 7
    assert arena.put("e", kv(40), c, s).pages.tolist() == [7, 8, 9]
    assert arena.put("f", kv(16), c, s).pages.tolist() == [0]  # one page: the lowest id
    # four pages: "b" (the least recent) is evicted, free 1-3, 10, 11 has no run of four: the lowest ids
    assert arena.put("g", kv(64), c, s).pages.tolist() == [1, 2, 3, 10]
    assert "b" not in arena.entries


def test_affine_runs_over_scattered_pages():
    """The runs that compute page ids need consecutive pages: over an arena whose pages are shuffled every run
    is one page long, and the answer is the same."""
    q, layer, cache, full = _setup([40, 3, 64, 17, 50, 29], 5, 4, 2, 32, 16, torch.float32, seed=2)
    n = q.shape[2]
    perm = torch.randperm(layer.shape[0], generator=torch.Generator().manual_seed(3)).to(layer.device)
    scattered = torch.empty_like(layer)
    scattered[perm] = layer  # page i now lies at perm[i]
    table = cache.table.clone()
    used = int(cache.meta[0])
    table[0, :used] = perm[table[0, :used].long()].to(table.dtype)
    for kw in (dict(seg=True, affine=True), dict(seg=True, affine=True, run_step=2),
               dict(seg=True, affine=True, run_step=2, tma=True), dict(seg=True), {}):
        got = attend_paged(q, scattered, table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half,
                           cache.sin_half, max_pages=cache.capacity, backend="triton", **kw)
        assert _err(got, full) < 2e-5, kw


def test_module_switches_turn_affine_runs_on(monkeypatch):
    """``AFFINE_RUNS`` / ``RUN_STEP`` (what ``bench_e2e --paged-affine`` sets) reach a default call; a question's
    rows (more than 16 packed rows) take the runs loop by default."""
    from blockrag.attention_kv.kernels import paged_attention as pa

    q, layer, cache, full = _setup([40, 3, 64, 17, 50, 29], 9, 4, 2, 32, 16, torch.float32, seed=6)
    monkeypatch.setattr(pa, "AFFINE_RUNS", True)
    monkeypatch.setattr(pa, "RUN_STEP", 2)
    assert _err(_run(q, layer, cache, "triton"), full) < 2e-5
    with pytest.raises(ValueError, match="run_step"):
        n = q.shape[2]
        attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half, cache.sin_half,
                     max_pages=cache.capacity, backend="triton", seg=False, run_step=2)


def test_arena_lru_and_pinned_entries():
    arena = PageArena(2, 1, 16, 6, 16, torch.float32, "cpu")
    c, s = cos_sin(torch.arange(64), 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    kv = lambda n: torch.randn(2, n, 2, 1, 16)  # noqa: E731
    a = arena.put("a", kv(20), c, s)  # 2 pages
    arena.put("b", kv(16), c, s)  # 1 page
    arena.put("c", kv(40), c, s)  # 3 pages: full
    assert arena.free_pages == 0 and len(a.pages) == 2
    arena.get("a")  # a is now the most recent: b goes first
    arena.put("d", kv(5), c, s)
    assert set(arena.entries) == {"a", "c", "d"}
    with pytest.raises(MemoryError):
        arena.put("e", kv(48), c, s, pinned=["a", "c", "d"])
    # a chunk's keys are stored rotated to 0..n-1, its values as they are
    x = kv(20)
    e = arena.put("x", x, c, s, pinned=["x"])
    rows = torch.cat([torch.arange(16) + int(p) * 16 for p in e.pages])[:20]
    stored = arena.kv.view(2, -1, 2, 1, 16)[:, rows]
    assert torch.equal(stored[:, :, 1], x[:, :, 1])
    want = apply_rope(x[:, :, 0].transpose(1, 2), torch.arange(20), 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    assert _err(stored[:, :, 0].transpose(1, 2), want) < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only (interpreter) test")
def test_paged_offsets_past_2_31_on_cpu(tmp_path):
    """Pages whose first element lies past 2^31 elements of the arena layer (int64 offsets in the kernel): a
    sparse memory-mapped arena; only the pages used are ever written."""
    page, hkv, d = 16, 1, 32
    per_page = page * 2 * hkv * d  # 1024 elements
    n_pages = (2 ** 31) // per_page + 64
    path = tmp_path / "arena.bin"
    with open(path, "wb") as f:
        f.truncate(n_pages * per_page * 4)
    buf = torch.from_file(str(path), shared=True, size=n_pages * per_page, dtype=torch.float32)
    layer = buf.view(n_pages, page, 2, hkv, d)
    g = torch.Generator().manual_seed(3)
    hi = n_pages - 40  # every page used sits past 2^31 elements
    assert hi * per_page > 2 ** 31
    dims = _Dims(1, 2, hkv, d)
    inv = dims.inv_freq
    c, s = cos_sin(torch.arange(256), inv)
    lens, Lq = [20, 9], 2
    L = sum(lens)
    pages = [hi + 3, hi + 4, hi + 10, hi + 20]  # chunk 0: two pages, chunk 1: one, tail: one
    raw_k = torch.randn(L, hkv, d, generator=g)
    raw_v = torch.randn(L, hkv, d, generator=g)
    starts = [0, 20]
    for (p0, n), st, pgs in zip(zip([0, 1], lens), starts, [pages[:2], pages[2:3]]):
        loc = torch.arange(n)
        k_rot = apply_rope(raw_k[st:st + n].transpose(0, 1), loc, inv).transpose(0, 1)
        for j in range(n):
            layer[pgs[j // page], j % page, 0] = k_rot[j]
            layer[pgs[j // page], j % page, 1] = raw_v[st + j]
    pos = torch.arange(L, L + Lq)
    qk = apply_rope(torch.randn(1, hkv, Lq, d, generator=g), pos, inv)
    qv = torch.randn(1, hkv, Lq, d, generator=g)
    for i in range(Lq):
        layer[pages[3], i, 0] = qk[0, :, i]
        layer[pages[3], i, 1] = qv[0, :, i]
    table = torch.tensor([[pages[0], pages[1], pages[2], pages[3]], [16, 4, 9, page], [0, 16, 20, L],
                          [0, 0, 20, 0]], dtype=torch.int32)
    q = apply_rope(torch.randn(1, 2, Lq, d, generator=g), pos, inv)
    k = torch.cat([apply_rope(raw_k.transpose(0, 1)[None], torch.arange(L), inv), qk], 2)
    v = torch.cat([raw_v.transpose(0, 1)[None], qv], 2)
    full = attend_reference(q, k, v)
    ch, sh = c[:, :d // 2].contiguous(), s[:, :d // 2].contiguous()
    got = attend_paged(q, layer, table, torch.tensor([4]), pos, ch, sh, backend="triton")
    assert _err(got, full) < 2e-5


# ------------------------------------------------------------------------------------------ Generator (CPU)
TEXTS = [
    "The lighthouse of Merrowgate has a copper roof and a red door.",
    "Its keeper, Ada Flint, rows to the mainland every second Tuesday.",
    "The lamp was converted to electricity in 1931 and automated in 1987.",
    "Merrowgate harbour freezes over about one winter in ten.",
]
QUESTION = "What roof does the lighthouse have?"


def _chunks(tok, texts):
    from blockrag.documents import Chunk

    return [Chunk(id=f"c{i}", doc_id="d", position=i, text=t,
                  token_ids=tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(texts)]


@torch.no_grad()
def test_generator_paged_turbo_equals_stitched_on_cpu(tokenizer, tmp_path):
    """The paged turbo path (switched on for the CPU, tiny pages, a small arena that must evict and grow)
    gives the stitched path's logits and answers, with a padded question block too."""
    from tiny_models import MODELS

    from blockrag.attention_kv import Generator, KVCacheStore

    model = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa", head_dim=32)  # (the kernel: D >= 32)
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    plain = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False)
    gen = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False, device_cache_bytes=1)
    gen.paged = True
    gen.tail_tokens = 64
    chunks = _chunks(tokenizer, TEXTS)
    for sel in (chunks[:1], chunks, chunks[2:] + chunks[:1]):
        ref, _ = plain.prefill(QUESTION, sel, "turbo")
        got, info = gen.prefill(QUESTION, sel, "turbo", room=8)
        assert info["bucket"] == "paged" and info["cache"] is gen._paged
        assert _err(got, ref) < 2e-3
        a = gen.generate(QUESTION, sel, max_new_tokens=6)
        b = plain.generate(QUESTION, sel, max_new_tokens=6)
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    assert gen.cache_memory()["buffer_bytes"] == 0  # no stitched buffer was made
    gen.pad_questions = True  # padded block (as the graphs run it), eagerly
    got, info = gen.prefill(QUESTION, chunks, "turbo", room=8)
    assert info["question_bucket"] == 16 and _err(got[-1], plain.prefill(QUESTION, chunks, "turbo")[0][-1]) < 2e-3
    if HAS_CUDA:  # (the model runs on the CPU here: no kernel without the interpreter)
        return
    gen._paged.backend = "triton"  # the kernel itself (interpreter), on the last request
    got, _ = gen.prefill(QUESTION, chunks[:2], "turbo", room=8)
    assert _err(got, plain.prefill(QUESTION, chunks[:2], "turbo")[0]) < 2e-3
    # the answer's room past the tail: the stitched path takes the request (one place decides)
    assert not gen._use_paged(100, 16, 200, None) and gen._use_paged(100, 16, 8, None)


# ------------------------------------------------------------------------------------------ GPU
@needs_cuda
@pytest.mark.parametrize("hq,hkv", [(32, 8), (28, 4)])  # Llama-3-8B and Qwen2-7B heads
@pytest.mark.parametrize("Lq", [50, 1])
def test_gpu_paged_kernel_bf16(hq, hkv, Lq):
    lens = [300, 511, 64, 129, 2000, 37] * 3
    q, layer, cache, full = _setup(lens, Lq, hq, hkv, 128, 64, torch.bfloat16, seed=4)
    got = _run(q, layer, cache, "triton")
    assert _err(got, full) < 3e-2
    ref = _run(q, layer, cache, "torch")
    assert _err(got, ref) < 3e-2
    n = q.shape[2]
    for kw in (dict(full=True), dict(full=True, rotate_once=False), dict(full=True, block_m=128, num_warps=8),
               dict(seg=True), dict(seg=True, block_m=128, num_warps=8), dict(seg=True, affine=True),
               dict(seg=True, affine=True, run_step=2)):
        got = attend_paged(q, layer, cache.table, cache.meta[:1], cache.meta[1:1 + n], cache.cos_half,
                           cache.sin_half, max_pages=cache.capacity, backend="triton", **kw)
        assert _err(got, ref) < 3e-2, kw


@needs_cuda
def test_gpu_paged_offsets_past_2_31():
    """An 8B-shaped arena layer of more than 2^31 elements, the request's pages at its end."""
    page, hkv, d = 64, 8, 128
    per_page = page * 2 * hkv * d
    n_pages = 2 ** 31 // per_page + 256
    try:
        layer_all = torch.zeros(1, n_pages, page, 2, hkv, d, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:  # pragma: no cover
        pytest.skip("not enough GPU memory")
    from collections import OrderedDict

    arena = PageArena.__new__(PageArena)  # a bare arena over that memory, only its highest pages free
    arena.page, arena.n_pages, arena.kv = page, n_pages, layer_all
    arena._free = list(range(n_pages - 128, n_pages))
    arena.entries = OrderedDict()
    dims = _Dims(1, 32, hkv, d)
    cache = _cache(dims, arena, tail=128)
    assert int(min(cache.tail_pages)) * per_page > 2 ** 31  # (int: numpy int32 would wrap)
    g = torch.Generator().manual_seed(5)
    raw = [torch.randn(1, n, 2, hkv, d, generator=g).cuda().bfloat16() for n in (700, 333)]
    parts = [arena.put(f"c{i}", r, cache.cos, cache.sin) for i, r in enumerate(raw)]
    assert min(int(p.pages.min()) for p in parts) * per_page > 2 ** 31
    L = sum(r.shape[1] for r in raw)
    cache.set_request(parts, L)
    cache.begin(L, 1)
    inv = dims.inv_freq.cuda()
    q = apply_rope(torch.randn(1, 32, 1, d, generator=g).cuda(), torch.tensor([L], device="cuda"), inv).bfloat16()
    k0 = torch.cat([r[0, :, 0] for r in raw]).permute(1, 0, 2)[None].float()
    v0 = torch.cat([r[0, :, 1] for r in raw]).permute(1, 0, 2)[None].float()
    k = apply_rope(k0, torch.arange(L, device="cuda"), inv)
    full = attend_reference(q.float(), k, v0, q_start=L)
    got = _run(q, layer_all[0], cache, "triton")
    assert _err(got, full) < 3e-2
    del layer_all, arena


@needs_cuda
@torch.no_grad()
def test_gpu_generator_paged_graphs_equal_eager_stitched(tokenizer, tmp_path):
    """On the GPU ``Generator(paged=True)`` runs turbo over the page table from CUDA graphs (question and decode),
    with no stitched buffer; answers equal the eager stitched path's, for contexts of several lengths."""
    from tiny_models import MODELS

    from blockrag.attention_kv import Generator, KVCacheStore

    model = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa", hidden=128, head_dim=32).cuda()
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    eager = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False)
    gen = Generator(model=model, tokenizer=tokenizer, store=store, max_cache_len=4096, paged=True)
    assert gen.paged
    rep = gen.warmup(question_lengths=[16, 32])
    assert rep["graphs"] == 3
    chunks = _chunks(tokenizer, TEXTS * 6)
    for n in (1, 4, 24):
        a = gen.generate(QUESTION, chunks[:n], max_new_tokens=8)
        b = eager.generate(QUESTION, chunks[:n], max_new_tokens=8)
        assert a.timings["question_graph"] and a.timings["decode_graph"] and a.timings["cache_bucket"] == "paged"
        assert a.timings["graph_capture_ms"] == 0.0
        assert a.token_ids == b.token_ids
    assert gen.cache_memory()["buffer_bytes"] == 0


@needs_cuda
@torch.no_grad()
def test_gpu_compiled_paged_question_graph_matches_eager(tokenizer, tmp_path):
    """torch.compile (inductor) inside the captured question forward over the page table (the attention stays
    eager): the padded block's last real row gives the eager paged forward's logits."""
    from tiny_models import MODELS

    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv.block_cache import GraphedStep, forward_block

    model = MODELS["llama"](seed=6, vocab=len(tokenizer), attention="sdpa", hidden=128, head_dim=32).cuda()
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    gen = Generator(model=model, tokenizer=tokenizer, store=store, cuda_graphs=False, max_cache_len=4096)
    gen.paged = True
    chunks = _chunks(tokenizer, TEXTS * 3)
    parts = gen._paged_parts(chunks)
    cache = gen._paged
    Lc = sum(p.n_tokens for p in parts)
    cache.set_request(parts, Lc)
    q = torch.tensor(store.question_ids(QUESTION), device="cuda")
    eager = forward_block(model, cache, q, Lc, logits_to_keep=1)[0, -1]
    step = GraphedStep(model, cache, n=64, compile=True, select_row=True)
    cache.set_request(parts, Lc)
    got = step.replay(q, Lc, n_valid=len(q))[0][0]
    assert (got - eager).abs().max().item() < 2e-3
    torch._dynamo.reset()

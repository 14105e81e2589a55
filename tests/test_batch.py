"""Batched generation (attention_kv.batch) against one request at a time through Generator.generate, on the CPU
with a tiny random Llama (fp32): greedy token ids must be equal token for token, for requests of different
context and question lengths, joining and leaving mid-run (more requests than rows, different budgets),
and with each stopping rule. The attention over rows of different lengths is also checked directly
against the per-row reference (fp32, max |diff| < 1e-5)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS

pytest.importorskip("transformers")

TEXTS = [
    "The lighthouse of Merrowgate has a copper roof and a red door.",
    "Its keeper, Ada Flint, rows to the mainland every second Tuesday.",
    "The lamp was converted to electricity in 1931 and automated in 1987.",
    "Merrowgate harbour freezes over about one winter in ten.",
    "Ferries leave for the island of Stroma at nine and at four, weather permitting, from the old pier.",
    "A museum in the old fog-signal house shows the original lens.",
]
QUESTIONS = [
    "What roof does the lighthouse have?",
    "Who keeps it?",
    "When was the lamp automated, and when was it converted to electricity before that?",
    "Does the harbour freeze?",
    "Where do ferries go?",
]


@pytest.fixture(scope="module")
def gen(tokenizer, tmp_path_factory):
    from blockrag.attention_kv import Generator, KVCacheStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = MODELS["llama"](seed=5, vocab=len(tokenizer), attention="sdpa")
    store = KVCacheStore(tmp_path_factory.mktemp("kv"), model, tokenizer, dtype=torch.float32)
    yield Generator(model=model, tokenizer=tokenizer, store=store)
    torch.set_num_threads(threads)


def _chunks(tok):
    from blockrag.documents import Chunk

    return [Chunk(id=f"c{i}", doc_id="d", position=i, text=t,
                  token_ids=tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(TEXTS)]


def _requests(gen, budgets=(3, 9, 5, 12, 1)):
    from blockrag.attention_kv.batch import BatchRequest

    ch = _chunks(gen.tokenizer)
    subsets = [ch[:1], ch[1:6], ch[2:4], ch[::2], ch[5:]]  # 1..5 passages: different context lengths
    return [BatchRequest(q, s, max_new_tokens=n) for q, s, n in zip(QUESTIONS, subsets, budgets)]


def _one_by_one(gen, reqs, **kw):
    return [gen.generate(r.question, r.chunks, max_new_tokens=r.max_new_tokens,
                         stop=r.stop, repetition_guard=r.repetition_guard, **kw) for r in reqs]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "matmul"])
def test_batched_equals_one_at_a_time_with_joins_and_leaves(gen, backend):
    """5 requests over 3 rows, budgets 1..12 tokens: requests leave at different steps and waiting ones join."""
    reqs = _requests(gen)
    ref = _one_by_one(gen, reqs)
    got = gen.generate_batch(reqs, max_batch=3, backend=backend)
    lens = {r.n_context_tokens for r in ref}
    assert len(lens) == len(reqs)  # every context length differs
    for a, b, r in zip(got, ref, reqs):
        assert a.token_ids == b.token_ids and len(a.token_ids) == r.max_new_tokens
        assert a.answer == b.answer
        assert a.n_context_tokens == b.n_context_tokens and a.n_question_tokens == b.n_question_tokens
        assert a.timings["stopped_by"] == b.timings["stopped_by"] == "budget"


@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_padded_rows_step_equals_one_at_a_time(gen, backend):
    """The computation a CUDA graph captures (rows padded to a power of two, keys over each row's whole
    capacity, positions and mask on the device), run eagerly on the CPU: the same tokens as generate()."""
    from blockrag.attention_kv.batch import BatchEngine

    reqs = _requests(gen, budgets=(4, 9, 6, 3, 7))
    ref = _one_by_one(gen, reqs)
    eng = BatchEngine(gen, max_batch=4, backend=backend)  # 3 running rows decode as 4 (one padding row)
    eng.pad_rows = True
    hs = [eng.submit(r) for r in reqs]
    eng.run()
    assert eng.stats["moves"] > 0
    for h, b in zip(hs, ref):
        assert h.result.token_ids == b.token_ids


def test_engine_accepts_requests_while_running_and_grows(gen):
    """A request submitted after decoding has started, with a longer context than the buffer was sized for,
    joins (the buffer grows, running rows are copied over) and all answers stay those of generate()."""
    from blockrag.attention_kv.batch import BatchEngine

    reqs = _requests(gen, budgets=(6, 8, 4, 7, 5))
    ref = _one_by_one(gen, reqs)
    eng = BatchEngine(gen, max_batch=2, backend="reference")
    first = [eng.submit(reqs[0]), eng.submit(reqs[2])]  # short contexts
    for _ in range(3):
        eng.step()
    cap = eng.kv.shape[2]
    late = [eng.submit(r) for r in (reqs[1], reqs[3], reqs[4])]
    eng.run()
    assert eng.kv.shape[2] > cap and eng.stats["moves"] >= 0
    for h, b in zip(first + late, [ref[0], ref[2], ref[1], ref[3], ref[4]]):
        assert h.done and h.result.token_ids == b.token_ids


def test_stop_rules_match_generate(gen):
    """Stop strings, the end-of-turn token and the repetition guard end each request where generate() ends it."""
    from blockrag.attention_kv.batch import BatchRequest

    reqs = _requests(gen, budgets=(12, 12, 12, 12, 12))
    free = _one_by_one(gen, reqs)
    tok = gen.tokenizer
    # a stop string taken from inside each free-running answer (its 4th token's text, when printable)
    stops = []
    for r in free:
        piece = tok.decode(r.token_ids[3:4]).strip() or tok.decode(r.token_ids[3:5])
        stops.append((piece,) if piece else ("\n",))
    stopped = [BatchRequest(r.question, r.chunks, max_new_tokens=12, stop=s) for r, s in zip(reqs, stops)]
    ref = _one_by_one(gen, stopped)
    got = gen.generate_batch(stopped, max_batch=2)
    assert any(r.timings["stopped_by"] == "stop" for r in ref)
    for a, b in zip(got, ref):
        assert (a.answer, a.token_ids, a.timings["stopped_by"]) == (b.answer, b.token_ids, b.timings["stopped_by"])
    # repetition guard
    guarded = [BatchRequest(r.question, r.chunks, max_new_tokens=12, repetition_guard=1) for r in reqs]
    ref = _one_by_one(gen, guarded)
    got = gen.generate_batch(guarded, max_batch=4)
    for a, b in zip(got, ref):
        assert (a.answer, a.token_ids, a.timings["stopped_by"]) == (b.answer, b.token_ids, b.timings["stopped_by"])
    # end-of-turn: a token each free-running answer produces counts as the end of the turn
    eos = set(gen.eos_ids)
    gen.eos_ids = eos | {free[0].token_ids[2], free[3].token_ids[5]}
    try:
        ref = _one_by_one(gen, reqs)
        got = gen.generate_batch(reqs, max_batch=3)
    finally:
        gen.eos_ids = eos
    assert ref[0].timings["stopped_by"] == "eos" and ref[3].timings["stopped_by"] == "eos"
    for a, b in zip(got, ref):
        assert (a.answer, a.token_ids, a.timings["stopped_by"]) == (b.answer, b.token_ids, b.timings["stopped_by"])


@pytest.mark.parametrize("L", [1, 7])
def test_attend_rows_matches_the_per_row_reference(L):
    from blockrag.attention_kv.batch import attend_rows

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, Lk = 3, 8, 2, 16, 40
    starts = [5, 33 - L, 17]
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    pos = torch.tensor(starts)[:, None] + torch.arange(L)[None]
    vis = torch.arange(Lk)[None, None] <= pos[:, :, None]
    ref = attend_rows(q, k, v, vis, 0.25, "reference", starts=starts)
    for backend in ("sdpa", "matmul"):
        out = attend_rows(q, k, v, vis, 0.25, backend)
        assert (out - ref).abs().max().item() < 1e-5


def test_unsupported_mode_and_empty(gen):
    with pytest.raises(ValueError, match="cached modes"):
        gen.generate_batch([("q", [])], mode="full")
    assert gen.generate_batch([]) == []


def test_streamed_pieces_and_cancel(gen):
    """on_piece receives generate(stream=True)'s pieces (stop strings held back then cut); a cancelled request
    leaves at once and the others are unaffected."""
    from blockrag.attention_kv.batch import BatchEngine, BatchRequest

    reqs = _requests(gen, budgets=(10, 10, 10, 10, 10))
    free = _one_by_one(gen, reqs)
    stops = [(gen.tokenizer.decode(r.token_ids[4:5]).strip() or "\n",) for r in free]
    reqs = [BatchRequest(r.question, r.chunks, max_new_tokens=10, stop=s) for r, s in zip(reqs, stops)]
    want = []
    for r in reqs:
        s = gen.generate(r.question, r.chunks, max_new_tokens=10, stop=r.stop, stream=True)
        want.append((list(s), s.result.answer))
    eng = BatchEngine(gen, max_batch=3, backend="reference")
    hs, got = [], []
    for r in reqs:
        h = eng.submit(r)
        pieces = []
        h.on_piece = pieces.append
        hs.append(h)
        got.append(pieces)
    eng.step()
    eng.step()
    assert eng.cancel(hs[1]) and hs[1].done and hs[1].result.timings["stopped_by"] == "cancelled"
    assert eng.cancel(hs[4]) and hs[4].done  # still waiting
    eng.run()
    for i in (0, 2, 3):
        assert got[i] == want[i][0] and hs[i].result.answer == want[i][1]
    assert "".join(got[1]) == want[1][1][:len("".join(got[1]))]  # what was shown before the cancel


def test_server_worker_batches_queued_generations(tmp_path):
    """``batch=4``: queued generations are decoded together by the server's worker (steps with several rows),
    each streamed and answered as generate() answers it."""
    import asyncio
    import time

    from serving import build_store

    from blockrag.server import ServerConfig
    from blockrag.server.engine import Engine, GenJob

    collection = build_store(tmp_path / "store")
    gen = collection.index("kv").generator()
    config = ServerConfig(store=str(collection.store.folder), retriever="bm25", k=2, mode="turbo", batch=4)
    eng = Engine(config, collection=collection, generator=gen)
    questions = ["Who founded the Veloria Savings Bank?", "What roof does the lighthouse have?",
                 "Where does the railway go?"]
    contexts = [eng.retrieve(q, 2)[0] for q in questions]

    async def ask():
        loop = asyncio.get_running_loop()
        jobs = [GenJob(q, c, "turbo", 8, time.monotonic() + 120, loop, asyncio.Queue())
                for q, c in zip(questions, contexts)]
        for job in jobs:
            eng.submit(job)
        outs = []
        for job in jobs:
            pieces = []
            while True:
                kind, payload = await asyncio.wait_for(job.out.get(), 120)
                if kind == "token":
                    pieces.append(payload)
                elif kind == "done":
                    outs.append(("".join(pieces), payload))
                    break
                elif kind == "error":
                    raise AssertionError(payload)
        return outs

    try:
        outs = asyncio.run(ask())
        stats = eng._batcher.stats
    finally:
        eng.close()
    assert stats["decode_rows"] > stats["decode_steps"]  # some steps decoded several requests
    for q, c, (text, res) in zip(questions, contexts, outs):
        ref = gen.generate(q, c, mode="turbo", max_new_tokens=8)
        assert res.token_ids == ref.token_ids and res.answer == ref.answer and res.timings["batched"]
        assert text.strip() == ref.answer

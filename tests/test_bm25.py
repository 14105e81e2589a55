"""BM25: tokenisation and scores against bm25s / rank-bm25, variants, persistence, incremental updates."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from blockrag.documents import Chunk
from blockrag.retrievers import bm25 as bm25_mod
from blockrag.retrievers.base import Hit, Index, Retriever
from blockrag.retrievers.bm25 import VARIANTS, BM25Retriever, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A quick brown dog outpaces a quick red fox; foxes are quick.",
    "Lazy dogs sleep all day in the sun, sleeping and sleeping.",
    "Cats and dogs: running, runner, runs. The cat ran.",
    "Stemming reduces running runners to their stem: run.",
    "Proteins fold into structures; folding is studied by biologists.",
    "Cancer cells divide quickly; cell division is regulated by proteins.",
    "The brown bear eats fish in the river while the fox watches.",
    "It is what it is, and that is that.",  # stopwords only (and 'what')
    "",  # empty chunk
    "Quantum computers use qubits; a qubit can be in superposition.",
    "Dogs and foxes are canids. Foxes are smaller than most dogs.",
]
QUERIES = ["quick fox", "sleeping dogs", "running runner", "protein folding cells", "the of and",
           "brown brown bear", "qubits superposition quantum", "zebra", "", "fox fox dog"]


def chunks(texts=TEXTS, prefix="c"):
    return [Chunk(id=f"{prefix}{i}", doc_id=f"d{i}", position=0, text=t) for i, t in enumerate(texts)]


def as_pairs(hits):
    return [(h.chunk_id, round(h.score, 4)) for h in hits]


@pytest.fixture(params=["kernel", "numpy"])
def path(request, monkeypatch):
    """Run a test through the numba kernel and through the pure-NumPy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(bm25_mod, "_KERNEL", False)
    elif bm25_mod._kernel() is None:
        pytest.skip("numba unavailable")
    return request.param


# ------------------------------------------------------------------------------------ tokeniser
def test_tokenizer_matches_bm25s():
    bm25s = pytest.importorskip("bm25s")
    import Stemmer

    texts = TEXTS + ["Ünïcode wörds, 3D-printing & co-operation; x y z 42 4.2 e-mail", "IT'S ALL CAPS"]
    theirs = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False,
                            show_progress=False)
    ours = Tokenizer().tokenize_many(texts)
    assert ours == [list(t) for t in theirs]
    assert [Tokenizer().tokenize(t) for t in texts] == ours


def test_protocols_and_manifest():
    r = BM25Retriever().build(chunks())
    assert isinstance(r, Retriever) and isinstance(r, Index)
    m = r.manifest()
    assert m["kind"] == "bm25" and m["model"] is None
    assert m["params"]["variant"] == "lucene" and m["params"]["k1"] == 1.5 and m["params"]["b"] == 0.75
    assert m["tokenizer_hash"] == Tokenizer().hash()
    with pytest.raises(ValueError, match="variant"):
        BM25Retriever(variant="nope")
    with pytest.raises(ValueError, match="rank_bm25"):
        BM25Retriever(variant="lucene", backend="rank_bm25")


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_scores_match_bm25s(variant, path):
    bm25s = pytest.importorskip("bm25s")
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    ref = bm25s.BM25(method=variant, k1=1.2, b=0.7, delta=0.6)
    ref.index(bm25s.tokenize(TEXTS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    ours = BM25Retriever(variant=variant, k1=1.2, b=0.7, delta=0.6).build(chunks())
    for q in QUERIES:
        hits = ours.retrieve(q, k=len(TEXTS))
        toks = Tokenizer().tokenize(q)
        toks = [t for t in toks if t in ref.vocab_dict]
        if not toks:
            assert hits == []
            continue
        full = ref.get_scores(toks)
        assert hits, q
        for h in hits:
            assert h.score == pytest.approx(float(full[int(h.chunk_id[1:])]), rel=1e-5, abs=1e-5), (q, h)
        # every chunk left out scores what a chunk without any query term scores
        left_out = set(range(len(TEXTS))) - {int(h.chunk_id[1:]) for h in hits}
        if left_out:
            empty = min(full[list(left_out)])
            assert all(h.score > empty - 1e-6 for h in hits)


@pytest.mark.parametrize("variant,delta", [("okapi", 0.5), ("bm25+", 1.0)])
def test_parity_with_rank_bm25(variant, delta, path):
    rank_bm25 = pytest.importorskip("rank_bm25")
    tok = Tokenizer()
    corpus = tok.tokenize_many(TEXTS)
    ref = rank_bm25.BM25Okapi(corpus) if variant == "okapi" else rank_bm25.BM25Plus(corpus, delta=delta)
    ours = BM25Retriever(variant=variant, delta=delta).build(chunks())
    backend = BM25Retriever(variant=variant, delta=delta, backend="rank_bm25").build(chunks())
    for q in QUERIES:
        full = ref.get_scores(tok.tokenize(q))
        hits = ours.retrieve(q, k=len(TEXTS))
        for h in hits:
            assert h.score == pytest.approx(float(full[int(h.chunk_id[1:])]), rel=1e-5, abs=1e-5), (q, h)
        # the reference backend returns the same ranking and scores
        ref_hits = backend.retrieve(q, k=len(TEXTS))
        assert [h.chunk_id for h in ref_hits] == [h.chunk_id for h in hits], q
        assert [h.score for h in ref_hits] == pytest.approx([h.score for h in hits], rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_sane(variant, path):
    docs = ["apple banana", "apple apple apple banana", "banana cherry", "cherry date elderberry fig grape",
            "apple " + "filler " * 30, "date fig", "kiwi lime", "lime grape"]
    # (a term in half the chunks has Robertson idf 0: such chunks score 0 and are not returned)
    r = BM25Retriever(variant=variant).build(chunks(docs))
    hits = r.retrieve("apple", k=10)
    ids = [h.chunk_id for h in hits]
    assert set(ids) == {"c0", "c1", "c4"}  # only chunks containing the term
    assert ids.index("c1") < ids.index("c4")  # more occurrences in a short chunk beat one in a long one
    assert ids.index("c0") < ids.index("c4")  # same tf, shorter chunk wins (b > 0)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    two = r.retrieve("apple cherry", k=10)
    assert {h.chunk_id for h in two} == {"c0", "c1", "c2", "c3", "c4"}
    assert r.retrieve("apple", k=2) == hits[:2]


def test_b_zero_ignores_length(path):
    r = BM25Retriever(b=0.0).build(chunks(["apple", "apple " + "pear " * 40]))
    s = [h.score for h in r.retrieve("apple", 5)]
    assert s[0] == pytest.approx(s[1])


def test_ties_break_by_insertion_order(path):
    r = BM25Retriever().build(chunks(["same text here"] * 5 + ["other"]))
    assert [h.chunk_id for h in r.retrieve("text", 3)] == ["c0", "c1", "c2"]


def test_batch_equals_single(path):
    r = BM25Retriever().build(chunks())
    assert r.retrieve_batch(QUERIES, k=5) == [r.retrieve(q, k=5) for q in QUERIES]
    assert all(isinstance(h, Hit) for hits in r.retrieve_batch(QUERIES, 5) for h in hits)


def test_empty_index_and_unknown_terms():
    r = BM25Retriever()
    assert r.retrieve("anything") == [] and r.retrieve_batch(["a", "b"]) == [[], []]
    r.build(chunks())
    assert r.retrieve("zebra xylophone") == [] and r.retrieve("") == [] and r.retrieve("fox", k=0) == []
    r.delete([c.id for c in chunks()])
    assert len(r) == 0 and r.retrieve("fox") == []


def test_kernel_and_numpy_paths_agree(monkeypatch):
    if bm25_mod._kernel() is None:
        pytest.skip("numba unavailable")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60), p=None)) for _ in range(400)]
    queries = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(60)]
    for variant in VARIANTS:
        r = BM25Retriever(variant=variant).build(chunks(texts))
        fast = [r.retrieve(q, 25) for q in queries]
        for ratio in (0, 10**9):  # force the kernel's sparse and dense paths
            monkeypatch.setattr(bm25_mod, "_DENSE_RATIO", ratio)
            assert [r.retrieve(q, 25) for q in queries] == fast
        monkeypatch.setattr(bm25_mod, "_DENSE_RATIO", 4)
        monkeypatch.setattr(bm25_mod, "_KERNEL", False)
        slow = [r.retrieve(q, 25) for q in queries]
        monkeypatch.setattr(bm25_mod, "_KERNEL", None)
        assert [[h.chunk_id for h in x] for x in slow] == [[h.chunk_id for h in x] for x in fast]
        assert [h.score for x in slow for h in x] == pytest.approx([h.score for x in fast for h in x])


# ------------------------------------------------------------------------------------ incremental
def test_incremental_add_delete_equals_fresh_build(path):
    a, b = chunks(TEXTS[:6], "a"), chunks(TEXTS[6:], "b")
    extra = chunks(["zebra fox quick", "more dogs"], "x")
    fresh = BM25Retriever().build(a + b)
    inc = BM25Retriever().build(a)
    inc.add(b)
    inc.add(extra)
    inc.delete([c.id for c in extra] + ["not-there"])
    for q in QUERIES:
        assert as_pairs(inc.retrieve(q, 20)) == as_pairs(fresh.retrieve(q, 20)), q
    assert inc.retrieve("zebra") == []  # the vocabulary forgets terms of deleted chunks
    batched = BM25Retriever()
    batched.add(a + b, batch_size=3)
    assert [batched.retrieve(q, 20) for q in QUERIES] == [fresh.retrieve(q, 20) for q in QUERIES]
    assert len(inc) == len(fresh) == len(TEXTS)


def test_add_replaces_same_id_and_does_not_retokenise(monkeypatch):
    r = BM25Retriever().build(chunks())
    seen = []
    original = r.tokenizer.tokenize_many
    monkeypatch.setattr(r.tokenizer, "tokenize_many", lambda texts: seen.extend(texts) or original(texts))
    r.add([Chunk(id="c0", doc_id="d0", position=0, text="zebra stripes"),
           Chunk(id="new", doc_id="dn", position=0, text="another zebra")])
    assert seen == ["zebra stripes", "another zebra"]  # retained chunks were not re-tokenised
    assert {h.chunk_id for h in r.retrieve("zebra")} == {"c0", "new"}
    assert "c0" not in {h.chunk_id for h in r.retrieve("quick fox")}
    fresh = BM25Retriever().build(chunks()[1:] + [Chunk(id="c0", doc_id="d0", position=0, text="zebra stripes"),
                                                  Chunk(id="new", doc_id="dn", position=0, text="another zebra")])
    for q in QUERIES + ["zebra"]:
        assert sorted(as_pairs(r.retrieve(q, 20))) == sorted(as_pairs(fresh.retrieve(q, 20)))


# ------------------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("variant", ["lucene", "bm25+"])
def test_save_load_round_trip(tmp_path, variant):
    r = BM25Retriever(name="kw", variant=variant, k1=1.1, b=0.6).build(chunks())
    r.save(tmp_path / "idx")
    loaded = BM25Retriever.load(tmp_path / "idx")
    assert loaded.name == "kw" and loaded.manifest() == r.manifest()
    for q in QUERIES:
        assert loaded.retrieve(q, 20) == r.retrieve(q, 20)
    # a loaded index keeps working incrementally
    loaded.add(chunks(["zebra"], "z"))
    r.add(chunks(["zebra"], "z"))
    assert loaded.retrieve("zebra fox", 20) == r.retrieve("zebra fox", 20)
    # the reference backend can be loaded over the same files
    ref = BM25Retriever.load(tmp_path / "idx", backend="rank_bm25") if variant == "bm25+" else None
    if ref is not None:
        assert [h.chunk_id for h in ref.retrieve("quick fox", 5)] == [h.chunk_id for h in r.retrieve("quick fox", 5)]


def test_interrupted_save_keeps_previous_index(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    old = BM25Retriever().build(chunks())
    old.save(folder)
    new = BM25Retriever().build(chunks(["zebra only"]))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(bm25_mod.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    loaded = BM25Retriever.load(folder)
    assert len(loaded) == len(TEXTS) and loaded.retrieve("zebra") == []
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp folders left behind
    with pytest.raises(FileNotFoundError):
        BM25Retriever.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------ real data
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


@pytest.mark.slow
@pytest.mark.skipif(not (SCIFACT / "qrels" / "train.tsv").exists(),
                    reason=f"SciFact not found at {SCIFACT} (BEIR scifact with qrels/train.tsv)")
def test_scifact_train_ndcg():
    from blockrag.eval.beir import beir_chunks, load_beir
    from blockrag.eval.evaluate import evaluate_retriever

    t0 = time.perf_counter()
    data = load_beir(SCIFACT, "train")
    r = BM25Retriever().build(beir_chunks(data.corpus))
    scores = evaluate_retriever(r, data.queries, data.qrels, k=100, metrics=["ndcg@10", "recall@100"])
    assert scores["ndcg@10"] >= 0.69, scores  # bm25s with the same tokenisation: 0.6964
    assert scores["recall@100"] >= 0.9, scores
    assert time.perf_counter() - t0 < 600  # a guard against pathological slowness, not a benchmark

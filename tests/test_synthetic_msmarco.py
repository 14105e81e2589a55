"""Synthetic MS MARCO-shaped corpus: deterministic, the stated shape, readable by the MS MARCO loader; the
scale benchmark's child runs on it."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from blockrag.eval.synthetic_msmarco import MSMARCO_PASSAGES, SyntheticMSMarco, heaps_vocabulary, vocabulary


def test_shape_and_determinism():
    a = SyntheticMSMarco(3000, seed=3)
    pa = list(a.passages())
    assert pa == list(SyntheticMSMarco(3000, seed=3).passages())
    assert pa != list(SyntheticMSMarco(3000, seed=4).passages())
    assert [p for p, _ in pa] == [str(i) for i in range(3000)]
    lens = np.array([len(t.split()) for _, t in pa])
    assert 57 <= lens.mean() <= 63 and lens.min() >= 8 and lens.max() <= 200
    # Zipfian: frequency x rank roughly constant over the head of the distribution
    counts = Counter(w.rstrip(".") for _, t in pa for w in t.split())
    freq = np.array(sorted(counts.values(), reverse=True), dtype=float)
    fr = freq[9:1000] * np.arange(10, 1001)
    assert fr.max() / fr.min() < 3
    assert 2_600_000 < heaps_vocabulary(MSMARCO_PASSAGES) < 2_900_000  # MS MARCO's vocabulary size
    v = vocabulary(5000, seed=1)
    assert len(set(v.tolist())) == 5000 and v[0] == "a"


def test_queries_and_loader(tmp_path):
    from blockrag.eval.msmarco import load_msmarco

    s = SyntheticMSMarco(2000, seed=0)
    folder = s.write(tmp_path / "m", n_queries=50, progress=False)
    corpus, queries, qrels = load_msmarco(folder)
    assert len(corpus) == 2000 and len(queries) == 50
    text = {d.id: d.text for d in corpus}
    for qid, q in queries.items():
        (pid,) = qrels[qid]
        words = q.split()
        assert 2 <= len(words) <= 7
        assert sum(w in text[pid].rstrip(".").split() for w in words) >= 2  # content words of its passage
    mtime = (folder / "collection.tsv").stat().st_mtime_ns
    s.write(folder, n_queries=50, progress=False)  # same corpus: reused, not rewritten
    assert (folder / "collection.tsv").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="n_passages"):
        SyntheticMSMarco(0)


def test_bench_child_in_process(tmp_path):
    pytest.importorskip("bm25s")
    from blockrag.eval.bench_bm25_scale import child

    folder = SyntheticMSMarco(2000, seed=0).write(tmp_path / "m", n_queries=20, progress=False)
    r = child("ours", folder, 20, 1, tmp_path / "idx")
    assert r["passages"] == 2000 and r["qps_one"] > 0 and r["disk_bytes"] > 0 and len(r["top10"]) == 20
    back = child("ours-load", folder, 20, 1, tmp_path / "idx")
    assert back["top10"] == r["top10"]  # the saved index answers the same

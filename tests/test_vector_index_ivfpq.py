"""VectorIndex(kind="ivfpq"): recall against exact search rises with nprobe, deletes, save/load, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from blockrag.eval.bench_dense_scale import clustered  # noqa: E402
from blockrag.retrievers.vector_index import VectorIndex  # noqa: E402


def _recall(a, b):
    return np.mean([len({i for i, _ in x} & {i for i, _ in y}) / max(1, len(y)) for x, y in zip(a, b)])


def test_ivfpq_recall_deletes_and_persistence(tmp_path):
    data = clustered(3100, 64, clusters=40, spread=0.8, seed=1)
    base, queries = data[:3000], data[3000:3100]
    ids = [f"v{i}" for i in range(3000)]
    exact = VectorIndex(64, "flat")
    exact.add(ids, base)
    ivf = VectorIndex(64, "ivfpq")
    ivf.add(ids, base)
    assert ivf.pq_m == 16 and ivf.nlist == min(int(4 * np.sqrt(3000)), 3000 // 39)
    truth = exact.search(queries, 10)
    recalls = []
    for nprobe in (1, 8, ivf.nlist):
        ivf.set_nprobe(nprobe)
        recalls.append(_recall(ivf.search(queries, 10), truth))
    assert recalls[0] < recalls[-1] and recalls[-1] > 0.6, recalls  # PQ codes: approximate even over all lists
    # deleted ids are gone; re-added ids are found again
    ivf.set_nprobe(16)
    gone = [h[0] for h in ivf.search(queries[:5], 1)]
    ivf.delete([g[0] for g in gone])
    assert all(h[0][0] not in {g[0] for g in gone} for h in [ivf.search(queries[:5], 3)] if h) and len(ivf) == 2995
    ivf.add(["extra"], queries[:1])
    assert ivf.search(queries[:1], 1)[0][0][0] == "extra"
    # persistence: same answers after a load, nprobe kept
    ivf.save(tmp_path / "v")
    back = VectorIndex.load(tmp_path / "v")
    assert back.kind == "ivfpq" and back.nprobe == 16 and len(back) == len(ivf)
    assert back.search(queries, 10) == ivf.search(queries, 10)
    # an empty ivfpq index saves and loads; a first add that is too small is refused in one line
    empty = VectorIndex(64, "ivfpq")
    assert empty.search(queries[:2], 3) == [[], []]
    empty.save(tmp_path / "e")
    assert len(VectorIndex.load(tmp_path / "e")) == 0
    with pytest.raises(ValueError, match="at least 1000 vectors"):
        VectorIndex(64, "ivfpq").add(ids[:10], base[:10])
    with pytest.raises(ValueError, match="unknown index kind"):
        VectorIndex(64, "ivf")


def test_ivfpq_refine_rescoring_exact(tmp_path):
    """refine=R: the PQ shortlist re-scored with the full vectors (memory-mapped after a load) returns exact
    inner products and a recall no lower than without it."""
    data = clustered(3100, 64, clusters=40, spread=0.8, seed=2)
    base, queries = data[:3000], data[3000:3060]
    ids = [f"v{i}" for i in range(3000)]
    exact = VectorIndex(64, "flat")
    exact.add(ids, base)
    plain, refined = VectorIndex(64, "ivfpq", nprobe=8), VectorIndex(64, "ivfpq", nprobe=8, refine=10)
    plain.add(ids, base)
    refined.add(ids, base)
    truth = exact.search(queries, 10)
    got = refined.search(queries, 10)
    assert _recall(got, truth) >= _recall(plain.search(queries, 10), truth)
    assert _recall(got, truth) > 0.9
    for hits in got:  # scores are the exact cosines
        for i, s in hits:
            assert abs(s - float(base[int(i[1:])] @ queries[got.index(hits)])) < 1e-4
    refined.delete(["v0"])
    refined.save(tmp_path / "r")
    back = VectorIndex.load(tmp_path / "r")
    assert isinstance(back._full, np.memmap) and back.refine == 10
    assert back.search(queries, 10) == refined.search(queries, 10)
    with pytest.raises(ValueError, match="refine applies"):
        VectorIndex(64, "hnsw", refine=4)

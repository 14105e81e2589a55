"""A loaded BM25 index memory-maps its postings from bm25.npz (no copy in memory) and answers like the built one;
add/delete after a load still work (the mapped arrays are read-only and never written in place)."""
from __future__ import annotations

import numpy as np
import pytest

from blockrag.documents import Chunk
from blockrag.eval.synthetic_msmarco import SyntheticMSMarco
from blockrag.retrievers.bm25 import BM25Retriever

ARRAYS = ("_indptr", "_indices", "_data", "_doc_ptr", "_post_term", "_post_tf", "_doc_len")


def _mapped(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a, np.ndarray) else None
    return False


@pytest.mark.parametrize("variant", ["lucene", "bm25+"])
def test_loaded_postings_are_memory_mapped(variant, tmp_path):
    s = SyntheticMSMarco(3000, seed=2)
    chunks = [Chunk(id=p, doc_id=p, position=0, text=t) for p, t in s.passages()]
    queries = [q for _, q, _ in s.queries(40)]
    built = BM25Retriever(variant=variant).build(chunks)
    built.save(tmp_path / "bm25")
    loaded = BM25Retriever.load(tmp_path / "bm25")
    for name in ARRAYS:
        a = getattr(loaded, name)
        assert _mapped(a) and not a.flags.writeable, name
        assert np.array_equal(a, getattr(built, name)), name
    for q in queries:
        assert loaded.retrieve(q, 10) == built.retrieve(q, 10)
    assert loaded.retrieve_batch(queries, 10) == built.retrieve_batch(queries, 10)
    # updates after a load: new arrays, same results as the same updates on the built index
    extra = [Chunk(id="new", doc_id="new", position=0, text=queries[0])]
    for r in (built, loaded):
        r.add(extra)
        r.delete(["0", "1"])
    for q in queries[:10]:
        assert loaded.retrieve(q, 10) == built.retrieve(q, 10)
    assert loaded.retrieve(queries[0], 1)[0].chunk_id == "new"

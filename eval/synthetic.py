"""Synthetic multi-hop QA sets over fictional entities, deterministic from a seed.

The generator lives in :mod:`blockrag.datasets` (``blockrag finetune`` trains on it); the names are
re-exported here for the benchmarks and scripts that import them from ``blockrag.eval.synthetic``.

    >>> s = make_multihop(seed=0)
    >>> s.passages[0].id, s.questions[0].hops, s.questions[0].gold_doc_ids  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from blockrag.datasets import SYNTHETIC_FORMAT_VERSION as FORMAT_VERSION
from blockrag.datasets import Question, SyntheticSet, make_multihop

__all__ = ["FORMAT_VERSION", "Question", "SyntheticSet", "load", "make_multihop"]


def load(folder: str | Path) -> SyntheticSet:
    return SyntheticSet.load(folder)


if __name__ == "__main__":  # python -m blockrag.eval.synthetic OUT_FOLDER [seed]
    import sys

    s = make_multihop(seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(s.summary())
    if len(sys.argv) > 1:
        print("written to", s.to_jsonl(sys.argv[1]))

"""A synthetic corpus with MS MARCO passage ranking's shape, for scale tests of the retrievers.

MS MARCO's passage collection has 8.8M passages of ~56 words (~60 tokens) each. This generator makes ``N``
passages of ``~N(60, 20)`` words (clipped to 8..200), every word drawn from a Zipfian vocabulary (rank^-1.0;
the 33 English stopwords of the BM25 tokenizer take the top ranks, the rest are pronounceable made-up words,
shorter at higher frequency). The vocabulary grows with the corpus by Heaps' law (``16 * tokens^0.6`` word
types: ~2.7M at 8.8M passages, the size of MS MARCO's, ~0.7M at 1M). Queries are ~6 words like MS MARCO's:
2-5 content words of one passage (rarer words more likely, as in real queries) plus 0-2 stopwords; that
passage is the query's one relevant passage.

Deterministic from ``seed``; written in MS MARCO's layout (``collection.tsv``, ``queries.dev.tsv``,
``qrels.dev.tsv``) so :func:`blockrag.eval.msmarco.load_msmarco` reads it:

    python -m blockrag.eval.synthetic_msmarco OUT_DIR --passages 1000000 --queries 1000
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from blockrag.retrievers.bm25 import STOPWORDS_EN

MSMARCO_PASSAGES = 8_841_823
FORMAT_VERSION = 1
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fr", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "t", "m", "k", "nd", "st", "x"]
_BLOCK = 100_000  # passages per random stream (generation is reproducible block by block)


def heaps_vocabulary(n_passages: int, mean_words: float = 60.0) -> int:
    """Word types for a corpus of ``n_passages`` (Heaps' law, fitted to MS MARCO's ~2.7M at 8.8M)."""
    return int(16 * (n_passages * mean_words) ** 0.6) + len(STOPWORDS_EN)


def vocabulary(size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct words by frequency rank: the stopwords, then made-up words of 1, 2, 3... syllables."""
    rng = np.random.default_rng(seed)
    syll = np.array([o + v + c for o in _ONSETS for v in _VOWELS for c in dict.fromkeys(_CODAS)])
    syll = syll[rng.permutation(len(syll))]
    stop = set(STOPWORDS_EN)
    words, seen = list(STOPWORDS_EN), set(STOPWORDS_EN)
    n_syll = 1
    while len(words) < size:
        need = size - len(words)
        if n_syll == 1:
            cand = syll
        else:  # random syllable strings; duplicates and stopwords dropped
            idx = rng.integers(0, len(syll), size=(int(need * 1.3) + 16, n_syll))
            cand = syll[idx[:, 0]]
            for j in range(1, n_syll):
                cand = np.char.add(cand, syll[idx[:, j]])
        for w in cand.tolist():
            if w not in seen and w not in stop and len(w) >= 2:
                seen.add(w)
                words.append(w)
                if len(words) == size:
                    break
        if n_syll == 1 or len(words) < size and len(seen) > 0.5 * len(syll) ** n_syll:
            n_syll += 1
    return np.array(words[:size])


class SyntheticMSMarco:
    """``SyntheticMSMarco(n_passages, seed=0)``: ``passages()`` yields ``(pid, text)``; ``queries(n)`` returns
    ``[(qid, text, relevant pid)]``; ``write(folder, n_queries)`` writes the MS MARCO files."""

    def __init__(self, n_passages: int, seed: int = 0, vocab_size: int | None = None, zipf: float = 1.0,
                 mean_words: float = 60.0, sd_words: float = 20.0):
        if n_passages < 1:
            raise ValueError("n_passages must be >= 1")
        self.n, self.seed, self.zipf = int(n_passages), seed, zipf
        self.mean_words, self.sd_words = mean_words, sd_words
        self.vocab = vocabulary(vocab_size or heaps_vocabulary(self.n, mean_words), seed)
        w = np.arange(1, len(self.vocab) + 1, dtype=np.float64) ** -zipf
        self._cdf = np.cumsum(w / w.sum())

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(word ranks of every token, passage lengths) of block ``b``."""
        rng = np.random.default_rng([self.seed, b])
        n = min(_BLOCK, self.n - b * _BLOCK)
        lens = np.clip(np.rint(rng.normal(self.mean_words, self.sd_words, n)), 8, 200).astype(np.int64)
        ranks = np.searchsorted(self._cdf, rng.random(int(lens.sum())) * self._cdf[-1])
        return np.minimum(ranks, len(self.vocab) - 1), lens

    def passages(self) -> Iterator[tuple[str, str]]:
        """``(pid, text)`` for every passage, in order (pids ``"0"``...)."""
        for b in range((self.n + _BLOCK - 1) // _BLOCK):
            ranks, lens = self._block(b)
            words = self.vocab[ranks].tolist()
            ends = np.cumsum(lens).tolist()
            start = 0
            for i, end in enumerate(ends):
                yield str(b * _BLOCK + i), " ".join(words[start:end]) + "."
                start = end

    def passage_ranks(self, pids) -> dict[int, np.ndarray]:
        """Word ranks of the given passages (each block generated once)."""
        out: dict[int, np.ndarray] = {}
        by_block: dict[int, list[int]] = {}
        for pid in pids:
            by_block.setdefault(int(pid) // _BLOCK, []).append(int(pid))
        for b, members in by_block.items():
            ranks, lens = self._block(b)
            starts = np.concatenate([[0], np.cumsum(lens)])
            for pid in members:
                i = pid - b * _BLOCK
                out[pid] = ranks[starts[i]:starts[i + 1]]
        return out

    def queries(self, n_queries: int) -> list[tuple[str, str, str]]:
        """``(qid, text, relevant pid)``: content words of one random passage (rarer words favoured)."""
        rng = np.random.default_rng([self.seed, 10**9])
        n_stop = len(STOPWORDS_EN)
        pids = rng.integers(self.n, size=n_queries)
        ranks = self.passage_ranks(pids.tolist())
        out = []
        for q, pid in enumerate(pids.tolist()):
            content = np.unique(ranks[pid])
            content = content[content >= n_stop]
            if len(content) == 0:
                continue
            w = np.log1p(content.astype(np.float64))  # idf-like preference for rare words
            m = min(len(content), int(rng.integers(2, 6)))
            words = self.vocab[rng.choice(content, size=m, replace=False, p=w / w.sum())].tolist()
            stops = rng.choice(n_stop, size=int(rng.integers(0, 3)), replace=False)
            words = self.vocab[stops].tolist() + words
            rng.shuffle(words)
            out.append((f"q{q}", " ".join(words), str(pid)))
        return out

    def write(self, folder: str | os.PathLike, n_queries: int = 1000, progress: bool = True) -> Path:
        """Write ``collection.tsv``, ``queries.dev.tsv``, ``qrels.dev.tsv`` and ``synthetic.json``; a folder
        already holding this exact corpus (same parameters) is reused."""
        folder = Path(folder)
        meta = {"format_version": FORMAT_VERSION, "passages": self.n, "seed": self.seed, "zipf": self.zipf,
                "vocab": len(self.vocab), "mean_words": self.mean_words, "sd_words": self.sd_words,
                "queries": n_queries}
        mpath = folder / "synthetic.json"
        if mpath.exists() and json.loads(mpath.read_text()) == meta:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        mpath.unlink(missing_ok=True)  # the marker goes last: a half-written folder is never reused
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n, desc="synthetic passages", unit="psg", mininterval=2)
        tmp = folder / "collection.tsv.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i, (pid, text) in enumerate(self.passages()):
                f.write(f"{pid}\t{text}\n")
                if bar is not None and i % 10_000 == 9_999:
                    bar.update(10_000)
        if bar is not None:
            bar.close()
        os.replace(tmp, folder / "collection.tsv")
        qs = self.queries(n_queries)
        (folder / "queries.dev.tsv").write_text("".join(f"{q}\t{t}\n" for q, t, _ in qs), encoding="utf-8")
        (folder / "qrels.dev.tsv").write_text("".join(f"{q}\t0\t{p}\t1\n" for q, _, p in qs), encoding="utf-8")
        mpath.write_text(json.dumps(meta, indent=1))
        return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic MS MARCO-shaped corpus (collection/queries/qrels).")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--passages", type=float, default=1e6, help=f"passages (MS MARCO: {MSMARCO_PASSAGES:,})")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    folder = SyntheticMSMarco(int(a.passages), a.seed).write(a.out, a.queries)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()

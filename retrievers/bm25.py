"""Fast vectorised BM25 over NumPy arrays (term-major sparse matrix of precomputed scores).

Every (term, chunk) score is computed once at indexing time and stored in a term-major CSR matrix
(``indptr`` over terms, chunk rows in ``indices``, scores in ``data``): a query is the sum of a few
matrix rows, then a top-k by ``argpartition``. No Python loop touches the chunks at query time.

Tokenisation mirrors ``bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"))``:
lowercase, regex ``(?u)\\b\\w\\w+\\b``, bm25s's English stopword list (removed before stemming), Snowball
English stemmer (PyStemmer). Scores are therefore comparable with bm25s.

Variants (formulas as in Kamphuis et al., ECIR 2020, and bm25s):
  ``lucene`` (default), ``robertson``, ``atire``, ``bm25l``, ``bm25+``, and ``okapi`` (rank-bm25's
  ``BM25Okapi``: Robertson idf floored at ``epsilon * mean idf``, tf part times ``k1 + 1``).

``backend="rank_bm25"`` scores with the reference ``rank_bm25`` package over the same tokens (slow;
for parity checks). Incremental ``add``/``delete`` keep each chunk's term counts, so retained chunks
are never re-tokenised; idf and length normalisation are global, so the score matrix is rebuilt
(vectorised) after each change.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .base import Hit
from .vector_index import atomic_folder_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VARIANTS = ("lucene", "robertson", "atire", "bm25l", "bm25+", "okapi")
BACKENDS = ("numpy", "rank_bm25")
TOKEN_PATTERN = r"(?u)\b\w\w+\b"

# bm25s's English stopword list (bm25s.stopwords.STOPWORDS_EN), copied so that results stay
# comparable without importing bm25s.
STOPWORDS_EN = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no",
    "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this",
    "to", "was", "will", "with",
)




# ------------------------------------------------------------------------------------------ tokens
class Tokenizer:
    """Lowercase -> regex word tokens -> drop stopwords -> Snowball stem (cached per word)."""

    def __init__(self, stopwords: Iterable[str] | None = STOPWORDS_EN, stemmer: str | None = "english",
                 pattern: str = TOKEN_PATTERN):
        self.pattern = pattern
        self.stopwords = frozenset(stopwords or ())
        self.stemmer_name = stemmer
        self._findall = re.compile(pattern).findall
        self._stems: dict[str, str] = {}
        if stemmer:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(stemmer)
        else:
            self._stemmer = None

    def config(self) -> dict:
        return {"pattern": self.pattern, "stopwords": sorted(self.stopwords), "stemmer": self.stemmer_name,
                "lower": True}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:16]

    def words(self, text: str) -> list[str]:
        """Lowercased word tokens with stopwords removed (not yet stemmed)."""
        stop = self.stopwords
        return [w for w in self._findall(text.lower()) if w not in stop]

    def stem_all(self, words: Iterable[str]) -> None:
        """Fill the stem cache for ``words`` in one PyStemmer call."""
        missing = [w for w in set(words) if w not in self._stems]
        if not missing:
            return
        if self._stemmer is None:
            self._stems.update(zip(missing, missing))
        else:
            self._stems.update(zip(missing, self._stemmer.stemWords(missing)))
        if len(self._stems) > 2_000_000:  # unbounded vocabularies (ids, numbers): keep memory in check
            self._stems.clear()

    def stem(self, word: str) -> str:
        s = self._stems.get(word)
        if s is None:
            s = self._stemmer.stemWord(word) if self._stemmer is not None else word
            self._stems[word] = s
        return s

    def tokenize(self, text: str) -> list[str]:
        return [self.stem(w) for w in self.words(text)]

    def tokenize_many(self, texts: Sequence[str]) -> list[list[str]]:
        docs = [self.words(t) for t in texts]
        self.stem_all(chain.from_iterable(docs))
        stems = self._stems
        out = []
        for d in docs:
            try:
                out.append([stems[w] for w in d])
            except KeyError:  # the cache was cleared mid-way
                out.append([self.stem(w) for w in d])
        return out


# ------------------------------------------------------------------------------------------ scoring
def _idf(variant: str, df: np.ndarray, n: int, epsilon: float = 0.25) -> np.ndarray:
    df = df.astype(np.float64)
    alive = df > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if variant == "lucene":
            idf = np.log1p((n - df + 0.5) / (df + 0.5))
        elif variant == "robertson":  # bm25s: inner ratio clamped at 1, so idf >= 0
            idf = np.log(np.maximum((n - df + 0.5) / (df + 0.5), 1.0))
        elif variant == "atire":
            idf = np.log(n / df)
        elif variant == "bm25l":
            idf = np.log((n + 1) / (df + 0.5))
        elif variant == "bm25+":
            idf = np.log((n + 1) / df)
        elif variant == "okapi":  # rank_bm25.BM25Okapi
            idf = np.log(n - df + 0.5) - np.log(df + 0.5)
            if alive.any():
                eps = epsilon * idf[alive].mean()
                idf = np.where(alive & (idf < 0), eps, idf)
        else:
            raise ValueError(f"unknown BM25 variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return np.where(alive, idf, 0.0)


def _tfc(variant: str, tf: np.ndarray, dl: np.ndarray, avgdl: float, k1: float, b: float,
         delta: float) -> np.ndarray:
    norm = 1.0 - b + b * dl / avgdl
    if variant in ("lucene", "robertson"):
        return tf / (k1 * norm + tf)
    if variant in ("atire", "okapi"):
        return tf * (k1 + 1.0) / (tf + k1 * norm)
    if variant == "bm25l":
        c = tf / norm
        return (k1 + 1.0) * (c + delta) / (k1 + c + delta)
    if variant == "bm25+":
        return (k1 + 1.0) * tf / (k1 * norm + tf) + delta
    raise ValueError(f"unknown BM25 variant {variant!r}")


def _nonoccurrence(variant: str, idf: np.ndarray, k1: float, delta: float) -> np.ndarray | None:
    """Per-term score of a chunk *without* the term (BM25L / BM25+ only; a constant per term)."""
    if variant == "bm25l":
        return idf * ((k1 + 1.0) * delta / (k1 + delta))
    if variant == "bm25+":
        return idf * delta
    return None


# ------------------------------------------------------------------------------------------ kernel
# Plain Python functions, compiled with numba on first use (``_kernel()``); on disk cache after that.
# the kernel scans every row (instead of only the touched ones) when postings * ratio >= rows
_DENSE_RATIO = 4
_KERNEL = None
_topk_into_jit = _heap_offer_jit = None


def _heap_offer(cand, m, buf, hr, hs, size):
    """Offer rows cand[:m] (scores in buf) to the min-heap hr/hs holding the best ``size`` so far
    (best = higher score, then lower row; the worst sits at the root); return the new size."""
    cap = hs.shape[0]
    for i in range(m):
        d = cand[i]
        s = buf[d]
        if s == 0.0:
            continue
        if size < cap:  # sift up
            c = size
            size += 1
            while c > 0:
                p = (c - 1) >> 1
                if hs[p] < s or (hs[p] == s and hr[p] > d):
                    break
                hs[c] = hs[p]
                hr[c] = hr[p]
                c = p
            hs[c] = s
            hr[c] = d
        elif s > hs[0] or (s == hs[0] and d < hr[0]):  # replace the root, sift down
            c = 0
            while True:
                lft = 2 * c + 1
                if lft >= size:
                    break
                m2 = lft
                r = lft + 1
                if r < size and (hs[r] < hs[lft] or (hs[r] == hs[lft] and hr[r] > hr[lft])):
                    m2 = r
                if hs[m2] > s or (hs[m2] == s and hr[m2] < d):
                    break
                hs[c] = hs[m2]
                hr[c] = hr[m2]
                c = m2
            hs[c] = s
            hr[c] = d
    return size


def _topk_into(indptr, indices, data, terms, buf, mark, touched, dense_ratio, hr, hs):
    """Sum the query's term rows; write the best len(hr) (row, score) pairs among rows with a nonzero
    score into hr/hs, best first (higher score, then lower row); return how many were written.

    buf (float32) and mark (uint8) are all-zero scratch arrays with one slot per chunk and are left
    all-zero again; touched is int64 scratch of the same length.
    """
    n_docs = buf.shape[0]
    cap = hs.shape[0]
    postings = 0
    for t in terms:
        postings += indptr[t + 1] - indptr[t]
    size = 0
    if postings * dense_ratio >= n_docs:
        # dense: scatter-add, then sweep the rows in blocks. Each block is first filtered without
        # branches (rows beating the heap's current worst, or nonzero while it fills): an `if` per row
        # would mispredict on about half of them and cost more than the scatter itself.
        for t in terms:
            for j in range(indptr[t], indptr[t + 1]):
                buf[indices[j]] += data[j]
        lo, step = 0, 64  # a short first block fills the heap, then long blocks
        while lo < n_docs:
            hi = min(lo + step, n_docs)
            step = 1024
            m = 0
            if size < cap:
                for d in range(lo, hi):
                    touched[m] = d
                    m += buf[d] != 0.0
            else:
                worst = hs[0]  # rows here come after every heap row: a tie never wins
                for d in range(lo, hi):
                    touched[m] = d
                    m += buf[d] > worst
            size = _heap_offer_jit(touched, m, buf, hr, hs, size)
            for d in range(lo, hi):
                buf[d] = 0.0
            lo = hi
    else:  # large corpus, rare terms: remember the touched rows and visit only those
        n = 0
        for t in terms:
            for j in range(indptr[t], indptr[t + 1]):
                d = indices[j]
                if mark[d] == 0:
                    mark[d] = 1
                    touched[n] = d
                    n += 1
                buf[d] += data[j]
        size = _heap_offer_jit(touched, n, buf, hr, hs, size)
        for i in range(n):
            d = touched[i]
            buf[d] = 0.0
            mark[d] = 0
    for i in range(1, size):  # best first (insertion sort: k is small)
        s = hs[i]
        d = hr[i]
        j = i - 1
        while j >= 0 and (hs[j] < s or (hs[j] == s and hr[j] > d)):
            hs[j + 1] = hs[j]
            hr[j + 1] = hr[j]
            j -= 1
        hs[j + 1] = s
        hr[j + 1] = d
    return size


def _score_topk(indptr, indices, data, flat_terms, ptr, buf, mark, touched, k, dense_ratio):
    """Queries i = flat_terms[ptr[i]:ptr[i+1]] -> (rows (nq, k), scores (nq, k), counts (nq,))."""
    nq = ptr.shape[0] - 1
    kk = min(k, buf.shape[0])
    rows = np.zeros((nq, kk), dtype=np.int64)
    scores = np.zeros((nq, kk), dtype=np.float32)
    counts = np.zeros(nq, dtype=np.int64)
    for i in range(nq):
        counts[i] = _topk_into_jit(indptr, indices, data, flat_terms[ptr[i]:ptr[i + 1]], buf, mark, touched,
                              dense_ratio, rows[i], scores[i])
    return rows, scores, counts



def _kernel():
    """The compiled query kernel (numba, cached on disk), or None where numba is unavailable."""
    global _KERNEL, _topk_into_jit, _heap_offer_jit
    if _KERNEL is not None:
        return _KERNEL or None
    if os.environ.get("BLOCKRAG_BM25_NUMBA", "1") == "0":
        _KERNEL = False
        return None
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba ships with ranx
        _KERNEL = False
        return None
    _heap_offer_jit = njit(cache=True, nogil=True)(_heap_offer)
    _topk_into_jit = njit(cache=True, nogil=True)(_topk_into)
    _KERNEL = njit(cache=True, nogil=True)(_score_topk)
    return _KERNEL


def _npz_mmap(path: Path, name: str) -> np.ndarray | None:
    """Member ``name`` of an uncompressed ``.npz`` (what ``np.savez`` writes) memory-mapped read-only, so a
    loaded index pages its postings in from the file instead of copying them; None when the member is
    compressed or not a plain array (the caller then reads it normally)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: fixed part, then its name and extra field
        if local[:4] != b"PK\x03\x04":
            return None
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        return None
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# ------------------------------------------------------------------------------------------ index
class BM25Retriever:
    """BM25 retriever and index over chunks (``.id``, ``.text``), keyed by chunk id.

    ``retrieve`` returns only chunks that contain a query term (strictly: whose summed term score is
    nonzero, so a term with idf 0, e.g. Robertson's for a term in half the chunks, matches nothing),
    best first, ties broken by insertion order. For ``bm25l``/``bm25+`` the reported scores include
    every query term's non-occurrence constant, as in bm25s.

    Queries are single-threaded per index (a lock guards the scratch buffers; each query takes
    microseconds); ``add``/``delete`` take the same lock, so a query never sees half an update.
    """

    kind = "bm25"

    def __init__(self, name: str = "bm25", variant: str = "lucene", k1: float = 1.5, b: float = 0.75,
                 delta: float | None = None, epsilon: float = 0.25, backend: str = "numpy",
                 stopwords: Iterable[str] | None = STOPWORDS_EN, stemmer: str | None = "english"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown BM25 variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown BM25 backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "rank_bm25" and variant not in ("okapi", "bm25l", "bm25+"):
            raise ValueError("backend='rank_bm25' implements variants 'okapi', 'bm25l' and 'bm25+' only")
        self.name = name
        self.variant = variant
        self.k1 = float(k1)
        self.b = float(b)
        # bm25s's default delta (0.5) for every variant; rank_bm25's BM25Plus defaults to 1.0.
        self.delta = float(0.5 if delta is None else delta)
        self.epsilon = float(epsilon)
        self.backend = backend
        self.tokenizer = Tokenizer(stopwords=stopwords, stemmer=stemmer)
        # per-chunk state (retained across add/delete; never re-tokenised)
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self._terms: list[str] = []  # term id -> stem
        self._vocab: dict[str, int] = {}  # stem -> term id
        self._doc_ptr = np.zeros(1, dtype=np.int64)  # chunk r's postings: [_doc_ptr[r], _doc_ptr[r+1])
        self._post_term = np.zeros(0, dtype=np.int32)
        self._post_tf = np.zeros(0, dtype=np.int32)
        self._doc_len = np.zeros(0, dtype=np.int32)  # tokens after stopword removal
        # guards the index arrays and the kernel's scratch buffers: queries run one at a time per
        # index (each takes microseconds) and never see a half-applied add/delete
        self._lock = threading.RLock()
        self._reset_matrix()

    # ------------------------------------------------------------------ protocol helpers
    def __len__(self) -> int:
        return len(self.ids)

    def params(self) -> dict:
        return {"variant": self.variant, "k1": self.k1, "b": self.b, "delta": self.delta,
                "epsilon": self.epsilon, "backend": self.backend, "tokenizer": self.tokenizer.config()}

    def manifest(self) -> dict:
        return {"kind": "bm25", "model": None, "tokenizer_hash": self.tokenizer.hash(),
                "format_version": FORMAT_VERSION, "params": self.params()}

    def identity(self) -> dict:
        """What the opened files say (compared with the store's manifest on open)."""
        return {"tokenizer_hash": self.tokenizer.hash(), "format_version": FORMAT_VERSION}

    # ------------------------------------------------------------------ building
    def build(self, chunks: Sequence) -> "BM25Retriever":
        """Index ``chunks`` from scratch (drops anything indexed before)."""
        with self._lock:
            self.ids, self._row = [], {}
            self._terms, self._vocab = [], {}
            self._doc_ptr = np.zeros(1, dtype=np.int64)
            self._post_term = np.zeros(0, dtype=np.int32)
            self._post_tf = np.zeros(0, dtype=np.int32)
            self._doc_len = np.zeros(0, dtype=np.int32)
            self._reset_matrix()
            self.add(chunks)
        return self

    def add(self, chunks: Iterable, batch_size: int = 50_000) -> None:
        """Add (or replace, by id) chunks; only the new chunks are tokenised (``batch_size`` at a time,
        to bound memory), then the score matrix is rebuilt once."""
        latest: dict[str, str] = {}
        for c in chunks:
            latest[str(c.id)] = c.text or ""
        if not latest:
            return
        with self._lock:
            replaced = [cid for cid in latest if cid in self._row]
            if replaced:
                self._drop_rows(replaced)
            items = list(latest.items())
            for i in range(0, len(items), batch_size):
                self._append(items[i:i + batch_size])
            self._rebuild()

    def _append(self, items: list[tuple[str, str]]) -> None:
        """Tokenise ``(chunk id, text)`` pairs and append their postings (no rebuild)."""
        new_ids = [cid for cid, _ in items]
        token_lists = self.tokenizer.tokenize_many([text for _, text in items])
        vocab, terms = self._vocab, self._terms
        for toks in token_lists:
            for t in toks:
                if t not in vocab:
                    vocab[t] = len(terms)
                    terms.append(t)
        n_terms = max(len(terms), 1)
        lens = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.fromiter((vocab[t] for t in chain.from_iterable(token_lists)), dtype=np.int64,
                           count=int(lens.sum()))
        local_doc = np.repeat(np.arange(len(new_ids), dtype=np.int64), lens)
        keys, tf = np.unique(local_doc * n_terms + flat, return_counts=True)  # sorted by (chunk, term)
        per_doc = np.bincount(keys // n_terms, minlength=len(new_ids))
        start = len(self.ids)
        self.ids.extend(new_ids)
        for i, cid in enumerate(new_ids):
            self._row[cid] = start + i
        self._post_term = np.concatenate([self._post_term, (keys % n_terms).astype(np.int32)])
        self._post_tf = np.concatenate([self._post_tf, tf.astype(np.int32)])
        self._doc_ptr = np.concatenate([self._doc_ptr, self._doc_ptr[-1] + np.cumsum(per_doc)])
        self._doc_len = np.concatenate([self._doc_len, lens.astype(np.int32)])

    def delete(self, chunk_ids: Sequence[str]) -> int:
        """Remove chunks by id (unknown ids are ignored); returns how many were removed."""
        with self._lock:
            n = self._drop_rows([str(c) for c in chunk_ids if str(c) in self._row])
            if n:
                self._rebuild()
        return n

    def _drop_rows(self, chunk_ids: list[str]) -> int:
        rows = {self._row[c] for c in chunk_ids}
        if not rows:
            return 0
        keep = np.ones(len(self.ids), dtype=bool)
        keep[list(rows)] = False
        per_doc = np.diff(self._doc_ptr)
        post_keep = np.repeat(keep, per_doc)
        self._post_term = self._post_term[post_keep]
        self._post_tf = self._post_tf[post_keep]
        self._doc_ptr = np.concatenate([[0], np.cumsum(per_doc[keep])]).astype(np.int64)
        self._doc_len = self._doc_len[keep]
        self.ids = [cid for cid, k in zip(self.ids, keep) if k]
        self._row = {cid: i for i, cid in enumerate(self.ids)}
        return len(rows)

    def _reset_matrix(self) -> None:
        self._indptr = np.zeros(len(self._terms) + 1, dtype=np.int64)
        self._indices = np.zeros(0, dtype=np.int32)
        self._data = np.zeros(0, dtype=np.float32)
        self._nonocc: np.ndarray | None = None
        self._qcache: dict[str, int] = {}
        self._ref = None
        self._buf = None  # scratch arrays of the numba kernel (zero between queries)

    def _rebuild(self) -> None:
        """Recompute idf, length normalisation and the term-major score matrix (vectorised)."""
        n_docs = len(self.ids)
        df = np.bincount(self._post_term, minlength=len(self._terms))
        if len(self._terms) and not df.all():  # terms left by deleted chunks: compact the vocabulary
            alive = df > 0
            remap = np.cumsum(alive) - 1
            self._post_term = remap[self._post_term].astype(np.int32)
            self._terms = [t for t, a in zip(self._terms, alive) if a]
            self._vocab = {t: i for i, t in enumerate(self._terms)}
            df = df[alive]
        self._reset_matrix()
        if n_docs == 0:
            return
        avgdl = float(self._doc_len.mean()) or 1.0
        idf = _idf(self.variant, df, n_docs, self.epsilon)
        doc_of = np.repeat(np.arange(n_docs, dtype=np.int32), np.diff(self._doc_ptr))
        tf = self._post_tf.astype(np.float64)
        score = idf[self._post_term] * _tfc(self.variant, tf, self._doc_len[doc_of].astype(np.float64), avgdl,
                                            self.k1, self.b, self.delta)
        nonocc = _nonoccurrence(self.variant, idf, self.k1, self.delta)
        if nonocc is not None:
            score -= nonocc[self._post_term]
            self._nonocc = nonocc
        order = np.argsort(self._post_term, kind="stable")  # postings are sorted by chunk already
        self._indices = doc_of[order]
        self._data = score[order].astype(np.float32)
        self._indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        if self.backend == "rank_bm25":
            self._build_reference()

    def _build_reference(self) -> None:
        import rank_bm25

        # term ids stand in for the stems (same tokens, cheaper dict keys); token order is irrelevant.
        tokens = np.repeat(self._post_term, self._post_tf)
        bounds = np.cumsum(self._doc_len)[:-1]
        corpus = [d.tolist() for d in np.split(tokens, bounds)]
        if self.variant == "okapi":
            self._ref = rank_bm25.BM25Okapi(corpus, k1=self.k1, b=self.b, epsilon=self.epsilon)
        elif self.variant == "bm25l":
            self._ref = rank_bm25.BM25L(corpus, k1=self.k1, b=self.b, delta=self.delta)
        else:
            self._ref = rank_bm25.BM25Plus(corpus, k1=self.k1, b=self.b, delta=self.delta)

    # ------------------------------------------------------------------ querying
    def _query_terms(self, text: str) -> list[int]:
        """Query text -> term ids (with repeats), through a word -> term id cache."""
        cache = self._qcache
        out = []
        for w in self.tokenizer._findall(text.lower()):
            t = cache.get(w)
            if t is None:
                t = -1 if w in self.tokenizer.stopwords else self._vocab.get(self.tokenizer.stem(w), -1)
                if len(cache) < 1_000_000:
                    cache[w] = t
            if t >= 0:
                out.append(t)
        return out

    def _scores(self, terms: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(candidate rows, their scores without the non-occurrence constant)."""
        indptr, indices, data = self._indptr, self._indices, self._data
        n_docs = len(self.ids)
        spans = [(int(indptr[t]), int(indptr[t + 1])) for t in terms]
        postings = sum(e - s for s, e in spans)
        if postings * 8 < n_docs:  # sparse path: large corpus, rare terms
            if len(spans) == 1:
                s, e = spans[0]
                return indices[s:e], data[s:e]
            idx = np.concatenate([indices[s:e] for s, e in spans])
            val = np.concatenate([data[s:e] for s, e in spans])
            rows, inv = np.unique(idx, return_inverse=True)
            return rows, np.bincount(inv, weights=val, minlength=len(rows)).astype(np.float32)
        scores = np.zeros(n_docs, dtype=np.float32)
        seen = np.zeros(n_docs, dtype=bool)
        for s, e in spans:
            ix = indices[s:e]
            scores[ix] += data[s:e]
            seen[ix] = True
        rows = np.flatnonzero(seen)
        return rows, scores[rows]

    def _top(self, rows: np.ndarray, scores: np.ndarray, k: int, offset: float = 0.0) -> list[Hit]:
        nz = scores != 0  # same candidate rule as the kernel: a nonzero (stored) score
        rows, scores = rows[nz], scores[nz]
        if len(rows) > k:  # keep everything tied with the k-th score, so ties break by row as in the kernel
            kth = -np.partition(-scores, k - 1)[k - 1]
            keep = scores >= kth
            rows, scores = rows[keep], scores[keep]
        order = np.lexsort((rows, -scores))[:k]
        ids = self.ids
        return [Hit(ids[r], float(s) + offset) for r, s in zip(rows[order].tolist(), scores[order].tolist())]

    def retrieve(self, query: str, k: int = 10) -> list[Hit]:
        if k <= 0 or not self.ids:
            if not self.ids:
                log.info("BM25 index %r is empty: nothing to retrieve", self.name)
            return []
        with self._lock:
            terms = self._query_terms(query)
            if not terms:
                return []
            if self._ref is not None:
                return self._retrieve_reference(terms, k)
            if _kernel() is not None and k <= 10_000:
                return self._retrieve_kernel([terms], k)[0]
            rows, scores = self._scores(terms)
            offset = float(self._nonocc[terms].sum()) if self._nonocc is not None else 0.0
            return self._top(rows, scores, k, offset)

    def _retrieve_reference(self, terms: list[int], k: int) -> list[Hit]:
        full = self._ref.get_scores(terms)
        matched = np.zeros(len(self.ids), dtype=bool)
        for t in terms:
            matched[self._indices[self._indptr[t]:self._indptr[t + 1]]] = True
        rows = np.flatnonzero(matched)
        return self._top(rows, full[rows], k)

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Like ``retrieve`` per query, in one compiled call for the whole batch."""
        if k <= 0 or not self.ids or self._ref is not None or _kernel() is None or k > 10_000:
            return [self.retrieve(q, k) for q in queries]
        with self._lock:
            return self._retrieve_kernel([self._query_terms(q) for q in queries], k)

    def _retrieve_kernel(self, term_lists: list[list[int]], k: int) -> list[list[Hit]]:
        n = len(self.ids)
        if self._buf is None or len(self._buf) != n:
            self._buf = np.zeros(n, dtype=np.float32)
            self._mark = np.zeros(n, dtype=np.uint8)
            self._touched = np.empty(n, dtype=np.int64)
        lens = [len(t) for t in term_lists]
        ptr = np.zeros(len(term_lists) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        flat = np.fromiter(chain.from_iterable(term_lists), dtype=np.int64, count=int(ptr[-1]))
        with self._lock:  # the scratch arrays are shared: one batch at a time per index
            rows, scores, counts = _kernel()(self._indptr, self._indices, self._data, flat, ptr, self._buf,
                                             self._mark, self._touched, k, _DENSE_RATIO)
        ids = self.ids
        if self._nonocc is not None:
            offsets = [float(self._nonocc[t].sum()) if t else 0.0 for t in term_lists]
        else:
            offsets = [0.0] * len(term_lists)
        return [[Hit(ids[r], s + off) for r, s in zip(rr[:c], ss[:c])]
                for rr, ss, c, off in zip(rows.tolist(), scores.tolist(), counts.tolist(), offsets)]

    def search(self, queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        """BEIR-style ``{qid: {chunk_id: score}}``."""
        return {qid: {h.chunk_id: h.score for h in self.retrieve(q, k)} for qid, q in queries.items()}

    def query_terms(self, query: str) -> list[str]:
        """The stems of ``query`` that are in the index (for debugging and explanations)."""
        return [self._terms[t] for t in self._query_terms(query)]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """Write ``bm25.npz`` + ``bm25.json`` into ``folder`` atomically (temp folder, then rename):
        an interrupted save leaves the previous index in place."""
        def write(tmp: Path) -> None:
            with self._lock:  # a consistent snapshot
                np.savez(tmp / "bm25.npz", ids=np.array(self.ids, dtype=str),
                         terms=np.array(self._terms, dtype=str), doc_ptr=self._doc_ptr, post_term=self._post_term,
                         post_tf=self._post_tf, doc_len=self._doc_len, indptr=self._indptr, indices=self._indices,
                         data=self._data)
            meta = {"format_version": FORMAT_VERSION, "name": self.name, "manifest": self.manifest(),
                    "n_chunks": len(self.ids), "n_terms": len(self._terms)}
            (tmp / "bm25.json").write_text(json.dumps(meta, indent=1))

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path, backend: str | None = None) -> "BM25Retriever":
        folder = Path(folder)
        if not (folder / "bm25.json").exists():
            # a save interrupted between its two renames leaves the previous index under .old-*
            olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
            if olds and (olds[-1] / "bm25.json").exists():
                folder = olds[-1]
            else:
                raise FileNotFoundError(f"no BM25 index in {folder} (bm25.json missing)")
        from blockrag.fileformat import read_json

        meta = read_json(folder / "bm25.json", what="BM25 index metadata")
        if not isinstance(meta.get("manifest"), dict) or meta["manifest"].get("kind") != "bm25":
            raise ValueError(f"{folder} does not hold a BM25 index (kind {meta.get('manifest', {}).get('kind')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"BM25 index in {folder} has format version {meta.get('format_version')}, "
                             f"this blockrag reads {FORMAT_VERSION}; rebuild it")
        p = meta["manifest"]["params"]
        tok = p["tokenizer"]
        self = cls(name=meta["name"], variant=p["variant"], k1=p["k1"], b=p["b"], delta=p["delta"],
                   epsilon=p["epsilon"], backend=backend or p["backend"], stopwords=tok["stopwords"],
                   stemmer=tok["stemmer"])
        from blockrag.fileformat import StoreFormatError

        try:  # plain arrays only: object arrays (pickles) are refused by allow_pickle=False
            with np.load(folder / "bm25.npz", allow_pickle=False) as z:
                self.ids = z["ids"].tolist()
                self._terms = z["terms"].tolist()
                # the numeric arrays are memory-mapped (read-only; updates build new arrays)
                arr = {}
                for n in ("doc_ptr", "post_term", "post_tf", "doc_len", "indptr", "indices", "data"):
                    m = _npz_mmap(folder / "bm25.npz", n)
                    arr[n] = z[n] if m is None else m
                self._doc_ptr, self._post_term, self._post_tf = arr["doc_ptr"], arr["post_term"], arr["post_tf"]
                self._doc_len = arr["doc_len"]
                indptr, indices, data = arr["indptr"], arr["indices"], arr["data"]
        except (ValueError, OSError, KeyError, EOFError) as err:
            kind = "holds pickled objects (refused)" if "pickle" in str(err) else f"is unreadable ({type(err).__name__})"
            raise StoreFormatError(f"{folder}/bm25.npz {kind}; rebuild the index") from None
        if not all(isinstance(x, str) for x in self.ids) or not all(isinstance(t, str) for t in self._terms):
            raise StoreFormatError(f"{folder}/bm25.npz: ids and terms must be strings; rebuild the index")
        self._row = {cid: i for i, cid in enumerate(self.ids)}
        self._vocab = {t: i for i, t in enumerate(self._terms)}
        if len(self.ids) != len(self._doc_len) or len(indptr) != len(self._terms) + 1:
            raise ValueError(f"BM25 index in {folder} is inconsistent; rebuild it")
        if self.backend == "rank_bm25":
            self._rebuild()
        else:
            self._reset_matrix()
            self._indptr, self._indices, self._data = indptr, indices, data
            if self.variant in ("bm25l", "bm25+"):
                df = np.diff(indptr)
                self._nonocc = _nonoccurrence(self.variant, _idf(self.variant, df, len(self.ids), self.epsilon),
                                              self.k1, self.delta)
        return self

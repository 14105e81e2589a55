"""A faiss vector index keyed by string ids, with deletes and atomic saves.

Vectors are L2-normalised and compared by inner product (cosine). ``kind="flat"`` is exact;
``kind="hnsw"`` trades a little recall for sub-linear search on large collections; ``kind="ivfpq"``
(inverted lists over product-quantised codes, ``pq_m`` bytes a vector instead of 4 x dim) fits millions of
vectors in little memory, trained on its first ``add`` (at least 1,000 vectors), searched over ``nprobe``
lists; with ``refine=R`` it fetches ``R * k`` candidates and re-scores them exactly against the full vectors,
kept in ``vectors.npy`` and memory-mapped after a load (only the candidates' rows are read). ``python -m blockrag.eval.bench_dense_scale`` measures their recall and speed against exact search.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def atomic_folder_write(folder: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling folder, then swap it in place of ``folder``.

    A crash before the swap leaves the previous folder untouched; a crash between the two renames leaves it
    under ``.<name>.old-*``, which :func:`recover_folder` puts back. Callers that share a folder between
    processes serialise saves (a Collection holds its store's write lock), so two swaps never interleave.
    """
    from blockrag.faults import fault

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{tmp.name[-8:]}")
            folder.rename(old)
            fault("swap:between-renames")
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_folder(folder: Path) -> bool:
    """Put back the previous copy of ``folder`` if a swap died between its renames; True if it did."""
    folder = Path(folder)
    if folder.exists():
        return False
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    olds[-1].rename(folder)
    return True


def remove_leftovers(parent: Path) -> int:
    """Delete temporary and superseded folders that interrupted swaps left in ``parent``."""
    n = 0
    for p in Path(parent).glob(".*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


IVFPQ_MIN_TRAIN = 1000


INDEX_KINDS = ("flat", "hnsw", "ivfpq")


class VectorIndex:
    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128,
                 nlist: int | None = None, pq_m: int | None = None, nprobe: int = 16, refine: int = 0):
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; use 'flat', 'hnsw' or 'ivfpq'")
        self.dim, self.kind, self.hnsw_m, self.ef_search = dim, kind, hnsw_m, ef_search
        self.nlist, self.nprobe, self.refine = nlist, nprobe, int(refine)
        if self.refine and kind != "ivfpq":
            raise ValueError("refine applies to kind='ivfpq' only")
        self._full = np.zeros((0, dim), np.float32)  # ivfpq + refine: normalised vectors by label
        self.pq_m = pq_m or max(d for d in range(1, min(dim, 64) + 1) if dim % d == 0 and d <= max(1, dim // 4))
        if dim % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide the dimension {dim}")
        if kind == "flat":
            base = faiss.IndexFlatIP(dim)
        elif kind == "ivfpq":  # built on the first add, when the training vectors are known
            base = None
        else:
            base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = ef_search
        # IDMap2 lets us delete by integer id (flat) and reconstruct; HNSW cannot remove, so we mask instead.
        self.index = faiss.IndexIDMap2(base) if kind == "flat" else base
        self.ids: list[str | None] = []      # faiss row / label -> string id (None = deleted)
        self.rows: dict[str, int] = {}

    def _train_ivfpq(self, vectors: np.ndarray) -> None:
        import faiss

        n = len(vectors)
        if n < IVFPQ_MIN_TRAIN:
            raise ValueError(f"an 'ivfpq' index is trained on its first add, which needs at least "
                             f"{IVFPQ_MIN_TRAIN} vectors (got {n}); use kind='flat' for small collections")
        # ~4 sqrt(n) lists, each with >= 39 training points (faiss' k-means minimum)
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, nlist, self.pq_m, 8,
                                 faiss.METRIC_INNER_PRODUCT)
        m = min(n, max(39 * nlist, 50_000))  # k-means cost grows with the sample: faiss' minimum, or 50K
        sample = vectors if m == n else vectors[np.sort(np.random.default_rng(0).choice(n, m, replace=False))]
        index.train(sample)
        index.nprobe = self.nprobe
        self.index, self.nlist = index, nlist

    def set_nprobe(self, nprobe: int) -> None:
        """IVF-PQ: inverted lists visited per query (more: higher recall, slower)."""
        self.nprobe = int(nprobe)
        if self.index is not None and self.kind == "ivfpq":
            self.index.nprobe = self.nprobe

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = normalise(vectors)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected vectors of shape ({len(ids)}, {self.dim}), got {vectors.shape}")
        replaced = [i for i in ids if i in self.rows]
        if replaced:
            self.delete(replaced)
        labels = np.arange(len(self.ids), len(self.ids) + len(ids), dtype=np.int64)
        if self.kind == "ivfpq" and (self.index is None or not self.index.is_trained):
            self._train_ivfpq(vectors)
        if self.kind in ("flat", "ivfpq"):
            self.index.add_with_ids(vectors, labels)
        else:
            self.index.add(vectors)
        if self.refine:
            self._full = np.concatenate([self._full, vectors])
        for label, id_ in zip(labels.tolist(), ids):
            self.ids.append(id_)
            self.rows[id_] = label

    def delete(self, ids) -> None:
        labels = [self.rows.pop(i) for i in ids if i in self.rows]
        if not labels:
            return
        for label in labels:
            self.ids[label] = None
        if self.kind in ("flat", "ivfpq"):
            self.index.remove_ids(np.asarray(labels, dtype=np.int64))

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        if len(self.rows) == 0 or k <= 0:
            return [[] for _ in range(len(vectors))]
        vectors = normalise(np.atleast_2d(vectors))
        # HNSW keeps deleted rows, so over-fetch to still return k live ones.
        fetch = min(self.index.ntotal, k if self.kind != "hnsw" else k + (len(self.ids) - len(self.rows)))
        if self.refine:
            fetch = min(self.index.ntotal, k * self.refine)
        scores, labels = self.index.search(vectors, fetch)
        if self.refine:  # exact inner products of the candidates, best first
            safe = np.maximum(labels, 0)
            exact = np.einsum("qcd,qd->qc", self._full[safe.reshape(-1)].reshape(*safe.shape, self.dim), vectors)
            exact = np.where(labels >= 0, exact, -np.inf)
            order = np.argsort(-exact, axis=1, kind="stable")
            scores, labels = np.take_along_axis(exact, order, 1), np.take_along_axis(labels, order, 1)
        out = []
        for row_scores, row_labels in zip(scores, labels):
            hits = [(self.ids[l], float(s)) for s, l in zip(row_scores, row_labels)
                    if l >= 0 and self.ids[l] is not None]
            out.append(hits[:k])
        return out

    def vectors(self, ids: list[str]) -> np.ndarray:
        """Stored (normalised) vectors by id, for flat indexes."""
        if self.kind != "flat":
            raise NotImplementedError("reconstruction is only kept for flat indexes")
        return np.stack([self.index.reconstruct(int(self.rows[i])) for i in ids]) if ids else \
            np.zeros((0, self.dim), np.float32)

    def save(self, folder: str | Path) -> None:
        import faiss

        def write(tmp: Path):
            index = self.index
            if index is None:  # an ivfpq index never added to: an untrained one stands for it
                index = faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, 1, self.pq_m, 8,
                                         faiss.METRIC_INNER_PRODUCT)
            faiss.write_index(index, str(tmp / "index.faiss"))
            if self.refine:
                np.save(tmp / "vectors.npy", np.ascontiguousarray(self._full))
            (tmp / "ids.json").write_text(json.dumps(self.ids))
            (tmp / "meta.json").write_text(json.dumps({
                "format_version": FORMAT_VERSION, "dim": self.dim, "kind": self.kind,
                "hnsw_m": self.hnsw_m, "ef_search": self.ef_search, "nlist": self.nlist, "pq_m": self.pq_m,
                "nprobe": self.nprobe, "refine": self.refine}))

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path) -> "VectorIndex":
        import faiss

        from blockrag.fileformat import StoreFormatError, read_json, require_format

        folder = Path(folder)
        meta = read_json(folder / "meta.json", what="vector index metadata")
        require_format(meta, FORMAT_VERSION, folder, "vector index")
        try:
            self = cls(int(meta["dim"]), meta["kind"], int(meta["hnsw_m"]), int(meta["ef_search"]),
                       meta.get("nlist"), meta.get("pq_m"), int(meta.get("nprobe", 16)), int(meta.get("refine", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreFormatError(f"{folder}: bad vector index metadata ({err})") from None
        ids = read_json(folder / "ids.json", list, "vector index ids")
        if not all(i is None or isinstance(i, str) for i in ids):
            raise StoreFormatError(f"{folder}: vector index ids must be strings")
        with open(folder / "index.faiss", "rb") as fh:  # faiss' own binary format: data, no code
            magic = fh.read(4)
        if magic not in (b"IxM2", b"IHNf", b"IwPQ"):  # IndexIDMap2 (flat) / IndexHNSWFlat / IndexIVFPQ, the kinds written
            raise StoreFormatError(f"{folder}/index.faiss: not a faiss index of a kind blockrag writes")
        try:
            self.index = faiss.read_index(str(folder / "index.faiss"))
        except RuntimeError as err:
            raise StoreFormatError(f"{folder}/index.faiss: unreadable ({str(err).splitlines()[0][:120]})") from None
        if self.index.d != self.dim:
            raise StoreFormatError(f"{folder}: faiss index has dimension {self.index.d}, its metadata says {self.dim}")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.ef_search
        if self.kind == "ivfpq":
            if self.index.is_trained:
                self.index.nprobe = self.nprobe
            else:
                self.index = None
        if self.refine:
            try:  # memory-mapped: a query reads only its candidates' rows
                self._full = np.load(folder / "vectors.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise StoreFormatError(f"{folder}/vectors.npy: unreadable ({type(err).__name__})") from None
            if self._full.shape != (len(ids), self.dim):
                raise StoreFormatError(f"{folder}/vectors.npy has shape {self._full.shape}, expected "
                                       f"({len(ids)}, {self.dim})")
        self.ids = ids
        self.rows = {id_: label for label, id_ in enumerate(self.ids) if id_ is not None}
        return self

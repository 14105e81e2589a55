"""A faiss vector index keyed by string ids, with deletes and atomic saves.

Vectors are L2-normalised and compared by inner product (cosine). ``kind="flat"`` is exact;
``kind="hnsw"`` trades a little recall for sub-linear search on large collections.
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


class VectorIndex:
    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128):
        import faiss

        if kind not in {"flat", "hnsw"}:
            raise ValueError(f"unknown index kind {kind!r}; use 'flat' or 'hnsw'")
        self.dim, self.kind, self.hnsw_m, self.ef_search = dim, kind, hnsw_m, ef_search
        if kind == "flat":
            base = faiss.IndexFlatIP(dim)
        else:
            base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = ef_search
        # IDMap2 lets us delete by integer id (flat) and reconstruct; HNSW cannot remove, so we mask instead.
        self.index = faiss.IndexIDMap2(base) if kind == "flat" else base
        self.ids: list[str | None] = []      # faiss row / label -> string id (None = deleted)
        self.rows: dict[str, int] = {}

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
        if self.kind == "flat":
            self.index.add_with_ids(vectors, labels)
        else:
            self.index.add(vectors)
        for label, id_ in zip(labels.tolist(), ids):
            self.ids.append(id_)
            self.rows[id_] = label

    def delete(self, ids) -> None:
        labels = [self.rows.pop(i) for i in ids if i in self.rows]
        if not labels:
            return
        for label in labels:
            self.ids[label] = None
        if self.kind == "flat":
            self.index.remove_ids(np.asarray(labels, dtype=np.int64))

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        if len(self.rows) == 0 or k <= 0:
            return [[] for _ in range(len(vectors))]
        vectors = normalise(np.atleast_2d(vectors))
        # HNSW keeps deleted rows, so over-fetch to still return k live ones.
        fetch = min(self.index.ntotal, k if self.kind == "flat" else k + (len(self.ids) - len(self.rows)))
        scores, labels = self.index.search(vectors, fetch)
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
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "ids.json").write_text(json.dumps(self.ids))
            (tmp / "meta.json").write_text(json.dumps({
                "format_version": FORMAT_VERSION, "dim": self.dim, "kind": self.kind,
                "hnsw_m": self.hnsw_m, "ef_search": self.ef_search}))

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path) -> "VectorIndex":
        import faiss

        from blockrag.fileformat import StoreFormatError, read_json, require_format

        folder = Path(folder)
        meta = read_json(folder / "meta.json", what="vector index metadata")
        require_format(meta, FORMAT_VERSION, folder, "vector index")
        try:
            self = cls(int(meta["dim"]), meta["kind"], int(meta["hnsw_m"]), int(meta["ef_search"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreFormatError(f"{folder}: bad vector index metadata ({err})") from None
        ids = read_json(folder / "ids.json", list, "vector index ids")
        if not all(i is None or isinstance(i, str) for i in ids):
            raise StoreFormatError(f"{folder}: vector index ids must be strings")
        with open(folder / "index.faiss", "rb") as fh:  # faiss' own binary format: data, no code
            magic = fh.read(4)
        if magic not in (b"IxM2", b"IHNf"):  # IndexIDMap2 (flat) / IndexHNSWFlat, the two kinds written
            raise StoreFormatError(f"{folder}/index.faiss: not a faiss index of a kind blockrag writes")
        try:
            self.index = faiss.read_index(str(folder / "index.faiss"))
        except RuntimeError as err:
            raise StoreFormatError(f"{folder}/index.faiss: unreadable ({str(err).splitlines()[0][:120]})") from None
        if self.index.d != self.dim:
            raise StoreFormatError(f"{folder}: faiss index has dimension {self.index.d}, its metadata says {self.dim}")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.ef_search
        self.ids = ids
        self.rows = {id_: label for label, id_ in enumerate(self.ids) if id_ is not None}
        return self

"""Dense retrieval: a sentence-transformers encoder over chunk texts, searched with faiss.

On a machine with CUDA the encoder runs there and search uses an exact torch matmul over the
stored vectors (fast for up to a few million chunks); otherwise faiss on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Hit
from .vector_index import INDEX_KINDS, VectorIndex, atomic_folder_write

FORMAT_VERSION = 1  # dense.json + vectors/ (a VectorIndex); files without the field are version 1


class DenseRetriever:
    def __init__(self, model_name: str | None = None, name: str = "dense", index_kind: str = "flat",
                 batch_size: int = 64, device: str | None = None, show_progress: bool = True):
        from blockrag.models import DEFAULT_EMBEDDER

        self.model_name = model_name or DEFAULT_EMBEDDER
        self.name, self.index_kind, self.batch_size = name, index_kind, batch_size
        self.device, self.show_progress = device, show_progress
        self._model = None
        self.index: VectorIndex | None = None
        self._gpu_matrix = None
        # chunk id -> vector encoded elsewhere (distributed indexing): add() takes these instead of encoding
        self.precomputed: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------- encoding
    @property
    def model(self):
        if self._model is None:
            from blockrag.models import load_embedder

            model = load_embedder(self.model_name, self.device)
            if self.index is not None:  # a clear refusal instead of faiss' AssertionError at query time
                getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
                if getter() != self.index.dim:
                    from blockrag.store import IndexMismatch

                    raise IndexMismatch(f"dense index {self.name!r} holds {self.index.dim}-dimensional vectors, "
                                        f"but model {self.model_name!r} encodes {getter()}; rebuild it")
            self._model = model
        return self._model

    @property
    def dim(self) -> int:
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return getter()

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        progress = self.show_progress and len(texts) > self.batch_size if progress is None else progress
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress).astype(np.float32)

    # ---------------------------------------------------------------- index
    def build(self, chunks: Sequence) -> None:
        self.index = VectorIndex(self.dim, self.index_kind)
        self.add(chunks)

    def add(self, chunks: Sequence) -> None:
        if self.index is None:
            self.index = VectorIndex(self.dim, self.index_kind)
        chunks = list(chunks)
        if chunks:
            self.index.add([c.id for c in chunks], self._vectors(chunks))
        self._gpu_matrix = None

    def _vectors(self, chunks: list) -> np.ndarray:
        pre = self.precomputed or {}
        todo = [c.text for c in chunks if c.id not in pre]
        fresh = iter(self.encode(todo)) if todo else iter(())
        return np.stack([pre[c.id] if c.id in pre else next(fresh) for c in chunks]).astype(np.float32)

    def delete(self, chunk_ids: Sequence[str]) -> None:
        if self.index is not None:
            self.index.delete(list(chunk_ids))
        self._gpu_matrix = None

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    # ------------------------------------------------------------ retrieval
    def retrieve(self, query: str, k: int = 10) -> list[Hit]:
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        if self.index is None or len(self.index) == 0:
            return [[] for _ in queries]
        vectors = self.encode(queries, progress=False)
        if self._use_torch_search():
            return self._torch_search(vectors, k)
        return [[Hit(i, s) for i, s in row] for row in self.index.search(vectors, k)]

    def _use_torch_search(self) -> bool:
        import torch

        return self.index.kind == "flat" and torch.cuda.is_available()

    def _torch_search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        # Exact search as one GPU matmul; the matrix is rebuilt lazily after add/delete.
        import torch

        if self._gpu_matrix is None:
            ids = [i for i in self.index.ids if i is not None]
            self._gpu_ids = ids
            self._gpu_matrix = torch.from_numpy(self.index.vectors(ids)).cuda()
        scores = torch.from_numpy(vectors).cuda() @ self._gpu_matrix.T
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return [[Hit(self._gpu_ids[j], float(s)) for s, j in zip(row_s.tolist(), row_i.tolist())]
                for row_s, row_i in zip(top.values.cpu(), top.indices.cpu())]

    # ---------------------------------------------------------- persistence
    def manifest(self) -> dict:
        from blockrag.models import model_revision, resolve_embedder

        return {"kind": "dense", "model": self.model_name, "dimension": self.dim,
                "revision": model_revision(resolve_embedder(self.model_name)), "format_version": FORMAT_VERSION,
                "params": {"index_kind": self.index_kind}}

    def identity(self) -> dict:
        """What the opened files and the installed model say, without loading the model: compared with the
        store's manifest on open (name, revision of the weights on disk, dimension, format)."""
        from blockrag.models import model_revision, resolve_embedder

        return {"model": self.model_name, "revision": model_revision(resolve_embedder(self.model_name)),
                "dimension": self.index.dim if self.index is not None else None, "format_version": FORMAT_VERSION}

    def save(self, folder: str | Path) -> None:
        def write(tmp: Path):
            (tmp / "dense.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "model": self.model_name,
                                                        "index_kind": self.index_kind}))
            if self.index is not None:
                self.index.save(tmp / "vectors")

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path, model_name: str | None = None, **kwargs) -> "DenseRetriever":
        from blockrag.fileformat import StoreFormatError, read_json, require_format
        from blockrag.store import IndexMismatch

        folder = Path(folder)
        meta = read_json(folder / "dense.json", what="dense index metadata")
        require_format({"format_version": 1, **meta}, FORMAT_VERSION, folder, "dense index")
        if not isinstance(meta.get("model"), str) or meta.get("index_kind") not in INDEX_KINDS:
            raise StoreFormatError(f"{folder}/dense.json: bad model or index kind")
        if model_name is not None and model_name != meta["model"]:
            raise IndexMismatch(f"dense index at {folder} was built with {meta['model']!r}, "
                                f"not {model_name!r}; rebuild it or drop --model")
        self = cls(meta["model"], index_kind=meta["index_kind"], **kwargs)
        if (folder / "vectors").exists():
            self.index = VectorIndex.load(folder / "vectors")
        return self

"""Collection: a DocStore plus the indexes built over it, kept consistent on every add and delete.

Order of an ingest: chunk -> update every index in memory (the slow part: encoding) -> one SQLite
transaction -> save each index atomically and record its manifest with the store generation. An
interruption before the transaction leaves the previous state; one after it leaves an index whose
generation lags the store's, which the next open detects and rebuilds from the store.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from .chunking import TokenChunker
from . import registry
from .documents import Chunk, Document
from .store import DocStore, IndexMismatch

log = logging.getLogger(__name__)

# index kinds live in the one registry of names (blockrag.registry); re-exported here for callers
index_class = registry.index_class
INDEX_KINDS = registry.INDEX_KINDS


@dataclass
class IngestReport:
    documents_added: int = 0
    documents_unchanged: int = 0
    documents_without_chunks: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.documents_added} documents added ({self.chunks_added} chunks), "
                f"{self.documents_unchanged} unchanged, {self.chunks_removed} chunks replaced or removed"
                + (f", {self.documents_without_chunks} produced no chunks" if self.documents_without_chunks else ""))


class Collection:
    """``Collection(folder)``: open or create; ``add_documents``; ``build_index``; ``retriever(name)``."""

    def __init__(self, folder: str | Path, tokenizer_name: str | None = None, chunk_tokens: int | None = 256,
                 overlap: int = 32, progress: bool = True):
        self.store = DocStore(folder)
        self.progress = progress
        saved = self.store.get_setting("chunking")
        wanted = {"tokenizer": tokenizer_name, "chunk_tokens": chunk_tokens, "overlap": overlap}
        if saved is None:
            self.chunking = wanted
        else:
            self.chunking = saved
            if tokenizer_name is not None and saved["tokenizer"] != tokenizer_name:
                raise IndexMismatch(f"store {folder} was chunked with tokenizer {saved['tokenizer']!r}, "
                                    f"not {tokenizer_name!r}")
        self._chunker = None
        self.indexes: dict = {}
        for entry in self.store.manifests():
            if entry["kind"] in INDEX_KINDS:
                self._open(entry)

    # --------------------------------------------------------------- chunking
    @property
    def chunker(self) -> TokenChunker:
        if self._chunker is None:
            from .models import load_tokenizer, tokenizer_hash

            tokenizer = load_tokenizer(self.chunking["tokenizer"])
            self._chunker = TokenChunker(tokenizer, self.chunking["chunk_tokens"], self.chunking["overlap"])
            thash = tokenizer_hash(tokenizer)
            saved = self.store.get_setting("chunking")
            if saved is None:
                self.store.set_setting("chunking", {**self.chunking, "tokenizer_hash": thash})
            elif saved.get("tokenizer_hash") not in (None, thash):
                raise IndexMismatch(f"store {self.store.folder} was chunked with tokenizer hash "
                                    f"{saved['tokenizer_hash']}, the loaded tokenizer hashes to {thash}")
        return self._chunker

    @property
    def generation(self) -> int:
        return self.store.get_setting("generation", 0)

    # ----------------------------------------------------------------- ingest
    def add_documents(self, docs: Iterable[Document], chunks_for=None) -> IngestReport:
        """Add or replace documents; every index is updated. ``chunks_for(doc)`` overrides the chunker."""
        report = IngestReport()
        chunks_for = chunks_for or self.chunker.split
        plan: list[tuple[Document, list[Chunk]]] = []
        removed: list[str] = []
        seen = set()
        for doc in tqdm(list(docs), desc="chunking", unit="doc", disable=not self.progress):
            if doc.id in seen:
                report.notes.append(f"duplicate document id {doc.id!r} in input: kept the last one")
                plan = [(d, c) for d, c in plan if d.id != doc.id]
            seen.add(doc.id)
            old = self.store.document(doc.id)
            if old is not None and (old.title, old.text) == (doc.title, doc.text):
                report.documents_unchanged += 1
                continue
            if old is not None:
                removed += [c for c, d in self.store.chunk_doc_ids().items() if d == doc.id]
            chunks = chunks_for(doc)
            if not chunks:
                report.documents_without_chunks += 1
            plan.append((doc, chunks))
        added = [c for _, chunks in plan for c in chunks]
        for name, index in self.indexes.items():
            if removed:
                index.delete(removed)
            if added:
                log.info("updating index %s with %d chunks", name, len(added))
                index.add(added)
        self.store.upsert(plan)
        report.documents_added = len(plan)
        report.chunks_added, report.chunks_removed = len(added), len(removed)
        if plan:
            self._bump_and_save()
        return report

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        doc_ids = [d for d in doc_ids if self.store.has_document(d)]
        mapping = self.store.chunk_doc_ids()
        targets = set(doc_ids)
        removed = [c for c, d in mapping.items() if d in targets]
        for index in self.indexes.values():
            index.delete(removed)
        self.store.delete(doc_ids)
        if doc_ids:
            self._bump_and_save()
        return len(removed)

    def _bump_and_save(self) -> None:
        generation = self.generation + 1
        self.store.set_setting("generation", generation)
        for name, index in self.indexes.items():
            self._save(name, index, generation)

    def _save(self, name: str, index, generation: int) -> None:
        index.save(self.store.index_dir(name))
        m = index.manifest()
        self.store.record_index(name, m["kind"], m.get("model"), m.get("revision"), m.get("dimension"),
                                m.get("tokenizer_hash"), params={**m.get("params", {}), "generation": generation})

    # ---------------------------------------------------------------- indexes
    def build_index(self, kind: str, name: str | None = None, **params):
        """Build (or rebuild) an index of ``kind`` over every chunk in the store."""
        name = name or kind
        index = index_class(kind)(name=name, **params)
        if hasattr(index, "attach"):  # indexes that write their files as they go need their folder first
            index.attach(self.store.index_dir(name))
        chunks = list(self.store.chunks())
        index.build(chunks)
        self.indexes[name] = index
        self._save(name, index, self.generation)
        return index

    def _open(self, entry: dict):
        name, cls = entry["name"], index_class(entry["kind"])
        folder = self.store.index_dir(name)
        if not folder.exists():
            log.warning("index %s is in the manifest but its files are missing; rebuilding", name)
            self.indexes[name] = None
            self.build_index(entry["kind"], name)
            return
        index = cls.load(folder)
        if entry["params"].get("generation") != self.generation:
            log.warning("index %s lags the store (interrupted update); rebuilding from the store", name)
            index.build(list(self.store.chunks()))
            self.indexes[name] = index
            self._save(name, index, self.generation)
            return
        self.indexes[name] = index

    def index(self, name: str, model: str | None = None):
        """An opened index; ``model`` (if given) must match the one it was built with."""
        self.store.check_index(name, model=model)
        if name not in self.indexes:
            have = ", ".join(sorted(self.indexes)) or "none"
            raise KeyError(f"no index named {name!r} in {self.store.folder} (have: {have}); "
                           f"build it with `blockrag index ... --index {name}`")
        return self.indexes[name]

    def retriever(self, spec: str = "hybrid", model: str | None = None, **opts):
        """A retriever by name (see :mod:`blockrag.registry`): ``bm25``, ``dense``, ``hybrid`` (RRF of bm25 +
        dense), ``mrag``, the graph modes (``local``, ``ppr``, ...), or any index name."""
        if model is not None:
            opts["model"] = model
        return registry.retriever(self, spec, **opts)

    def get_chunks(self, ids):
        return self.store.get_chunks(ids)

    def close(self):
        self.store.close()

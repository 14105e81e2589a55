"""GraphIndex: extraction -> graph store -> entity / relation / chunk vector indexes, kept incrementally.

Satisfies the ``Index`` protocol of :mod:`retrievers.base` (``add``, ``delete``, ``save``, ``manifest``,
plus ``build`` and ``load`` for :class:`rag.collection.Collection`) and is itself a retriever in its
default mode; :class:`graph.query.GraphRetriever` gives every mode.

Bad input never stops a build: gigantic chunks are cut, duplicates reuse the first copy's extraction,
non-English text goes to the regex extractor, chunks with no entities and failed extractions (LLM
timeouts, garbage) are counted and listed in :attr:`GraphIndex.report`; failed chunks can be retried
with :meth:`GraphIndex.retry_failed`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .extract import Entity, RegexExtractor, Relation, default_extractor, extract_batch, looks_english
from .store import GraphStore, edge_ends

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the graph is JSON (1 was a pickle, refused)
GRAPH_FILE = "graph_data.json"


@dataclass
class BuildReport:
    chunks_seen: int = 0
    chunks_indexed: int = 0
    duplicates: int = 0          # same text as an indexed chunk: extraction reused
    no_entities: int = 0         # nothing extracted (kept, so the document can still be deleted)
    truncated: int = 0           # longer than max_chunk_chars: cut
    non_english: int = 0         # sent to the regex extractor
    failed: int = 0              # extractor raised (timeout, garbage): listed in failed_ids
    failed_ids: list[str] = field(default_factory=list)
    chunks_deleted: int = 0
    entities_added: int = 0
    relations_added: int = 0
    entities_removed: int = 0
    relations_removed: int = 0
    extract_s: float = 0.0
    embed_s: float = 0.0
    total_s: float = 0.0
    llm: dict = field(default_factory=dict)

    def summary(self) -> str:
        skipped = {k: getattr(self, k) for k in ("duplicates", "no_entities", "truncated", "non_english", "failed")
                   if getattr(self, k)}
        rate = self.chunks_seen / self.total_s if self.total_s else 0.0
        return (f"{self.chunks_indexed}/{self.chunks_seen} chunks indexed ({rate:.1f} chunks/s), "
                f"+{self.entities_added} entities, +{self.relations_added} relations"
                + (f", -{self.entities_removed} entities, -{self.relations_removed} relations" if
                   self.chunks_deleted else "")
                + (f"; skipped/adjusted: {skipped}" if skipped else ""))


class HashEmbedder:
    """Character-trigram hashing embedder: no model, deterministic. For tests and model-less setups."""

    name = "hash-trigram-256"

    def __init__(self, dim: int = 256):
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            t = f"  {t.lower()}  "
            for j in range(len(t) - 2):
                h = int.from_bytes(hashlib.blake2b(t[j:j + 3].encode(), digest_size=4).digest(), "little")
                out[i, h % self.dim] += 1.0 if h & (1 << 31) else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


class STEmbedder:
    """sentence-transformers model resolved offline by :func:`rag.models.load_embedder`."""

    def __init__(self, model_name: str | None = None, batch_size: int = 128):
        from blockrag.models import DEFAULT_EMBEDDER

        self.name = model_name or DEFAULT_EMBEDDER
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from blockrag.models import load_embedder

            self._model = load_embedder(self.name)
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        getter = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return getter()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def make_embedder(name: str | None):
    if name in ("hash", HashEmbedder.name):
        return HashEmbedder()
    return STEmbedder(name)


class GraphIndex:
    """``GraphIndex(name="graph", extractor=None, embedder=None)``; ``build(chunks)`` / ``add`` / ``delete``.

    ``extractor``: any :class:`graph.extract.Extractor` (default: spaCy, regex fallback).
    ``embedder``: a model name for sentence-transformers (default all-MiniLM-L6-v2), ``"hash"`` for the
    model-free hashing embedder, or an object with ``name``, ``dim`` and ``encode(texts)``.
    ``chunk_vectors``: also embed chunk texts (needed by the ``naive`` and ``mix`` modes).
    """

    def __init__(self, name: str = "graph", extractor=None, embedder=None, chunk_vectors: bool = True,
                 max_chunk_chars: int = 20000, batch_size: int = 256, default_mode: str = "ppr",
                 relation_vectors: str = "composed", dense=None, progress: bool = False, **_ignored):
        if relation_vectors not in {"composed", "text"}:
            raise ValueError("relation_vectors: 'composed' (entity + keyword vectors, fast) or 'text'")
        self.name = name
        self._extractor = extractor
        self.embedder = embedder if (hasattr(embedder, "encode") and not isinstance(embedder, str)) else make_embedder(embedder)
        self.chunk_vectors = chunk_vectors
        self.max_chunk_chars, self.batch_size = max_chunk_chars, batch_size
        self.default_mode, self.progress = default_mode, progress
        self.relation_vectors = relation_vectors
        self.dense = dense  # optional DenseRetriever for the naive/mix modes instead of own chunk vectors
        self._kw_vec: dict[str, np.ndarray] = {}
        self.analysis_cache: dict = {}
        self.store = GraphStore()
        self.entities = None  # VectorIndex over entity texts (id = entity key)
        self.relations = None  # VectorIndex over relation texts (id = edge id)
        self.chunks = None  # VectorIndex over chunk texts (id = chunk id)
        self.chunk_hash: dict[str, str] = {}  # chunk id -> content hash
        self.hash_chunk: dict[str, str] = {}  # content hash -> first chunk id with that text
        self.failed: set[str] = set()
        self.report = BuildReport()
        self.extractor_config: dict = {}
        self._retrievers: dict = {}

    # --------------------------------------------------------------- parts
    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = default_extractor()
        return self._extractor

    def _vi(self):
        from blockrag.retrievers.vector_index import VectorIndex

        return VectorIndex(self.embedder.dim, "flat")

    def _ensure_indexes(self):
        if self.entities is None:
            self.entities, self.relations = self._vi(), self._vi()
        if self.chunks is None and self.chunk_vectors and self.dense is None:
            self.chunks = self._vi()

    # --------------------------------------------------------------- write
    def build(self, chunks: Sequence) -> BuildReport:
        """Index ``chunks`` from scratch (drops whatever was indexed)."""
        self.store = GraphStore()
        self.entities = self.relations = self.chunks = None
        self.chunk_hash, self.hash_chunk, self.failed = {}, {}, set()
        self.report = BuildReport()
        return self.add(chunks)

    def add(self, chunks: Sequence) -> BuildReport:
        """Extract and merge ``chunks`` (objects with id, doc_id, text); re-adding an id replaces it."""
        t0 = time.perf_counter()
        chunks = list(chunks)
        rep = self.report
        self._ensure_indexes()
        ex = self.extractor
        self.extractor_config = getattr(ex, "config", lambda: {"extractor": getattr(ex, "name", "?")})()
        replaced = [c.id for c in chunks if c.id in self.store]
        if replaced:
            self.delete(replaced)
        new_nodes: set[str] = set()
        new_edges: set[str] = set()
        batch = max(1, self.batch_size)
        iterator = range(0, len(chunks), batch)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"graph {self.name}", unit="batch")
        for start in iterator:
            part = chunks[start:start + batch]
            rep.chunks_seen += len(part)
            todo, texts, dup_of, pending = [], [], {}, set()
            for c in part:
                text = c.text or ""
                h = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
                self.chunk_hash[c.id] = h
                first = self.hash_chunk.get(h)
                if first is not None and first != c.id and (first in self.store or first in pending):
                    dup_of[c.id] = first
                    continue
                self.hash_chunk.setdefault(h, c.id)
                pending.add(c.id)
                if len(text) > self.max_chunk_chars:
                    rep.truncated += 1
                    text = text[: self.max_chunk_chars]
                todo.append(c)
                texts.append(text)
            te = time.perf_counter()
            results = self._extract(todo, texts)
            rep.extract_s += time.perf_counter() - te
            for c, res in zip(todo, results):
                doc_id = getattr(c, "doc_id", c.id)
                if isinstance(res, Exception):
                    rep.failed += 1
                    rep.failed_ids.append(c.id)
                    self.failed.add(c.id)
                    log.warning("graph extraction failed for chunk %s: %s", c.id, res)
                    self.store.add_empty_chunk(c.id, doc_id)
                    continue
                ents, rels = res
                if not ents and not rels:
                    rep.no_entities += 1
                    self.store.add_empty_chunk(c.id, doc_id)
                    rep.chunks_indexed += 1
                    continue
                n, e = self.store.add_chunk(c.id, doc_id, ents, rels)
                new_nodes |= n
                new_edges |= e
                rep.chunks_indexed += 1
            for c in part:
                if c.id in dup_of:
                    rep.duplicates += 1
                    ents, rels = self.chunk_extraction(dup_of[c.id])
                    n, e = self.store.add_chunk(c.id, getattr(c, "doc_id", c.id), ents, rels)
                    new_nodes |= n
                    new_edges |= e
                    rep.chunks_indexed += 1
        # embed what is new and still there
        te = time.perf_counter()
        nodes = [k for k in new_nodes if k in self.store.g]
        edges = [e for e in new_edges if self.store.g.has_edge(*edge_ends(e))]
        self.entities.add(nodes, self._encode([self.store.entity_text(k) for k in nodes]))
        self.relations.add(edges, self._relation_vectors(edges))
        if self.chunks is not None and self.dense is None:
            self.chunks.add([c.id for c in chunks], self._encode([(c.text or "")[: self.max_chunk_chars]
                                                                   for c in chunks]))
        rep.embed_s += time.perf_counter() - te
        rep.entities_added += len(nodes)
        rep.relations_added += len(edges)
        rep.total_s += time.perf_counter() - t0
        if hasattr(ex, "usage"):
            rep.llm = dict(ex.usage())
        self._retrievers.clear()
        self.analysis_cache.clear()
        return rep

    def _relation_vectors(self, edges: list[str]) -> np.ndarray:
        """``text``: embed "source keywords target"; ``composed`` (default, far cheaper): the normalised sum
        of both entity vectors and the keyword-phrase vector (keyword phrases repeat, so they are cached)."""
        if self.relation_vectors == "text" or not edges:
            return self._encode([self.store.relation_text(e) for e in edges])
        phrases = []
        for e in edges:
            kws = [k for k in self.store.relation_keywords(e) if k != "co-occurs"][:3]
            phrases.append(", ".join(kws) or "related to")
        missing = sorted({p for p in phrases if p not in self._kw_vec})
        for p, v in zip(missing, self._encode(missing)):
            self._kw_vec[p] = v
        ends = [edge_ends(e) for e in edges]
        keys = sorted({k for pair in ends for k in pair})
        ev = dict(zip(keys, self.entities.vectors(keys))) if keys else {}
        out = np.stack([ev[a] + ev[b] + self._kw_vec[p] for (a, b), p in zip(ends, phrases)])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        return self.embedder.encode(texts)

    def _extract(self, chunks: list, texts: list[str]) -> list:
        if not chunks:
            return []
        ex = self.extractor
        out: list = [None] * len(chunks)
        english = [i for i, t in enumerate(texts) if looks_english(t)]
        english_set = set(english)
        other = [i for i in range(len(texts)) if i not in english_set]
        if getattr(ex, "english_only", getattr(ex, "name", "") == "spacy") and other:
            regex = RegexExtractor()
            for i in other:
                self.report.non_english += 1
                try:
                    out[i] = regex.extract(texts[i])
                except Exception as err:  # noqa: BLE001
                    out[i] = err
        else:
            english = list(range(len(texts)))
        if english:
            try:
                res = extract_batch(ex, [texts[i] for i in english])
            except Exception as err:  # noqa: BLE001 - whole batch failed: mark each chunk
                res = [err] * len(english)
            for i, r in zip(english, res):
                out[i] = r
        return out

    def chunk_extraction(self, chunk_id: str) -> tuple[list[Entity], list[Relation]]:
        """What was merged from one chunk, rebuilt from the graph (used to reuse duplicates)."""
        s = self.store
        ents = []
        for key in s.chunk_entities.get(chunk_id, []):
            if key in s.g:
                d = s.g.nodes[key]
                ents.append(Entity(s.entity_name(key), s.entity_type(key), d["desc"].get(chunk_id, ""),
                                   d["chunks"].get(chunk_id, 1.0)))
        rels = []
        for eid in s.chunk_edges.get(chunk_id, []):
            sup = s.relation_support(eid).get(chunk_id)
            if sup:
                a, b = edge_ends(eid)
                rels.append(Relation(s.entity_name(a), s.entity_name(b), list(sup[1]), sup[2], sup[0]))
        return ents, rels

    def delete(self, chunk_ids: Sequence[str]) -> None:
        """Forget chunks; entities and relations only they supported go too (and leave the vector indexes)."""
        t0 = time.perf_counter()
        nodes, edges = set(), set()
        ids = [c for c in chunk_ids if c in self.store]
        for c in ids:
            n, e = self.store.remove_chunk(c)
            nodes |= n
            edges |= e
            self.failed.discard(c)
            h = self.chunk_hash.pop(c, None)
            if h is not None and self.hash_chunk.get(h) == c:
                del self.hash_chunk[h]
                alive = [o for o, oh in self.chunk_hash.items() if oh == h and o in self.store]
                if alive:
                    self.hash_chunk[h] = alive[0]
        if self.entities is not None:
            self.entities.delete(list(nodes))
            self.relations.delete(list(edges))
        if self.chunks is not None:
            self.chunks.delete(list(chunk_ids))
        self.report.chunks_deleted += len(ids)
        self.report.entities_removed += len(nodes)
        self.report.relations_removed += len(edges)
        self.report.total_s += time.perf_counter() - t0
        self._retrievers.clear()
        self.analysis_cache.clear()

    def delete_documents(self, doc_ids: Sequence[str]) -> int:
        ids = [c for d in doc_ids for c in self.store.doc_chunks.get(d, ())]
        self.delete(ids)
        return len(ids)

    def retry_failed(self, chunks_by_id) -> BuildReport:
        """Re-extract chunks whose extraction failed; ``chunks_by_id``: id -> chunk (e.g. from the DocStore)."""
        ids = [c for c in list(self.failed) if c in chunks_by_id]
        self.report.failed -= len(ids)
        self.report.failed_ids = [c for c in self.report.failed_ids if c not in set(ids)]
        return self.add([chunks_by_id[c] for c in ids])

    # ---------------------------------------------------------------- read
    def __len__(self) -> int:
        return len(self.store.chunk_doc)

    def stats(self) -> dict:
        return {**self.store.stats(), "failed": len(self.failed)}

    def idf(self, key: str) -> float:
        """Specificity of an entity: log(1 + #chunks / #chunks mentioning it)."""
        n = max(1, len(self.store.chunk_doc))
        df = max(1, len(self.store.entity_chunks(key)))
        return math.log(1.0 + n / df)

    def retriever(self, mode: str | None = None, **kwargs):
        from .query import GraphRetriever

        mode = mode or self.default_mode
        key = (mode, tuple(sorted(kwargs.items())))
        if key not in self._retrievers:
            self._retrievers[key] = GraphRetriever(self, mode=mode, **kwargs)
        return self._retrievers[key]

    def retrieve(self, query: str, k: int = 10):
        return self.retriever().retrieve(query, k)

    def retrieve_batch(self, queries: Sequence[str], k: int = 10):
        return self.retriever().retrieve_batch(queries, k)

    # ----------------------------------------------------------- persistence
    def manifest(self) -> dict:
        from blockrag.models import model_revision, resolve_embedder

        model = getattr(self.embedder, "name", None)
        revision = None
        if isinstance(self.embedder, STEmbedder):
            revision = model_revision(resolve_embedder(model))
        return {"kind": "graph", "model": model, "dimension": self.embedder.dim, "revision": revision,
                "format_version": FORMAT_VERSION,
                "params": {"extractor": self.extractor_config, "chunk_vectors": self.chunk_vectors,
                           "relation_vectors": self.relation_vectors,
                           "format_version": FORMAT_VERSION, **self.store.stats()}}

    def identity(self) -> dict:
        """What the opened files say (compared with the store's manifest on open): embedder, dimension, format."""
        dim = self.entities.dim if self.entities is not None else None
        out = {"model": getattr(self.embedder, "name", None), "dimension": dim, "format_version": FORMAT_VERSION}
        if isinstance(self.embedder, STEmbedder):
            from blockrag.models import model_revision, resolve_embedder

            out["revision"] = model_revision(resolve_embedder(self.embedder.name))
        return out

    def save(self, folder: str | Path) -> None:
        from blockrag.retrievers.vector_index import atomic_folder_write

        self._ensure_indexes()

        def write(tmp: Path):
            self.store.save(tmp / GRAPH_FILE)
            self.entities.save(tmp / "entities")
            self.relations.save(tmp / "relations")
            if self.chunks is not None:
                self.chunks.save(tmp / "chunks")
            (tmp / "blockrag.graph.json").write_text(json.dumps({
                "format_version": FORMAT_VERSION, "name": self.name,
                "embedder": getattr(self.embedder, "name", None), "extractor": self.extractor_config,
                "chunk_vectors": self.chunk_vectors, "max_chunk_chars": self.max_chunk_chars,
                "relation_vectors": self.relation_vectors,
                "default_mode": self.default_mode, "chunk_hash": self.chunk_hash,
                "failed": sorted(self.failed), "report": asdict(self.report)}))

        atomic_folder_write(Path(folder), write)

    @classmethod
    def load(cls, folder: str | Path, extractor=None, embedder=None, **kwargs) -> "GraphIndex":
        from blockrag.store import IndexMismatch
        from blockrag.retrievers.vector_index import VectorIndex

        folder = Path(folder)
        from blockrag.fileformat import read_json

        meta = read_json(folder / "blockrag.graph.json", what="graph index metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexMismatch(f"graph index at {folder} has format {meta.get('format_version')!r}, "
                                f"this blockrag reads {FORMAT_VERSION}; rebuild it")
        name = embedder if isinstance(embedder, str) else getattr(embedder, "name", None)
        if name is not None and name != meta["embedder"]:
            raise IndexMismatch(f"graph index at {folder} was built with embedder {meta['embedder']!r}, "
                                f"not {name!r}; rebuild it or use the original model")
        self = cls(name=meta["name"], extractor=extractor,
                   embedder=embedder if embedder is not None else meta["embedder"],
                   chunk_vectors=meta["chunk_vectors"], max_chunk_chars=meta["max_chunk_chars"],
                   default_mode=meta.get("default_mode", "ppr"),
                   relation_vectors=meta.get("relation_vectors", "text"), **kwargs)
        if not (folder / GRAPH_FILE).exists():
            raise IndexMismatch(f"graph index at {folder} is in an older format (no {GRAPH_FILE}); rebuild it")
        self.store = GraphStore.load(folder / GRAPH_FILE)
        self.entities = VectorIndex.load(folder / "entities")
        self.relations = VectorIndex.load(folder / "relations")
        if (folder / "chunks").exists():
            self.chunks = VectorIndex.load(folder / "chunks")
        self.chunk_hash = meta.get("chunk_hash", {})
        for c, h in self.chunk_hash.items():
            self.hash_chunk.setdefault(h, c)
        self.failed = set(meta.get("failed", []))
        self.extractor_config = meta.get("extractor", {})
        r = meta.get("report") or {}
        self.report = BuildReport(**{k: v for k, v in r.items() if k in BuildReport.__dataclass_fields__})
        return self

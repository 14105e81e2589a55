"""Collection: a DocStore plus the indexes built over it, kept consistent on every add and delete.

One writer at a time: an ingest, delete or index build holds the store's write lock (:mod:`blockrag.lock`)
and first loads whatever another process committed. The order of an ingest:

1. one SQLite transaction opens; documents are chunked as they stream in and their rows written;
2. every index is updated in memory (the slow part: encoding);
3. the generation is bumped, the chunk ids added/removed are journalled, and each index that is saved as a
   whole (bm25, dense, graph, mrag) is written to a *new* folder which its manifest row now names; then the
   transaction commits: documents, generation and index folders change together (the commit point);
4. after the commit: indexes that live in place (the kv cache, whose files are content-keyed) save and
   remove the files of deleted chunks, their manifest rows record the generation applied; the journal is
   pruned; folders of the previous state are removed.

A crash before the commit leaves the previous state (new folders are unreferenced, removed later); after
it, an in-place index whose applied generation lags is brought up to date on the next open by replaying the
journal. ``refresh()`` lets a long-running reader follow commits of other processes.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from .chunking import TokenChunker
from . import registry
from .documents import Chunk, Document
from .faults import fault
from .lock import StoreLocks
from .store import DocStore, IndexMismatch

log = logging.getLogger(__name__)

# index kinds live in the one registry of names (blockrag.registry); re-exported here for callers
index_class = registry.index_class
INDEX_KINDS = registry.INDEX_KINDS

_UNSET = object()
INDEX_BATCH = 16384  # chunks handed to an index per add() call (bounded memory on huge ingests)
_IDENTITY_KEYS = ("model", "revision", "dimension", "tokenizer_hash", "format_version")


class UnknownDocuments(KeyError):
    """``delete_documents`` was given ids the store does not hold (nothing was deleted)."""

    def __str__(self):
        return self.args[0] if self.args else ""


class RefusedIndex:
    """Stands in for an index that could not be opened (corrupt files, another model, another format):
    any use raises :class:`IndexMismatch` with the reason, so nothing silently falls back to other indexes."""

    def __init__(self, name: str, kind: str, reason: str):
        self.name, self.kind, self.reason = name, kind, reason

    def _refuse(self, *args, **kwargs):
        raise IndexMismatch(self.reason)

    retrieve = retrieve_batch = add = delete = save = build = generator = _refuse

    def __len__(self):
        return 0

    def __repr__(self):
        return f"RefusedIndex({self.name!r}: {self.reason})"


def _check_settings(chunk_tokens, overlap) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be an integer >= 1 (or None: whole documents), not {chunk_tokens!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or \
            (chunk_tokens is not None and overlap >= chunk_tokens):
        raise ValueError(f"overlap must be an integer >= 0 and smaller than chunk_tokens, not {overlap!r}")


def _check_ids(ids, what: str = "document id") -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"expected a list of {what}s, got a single {type(ids).__name__}")
    ids = list(ids)
    for i in ids:
        if not isinstance(i, str):
            raise TypeError(f"{what}s must be strings, got {type(i).__name__} {i!r}")
    return ids


def _check_document(doc) -> str | None:
    """Raise TypeError for a malformed Document; return a reason to skip it (text that cannot be stored)."""
    if not isinstance(doc, Document):
        raise TypeError(f"expected Document objects, got {type(doc).__name__}")
    if not isinstance(doc.id, str):
        raise TypeError(f"document ids must be strings, got {type(doc.id).__name__} {doc.id!r}")
    if not doc.id:
        raise ValueError("document id must not be empty")
    for name in ("title", "text"):
        if not isinstance(getattr(doc, name), str):
            raise TypeError(f"document {doc.id!r}: {name} must be a string, got {type(getattr(doc, name)).__name__}")
    if not isinstance(doc.metadata, dict):
        raise TypeError(f"document {doc.id!r}: metadata must be a dict")
    try:
        json.dumps(doc.metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"document {doc.id!r}: metadata is not JSON-serialisable ({err})") from None
    for part in (doc.id, doc.title, doc.text, json.dumps(doc.metadata, ensure_ascii=False)):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"not valid Unicode ({err.reason} at position {err.start})"
    return None


def _same_model(kind: str, recorded: str, asked: str) -> bool:
    if recorded == asked:
        return True
    try:  # a name and the folder it resolves to are the same model
        from .models import resolve_embedder, resolve_generator

        resolve = resolve_embedder if kind in ("dense", "graph") else resolve_generator
        return Path(resolve(recorded)).resolve() == Path(resolve(asked)).resolve()
    except Exception:  # noqa: BLE001 - an unresolvable name is simply another model
        return False


@dataclass
class IngestReport:
    documents_added: int = 0
    documents_unchanged: int = 0
    documents_without_chunks: int = 0
    documents_skipped: int = 0  # could not be stored or tokenised (invalid Unicode, tokenizer error)
    chunks_added: int = 0
    chunks_removed: int = 0
    generation: int | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.documents_added} documents added ({self.chunks_added} chunks), "
                f"{self.documents_unchanged} unchanged, {self.chunks_removed} chunks replaced or removed"
                + (f", {self.documents_without_chunks} produced no chunks" if self.documents_without_chunks else "")
                + (f", {self.documents_skipped} skipped (see warnings)" if self.documents_skipped else ""))


class Collection:
    """``Collection(folder)``: open or create; ``add_documents``; ``delete_documents``; ``build_index``;
    ``retriever(name)``; ``refresh()`` to follow other processes' writes.

    ``chunk_tokens`` / ``overlap`` / ``tokenizer_name`` apply to a new store; given for an existing store
    they must equal its settings (chunks of two sizes in one store would be silently inconsistent).
    ``lock_timeout``: seconds a write waits for another process's write (default ``BLOCKRAG_LOCK_TIMEOUT``
    or 120), then :class:`blockrag.lock.StoreBusy`.
    """

    def __init__(self, folder: str | Path, tokenizer_name: str | None = None, chunk_tokens=_UNSET,
                 overlap=_UNSET, progress: bool = True, lock_timeout: float | None = None):
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"store {folder} is not a folder")
        given = {k: v for k, v in (("chunk_tokens", chunk_tokens), ("overlap", overlap)) if v is not _UNSET}
        self.store = DocStore(folder)
        self.locks = StoreLocks(folder)
        self.progress, self.lock_timeout = progress, lock_timeout
        saved = self.store.get_setting("chunking")
        if saved is None:
            wanted = {"tokenizer": tokenizer_name, "chunk_tokens": given.get("chunk_tokens", 256),
                      "overlap": given.get("overlap", 32)}
            if wanted["chunk_tokens"] is not None and "overlap" not in given:
                wanted["overlap"] = min(wanted["overlap"], wanted["chunk_tokens"] - 1) if \
                    isinstance(wanted["chunk_tokens"], int) and not isinstance(wanted["chunk_tokens"], bool) \
                    and wanted["chunk_tokens"] >= 1 else wanted["overlap"]
            _check_settings(wanted["chunk_tokens"], wanted["overlap"])
            self.chunking = wanted
        else:
            self.chunking = saved
            if tokenizer_name is not None and saved["tokenizer"] != tokenizer_name:
                raise IndexMismatch(f"store {folder} was chunked with tokenizer {saved['tokenizer']!r}, "
                                    f"not {tokenizer_name!r}")
            differ = {k: v for k, v in given.items() if saved.get(k) != v}
            if differ:
                have = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
                want = ", ".join(f"{k}={v!r}" for k, v in differ.items())
                raise ValueError(f"store {folder} is chunked with {have}, not {want}: chunks of two settings "
                                 f"would mix; use a new store, or the store's settings")
        self._chunker = None
        self.indexes: dict = {}
        self._loaded: dict[str, tuple] = {}  # name -> (folder, applied generation, updated_at) as loaded
        self._open_all(repair=True)

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
        """The store's committed generation (read from the database: moves when any process commits)."""
        return self.store.generation

    # ------------------------------------------------------------- reading state
    def _index_folder(self, entry: dict) -> Path:
        return self.store.folder / "indexes" / entry["params"].get("folder", entry["name"])

    def _state(self, entry: dict) -> tuple:
        return (entry["params"].get("folder", entry["name"]), entry["params"].get("generation"),
                entry["updated_at"])

    def _load(self, entry: dict):
        """Open one index from its manifest row; a failure or a manifest mismatch gives a RefusedIndex."""
        from .fileformat import StoreFormatError
        from blockrag.retrievers.vector_index import recover_folder

        name, kind = entry["name"], entry["kind"]
        folder = self._index_folder(entry)
        where = f"index {name!r} of {self.store.folder}"
        try:
            cls = index_class(kind)
        except (ValueError, KeyError) as err:
            return RefusedIndex(name, kind, f"{where}: {err}")
        if not folder.exists() and self.locks.write.held:
            recover_folder(folder)  # a folder swap that died between its renames (stores written in place)
        if not folder.exists():
            return RefusedIndex(name, kind, f"{where}: its files are missing; rebuild it")
        try:
            index = cls.load(folder)
        except (StoreFormatError, IndexMismatch, ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            return RefusedIndex(name, kind, f"{where} cannot be opened: {msg.splitlines()[0] if msg else type(err).__name__}")
        identity = getattr(index, "identity", None)
        if identity is not None:
            try:
                current = identity()
            except Exception as err:  # noqa: BLE001 - e.g. the model it names is not installed
                return RefusedIndex(name, kind, f"{where}: {type(err).__name__}: {err}")
            for key in _IDENTITY_KEYS:
                rec, cur = entry.get(key), current.get(key)
                if rec is not None and cur is not None and rec != cur:
                    return RefusedIndex(name, kind, f"{where} was built with {key} {rec!r}, but the opened files and "
                                                    f"installed model give {cur!r}; rebuild it")
        return index

    def _open_all(self, repair: bool) -> None:
        """(Re)load every index whose manifest row changed since it was loaded; drop removed ones."""
        with self.locks.reading():
            entries = {e["name"]: e for e in self.store.manifests()}
            for name, entry in entries.items():
                state = self._state(entry)
                if self._loaded.get(name) == state and name in self.indexes:
                    continue
                old = self.indexes.get(name)
                if old is not None and not isinstance(old, RefusedIndex) and hasattr(old, "attach") \
                        and self._loaded.get(name, (None,))[0] == state[0] and hasattr(old, "reload"):
                    old.reload()  # an in-place index keeps its object (and its loaded model)
                else:
                    self.indexes[name] = self._load(entry)
                self._loaded[name] = state
            for name in [n for n in self.indexes if n not in entries]:
                del self.indexes[name]
                self._loaded.pop(name, None)
            self._data_version = self.store.data_version
        if repair and self._lagging():
            try:
                with self.locks.writing(timeout=0):
                    self._sync()
            except Exception as err:  # noqa: BLE001 - a writer is at work (it repairs), or the repair failed
                log.warning("not repairing %s now: %s", ", ".join(self._lagging()), err)

    def _lagging(self) -> list[str]:
        gen = self.store.generation
        return [n for n, st in self._loaded.items()
                if not isinstance(self.indexes.get(n), RefusedIndex) and (st[1] or 0) < gen]

    def refresh(self) -> bool:
        """Follow other processes' commits: cheap (one ``PRAGMA data_version``) when nothing changed; else
        reloads the indexes whose manifest rows changed. Returns True when anything was reloaded: retrievers
        and pipelines obtained before must then be obtained again (they hold the previous index objects).
        Long-running readers (a server) call it before each query."""
        if self.store.data_version == self._data_version:
            return False
        before = dict(self._loaded)
        self._open_all(repair=False)
        return before != self._loaded

    # ------------------------------------------------------------- writing state
    def _sync(self) -> None:
        """Under the write lock: load what others committed, then bring lagging in-place indexes up to date."""
        self._open_all(repair=False)
        gen = self.store.generation
        for name in self._lagging():
            entry = self.store.manifest(name)
            index = self.indexes[name]
            applied = entry["params"].get("generation", 0) or 0
            changes = self.store.changes_since(applied)
            if changes is None:
                log.warning("index %s lags the store and the journal no longer covers it; rebuilding", name)
                self._build_into(index, entry["kind"])
            else:
                adds, dels = changes
                log.warning("index %s lags the store (an interrupted update): replaying %d additions, "
                            "%d removals", name, len(adds), len(dels))
                self._apply(index, name, adds, dels)
            self._save_in_place(name, index, gen, entry)
        self.store.prune_journal()
        self._remove_unreferenced()  # folders a writer killed after its commit (or before it) left behind

    def _writable(self) -> None:
        bad = [i.reason for i in self.indexes.values() if isinstance(i, RefusedIndex)]
        if bad:
            raise IndexMismatch(f"{bad[0]} (the store cannot be written while an index is unusable: rebuild it "
                                f"with build_index / `blockrag index PATH --index KIND`)")

    def _apply(self, index, name: str, adds: list[str], dels: list[str]) -> None:
        if dels:
            index.delete(dels)
        if adds:
            bar = tqdm(total=len(adds), desc=f"indexing {name}", unit="chunk",
                       disable=not self.progress or len(adds) < INDEX_BATCH)
            for batch in self.store.iter_chunk_batches(adds, INDEX_BATCH):
                index.add(batch)
                bar.update(len(batch))
            bar.close()

    def _build_into(self, index, kind: str) -> None:
        first = True
        for batch in self.store.iter_chunk_batches(self.store.chunk_ids(), INDEX_BATCH):
            (index.build if first else index.add)(batch)
            first = False
        if first:
            index.build([])

    @staticmethod
    def _in_place(index) -> bool:
        return hasattr(index, "attach") and not isinstance(index, RefusedIndex)

    def _record(self, name: str, index, generation: int, folder: str) -> None:
        m = index.manifest()
        fmt = m.get("format_version") or m.get("params", {}).get("format_version") or 1
        self.store.record_index(name, m["kind"], m.get("model"), m.get("revision"), m.get("dimension"),
                                m.get("tokenizer_hash"), format_version=fmt,
                                params={**m.get("params", {}), "generation": generation, "folder": folder})
        entry = self.store.manifest(name)
        self._loaded[name] = self._state(entry)

    def _save_versioned(self, name: str, index, generation: int) -> None:
        """Write a whole-folder index to a new folder and record it (inside the caller's transaction)."""
        folder = f"{name}@{generation}-{uuid.uuid4().hex[:8]}"
        index.save(self.store.folder / "indexes" / folder)
        self._record(name, index, generation, folder)

    def _save_in_place(self, name: str, index, generation: int, entry: dict | None = None) -> None:
        folder = (entry or {}).get("params", {}).get("folder", name) if entry else name
        index.save(self.store.folder / "indexes" / folder)
        fault(f"save:{name}:written")
        with self.store.transaction():
            self._record(name, index, generation, folder)
        fault(f"save:{name}:recorded")

    def _remove_unreferenced(self) -> None:
        """Delete index folders no manifest row names (superseded versions, leftovers of crashes)."""
        root = self.store.folder / "indexes"
        if not root.exists():
            return
        keep = {e["params"].get("folder", e["name"]) for e in self.store.manifests()}
        with self.locks.swapping():  # no reader is loading a folder while it goes
            for p in root.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _commit_indexes(self, generation: int) -> None:
        """Inside the transaction: save whole-folder indexes to new folders, recorded at ``generation``."""
        for name, index in self.indexes.items():
            if not self._in_place(index):
                self._save_versioned(name, index, generation)

    def _after_commit(self, generation: int) -> None:
        for name, index in self.indexes.items():
            if self._in_place(index):
                self._save_in_place(name, index, generation, self.store.manifest(name))
        fault("save:done")
        self.store.prune_journal()
        self._remove_unreferenced()
        self._data_version = self.store.data_version

    def _rollback_memory(self) -> None:
        """After a failed write: indexes updated in memory are reloaded from their committed files (in-place
        ones keep their object, and so their loaded model, and re-read their files)."""
        self._loaded = {n: (st[0], None, None) for n, st in self._loaded.items() if self._in_place(self.indexes.get(n))}
        self.indexes = {n: i for n, i in self.indexes.items() if n in self._loaded}
        self._open_all(repair=False)

    # ----------------------------------------------------------------- ingest
    def add_documents(self, docs: Iterable[Document], chunks_for=None) -> IngestReport:
        """Add or replace documents (streamed: any iterable); every index is updated. ``chunks_for(doc)``
        (returning an iterable of chunks) overrides the chunker. Documents with text that cannot be stored or
        tokenised are skipped with a warning and counted; a non-string id raises TypeError (nothing changes)."""
        report = IngestReport()
        with self.locks.writing(self.lock_timeout):
            self._sync()
            self._writable()
            try:
                generation = self._ingest(docs, chunks_for, report)
            except BaseException:
                self._rollback_memory()
                raise
            if generation is not None:
                fault("ingest:committed")
                self._after_commit(generation)
        report.generation = self.generation
        return report

    def _ingest(self, docs, chunks_for, report: IngestReport) -> int | None:
        store = self.store
        old_ids: dict[str, list[str]] = {}  # touched document -> its committed chunk ids
        bar = tqdm(desc="chunking", unit="chunk", disable=not self.progress)  # chunks: one huge document moves it too
        n_docs = 0
        n_chunks = 0
        with store.transaction():
            for doc in docs:
                reason = _check_document(doc)
                if reason is not None:
                    log.warning("skipping document %r: %s", doc.id.encode("utf-8", "replace").decode(), reason)
                    report.documents_skipped += 1
                    report.notes.append(f"skipped document {doc.id.encode('utf-8', 'replace').decode()!r}: {reason}")
                    continue
                n_docs += 1
                bar.set_postfix(docs=n_docs, refresh=False)
                fresh = doc.id not in old_ids
                if fresh:
                    old = store.document(doc.id)
                    if old is not None and (old.title, old.text) == (doc.title, doc.text):
                        report.documents_unchanged += 1
                        continue
                    old_ids[doc.id] = store.doc_chunk_ids(doc.id) if old is not None else []
                else:
                    report.notes.append(f"duplicate document id {doc.id!r} in input: kept the last one")
                    report.documents_added -= 1
                store.db.execute("SAVEPOINT document")
                n = 0
                try:
                    chunks = iter((chunks_for or self.chunker.iter_split)(doc))
                    part = list(_take(chunks, 1024))
                    store.replace_document(doc, part)
                    while part:
                        n += len(part)
                        bar.update(len(part))
                        part = list(_take(chunks, 1024))
                        store.add_chunks(part)
                except Exception as err:  # noqa: BLE001 - the tokenizer refused this text: skip it, keep the batch
                    store.db.execute("ROLLBACK TO document")
                    store.db.execute("RELEASE document")
                    bar.update(-n)
                    if fresh:
                        old_ids.pop(doc.id)
                    else:
                        report.documents_added += 1  # the earlier copy stays
                    log.warning("skipping document %r: cannot be chunked (%s: %s)", doc.id, type(err).__name__, err)
                    report.documents_skipped += 1
                    report.notes.append(f"skipped document {doc.id!r}: cannot be chunked ({type(err).__name__})")
                    continue
                store.db.execute("RELEASE document")
                if n == 0:
                    report.documents_without_chunks += 1
                n_chunks += n
                report.documents_added += 1
            bar.close()
            if not old_ids:
                return None
            before = {c for ids in old_ids.values() for c in ids}
            after: list[str] = []
            for doc_id in old_ids:
                after += store.doc_chunk_ids(doc_id)
            after_set = set(after)
            to_del = [c for c in before if c not in after_set]
            to_add = [c for c in after if c not in before]
            report.chunks_added, report.chunks_removed = len(to_add), len(to_del)
            fault("ingest:rows-written")
            for name, index in self.indexes.items():
                self._apply(index, name, to_add, to_del)
            fault("ingest:indexes-updated")
            generation = store.commit_generation(to_add, to_del)
            self._commit_indexes(generation)
            fault("ingest:saved-uncommitted")
        return generation

    def delete_documents(self, doc_ids: Iterable[str], missing_ok: bool = False) -> int:
        """Delete documents by id; returns the number of chunks removed. Unknown ids raise
        :class:`UnknownDocuments` before anything changes (``missing_ok=True`` skips them)."""
        doc_ids = list(dict.fromkeys(_check_ids(doc_ids)))
        with self.locks.writing(self.lock_timeout):
            self._sync()
            self._writable()
            try:
                with self.store.transaction():
                    unknown = [d for d in doc_ids if not self.store.has_document(d)]
                    if unknown and not missing_ok:
                        shown = ", ".join(repr(d) for d in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                        raise UnknownDocuments(f"{len(unknown)} of {len(doc_ids)} document ids are not in store "
                                               f"{self.store.folder}: {shown}; nothing was deleted")
                    known = [d for d in doc_ids if d not in set(unknown)]
                    removed = [c for d in known for c in self.store.doc_chunk_ids(d)]
                    if not known:
                        return 0
                    self.store.delete_documents(known)
                    fault("delete:rows-deleted")
                    for index in self.indexes.values():
                        if removed:
                            index.delete(removed)
                    fault("delete:indexes-updated")
                    generation = self.store.commit_generation([], removed)
                    self._commit_indexes(generation)
                    fault("delete:saved-uncommitted")
            except BaseException:
                self._rollback_memory()
                raise
            fault("delete:committed")
            self._after_commit(generation)
        return len(removed)

    # ---------------------------------------------------------------- indexes
    def build_index(self, kind: str, name: str | None = None, **params):
        """Build (or rebuild) an index of ``kind`` over every chunk in the store."""
        name = name or kind
        cls = index_class(kind)
        with self.locks.writing(self.lock_timeout):
            self._sync()
            index = cls(name=name, **params)
            if hasattr(index, "attach"):  # indexes that write their files as they go need their folder first
                index.attach(self.store.index_dir(name))
            self._build_into(index, kind)
            fault(f"build:{name}:built")
            generation = self.store.generation
            self.indexes[name] = index
            try:
                if self._in_place(index):
                    self._save_in_place(name, index, generation)
                else:
                    with self.store.transaction():
                        self._save_versioned(name, index, generation)
            except BaseException:
                self._rollback_memory()
                raise
            self.store.prune_journal()
            self._remove_unreferenced()
            self._data_version = self.store.data_version
        return index

    def index(self, name: str, model: str | None = None):
        """An opened index; ``model`` (if given) must match the one it was built with."""
        if name not in self.indexes:
            have = ", ".join(sorted(self.indexes)) or "none"
            raise KeyError(f"no index named {name!r} in {self.store.folder} (have: {have}); "
                           f"build it with `blockrag index ... --index {name}`")
        index = self.indexes[name]
        if isinstance(index, RefusedIndex):
            raise IndexMismatch(index.reason)
        entry = self.store.manifest(name)
        if model is not None and entry is not None and entry["model"] is not None \
                and not _same_model(entry["kind"], entry["model"], model):
            raise IndexMismatch(f"index {name!r} in {self.store.folder} was built with model {entry['model']!r}, "
                                f"but {model!r} was requested; rebuild it or use the original model")
        return index

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


def _take(it, n: int):
    for _, x in zip(range(n), it):
        yield x

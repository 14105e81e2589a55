"""DocStore: documents, chunks and the manifest of every index built over them, in SQLite (WAL).

Each write is one transaction that also bumps the store's generation and appends, per chunk added or
removed, a row to the ``journal``; every index's manifest row records the generation it has applied. An
index whose applied generation lags the store's is missing committed changes, and the journal says which
(see :meth:`DocStore.changes_since`). Index files live beside the database (``<store>/indexes/<name>/``)
and are replaced atomically by their writers.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from array import array
from pathlib import Path
from typing import Iterable, Iterator

from .documents import Chunk, Document

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, metadata TEXT NOT NULL, added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY, doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, text TEXT NOT NULL, token_ids BLOB NOT NULL, metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE TABLE IF NOT EXISTS manifest (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT, revision TEXT, dimension INTEGER,
    tokenizer_hash TEXT, format_version INTEGER NOT NULL, params TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (generation INTEGER NOT NULL, chunk_id TEXT NOT NULL, op TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS journal_generation ON journal(generation);
"""
STORE_FORMAT = 2  # 2: journal table; 1 (no journal) is upgraded in place by adding the table


class IndexMismatch(RuntimeError):
    """An index was opened with a model (or tokenizer) other than the one it was built with."""


def _pack(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def _unpack(blob: bytes) -> list[int]:
    a = array("i")
    a.frombytes(blob)
    return a.tolist()


class DocStore:
    """``DocStore(folder)``: the SQLite file of a store. Writes go through :meth:`transaction`."""

    def __init__(self, folder: str | Path):
        from .fileformat import StoreFormatError

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._depth = 0
        path = self.folder / "store.sqlite"
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE in transaction())
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.executescript(_SCHEMA)
            fmt = self.get_setting("store_format")
        except sqlite3.DatabaseError as err:
            raise StoreFormatError(f"{path}: not a blockrag store ({err})") from None
        if fmt is None:  # new, or written before the journal existed: it covers nothing older than now
            with self.transaction():
                self.set_setting("store_format", STORE_FORMAT)
                self.set_setting("journal_floor", self.generation)
        elif fmt != STORE_FORMAT:
            raise StoreFormatError(f"{path}: store format {fmt!r}, this blockrag reads {STORE_FORMAT}")

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (re-entrant): everything inside commits together or not at all."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK")
            raise
        self._depth = 0
        self.db.execute("COMMIT")

    @property
    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap: no table is read)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # ------------------------------------------------------- generation, journal
    @property
    def generation(self) -> int:
        return self.get_setting("generation", 0)

    def commit_generation(self, added: Iterable[str], removed: Iterable[str]) -> int:
        """Bump the generation and journal the chunk ids added and removed; call inside a transaction."""
        if not self._depth:
            raise RuntimeError("commit_generation must run inside DocStore.transaction()")
        generation = self.generation + 1
        self.db.executemany("INSERT INTO journal VALUES (?, ?, 'del')", ((generation, c) for c in removed))
        self.db.executemany("INSERT INTO journal VALUES (?, ?, 'add')", ((generation, c) for c in added))
        self.set_setting("generation", generation)
        return generation

    def changes_since(self, generation: int) -> tuple[list[str], list[str]] | None:
        """(chunk ids to add, chunk ids to delete) that bring an index at ``generation`` to the current one,
        netted per chunk (its last operation wins); ``None`` if the journal no longer reaches back that far."""
        current = self.generation
        if generation >= current:
            return [], []
        floor = self.get_setting("journal_floor", 0)
        if generation < floor:
            return None
        last: dict[str, str] = {}
        for cid, op in self.db.execute("SELECT chunk_id, op FROM journal WHERE generation > ? "
                                       "ORDER BY generation, rowid", (generation,)):
            last.pop(cid, None)
            last[cid] = op
        return [c for c, op in last.items() if op == "add"], [c for c, op in last.items() if op == "del"]

    def prune_journal(self) -> None:
        """Drop journal rows every recorded index has applied."""
        applied = [m["params"].get("generation", 0) for m in self.manifests()]
        floor = min(applied) if applied else self.generation
        with self.transaction():
            self.db.execute("DELETE FROM journal WHERE generation <= ?", (floor,))
            if floor > self.get_setting("journal_floor", 0):
                self.set_setting("journal_floor", floor)

    def state_key(self) -> tuple:
        """(generation, per index (name, applied generation, updated_at)): what readers compare to reload."""
        rows = self.db.execute("SELECT name, params, updated_at FROM manifest ORDER BY name").fetchall()
        return (self.generation, tuple((n, json.loads(p).get("generation"), u) for n, p, u in rows))

    # ----------------------------------------------------------------- settings
    def get_setting(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))

    def index_dir(self, name: str) -> Path:
        return self.folder / "indexes" / name

    # ---------------------------------------------------------------- documents
    def upsert(self, docs_and_chunks: Iterable[tuple[Document, list[Chunk]]]) -> tuple[list[Chunk], list[str]]:
        """Insert or replace documents with their chunks in one transaction.

        Returns (chunks added, chunk ids removed). A document whose content is unchanged is a no-op.
        """
        added, removed = [], []
        now = time.time()
        with self.transaction():
            for doc, chunks in docs_and_chunks:
                old = self.db.execute("SELECT title, text FROM documents WHERE id=?", (doc.id,)).fetchone()
                if old == (doc.title, doc.text):
                    continue
                if old is not None:
                    removed += [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id=?", (doc.id,))]
                    self.db.execute("DELETE FROM documents WHERE id=?", (doc.id,))
                self.db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?)",
                                (doc.id, doc.title, doc.text, json.dumps(doc.metadata), now))
                self.db.executemany(
                    "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                    [(c.id, c.doc_id, c.position, c.text, _pack(c.token_ids), json.dumps(c.metadata))
                     for c in chunks])
                added += chunks
        return added, removed

    def delete(self, doc_ids: Iterable[str]) -> list[str]:
        """Delete documents (and their chunks); returns the removed chunk ids."""
        doc_ids = list(doc_ids)
        removed = []
        with self.transaction():
            for doc_id in doc_ids:
                removed += [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id=?", (doc_id,))]
                self.db.execute("DELETE FROM documents WHERE id=?", (doc_id,))
        return removed

    def replace_document(self, doc: Document, chunks: Iterable[Chunk] = ()) -> None:
        """Write ``doc`` (dropping any previous version and its chunks) and then its chunks, streamed in."""
        if not self._depth:
            raise RuntimeError("replace_document must run inside DocStore.transaction()")
        self.db.execute("DELETE FROM documents WHERE id=?", (doc.id,))
        self.db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?)",
                        (doc.id, doc.title, doc.text, json.dumps(doc.metadata), time.time()))
        self.add_chunks(chunks)

    def add_chunks(self, chunks: Iterable[Chunk]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                            ((c.id, c.doc_id, c.position, c.text, _pack(c.token_ids), json.dumps(c.metadata))
                             for c in chunks))

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete rows (chunks cascade); call inside a transaction."""
        self.db.executemany("DELETE FROM documents WHERE id=?", ((d,) for d in doc_ids))

    def doc_chunk_ids(self, doc_id: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id=? ORDER BY position", (doc_id,))]

    def iter_chunk_batches(self, ids: Iterable[str], batch: int = 4096) -> Iterator[list[Chunk]]:
        """Chunks by id in batches of ``batch`` (unknown ids left out), so huge updates stay bounded in memory."""
        ids = list(ids)
        for i in range(0, len(ids), batch):
            part = self.get_chunks(ids[i:i + batch])
            if part:
                yield part

    def has_document(self, doc_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM documents WHERE id=?", (doc_id,)).fetchone() is not None

    def document(self, doc_id: str) -> Document | None:
        row = self.db.execute("SELECT id, title, text, metadata FROM documents WHERE id=?", (doc_id,)).fetchone()
        return Document(id=row[0], title=row[1], text=row[2], metadata=json.loads(row[3])) if row else None

    def document_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM documents ORDER BY id")]

    def count_documents(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    # ------------------------------------------------------------------- chunks
    @staticmethod
    def _chunk(row) -> Chunk:
        return Chunk(id=row[0], doc_id=row[1], position=row[2], text=row[3], token_ids=_unpack(row[4]),
                     metadata=json.loads(row[5]))

    def chunks(self) -> Iterator[Chunk]:
        """All chunks in a stable order (document id, position)."""
        for row in self.db.execute("SELECT * FROM chunks ORDER BY doc_id, position"):
            yield self._chunk(row)

    def get_chunks(self, ids: Iterable[str]) -> list[Chunk]:
        """Chunks by id, in the order asked; unknown ids are left out."""
        ids = list(ids)
        found = {}
        for i in range(0, len(ids), 900):
            part = ids[i:i + 900]
            q = f"SELECT * FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            for row in self.db.execute(q, part):
                found[row[0]] = self._chunk(row)
        return [found[i] for i in ids if i in found]

    def chunk_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks ORDER BY doc_id, position")]

    def chunk_doc_ids(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, doc_id FROM chunks"))

    def count_chunks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    # ----------------------------------------------------------------- manifest
    def manifest(self, name: str) -> dict | None:
        row = self.db.execute("SELECT * FROM manifest WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        keys = ["name", "kind", "model", "revision", "dimension", "tokenizer_hash", "format_version",
                "params", "updated_at"]
        out = dict(zip(keys, row))
        out["params"] = json.loads(out["params"])
        return out

    def manifests(self) -> list[dict]:
        return [self.manifest(r[0]) for r in self.db.execute("SELECT name FROM manifest ORDER BY name")]

    def record_index(self, name: str, kind: str, model: str | None = None, revision: str | None = None,
                     dimension: int | None = None, tokenizer_hash: str | None = None,
                     format_version: int = FORMAT_VERSION, params: dict | None = None) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (name, kind, model, revision, dimension, tokenizer_hash, format_version,
                             json.dumps(params or {}), time.time()))

    def drop_index(self, name: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM manifest WHERE name=?", (name,))

    def check_index(self, name: str, model: str | None = None, tokenizer_hash: str | None = None,
                    format_version: int | None = None) -> dict | None:
        """Fail fast, naming both sides, when an index is opened with a different model or tokenizer."""
        entry = self.manifest(name)
        if entry is None:
            return None
        if model is not None and entry["model"] is not None and entry["model"] != model:
            raise IndexMismatch(f"index {name!r} in {self.folder} was built with model {entry['model']!r}, "
                                f"but {model!r} was requested; rebuild it or use the original model")
        if tokenizer_hash is not None and entry["tokenizer_hash"] not in (None, tokenizer_hash):
            raise IndexMismatch(f"index {name!r} was built with tokenizer {entry['tokenizer_hash']}, "
                                f"not {tokenizer_hash}")
        if format_version is not None and entry["format_version"] != format_version:
            raise IndexMismatch(f"index {name!r} has format version {entry['format_version']}, "
                                f"this blockrag reads {format_version}; rebuild it")
        return entry

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

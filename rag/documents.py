"""Documents, chunks and loaders (folder of .txt/.md, JSONL, BEIR corpus), plus LangChain interop."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def full_text(self) -> str:
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class Chunk:
    """One retrievable unit; with the generator's tokenizer, also one KV-cache block."""

    id: str
    doc_id: str
    position: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chunk_id(doc_id: str, position: int, text: str) -> str:
    """Stable across runs: the same document content always yields the same chunk ids."""
    return hashlib.sha256(f"{doc_id}\x00{position}\x00{text}".encode("utf-8")).hexdigest()[:16]


class LoadError(ValueError):
    """Bad input that names the file (and line) it came from."""


@dataclass
class LoadReport:
    loaded: int = 0
    skipped_empty: int = 0
    skipped_undecodable: list[str] = field(default_factory=list)
    skipped_binary: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)  # symlinks leaving the folder (not followed)
    skipped_unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.loaded} documents"]
        if self.skipped_empty:
            parts.append(f"{self.skipped_empty} empty skipped")
        if self.skipped_undecodable:
            parts.append(f"{len(self.skipped_undecodable)} non-UTF-8 files skipped")
        if self.skipped_binary:
            parts.append(f"{len(self.skipped_binary)} binary files skipped")
        if self.skipped_links:
            parts.append(f"{len(self.skipped_links)} symlinks leaving the folder not followed")
        if self.skipped_unreadable:
            parts.append(f"{len(self.skipped_unreadable)} unreadable files skipped")
        return ", ".join(parts)


def _keep(doc: Document, report: LoadReport) -> bool:
    if not doc.text.strip():
        report.skipped_empty += 1
        return False
    report.loaded += 1
    return True


def _file_document(doc_id: str, file: Path, text: str) -> Document:
    """A leading markdown heading becomes the title (not repeated in the text); else the file stem."""
    first, _, rest = text.lstrip().partition("\n")
    if first.startswith("#"):
        return Document(id=doc_id, text=rest.strip(), title=first.lstrip("#").strip(), metadata={"source": str(file)})
    return Document(id=doc_id, text=text, title=file.stem, metadata={"source": str(file)})


def walk_files(root: str | Path, suffixes: tuple[str, ...] = (".txt", ".md"), follow_symlinks: bool = False,
               report: LoadReport | None = None) -> Iterator[Path]:
    """Files under ``root`` with one of ``suffixes``, in sorted order, walked with an explicit stack (no depth
    limit). Symlinks are not followed unless ``follow_symlinks``; even then, never to a place outside
    ``root`` (those are counted in ``report.skipped_links``) and never twice into one folder (cycles)."""
    root = Path(root)
    real_root = os.path.realpath(root)
    report = report if report is not None else LoadReport()
    seen_dirs = {real_root}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as err:
            log.warning("skipping folder %s: %s", folder, err.strerror)
            report.skipped_unreadable.append(str(folder))
            continue
        files = []
        for e in entries:
            path = Path(e.path)
            try:
                link = e.is_symlink()
                if link:
                    real = os.path.realpath(path)
                    inside = real == real_root or real.startswith(real_root + os.sep)
                    if not follow_symlinks or not inside:
                        if e.name.lower().endswith(suffixes) or os.path.isdir(path):
                            log.warning("not following symlink %s (%s)", path,
                                        "points outside the folder" if not inside else "symlinks are not followed")
                            report.skipped_links.append(str(path))
                        continue
                if e.is_dir(follow_symlinks=link):
                    if not link:  # without symlinks a tree has no cycles (and realpath costs O(depth))
                        stack.append(path)
                    elif real not in seen_dirs:
                        seen_dirs.add(real)
                        stack.append(path)
                elif e.is_file(follow_symlinks=link) and e.name.lower().endswith(suffixes):
                    files.append(path)
            except OSError as err:
                log.warning("skipping %s: %s", path, err.strerror)
                report.skipped_unreadable.append(str(path))
        yield from reversed(files)


def read_text_file(file: Path, report: LoadReport) -> str | None:
    """The UTF-8 text of ``file``, or None (counted in ``report``) for binary, non-UTF-8 or unreadable files."""
    try:
        data = Path(file).read_bytes()
    except OSError as err:
        log.warning("skipping %s: %s", file, err.strerror)
        report.skipped_unreadable.append(str(file))
        return None
    if b"\x00" in data:
        log.warning("skipping %s: binary (contains NUL bytes)", file)
        report.skipped_binary.append(str(file))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        log.warning("skipping %s: not UTF-8 (%s)", file, err.reason)
        report.skipped_undecodable.append(str(file))
        return None


def load_folder(path: str | Path, report: LoadReport | None = None,
                suffixes: tuple[str, ...] = (".txt", ".md"), follow_symlinks: bool = False) -> Iterator[Document]:
    """Every .txt/.md file under ``path``; the id is the path relative to the folder. Binary (NUL bytes) and
    non-UTF-8 files are skipped and counted; symlinks are not followed (see :func:`walk_files`)."""
    root = Path(path)
    report = report if report is not None else LoadReport()
    for file in walk_files(root, tuple(s.lower() for s in suffixes), follow_symlinks, report):
        text = read_text_file(file, report)
        if text is None:
            continue
        doc = _file_document(file.relative_to(root).as_posix(), file, text)
        if _keep(doc, report):
            yield doc
        else:
            log.warning("skipping %s: empty", file)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a UTF-8 text file; bad bytes raise LoadError naming the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise LoadError(f"{path}:{lineno}: not UTF-8 ({err.reason})") from None
            if line.strip():
                yield lineno, line


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LoadError(f"{path}:{lineno}: not UTF-8 ({err.reason})") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LoadError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            except RecursionError:
                raise LoadError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise LoadError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def load_jsonl(path: str | Path, report: LoadReport | None = None, id_field: str = "id",
               text_field: str = "text", title_field: str = "title") -> Iterator[Document]:
    """One JSON object per line with id/text (and optional title); other fields become metadata.

    BEIR's ``_id`` is accepted as the id. Malformed lines raise :class:`LoadError` naming file and line.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    for lineno, obj in _read_jsonl(path):
        doc_id = obj.get(id_field, obj.get("_id"))
        if doc_id is None:
            raise LoadError(f"{path}:{lineno}: missing '{id_field}'")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise LoadError(f"{path}:{lineno}: '{id_field}' must be a string or an integer, "
                            f"not {type(doc_id).__name__}")
        if isinstance(doc_id, str) and not doc_id.strip():
            raise LoadError(f"{path}:{lineno}: '{id_field}' is empty")
        text = obj.get(text_field)
        if text is not None and not isinstance(text, str):
            raise LoadError(f"{path}:{lineno}: '{text_field}' must be a string")
        title = obj.get(title_field)
        if title is None:
            title = ""
        elif isinstance(title, (int, float)) and not isinstance(title, bool):
            title = str(title)  # stored as text, so compare as text: a number must not look changed on every run
        elif not isinstance(title, str):
            raise LoadError(f"{path}:{lineno}: '{title_field}' must be a string")
        meta = {k: v for k, v in obj.items() if k not in {id_field, "_id", text_field, title_field}}
        doc = Document(id=str(doc_id), text=text or "", title=title, metadata=meta)
        if _keep(doc, report):
            yield doc
        else:
            log.warning("%s:%d: empty document %s skipped", path, lineno, doc_id)


def load_beir_corpus(folder: str | Path, report: LoadReport | None = None) -> Iterator[Document]:
    """``corpus.jsonl`` of a BEIR dataset folder."""
    return load_jsonl(Path(folder) / "corpus.jsonl", report=report, id_field="_id")


def load_path(path: str | Path, report: LoadReport | None = None) -> Iterator[Document]:
    """Dispatch on what ``path`` is: a BEIR folder, a folder of text files, or a .jsonl file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir() and (path / "corpus.jsonl").exists():
        return load_beir_corpus(path, report)
    if path.is_dir():
        return load_folder(path, report)
    if path.suffix == ".jsonl":
        return load_jsonl(path, report)
    if path.suffix.lower() in {".txt", ".md"}:
        return load_folder_files([path], report)
    raise LoadError(f"{path}: unsupported input (expected a folder, .jsonl, .txt or .md)")


def load_folder_files(files: Iterable[Path], report: LoadReport | None = None) -> Iterator[Document]:
    report = report if report is not None else LoadReport()
    for file in files:
        text = read_text_file(Path(file), report)
        if text is None:
            continue
        doc = _file_document(Path(file).name, Path(file), text)
        if _keep(doc, report):
            yield doc


# LangChain interop: both directions, without making langchain a hard dependency.
def to_langchain(item, score: float | None = None):
    """A LangChain Document. Every metadata field is kept; added: ``doc_id`` and ``title`` (documents), or
    ``doc_id``, ``chunk_id``, ``position`` and ``source`` (chunks; ``source`` = the chunk's own or its
    document id), and ``score`` / ``rank`` for a retrieved passage (``blockrag.pipeline.Passage``) or when
    ``score`` is given. ``from_langchain(to_langchain(doc)) == doc``."""
    from langchain_core.documents import Document as LCDocument

    if hasattr(item, "chunk") and hasattr(item, "rank"):  # a retrieved Passage
        lc = to_langchain(item.chunk, item.score if score is None else score)
        lc.metadata["rank"] = item.rank
        return lc
    if isinstance(item, Chunk):
        meta = {**item.metadata, "doc_id": item.doc_id, "chunk_id": item.id, "position": item.position}
        meta.setdefault("source", item.doc_id)
        if score is not None:
            meta["score"] = float(score)
        return LCDocument(page_content=item.text, id=item.id, metadata=meta)
    meta = {**item.metadata, "title": item.title, "doc_id": item.id}
    if score is not None:
        meta["score"] = float(score)
    return LCDocument(page_content=item.text, id=item.id, metadata=meta)


def from_langchain(lc_doc, default_id: str | None = None) -> Document:
    """A blockrag Document: id from ``lc_doc.id`` (else metadata ``id`` / ``doc_id``, ``default_id``, or a
    content hash), ``title`` from metadata; every other metadata field is kept (``doc_id`` only when it
    differs from the id)."""
    meta = dict(lc_doc.metadata or {})
    doc_id = lc_doc.id or meta.pop("id", None) or meta.get("doc_id") or default_id or content_hash(lc_doc.page_content)
    if str(meta.get("doc_id", "")) == str(doc_id):
        meta.pop("doc_id")
    return Document(id=str(doc_id), text=lc_doc.page_content, title=meta.pop("title", "") or "", metadata=meta)

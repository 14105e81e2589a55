"""MS MARCO passage-ranking loaders: ``collection.tsv`` (pid, text), ``queries.*.tsv`` (qid, text),
qrels as TREC (``qid 0 pid rel``) or TSV (``qid<TAB>pid[<TAB>rel]``).

Bad input raises :class:`rag.documents.LoadError` naming the file and line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from blockrag.documents import Document, LoadError, LoadReport, text_lines

log = logging.getLogger(__name__)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.exists():
        raise FileNotFoundError(f"MS MARCO file not found: {path}")
    yield from text_lines(path)


def _id_text(path: Path, lineno: int, line: str, what: str) -> tuple[str, str]:
    parts = line.split("\t")
    if len(parts) < 2:
        raise LoadError(f"{path}:{lineno}: expected '{what}<TAB>text', found no tab: {line[:80]!r}")
    ident = parts[0].strip()
    if not ident:
        raise LoadError(f"{path}:{lineno}: empty {what}")
    # MS MARCO text has no tabs, but some derived files append a title column: keep it all.
    return ident, "\t".join(parts[1:]).strip()


def iter_collection(path: str | Path, report: LoadReport | None = None) -> Iterator[Document]:
    """``collection.tsv``: ``pid<TAB>text`` per line; empty passages are skipped (counted in ``report``)."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    for lineno, line in _lines(path):
        pid, text = _id_text(path, lineno, line, "pid")
        if not text:
            report.skipped_empty += 1
            log.warning("%s:%d: empty passage %s skipped", path, lineno, pid)
            continue
        report.loaded += 1
        yield Document(id=pid, text=text)


def load_collection(path: str | Path, report: LoadReport | None = None) -> list[Document]:
    return list(iter_collection(path, report))


def load_queries(path: str | Path) -> dict[str, str]:
    """``queries.tsv``: ``qid<TAB>text`` per line."""
    path = Path(path)
    out: dict[str, str] = {}
    for lineno, line in _lines(path):
        qid, text = _id_text(path, lineno, line, "qid")
        out[qid] = text
    return out


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC ``qid 0 pid rel`` (space or tab separated), or TSV ``qid pid [rel]`` (rel defaults to 1).

    A non-numeric header line (first line only) is skipped.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) == 4:
            qid, _, pid, rel = parts
        elif len(parts) == 3:
            qid, pid, rel = parts
        elif len(parts) == 2:
            (qid, pid), rel = parts, "1"
        else:
            raise LoadError(f"{path}:{lineno}: expected 'qid 0 pid rel' (TREC) or 'qid pid [rel]', "
                            f"got {len(parts)} fields: {line[:80]!r}")
        try:
            value = int(float(rel))
        except ValueError:
            if lineno == 1:
                continue
            raise LoadError(f"{path}:{lineno}: relevance {rel!r} is not a number") from None
        qrels.setdefault(qid, {})[pid] = value
    return qrels


def load_msmarco(data_dir: str | Path, split: str = "dev") -> tuple[list[Document], dict[str, str],
                                                                      dict[str, dict[str, int]]]:
    """A folder with ``collection.tsv``, ``queries.<split>.tsv`` (or ``queries.tsv``) and
    ``qrels.<split>.tsv`` (or ``.txt``). Queries are restricted to the judged ones."""
    root = Path(data_dir)

    def first(*names: str) -> Path:
        for n in names:
            if (root / n).exists():
                return root / n
        raise FileNotFoundError(f"none of {', '.join(names)} in {root}")

    corpus = load_collection(first("collection.tsv"))
    queries = load_queries(first(f"queries.{split}.small.tsv", f"queries.{split}.tsv", "queries.tsv"))
    qrels = load_qrels(first(f"qrels.{split}.small.tsv", f"qrels.{split}.tsv", f"qrels.{split}.txt", "qrels.tsv"))
    queries = {q: t for q, t in queries.items() if q in qrels}
    qrels = {q: r for q, r in qrels.items() if q in queries}
    return corpus, queries, qrels

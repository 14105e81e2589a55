"""BEIR dataset loader: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Bad input raises :class:`rag.documents.LoadError` naming the file and line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from blockrag.documents import Chunk, Document, LoadError, LoadReport, _read_jsonl, load_jsonl, text_lines

log = logging.getLogger(__name__)


@dataclass
class BeirData:
    corpus: list[Document]
    queries: dict[str, str]  # qid -> text, only the queries judged in the split
    qrels: dict[str, dict[str, int]]  # qid -> {doc_id: relevance}
    split: str = "test"
    report: LoadReport = field(default_factory=LoadReport)


def load_corpus(path: str | Path, report: LoadReport | None = None) -> list[Document]:
    """``corpus.jsonl``: one ``{"_id", "title", "text"}`` object per line; empty documents are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BEIR corpus not found: {path}")
    return list(load_jsonl(path, report=report, id_field="_id"))


def load_queries(path: str | Path) -> dict[str, str]:
    """``queries.jsonl``: one ``{"_id", "text"}`` object per line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BEIR queries not found: {path}")
    queries: dict[str, str] = {}
    for lineno, obj in _read_jsonl(path):
        qid = obj.get("_id", obj.get("id"))
        if qid is None:
            raise LoadError(f"{path}:{lineno}: missing '_id'")
        text = obj.get("text")
        if not isinstance(text, str):
            raise LoadError(f"{path}:{lineno}: query {qid} has no 'text' string")
        queries[str(qid)] = text
    return queries


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``qrels/<split>.tsv``: ``query-id<TAB>corpus-id<TAB>score`` with an optional header line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BEIR qrels not found: {path}")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        parts = line.split("\t")
        if len(parts) != 3:
            raise LoadError(f"{path}:{lineno}: expected 3 tab-separated fields "
                            f"(query-id, corpus-id, score), got {len(parts)}: {line[:80]!r}")
        qid, did, score = (p.strip() for p in parts)
        try:
            rel = int(float(score))
        except ValueError:
            if lineno == 1:  # header: query-id corpus-id score
                continue
            raise LoadError(f"{path}:{lineno}: relevance {score!r} is not a number") from None
        qrels.setdefault(qid, {})[did] = rel
    return qrels


def load_beir(data_dir: str | Path, split: str = "test") -> BeirData:
    """A BEIR folder. Queries are restricted to those judged in ``split`` (as BEIR's own loader does)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR dataset folder not found: {root}")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise FileNotFoundError(f"no qrels for split {split!r}: {qrels_path} "
                                f"(available splits: {', '.join(have) or 'none'})")
    report = LoadReport()
    corpus = load_corpus(root / "corpus.jsonl", report)
    if report.skipped_empty:
        log.warning("%s: %d empty documents skipped", root / "corpus.jsonl", report.skipped_empty)
    all_queries = load_queries(root / "queries.jsonl")
    qrels = load_qrels(qrels_path)
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        log.warning("%s: %d judged queries have no text in queries.jsonl (e.g. %s); ignored",
                    qrels_path, len(missing), missing[0])
    queries = {q: all_queries[q] for q in qrels if q in all_queries}
    qrels = {q: qrels[q] for q in queries}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, split=split, report=report)


def beir_chunks(docs: Iterable[Document]) -> list[Chunk]:
    """One chunk per document (title + "\\n" + text), chunk id == document id: the BEIR convention."""
    return [Chunk(id=d.id, doc_id=d.id, position=0, text=d.full_text) for d in docs]

"""Cited passages as JSON, and the span of a passage an answer most likely came from."""
from __future__ import annotations

import math
import re

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say where an answer came from.
_STOP = frozenset("the a an and or of to in on at by for with from is are was were be been it its this that "
                  "as which who what when where how why not no yes has have had do does did than then there "
                  "their they he she his her we you i".split())


def _words(text: str) -> set[str]:
    return {w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in _STOP and len(w) > 1}


def best_span(passage: str, answer: str | None) -> list[int] | None:
    """``[start, end)`` character offsets of the sentence of ``passage`` sharing most words with ``answer``
    (normalised by the sentence's length), or None when no sentence shares any."""
    if not answer:
        return None
    target = _words(answer)
    best, best_score = None, 0.0
    for m in _SENTENCE.finditer(passage):
        words = _words(m.group(0))
        if not words:
            continue
        score = len(words & target) / math.sqrt(len(words))
        if score > best_score:
            start = m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
            best, best_score = [start, m.end()], score
    return best


def citation(index: int, chunk, score: float, title: str) -> dict:
    """One retrieved passage in the form every endpoint (and the final SSE event) returns."""
    return {"index": index, "doc_id": chunk.doc_id, "title": title, "chunk_id": chunk.id,
            "position": chunk.position, "score": float(score), "text": chunk.text, "span": None}

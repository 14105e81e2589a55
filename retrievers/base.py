"""The one retriever protocol: ``retrieve(query, k)`` and its batched form, returning scored chunk ids."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, Sequence, runtime_checkable


class Hit(NamedTuple):
    """A scored chunk id. A NamedTuple: retrievers create millions of these, and tuples are cheap."""

    chunk_id: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    name: str

    def retrieve(self, query: str, k: int = 10) -> list[Hit]: ...

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]: ...


@runtime_checkable
class Index(Protocol):
    """A retriever that is persisted beside a DocStore and kept in step with it."""

    name: str

    def add(self, chunks: Sequence) -> None: ...

    def delete(self, chunk_ids: Sequence[str]) -> None: ...

    def save(self, folder: Path) -> None: ...

    def manifest(self) -> dict: ...


class BatchFromSingle:
    """Mixin: a batched ``retrieve_batch`` from ``retrieve`` for retrievers with no faster batch path."""

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        return [self.retrieve(q, k) for q in queries]

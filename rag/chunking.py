"""Token-aware chunking with the generator's tokenizer, so that a chunk is exactly one KV block."""
from __future__ import annotations

from dataclasses import dataclass

from .documents import Chunk, Document, chunk_id


@dataclass
class TokenChunker:
    """Split documents into windows of ``chunk_tokens`` tokens overlapping by ``overlap`` tokens.

    ``chunk_tokens=None`` keeps each document whole (one chunk). Chunk text is the exact character
    span of its tokens (from the tokenizer's offsets), and the token ids are stored with the chunk:
    later stages (KV cache, cached generation) use these ids, never a re-tokenisation of the text.
    """

    tokenizer: object
    chunk_tokens: int | None = 256
    overlap: int = 32

    def __post_init__(self):
        if self.chunk_tokens is not None:
            if self.chunk_tokens <= 0:
                raise ValueError("chunk_tokens must be positive")
            if not 0 <= self.overlap < self.chunk_tokens:
                raise ValueError("overlap must be >= 0 and smaller than chunk_tokens")

    def config(self) -> dict:
        return {"chunk_tokens": self.chunk_tokens, "overlap": self.overlap}

    def split(self, doc: Document) -> list[Chunk]:
        text = doc.full_text
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            return []
        size = self.chunk_tokens or len(ids)
        step = size - (self.overlap if self.chunk_tokens else 0)
        chunks = []
        for position, start in enumerate(range(0, len(ids), step)):
            window = ids[start:start + size]
            lo, hi = offsets[start][0], offsets[start + len(window) - 1][1]
            piece = text[lo:hi]
            chunks.append(Chunk(id=chunk_id(doc.id, position, piece), doc_id=doc.id, position=position,
                                text=piece, token_ids=list(window), metadata={"title": doc.title}))
            if start + size >= len(ids):
                break
        return chunks

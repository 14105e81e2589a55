"""Token-aware chunking with the generator's tokenizer, so that a chunk is exactly one KV block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .documents import Chunk, Document, chunk_id

SEGMENT_CHARS = 200_000  # longer texts are tokenised a segment at a time (bounded memory)
_PROBE = 256  # characters each side of a segment cut that are re-tokenised to prove the cut is neutral


@dataclass
class TokenChunker:
    """Split documents into windows of ``chunk_tokens`` tokens overlapping by ``overlap`` tokens.

    ``chunk_tokens=None`` keeps each document whole (one chunk). Chunk text is the exact character
    span of its tokens (from the tokenizer's offsets), and the token ids are stored with the chunk:
    later stages (KV cache, cached generation) use these ids, never a re-tokenisation of the text.

    Texts longer than ``segment_chars`` are tokenised one segment at a time, cut only where tokenising
    across the cut gives the same tokens as tokenising each side (checked on the spot), so the chunks are
    those of one tokenisation of the whole text while memory stays bounded (see :meth:`iter_split`).
    """

    tokenizer: object
    chunk_tokens: int | None = 256
    overlap: int = 32
    segment_chars: int = SEGMENT_CHARS

    def __post_init__(self):
        if self.chunk_tokens is not None:
            if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
                raise ValueError(f"chunk_tokens must be a positive integer or None, not {self.chunk_tokens!r}")
            if self.chunk_tokens <= 0:
                raise ValueError("chunk_tokens must be positive")
            if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) \
                    or not 0 <= self.overlap < self.chunk_tokens:
                raise ValueError("overlap must be >= 0 and smaller than chunk_tokens")

    def config(self) -> dict:
        return {"chunk_tokens": self.chunk_tokens, "overlap": self.overlap}

    def split(self, doc: Document) -> list[Chunk]:
        return list(self.iter_split(doc))

    # ------------------------------------------------------------------ tokenising
    def _encode(self, text: str, base: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(a + base, b + base) for a, b in enc["offset_mapping"]]

    def _neutral_cut(self, text: str, at: int) -> bool:
        lo, hi = max(0, at - _PROBE), min(len(text), at + _PROBE)
        return self._encode(text[lo:hi])[0] == self._encode(text[lo:at])[0] + self._encode(text[at:hi])[0]

    def _cut(self, text: str, start: int) -> int:
        """End of the segment starting at ``start``: a neutral cut before a space, near ``segment_chars``."""
        end = start + self.segment_chars
        if end >= len(text):
            return len(text)
        tries = 0
        while end < len(text):
            i = text.rfind(" ", start + self.segment_chars // 2, end)
            while i > start and tries < 64:
                tries += 1
                if not text[i - 1].isspace() and not text[i + 1:i + 2].isspace() and self._neutral_cut(text, i):
                    return i
                i = text.rfind(" ", start + self.segment_chars // 2, i)
            end += self.segment_chars  # no neutral cut found: take a longer segment
            tries = 0
        return len(text)

    def _segments(self, text: str) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        start = 0
        while start < len(text):
            end = self._cut(text, start) if len(text) > self.segment_chars else len(text)
            yield self._encode(text[start:end], start)
            start = end

    # ------------------------------------------------------------------ windows
    def iter_split(self, doc: Document) -> Iterator[Chunk]:
        """The chunks of ``doc``, produced as the text is tokenised (a segment at a time)."""
        text = doc.full_text

        def make(position, window, offs):
            piece = text[offs[0][0]:offs[-1][1]]
            return Chunk(id=chunk_id(doc.id, position, piece), doc_id=doc.id, position=position,
                         text=piece, token_ids=list(window), metadata={"title": doc.title})

        if self.chunk_tokens is None:
            ids, offs = [], []
            for seg_ids, seg_offs in self._segments(text):
                ids += seg_ids
                offs += seg_offs
            if ids:
                yield make(0, ids, offs)
            return
        size, step = self.chunk_tokens, self.chunk_tokens - self.overlap
        ids: list[int] = []
        offs: list[tuple[int, int]] = []
        base = 0  # global token index of ids[0]
        start, position = 0, 0  # global token index of the next window
        for seg_ids, seg_offs in self._segments(text):
            ids += seg_ids
            offs += seg_offs
            # emit windows that are certainly not the last one (more tokens follow them)
            while start + size < base + len(ids):
                a = start - base
                yield make(position, ids[a:a + size], offs[a:a + size])
                position += 1
                start += step
            drop = start - base
            if drop > 0:
                del ids[:drop], offs[:drop]
                base = start
        n = base + len(ids)
        while start < n:
            a = start - base
            yield make(position, ids[a:a + size], offs[a:a + size])
            if start + size >= n:
                break
            position += 1
            start += step

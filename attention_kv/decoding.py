"""What one decoded answer is made of, shared by :mod:`attention_kv.generate` and :mod:`attention_kv.batch`:
the stopping rules (stop strings, the held-back tail of a stream, the repetition guard) and the result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def apply_stops(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(``text`` cut before the first stop string, whether one was found). A stop string counts once the
    answer has begun: matches inside leading whitespace are skipped (a model that opens with a newline is
    not cut to an empty answer), and so are matches right after a colon (a line such as "The answer is:"
    announces the next one)."""
    begin = len(text) - len(text.lstrip())
    cuts = []
    for s in stop:
        i = text.find(s, begin) if s else -1
        while i >= 0 and text[:i].rstrip().endswith(":"):
            i = text.find(s, i + len(s))
        if i >= 0:
            cuts.append(i)
    return (text[:min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (not streamed until decided)."""
    n = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def repeats(ids: Sequence[int], n: int) -> bool:
    """True when the last ``n`` ids already occurred as a window earlier in ``ids`` (a decoding loop)."""
    if n <= 0 or len(ids) < 2 * n:
        return False
    tail = list(ids[-n:])
    return any(list(ids[i:i + n]) == tail for i in range(len(ids) - 2 * n + 1))


@dataclass
class GenerationResult:
    answer: str
    token_ids: list[int]
    mode: str
    chunk_ids: list[str]
    ttft_ms: float
    decode_tokens_per_s: float
    n_context_tokens: int
    n_question_tokens: int
    n_recomputed: int = 0
    timings: dict = field(default_factory=dict)

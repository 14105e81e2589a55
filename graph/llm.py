"""LLM extraction (LightRAG-style) for users with a capable model: a local HF model or any
OpenAI-compatible HTTP endpoint.

* :class:`LLMExtractor` — delimited-record prompt, tolerant parser (quotes, missing fields, other
  delimiters, JSON, chatter around the records), retries with a timeout, an on-disk response cache
  keyed by (model, prompt), and a token / cost counter per indexing run (:meth:`LLMExtractor.usage`).
* :class:`LLMKeywordExtractor` — query -> (low-level, high-level) keywords, JSON answer, offline fallback.
* Backends: :class:`OpenAIBackend` (urllib, no SDK) and :class:`HFBackend` (``blockrag.models.shared_generator``).
  Anything with ``name`` and ``complete(prompt, max_tokens) -> (text, prompt_tokens, completion_tokens)``
  works.

The 135M-parameter SmolLM2 that ships offline is far too small to extract reliably; use the spaCy
extractor with it, and this one with a real model.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Sequence

from .extract import Entity, Relation, normalise_name

log = logging.getLogger(__name__)

TUPLE = "<|>"
RECORD = "##"
DONE = "<|COMPLETE|>"
DEFAULT_TYPES = ["person", "organization", "location", "event", "concept", "product", "date", "other"]

EXTRACT_PROMPT = """-Goal-
Given a text, identify all entities of the types [{types}] and all relationships among them.

-Steps-
1. For each entity, output: ("entity"{t}<name>{t}<type>{t}<one-sentence description from the text>)
2. For each pair of related entities, output:
("relationship"{t}<source name>{t}<target name>{t}<description of how they are related>{t}<2-4 comma-separated keywords>{t}<strength 1-10>)
3. Separate records with {r}. Use names exactly as written in the text. End with {done}

-Example-
Text: Mara Velt founded Quill Works in Osmund in 1998.
Output:
("entity"{t}Mara Velt{t}person{t}Founder of Quill Works){r}
("entity"{t}Quill Works{t}organization{t}Company founded in 1998 in Osmund){r}
("entity"{t}Osmund{t}location{t}City where Quill Works was founded){r}
("relationship"{t}Mara Velt{t}Quill Works{t}Mara Velt founded Quill Works in 1998{t}founder, company{t}9){r}
("relationship"{t}Quill Works{t}Osmund{t}Quill Works was founded in Osmund{t}location, founding{t}7)
{done}

-Real data-
Text: {text}
Output:
"""

KEYWORD_PROMPT = """Extract keywords from the question for searching a knowledge graph.
"low_level_keywords": the specific entities, names and terms in the question.
"high_level_keywords": the broader themes, relations or concepts it asks about.
Answer with JSON only, e.g. {{"high_level_keywords": ["..."], "low_level_keywords": ["..."]}}

Question: {query}
JSON:"""


class ExtractionError(RuntimeError):
    """The model's answer could not be turned into entities/relations (after retries)."""


# --------------------------------------------------------------------------- parsing
_FIELD_SPLIT = re.compile(r"<\|>|\|\|\||<\|\s*>|\t|\s\|\s")


def _clean(s: str) -> str:
    s = s.strip().strip('"\'`*').strip()
    s = re.sub(r"^<|>$", "", s).strip()
    return re.sub(r"\s+", " ", s)


def parse_extraction(text: str) -> tuple[list[Entity], list[Relation]]:
    """Entities and relations from a model answer in the delimited format (or JSON), tolerating noise."""
    text = (text or "").replace(DONE, "")
    ents: dict[str, Entity] = {}
    rels: list[Relation] = []
    # JSON answer: {"entities": [...], "relationships": [...]}
    m = re.search(r"\{.*\}", text, re.S)
    if m and '"entit' in m.group(0):
        try:
            obj = json.loads(m.group(0))
            for e in obj.get("entities", []):
                name = _clean(str(e.get("name") or e.get("entity_name") or ""))
                if name:
                    ents[normalise_name(name)] = Entity(name, _clean(str(e.get("type", "concept"))).upper(),
                                                        _clean(str(e.get("description", ""))))
            for r in obj.get("relationships", obj.get("relations", [])):
                s, t = _clean(str(r.get("source", ""))), _clean(str(r.get("target", "")))
                if s and t:
                    kws = r.get("keywords", [])
                    kws = kws if isinstance(kws, list) else str(kws).split(",")
                    rels.append(Relation(s, t, [_clean(k) for k in kws if _clean(k)],
                                         _clean(str(r.get("description", ""))), _weight(r.get("strength"))))
            return list(ents.values()), rels
        except (json.JSONDecodeError, AttributeError, TypeError):
            pass
    for rec in re.split(re.escape(RECORD) + r"|\n", text):
        rec = rec.strip().strip(",;")
        if not rec:
            continue
        inner = re.sub(r"^\s*\(|\)\s*$", "", rec)
        fields = [_clean(f) for f in _FIELD_SPLIT.split(inner)]
        if len(fields) < 2:
            continue
        head = fields[0].lower()
        if "entity" in head and len(fields) >= 2 and fields[1]:
            name = fields[1]
            if len(name) > 120:
                continue
            etype = (fields[2] if len(fields) > 2 and fields[2] else "concept").upper()
            desc = " ".join(fields[3:]) if len(fields) > 3 else ""
            key = normalise_name(name)
            if key in ents:
                if desc and desc not in ents[key].description:
                    ents[key].description += " " + desc
            elif key:
                ents[key] = Entity(name, etype, desc)
        elif "relation" in head and len(fields) >= 3 and fields[1] and fields[2]:
            desc = fields[3] if len(fields) > 3 else ""
            kws = [k.strip() for k in fields[4].split(",")] if len(fields) > 4 else []
            rels.append(Relation(fields[1], fields[2], [k for k in kws if k], desc,
                                 _weight(fields[5] if len(fields) > 5 else None)))
    for r in rels:  # endpoints must exist as entities
        for n in (r.source, r.target):
            if normalise_name(n) and normalise_name(n) not in ents:
                ents[normalise_name(n)] = Entity(n, "CONCEPT", "")
    return list(ents.values()), rels


def _weight(x) -> float:
    try:
        return max(0.1, min(10.0, float(str(x).strip().split()[0]))) / 5.0  # 5/10 ~ one parsed predicate
    except (ValueError, IndexError, TypeError):
        return 1.0


def parse_keywords(text: str) -> tuple[list[str], list[str]]:
    m = re.search(r"\{.*\}", text or "", re.S)
    if not m:
        raise ExtractionError("no JSON object in keyword answer")
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError as err:
        raise ExtractionError(f"bad keyword JSON: {err}") from None
    low = [str(x) for x in obj.get("low_level_keywords", []) if str(x).strip()]
    high = [str(x) for x in obj.get("high_level_keywords", []) if str(x).strip()]
    return low, high


# --------------------------------------------------------------------------- backends
class OpenAIBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, Ollama, OpenAI...)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 temperature: float = 0.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.timeout, self.temperature = model, timeout, temperature
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.name = f"openai:{model}@{self.base_url}"

    def complete(self, prompt: str, max_tokens: int = 1024) -> tuple[str, int, int]:
        url = self.base_url + ("/chat/completions" if self.base_url.endswith("/v1") else "/v1/chat/completions")
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            obj = json.loads(resp.read().decode("utf-8", "replace"))
        try:
            text = obj["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ExtractionError(f"unexpected response shape: {str(obj)[:200]}") from None
        usage = obj.get("usage") or {}
        return text, int(usage.get("prompt_tokens", len(prompt) // 4)), int(usage.get("completion_tokens",
                                                                                        len(text) // 4))


class HFBackend:
    """A local causal LM through :func:`blockrag.models.shared_generator` (greedy decoding, chat template)."""

    def __init__(self, model_name: str | None = None, device: str | None = None):
        self.model_name, self.device = model_name, device
        self._model = self._tok = None
        self._lock = threading.Lock()
        self.name = f"hf:{model_name or 'default'}"

    def complete(self, prompt: str, max_tokens: int = 512) -> tuple[str, int, int]:
        import torch

        from blockrag.models import shared_generator as load_generator  # one copy per process

        with self._lock:
            if self._model is None:
                self._model, self._tok = load_generator(self.model_name, device=self.device)
            tok, model = self._tok, self._model
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt")
                if not torch.is_tensor(ids):
                    ids = ids["input_ids"]
            else:
                ids = tok(prompt, return_tensors="pt")["input_ids"]
            ids = ids.to(model.device)
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            new = out[0, ids.shape[1]:]
            return tok.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.shape[0])


# --------------------------------------------------------------------------- cache + calls
class ResponseCache:
    """One JSON file per (model, prompt) hash under ``folder``; writes are atomic."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str):
        if not self.folder:
            return None
        p = self._path(key)
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value) -> None:
        if not self.folder:
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh)
        os.replace(tmp, p)


class _Caller:
    def __init__(self, backend, cache_dir=None, retries: int = 2, timeout: float = 120.0, backoff: float = 0.5,
                 price_per_1k: tuple[float, float] = (0.0, 0.0)):
        self.backend, self.retries, self.timeout, self.backoff = backend, retries, timeout, backoff
        self.cache = ResponseCache(cache_dir)
        self.price = price_per_1k
        self.counts = Counter()
        self._pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="llm")

    def call(self, prompt: str, max_tokens: int, parse):
        """Cached completion -> parse(text); retried on errors, timeouts and unparseable answers."""
        key = hashlib.sha256(f"{self.backend.name}\x00{max_tokens}\x00{prompt}".encode()).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            try:
                out = parse(hit["text"])
                self.counts["cache_hits"] += 1
                return out
            except ExtractionError:
                pass
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                self.counts["retries"] += 1
            fut = self._pool.submit(self.backend.complete, prompt, max_tokens)
            try:
                text, pt, ct = fut.result(timeout=self.timeout)
            except cf.TimeoutError:
                self.counts["timeouts"] += 1
                last = TimeoutError(f"LLM call exceeded {self.timeout}s")
                continue
            except (urllib.error.URLError, OSError, ExtractionError, ValueError) as err:
                self.counts["errors"] += 1
                last = err
                continue
            self.counts["calls"] += 1
            self.counts["prompt_tokens"] += pt
            self.counts["completion_tokens"] += ct
            try:
                out = parse(text)
            except ExtractionError as err:
                self.counts["unparseable"] += 1
                last = err
                continue
            self.cache.put(key, {"text": text, "prompt_tokens": pt, "completion_tokens": ct})
            return out
        self.counts["failures"] += 1
        raise ExtractionError(f"LLM extraction failed after {self.retries + 1} attempts: {last}")

    def usage(self) -> dict:
        u = dict(self.counts)
        u["cost"] = round(u.get("prompt_tokens", 0) / 1000 * self.price[0]
                          + u.get("completion_tokens", 0) / 1000 * self.price[1], 6)
        return u


class LLMExtractor:
    """``extract(chunk) -> (entities, relations)`` with a generative model.

    ``retries``: extra attempts after an error, timeout or unparseable answer; then the chunk fails
    (the index build counts it and goes on). ``cache_dir``: on-disk response cache (re-indexing is free).
    ``price_per_1k``: (prompt, completion) price for the cost estimate in :meth:`usage`.
    """

    name = "llm"
    english_only = False

    def __init__(self, backend, entity_types: Sequence[str] = DEFAULT_TYPES, cache_dir: str | Path | None = None,
                 retries: int = 2, timeout: float = 120.0, max_tokens: int = 1024, max_chars: int = 8000,
                 workers: int = 4, price_per_1k: tuple[float, float] = (0.0, 0.0)):
        self.backend = backend
        self.types = list(entity_types)
        self.max_tokens, self.max_chars, self.workers = max_tokens, max_chars, workers
        self._caller = _Caller(backend, cache_dir, retries, timeout, price_per_1k=price_per_1k)

    def config(self) -> dict:
        return {"extractor": self.name, "model": self.backend.name, "types": self.types}

    def prompt(self, text: str) -> str:
        return EXTRACT_PROMPT.format(types=", ".join(self.types), t=TUPLE, r=RECORD, done=DONE,
                                     text=text[: self.max_chars])

    @staticmethod
    def _parse(text: str):
        ents, rels = parse_extraction(text)
        if not ents and not rels and DONE not in (text or ""):
            raise ExtractionError(f"nothing parseable in answer: {(text or '')[:120]!r}")
        return ents, rels

    def extract(self, chunk) -> tuple[list[Entity], list[Relation]]:
        text = chunk if isinstance(chunk, str) else chunk.text
        return self._caller.call(self.prompt(text), self.max_tokens, self._parse)

    def extract_batch(self, chunks: Sequence) -> list:
        def one(c):
            try:
                return self.extract(c)
            except Exception as err:  # noqa: BLE001 - reported per chunk
                return err

        with cf.ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, chunks))

    def usage(self) -> dict:
        return self._caller.usage()


class LLMKeywordExtractor:
    """``(query) -> (low, high)`` keywords from the model; falls back to ``fallback`` on failure."""

    def __init__(self, backend, fallback=None, cache_dir=None, retries: int = 1, timeout: float = 30.0):
        self._caller = _Caller(backend, cache_dir, retries, timeout)
        self.fallback = fallback

    def __call__(self, query: str) -> tuple[list[str], list[str]]:
        try:
            return self._caller.call(KEYWORD_PROMPT.format(query=query), 256, parse_keywords)
        except ExtractionError:
            if self.fallback is None:
                from .extract import RegexExtractor, query_keywords

                return query_keywords(RegexExtractor(), query)
            return self.fallback(query)

    def usage(self) -> dict:
        return self._caller.usage()

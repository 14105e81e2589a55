"""LLM extraction without a model: fake backends (garbage, timeouts, flakiness) and a local HTTP server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from blockrag.graph import GraphIndex, HashEmbedder
from blockrag.graph.llm import (DONE, ExtractionError, LLMExtractor, LLMKeywordExtractor, OpenAIBackend,
                       parse_extraction, parse_keywords)
from blockrag.documents import Chunk

GOOD = ('("entity"<|>Mara Velt<|>person<|>Founder of Quill Works)##\n'
        '("entity"<|>Quill Works<|>organization<|>A company)##\n'
        '("relationship"<|>Mara Velt<|>Quill Works<|>Mara Velt founded Quill Works<|>founder, company<|>9)\n'
        + DONE)


class Fake:
    def __init__(self, answers, delay=0.0):
        self.answers, self.delay, self.calls = list(answers), delay, 0
        self.name = "fake"

    def complete(self, prompt, max_tokens=512):
        self.calls += 1
        time.sleep(self.delay)
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, Exception):
            raise a
        return a, len(prompt) // 4, len(a) // 4


def test_parse_good_and_malformed():
    ents, rels = parse_extraction(GOOD)
    assert {e.name for e in ents} == {"Mara Velt", "Quill Works"}
    assert rels[0].keywords == ["founder", "company"] and rels[0].weight == pytest.approx(9 / 5)
    messy = ('Sure! Here you go:\n(entity | "Mara Velt" | PERSON | founder)\n'
             '("relationship"<|>Mara Velt<|>Osmund<|>lives in)\n("entity"<|>)\nrandom chatter')
    ents, rels = parse_extraction(messy)
    assert {e.key for e in ents} == {"mara velt", "osmund"}  # relation endpoint added as an entity
    assert rels[0].weight == 1.0 and rels[0].keywords == []
    js = json.dumps({"entities": [{"name": "A B", "type": "org"}],
                     "relationships": [{"source": "A B", "target": "C", "keywords": "x, y", "strength": "3"}]})
    ents, rels = parse_extraction("```json\n" + js + "\n```")
    assert {e.name for e in ents} == {"A B"} and rels[0].keywords == ["x", "y"]
    assert parse_extraction("complete garbage") == ([], [])
    assert parse_keywords('{"low_level_keywords": ["X"], "high_level_keywords": ["y"]}') == (["X"], ["y"])
    with pytest.raises(ExtractionError):
        parse_keywords("no json")


def test_retries_cache_and_usage(tmp_path):
    backend = Fake(["garbage", ConnectionError("reset"), GOOD])
    ex = LLMExtractor(backend, cache_dir=tmp_path, retries=2, timeout=5)
    ex._caller.backoff = 0.0
    ents, rels = ex.extract("Mara Velt founded Quill Works.")
    assert len(ents) == 2 and len(rels) == 1 and backend.calls == 3
    u = ex.usage()
    assert u["unparseable"] == 1 and u["errors"] == 1 and u["calls"] == 2 and u["prompt_tokens"] > 0
    # same prompt again: answered from the on-disk cache, also by a fresh extractor
    ex2 = LLMExtractor(Fake(["never called"]), cache_dir=tmp_path)
    ex2.backend.name = "fake"
    assert ex2.extract("Mara Velt founded Quill Works.")[0] == ents
    assert ex2.usage()["cache_hits"] == 1 and ex2.backend.calls == 0


def test_timeout_and_garbage_do_not_stop_the_build(tmp_path):
    slow = LLMExtractor(Fake([GOOD], delay=1.0), retries=1, timeout=0.1)
    slow._caller.backoff = 0.0
    gi = GraphIndex(extractor=slow, embedder=HashEmbedder(), chunk_vectors=False)
    rep = gi.add([Chunk(id="a", doc_id="a", position=0, text="Mara Velt founded Quill Works.")])
    assert rep.failed == 1 and rep.llm["timeouts"] == 2 and rep.llm["failures"] == 1
    # garbage for one chunk, a good answer for the next: the good one is indexed
    ex = LLMExtractor(Fake(["nonsense", "nonsense", GOOD]), retries=1, workers=1)
    ex._caller.backoff = 0.0
    gi = GraphIndex(extractor=ex, embedder=HashEmbedder(), chunk_vectors=False)
    rep = gi.add([Chunk(id="x", doc_id="x", position=0, text="first"),
                  Chunk(id="y", doc_id="y", position=0, text="second")])
    assert rep.failed == 1 and rep.failed_ids == ["x"] and "mara velt" in gi.store.g


def test_keyword_extractor_fallback():
    kw = LLMKeywordExtractor(Fake(['{"low_level_keywords": ["Mara Velt"], "high_level_keywords": ["founding"]}']))
    assert kw("Who founded Quill Works?") == (["Mara Velt"], ["founding"])
    bad = LLMKeywordExtractor(Fake(["not json"]), retries=0)
    low, high = bad("Who founded Quill Works?")
    assert "Quill Works" in low


class _Handler(BaseHTTPRequestHandler):
    mode = "good"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "user"
        if _Handler.mode == "slow":
            time.sleep(1.0)
        out = {"choices": [{"message": {"content": GOOD}}], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}
        data = json.dumps(out).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_openai_compatible_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        ex = LLMExtractor(OpenAIBackend(url, "test-model", api_key="x", timeout=5), retries=0)
        ents, rels = ex.extract("Mara Velt founded Quill Works.")
        assert len(ents) == 2 and ex.usage()["prompt_tokens"] == 11
        _Handler.mode = "slow"
        ex = LLMExtractor(OpenAIBackend(url, "test-model", timeout=0.2), retries=0)
        with pytest.raises(ExtractionError):
            ex.extract("Mara Velt founded Quill Works.")
    finally:
        _Handler.mode = "good"
        server.shutdown()

"""blockrag serve against a real uvicorn on loopback: the official openai client, the HTTP API, security."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from serving import XSS_TITLE, gated_engine, running

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

QUESTION = "Who founded the Veloria Savings Bank?"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with gated_engine(tmp_path_factory.mktemp("serve") / "store", max_new_tokens=6, queue_size=2, max_body_bytes=64 << 10) as eng:
        yield eng


@pytest.fixture(scope="module")
def base(engine):
    from blockrag.server import create_app

    with running(create_app(engine.config, engine)) as url:
        yield url


def _metric(base: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(base + "/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def test_openai_client_plain_and_streamed_with_citations(engine, base):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert models == [engine.model_id] and "SmolLM2" in engine.model_id

    plain = client.chat.completions.create(model=engine.model_id, max_tokens=6,
                                           messages=[{"role": "user", "content": QUESTION}])
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length")
    cites = plain.model_extra["citations"]
    assert cites[0]["doc_id"] == "bank.md" and cites[0]["title"] == "Veloria Savings Bank"
    assert {"chunk_id", "score", "text", "span"} <= set(cites[0]) and "Tobias Renn" in cites[0]["text"]
    u = plain.usage
    assert 0 < u.completion_tokens <= 6 and u.prompt_tokens > u.prompt_tokens_details.cached_tokens > 0
    assert plain.model_extra["timings"]["ttft_ms"] > 0

    pieces, finals, first_citations, usage = [], [], None, None
    for chunk in client.chat.completions.create(model=engine.model_id, max_tokens=6, stream=True,
                                                messages=[{"role": "user", "content": QUESTION}],
                                                extra_body={"mode": "block", "k": 1}):
        extra = chunk.model_extra or {}
        if first_citations is None:
            first_citations = extra.get("citations")
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices[0].finish_reason:
            finals.append(extra)
            usage = chunk.usage
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert [c["doc_id"] for c in first_citations] == ["bank.md"]  # k=1 from the request's extra field
    final = finals[-1]
    assert final["citations"][0]["chunk_id"] == first_citations[0]["chunk_id"]
    assert 0 < usage.completion_tokens <= 6 and usage.prompt_tokens_details.cached_tokens > 0
    assert final["timings"]["mode"] == "block" and final["timings"]["cached_tokens"] > 0
    assert _metric(base, "blockrag_ttft_seconds_count", mode="block") >= 1
    assert _metric(base, "blockrag_kv_cache_hits_total") >= 2  # the caches built at indexing time
    assert _metric(base, "blockrag_kv_cache_misses_total") == 0


def test_usage_per_mode(engine, base):
    rows = {}
    for mode in ("full", "blend"):
        r = _chat(base, engine, max_tokens=2, mode=mode)
        assert r.status_code == 200, r.text
        rows[mode] = r.json()
    full, blend = rows["full"], rows["blend"]
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a plain prefill reuses nothing
    assert full["timings"]["prefilled_tokens"] == full["usage"]["prompt_tokens"]
    t = blend["timings"]
    assert t["mode"] == "blend" and t["recomputed_tokens"] > 0
    assert blend["usage"]["prompt_tokens_details"]["cached_tokens"] == t["cached_tokens"] > 0
    assert t["cached_tokens"] + t["prefilled_tokens"] == blend["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]


def test_retrieve_and_document_add_delete(base):
    r = httpx.post(base + "/v1/retrieve", json={"query": "steam engine Grey Heron", "k": 2})
    assert r.status_code == 200 and r.json()["data"][0]["doc_id"] == "railway.md"
    assert r.json()["timings"]["retrieve_ms"] >= 0
    doc = {"id": "notes/ferry.md", "text": "# The ferry\nThe ferry Saltwing sails from Lisk to Corvane at dawn."}
    r = httpx.post(base + "/v1/documents", json={"documents": [doc]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["documents_added"] == 1 and r.json()["chunks_added"] == 1
    hit = httpx.post(base + "/v1/retrieve", json={"query": "Saltwing ferry", "k": 1}).json()["data"][0]
    assert (hit["doc_id"], hit["title"]) == ("notes/ferry.md", "The ferry")  # markdown heading -> title
    assert "notes/ferry.md" in [d["id"] for d in httpx.get(base + "/v1/documents").json()["data"]]
    r = httpx.delete(base + "/v1/documents/notes/ferry.md", timeout=60)
    assert r.status_code == 200 and r.json()["chunks_removed"] == 1
    r = httpx.delete(base + "/v1/documents/notes/ferry.md")
    assert r.status_code == 404 and "no document" in r.json()["error"]["message"]
    hits = httpx.post(base + "/v1/retrieve", json={"query": "Saltwing ferry", "k": 4}).json()["data"]
    assert "notes/ferry.md" not in [h["doc_id"] for h in hits]


def test_server_follows_writes_of_another_process(engine, base):
    from blockrag.collection import Collection
    from blockrag.documents import Document

    if not hasattr(Collection, "refresh"):
        pytest.skip("Collection.refresh() not available")
    other = Collection(engine.config.store, progress=False)  # another writer of the same store
    try:
        other.add_documents([Document(id="mill.md", text="The windmill of Ashby grinds kelp flour.")])
        hit = httpx.post(base + "/v1/retrieve", json={"query": "windmill kelp flour", "k": 1}).json()["data"]
        assert hit and hit[0]["doc_id"] == "mill.md"
        other.delete_documents(["mill.md"])
        hits = httpx.post(base + "/v1/retrieve", json={"query": "windmill kelp flour", "k": 3}).json()["data"]
        assert "mill.md" not in [h["doc_id"] for h in hits]
    finally:
        other.close()


def test_every_error_is_json_with_a_message(engine, base):
    cases = [
        httpx.get(base + "/no/such/route"),
        httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
        httpx.post(base + "/v1/chat/completions", json={"model": engine.model_id, "messages": []}),
        httpx.post(base + "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        httpx.post(base + "/v1/chat/completions", json={"model": engine.model_id, "messages": [{"role": "user", "content": "  "}]}),
        httpx.post(base + "/v1/chat/completions", json={"model": engine.model_id, "mode": "warp",
                                                         "messages": [{"role": "user", "content": "hi"}]}),
        httpx.post(base + "/v1/retrieve", json={"query": "x", "retriever": "nope"}),
        httpx.put(base + "/v1/models"),
    ]
    assert [r.status_code for r in cases] == [404, 400, 400, 404, 400, 400, 400, 405]
    for r in cases:
        assert r.headers["content-type"].startswith("application/json")
        assert isinstance(r.json()["error"]["message"], str) and r.json()["error"]["message"]
    # a lone surrogate is valid JSON but not UTF-8: it must not break the request (it once hung the page)
    body = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "bank \\ud800 founder?"}]}'
    r = httpx.post(base + "/v1/chat/completions", content=(body % engine.model_id).encode(),
                   headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_security_body_limit_traversal_host_xss(base):
    big = {"query": "x" * (70 << 10)}
    r = httpx.post(base + "/v1/retrieve", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(80):
            yield b"x" * 1024
    r = httpx.post(base + "/v1/documents", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    for path in ("/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
                 "/static/..%2f..%2fconfig.py", "/static/%2e%2e%2fapp.py", "/static/....//app.py",
                 "/v1/documents/..%2f..%2fstore.sqlite"):
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as s:
            method = "DELETE" if path.startswith("/v1/documents") else "GET"
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        status = int(raw.split(b" ", 2)[1])
        assert status == 404, (path, raw[:200])
        assert b"[project]" not in raw and b"import" not in raw
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["message"]

    r = httpx.get(base + "/health", headers={"host": "evil.example"})
    assert r.status_code == 400 and "Host" in r.json()["error"]["message"]

    # documents come back as data (JSON strings), and the page never parses them as HTML
    hit = httpx.post(base + "/v1/retrieve", json={"query": "harbour master tide book", "k": 1}).json()["data"][0]
    assert hit["title"] == XSS_TITLE and "<script>window.__xss=2</script>" in hit["text"]
    js = httpx.get(base + "/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_write_endpoints_need_the_token_off_loopback(engine):
    from blockrag.server import ServerConfig, create_app

    # the auth rules of a server bound to all interfaces; the test still only connects to 127.0.0.1
    doc = {"documents": [{"id": "auth.md", "text": "A note about the tide."}]}
    open_cfg = ServerConfig(store=engine.config.store, host="0.0.0.0")
    with running(create_app(open_cfg, engine)) as url:
        r = httpx.post(url + "/v1/documents", json=doc)
        assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]
        assert httpx.delete(url + "/v1/documents/bank.md").status_code == 401
        assert httpx.get(url + "/health").json()["writes_need_token"] is True
    cfg = ServerConfig(store=engine.config.store, host="0.0.0.0", api_key="s3cret")
    with running(create_app(cfg, engine)) as url:
        assert httpx.post(url + "/v1/documents", json=doc).status_code == 401
        r = httpx.post(url + "/v1/documents", json=doc, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.delete(url + "/v1/documents/auth.md", headers={"authorization": "Basic s3cret"}).status_code == 401
        assert httpx.post(url + "/v1/retrieve", json={"query": "tide"}).status_code == 200  # reads stay open
        ok = httpx.post(url + "/v1/documents", json=doc, headers={"authorization": "Bearer s3cret"}, timeout=120)
        assert ok.status_code == 200, ok.text
        r = httpx.delete(url + "/v1/documents/auth.md", headers={"authorization": "Bearer s3cret"}, timeout=60)
        assert r.status_code == 200


def _chat(base, engine, question=QUESTION, **extra):
    return httpx.post(base + "/v1/chat/completions", timeout=120,
                      json={"model": engine.model_id, "max_tokens": 4,
                            "messages": [{"role": "user", "content": question}], **extra})


def test_queue_bound_timeout_and_retrieval_isolation(engine, base):
    gen = engine.generator
    gen.gate.clear()
    gen.entered.clear()
    results = {}
    try:
        held = threading.Thread(target=lambda: results.setdefault("held", _chat(base, engine)))
        held.start()
        assert gen.entered.wait(30)  # the worker is inside a generation, holding the model
        # retrieval does not wait for the generation
        t = time.perf_counter()
        for _ in range(5):
            assert httpx.post(base + "/v1/retrieve", json={"query": "copper roof", "k": 2}).status_code == 200
        assert time.perf_counter() - t < 5.0
        # a request whose time-out passes while it waits in the queue gets 504
        waiting = [threading.Thread(target=lambda i=i: results.setdefault(f"w{i}", _chat(base, engine, timeout=1.0)))
                   for i in range(2)]
        for w in waiting:
            w.start()
        deadline = time.monotonic() + 10
        while engine.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.queue_depth == 2
        full = _chat(base, engine)  # queue_size=2: the third is refused at once
        assert full.status_code == 503 and full.headers["retry-after"] == "2"
        assert "busy" in full.json()["error"]["message"]
        for w in waiting:
            w.join(30)
        assert [results[f"w{i}"].status_code for i in range(2)] == [504, 504]
        assert "took longer" in results["w0"].json()["error"]["message"]
    finally:
        gen.gate.set()
    held.join(120)
    assert results["held"].status_code == 200
    assert _metric(base, "blockrag_queue_rejected_total") >= 1


def test_client_disconnect_cancels_generation(engine, base):
    before = _metric(base, "blockrag_generations_cancelled_total", reason="disconnect")
    body = {"model": engine.model_id, "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Tell me everything about the lighthouse."}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        tokens = 0
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '"content": ""' not in line:
                tokens += 1
                if tokens == 2:
                    break  # leave after two tokens: the connection closes here
    t = time.perf_counter()
    while _metric(base, "blockrag_generations_cancelled_total", reason="disconnect") <= before:
        assert time.perf_counter() - t < 60, "the generation was not cancelled"
        time.sleep(0.2)
    # the worker is free again: the next answer does not wait for 198 more tokens
    assert _chat(base, engine, max_tokens=2).status_code == 200


def test_client_disconnect_cancels_a_non_streamed_generation(engine, base):
    before = _metric(base, "blockrag_generations_cancelled_total", reason="disconnect")
    body = json.dumps({"model": engine.model_id, "max_tokens": 200,
                       "messages": [{"role": "user", "content": "Tell me everything about the railway."}]})
    port = int(base.rsplit(":", 1)[1])
    gen = engine.generator
    gen.gate.clear()  # hold the generation before its first token, so it cannot finish before the server looks
    gen.entered.clear()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            assert gen.entered.wait(60)  # the worker is inside the generation
        time.sleep(2.0)  # the socket is closed: the server notices within its polling interval
    finally:
        gen.gate.set()
    t = time.perf_counter()
    while _metric(base, "blockrag_generations_cancelled_total", reason="disconnect") <= before:
        assert time.perf_counter() - t < 60, "the generation was not cancelled"
        time.sleep(0.2)
    assert _chat(base, engine, max_tokens=2).status_code == 200


def test_streamed_server_error_is_an_error_event(engine, base):
    engine.generator.fail_on = "EXPLODE"
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="injected failure"):
            for _ in client.chat.completions.create(model=engine.model_id, stream=True, max_tokens=6,
                                                    messages=[{"role": "user", "content": "EXPLODE the bank"}]):
                pass
        r = _chat(base, engine, question="EXPLODE the savings bank")
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    finally:
        engine.generator.fail_on = None
    assert _chat(base, engine, max_tokens=2).status_code == 200  # the worker survived


def test_health_metrics_and_page(engine, base):
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["generate"] and h["chunks"] >= 4 and h["writes_need_token"] is False
    text = httpx.get(base + "/metrics").text
    for name in ("blockrag_requests_total", "blockrag_request_seconds_bucket", "blockrag_queue_depth",
                 "blockrag_generations_in_flight", "blockrag_kv_cache_hits_total", "blockrag_tokens_total"):
        assert name in text
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "app.js" in page.text


def test_cli_serve_refuses_bad_input_in_one_line(tmp_path, capsys):
    from blockrag.cli import main

    assert main(["serve", "--store", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no store at") and "\n" not in err


def test_cli_parses_serve_flags():
    from blockrag.cli import build_parser
    from blockrag.server import from_args

    args = build_parser().parse_args(["serve", "--store", "s", "--port", "9001", "--max-body-mb", "1"])
    cfg = from_args(args)
    assert (cfg.host, cfg.port, cfg.max_body_bytes, cfg.loopback, cfg.writes_need_token) == \
        ("127.0.0.1", 9001, 1 << 20, True, False)
    assert from_args(build_parser().parse_args(["serve", "--store", "s", "--host", "0.0.0.0"])).writes_need_token

"""Helpers for the server tests: a tiny store with a kv index, a real uvicorn on a free loopback port, and a
generator wrapper that can hold a generation at a gate (to test queueing, time-outs and isolation)."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

XSS_TITLE = '<img src=x onerror="window.__xss=1">Harbour <b>notes</b>'
XSS_TEXT = ("The harbour master of Lisk keeps the tide book. <script>window.__xss=2</script> "
            "<img src=x onerror=\"window.__xss=3\"> Its cover is painted blue.")

CORPUS = [
    ("bank.md", "Veloria Savings Bank", "The Veloria Savings Bank was founded by the merchant Tobias Renn in 1784. "
     "Its headquarters stand on Harbour Street in Merrowgate."),
    ("lighthouse.md", "Merrowgate lighthouse", "The lighthouse of Merrowgate has a copper roof. It was rebuilt in "
     "1890 after a storm destroyed the wooden tower."),
    ("railway.md", "The Corvane Railway", "A narrow-gauge railway connects Merrowgate to the mining town of Ashby. "
     "Its steam engine, the Grey Heron, still runs on Sundays."),
    ("harbour.md", XSS_TITLE, XSS_TEXT),
]


_template: list = []  # the folder of the first store built in this test run


def build_store(folder):
    """bm25 + kv over the tiny corpus, opened at ``folder``. The kv index encodes every chunk with SmolLM2
    once per test run: later calls copy the first store (each test module then writes to its own copy)."""
    import shutil

    from blockrag.collection import Collection
    from blockrag.documents import Document
    from blockrag.models import ModelNotAvailable

    folder = Path(folder)
    if not _template:
        template = folder.parent / (folder.name + "-template")
        collection = Collection(template, chunk_tokens=64, overlap=0, progress=False)
        collection.build_index("bm25")
        try:
            collection.build_index("kv")
        except ModelNotAvailable as err:
            pytest.skip(str(err))
        collection.add_documents([Document(id=i, title=t, text=x) for i, t, x in CORPUS])
        collection.close()
        _template.append(template)
    shutil.copytree(_template[0], folder)
    return Collection(folder, progress=False)


class GatedGenerator:
    """Delegates to a real Generator; while ``gate`` is cleared, a generation waits before its first token."""

    def __init__(self, inner):
        self.inner = inner
        self.store = inner.store
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: str | None = None  # a question containing this raises mid-stream (after one token)

    def generate(self, question, chunks, stream=False, **kw):
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("test gate never opened")
        if self.fail_on and self.fail_on in question:
            if not stream:
                raise RuntimeError("injected failure")
            return _Failing(self.inner.generate(question, chunks, stream=True, **kw))
        return self.inner.generate(question, chunks, stream=stream, **kw)


class _Failing:
    """A stream that yields one real piece, then fails (a server error in the middle of an answer)."""

    def __init__(self, inner):
        self.inner, self.n, self.result = inner, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.n >= 2:
            raise RuntimeError("injected failure after the first tokens")
        self.n += 1
        return next(self.inner)


@contextlib.contextmanager
def running(app):
    """A real uvicorn serving ``app`` on a free 127.0.0.1 port, in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def gated_engine(folder, **config):
    """A warmed server Engine over a fresh demo store in ``folder`` whose generator is a GatedGenerator
    (bm25, k=2, turbo unless ``config`` says otherwise)."""
    from blockrag.server import ServerConfig
    from blockrag.server.engine import Engine

    collection = build_store(folder)
    gen = GatedGenerator(collection.index("kv").generator())
    config = ServerConfig(store=str(collection.store.folder), **{"retriever": "bm25", "k": 2, "mode": "turbo",
                                                                 **config})
    eng = Engine(config, collection=collection, generator=gen)
    eng.warm_up()
    try:
        yield eng
    finally:
        eng.close()

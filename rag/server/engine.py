"""The server's engine: the store, retrieval, and one generation worker behind a bounded queue.

One Generator serves one generation at a time (its model and cache buffer are not re-entrant), so
generations are handed to a single worker thread through a bounded queue. Retrieval never enters that
queue: it runs in the web server's thread pool under the read side of a readers-writer lock, so a slow
answer never holds up a retrieve-only request. Writes (adding or deleting documents) take the model
(KV encoding uses it) and the write side of the lock.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .citations import citation
from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The generation queue is at its bound."""


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers (writes are rare and must not starve)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class GenJob:
    """One generation request; the worker reports ``(kind, payload)`` events to ``out`` on ``loop``:
    ``("start", {"queue_ms", "cache_hits", "cache_misses"})``, ``("token", text)``, ``("done", GenerationResult)``
    or ``("error", (status, message))``."""

    question: str
    chunks: list
    mode: str
    max_new_tokens: int
    deadline: float  # time.monotonic() after which the job is dropped
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    cancel_reason: str = "disconnect"

    def emit(self, kind: str, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel.set()


class Engine:
    """``Engine(config)`` opens the store, loads the generator from the store's ``kv`` index and starts the
    worker; ``retrieve``, ``submit``, ``add_documents`` and ``delete_document`` are what the app calls."""

    def __init__(self, config: ServerConfig, collection=None, generator=None):
        from blockrag.collection import Collection

        self.config = config
        self.metrics = Metrics()
        if collection is None:
            if not (Path(config.store) / "store.sqlite").exists():
                raise FileNotFoundError(f"no store at {config.store}; create one with "
                                        f"`blockrag index PATH --store {config.store} --index kv`")
            collection = Collection(config.store, progress=False)
        self.collection = collection
        self.model_id = "blockrag"
        self._own_generator = generator is None
        if generator is None and config.generate and "kv" in collection.indexes:
            kv = collection.index("kv")
            generator = kv.generator()  # the caches computed at indexing time, and their model
        if "kv" in collection.indexes:
            from blockrag.models import DEFAULT_GENERATOR

            self.model_id = collection.index("kv").model_name or DEFAULT_GENERATOR
        self.generator = generator if config.generate else None
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, config.queue_size))
        self._model_lock = threading.Lock()
        self._rw = RWLock()
        self._refreshing = threading.Lock()
        self._seen_generation = collection.generation
        self._pipelines: dict = {}
        self.metrics.queue_depth.set_function(self._jobs.qsize)
        # a replica pool (blockrag.distributed.serving) runs one generation per replica at once
        n_workers = max(1, int(getattr(self.generator, "concurrency", 1)))
        # --batch N: one worker decodes up to N generations together (continuous batching)
        batched = int(getattr(config, "batch", 1)) > 1 and n_workers == 1 and hasattr(self.generator, "generate_batch")
        self._batcher = None  # the BatchEngine of the batched worker (built at its first job)
        self._workers = [threading.Thread(target=self._work_batched if batched else self._work,
                                          name=f"blockrag-generation-{i}", daemon=True) for i in range(n_workers)]
        for worker in self._workers:
            worker.start()
        self._worker = self._workers[0]

    # ------------------------------------------------------------- retrieval
    def _pipeline(self, retriever: str | None = None):
        """A retrieval-only Pipeline per retriever name, built once (``Pipeline.retrieve`` keeps no state)."""
        from blockrag.pipeline import Pipeline

        name = retriever or self.config.retriever
        pipe = self._pipelines.get(name)
        if pipe is None:
            pipe = self._pipelines[name] = Pipeline(self.collection, name, k=self.config.k)
        return pipe

    def check_retriever(self, name: str) -> None:
        """Raises ValueError (one line) when ``name`` is not a retriever this store can serve."""
        try:
            with self._rw.read():
                self._pipeline(name)
        except Exception as err:  # noqa: BLE001  (registry errors, KeyError for a missing index, ...)
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ValueError(f"retriever {name!r} cannot be used here: {message}") from None

    def refresh(self) -> None:
        """Reload the indexes when another process changed the store (its generation moved on)."""
        refresh = getattr(self.collection, "refresh", None)
        if refresh is None or self.collection.generation == self._seen_generation:
            return
        if not self._refreshing.acquire(blocking=False):
            return  # another request is reloading; this one reads the state it has
        try:
            with self._rw.write():  # not the model lock: loading indexes does not run the model
                kv_before = self.collection.indexes.get("kv")
                if refresh():
                    self._reobtain(kv_before)
                self._seen_generation = self.collection.generation
        finally:
            self._refreshing.release()

    def _reobtain(self, kv_before) -> None:
        """After the indexes changed: pipelines hold the previous index objects, and so may the generator."""
        self._pipelines.clear()
        kv = self.collection.indexes.get("kv")
        if self._own_generator and self.generator is not None and kv is not None and kv is not kv_before:
            self.generator = kv.generator()

    def retrieve(self, question: str, k: int, retriever: str | None = None) -> tuple[list, list[dict], float]:
        """(chunks, citations, retrieve_ms); thread-safe against writes."""
        self.refresh()
        with self._rw.read():
            if self.collection.store.count_chunks() == 0:
                return [], [], 0.0
            chunks, scores, ms = self._pipeline(retriever).retrieve(question, k)
            titles = {}
            for c in chunks:
                if c.doc_id not in titles:
                    doc = self.collection.store.document(c.doc_id)
                    titles[c.doc_id] = (doc.title if doc else "") or c.doc_id
        return chunks, [citation(i + 1, c, s, titles[c.doc_id]) for i, (c, s) in enumerate(zip(chunks, scores))], ms

    # ------------------------------------------------------------ generation
    def submit(self, job: GenJob) -> None:
        if self.generator is None:
            raise RuntimeError("this server has no generator")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.inc()
            raise QueueFull(f"{self._jobs.maxsize} generations are already waiting") from None

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                self.metrics.cancelled.labels(job.cancel_reason).inc()
                continue
            if time.monotonic() > job.deadline:
                self.metrics.cancelled.labels("timeout").inc()
                job.emit("error", (504, "the request timed out while waiting for the generator"))
                continue
            with self._model_lock if not getattr(self.generator, "concurrent", False) else nullcontext():
                self._one(job)

    def _start(self, job: GenJob) -> None:
        """Queue-wait and cache metrics of a job whose generation begins, and its "start" event."""
        waited = time.monotonic() - job.enqueued
        self.metrics.queue_wait.observe(waited)
        store = self.generator.store
        hits = sum(1 for c in job.chunks if c in store)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(job.chunks) - hits)
        job.emit("start", {"queue_ms": waited * 1e3, "cache_hits": hits, "cache_misses": len(job.chunks) - hits})

    def _done(self, job: GenJob, result) -> None:
        cached = 0 if result.mode == "full" else max(result.n_context_tokens - result.n_recomputed, 0)
        self.metrics.tokens.labels("cached").inc(cached)
        self.metrics.tokens.labels("prefilled").inc(result.n_context_tokens + result.n_question_tokens - cached)
        self.metrics.tokens.labels("generated").inc(len(result.token_ids))
        job.emit("done", result)

    def _work_batched(self) -> None:
        """The worker with ``--batch N``: generations in the cached modes join one BatchEngine between its steps
        (up to N decoded together) and leave when they end; other modes run one at a time as in :meth:`_work`.
        Cancellation and time-outs are checked between steps."""
        from blockrag.attention_kv.batch import BATCH_MODES, BatchEngine, BatchRequest

        live: dict = {}  # Handle -> GenJob
        limit = int(self.config.batch)
        while True:
            jobs = []
            try:
                if not live:
                    jobs.append(self._jobs.get())
                while len(live) + len(jobs) < limit:
                    jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                pass
            for job in jobs:
                if job is None:
                    for j in live.values():
                        j.emit("error", (503, "the server is shutting down"))
                    return
                if job.cancel.is_set():
                    self.metrics.cancelled.labels(job.cancel_reason).inc()
                elif time.monotonic() > job.deadline:
                    self.metrics.cancelled.labels("timeout").inc()
                    job.emit("error", (504, "the request timed out while waiting for the generator"))
                elif job.mode not in BATCH_MODES:
                    with self._model_lock:
                        self._one(job)
                else:
                    if self._batcher is None or (not live and self._batcher.gen is not self.generator):
                        self._batcher = BatchEngine(self.generator, max_batch=limit)
                    self._start(job)
                    h = self._batcher.submit(BatchRequest(job.question, job.chunks, job.max_new_tokens,
                                                          mode=job.mode))
                    h.on_piece = lambda text, job=job: job.emit("token", text)
                    live[h] = job
                    self.metrics.in_flight.inc()
            for h, job in list(live.items()):
                timeout = time.monotonic() > job.deadline
                if job.cancel.is_set() or timeout:
                    self.metrics.cancelled.labels("timeout" if timeout else job.cancel_reason).inc()
                    if timeout:
                        job.emit("error", (504, "the request timed out while generating"))
                    self._batcher.cancel(h)
                    del live[h]
                    self.metrics.in_flight.dec()
            if not live:
                continue
            try:
                with self._model_lock:
                    finished = self._batcher.step()
            except Exception as err:  # noqa: BLE001  (reported to every client of the batch, the worker lives on)
                log.exception("batched generation failed")
                for job in live.values():
                    job.emit("error", (500, f"generation failed: {type(err).__name__}: {err}"))
                    self.metrics.in_flight.dec()
                live.clear()
                self._batcher = None
                continue
            for h in finished:
                job = live.pop(h, None)
                if job is not None:
                    self._done(job, h.result)
                    self.metrics.in_flight.dec()

    def _one(self, job: GenJob) -> None:
        self.metrics.in_flight.inc()
        try:
            self._generate(job)
        except Exception as err:  # noqa: BLE001  (reported to the client, the worker lives on)
            log.exception("generation failed")
            job.emit("error", (500, f"generation failed: {type(err).__name__}: {err}"))
        finally:
            self.metrics.in_flight.dec()

    def _generate(self, job: GenJob) -> None:
        self._start(job)
        pieces = self.generator.generate(job.question, job.chunks, mode=job.mode,
                                         max_new_tokens=job.max_new_tokens, stream=True)
        for piece in pieces:
            if job.cancel.is_set():
                self.metrics.cancelled.labels(job.cancel_reason).inc()
                return  # the suspended stream is dropped; the next request starts afresh
            if time.monotonic() > job.deadline:
                self.metrics.cancelled.labels("timeout").inc()
                job.emit("error", (504, "the request timed out while generating"))
                return
            job.emit("token", piece)
        self._done(job, pieces.result)

    def warm_up(self) -> dict:
        """Load what the first request would otherwise load (embedder, tokenizer, JIT-compiled scorers, model
        kernels), with a question made of a stored passage's words so that every scoring path runs."""
        timings = {}
        ids = self.collection.store.chunk_ids()[:1]
        if not ids:
            return timings
        chunks = self.collection.get_chunks(ids)
        question = " ".join(chunks[0].text.split()[:12])
        t = time.perf_counter()
        self.retrieve(question, self.config.k)
        timings["retrieve_s"] = time.perf_counter() - t
        if self.generator is not None:
            t = time.perf_counter()
            with self._model_lock:
                self.generator.generate(question, chunks, mode=self.config.mode, max_new_tokens=2)
            timings["generate_s"] = time.perf_counter() - t
        return timings

    # ---------------------------------------------------------------- writes
    def add_documents(self, docs) -> dict:
        with self._model_lock, self._rw.write():
            kv_before = self.collection.indexes.get("kv")
            report = self.collection.add_documents(docs)
            self._reobtain(kv_before)
            self._seen_generation = self.collection.generation
        return {"documents_added": report.documents_added, "documents_unchanged": report.documents_unchanged,
                "chunks_added": report.chunks_added, "chunks_removed": report.chunks_removed,
                "notes": list(report.notes), "generation": self._seen_generation}

    def delete_document(self, doc_id: str) -> int | None:
        """Chunks removed, or None when there is no such document."""
        with self._model_lock, self._rw.write():
            if not self.collection.store.has_document(doc_id):
                return None
            kv_before = self.collection.indexes.get("kv")
            removed = self.collection.delete_documents([doc_id])
            self._reobtain(kv_before)
            self._seen_generation = self.collection.generation
        return removed

    def documents(self, limit: int = 500) -> list[dict]:
        with self._rw.read():
            out = []
            for doc_id in self.collection.store.document_ids()[:limit]:
                doc = self.collection.store.document(doc_id)
                out.append({"id": doc_id, "title": doc.title if doc else ""})
        return out

    def stats(self) -> dict:
        with self._rw.read():
            store = self.collection.store
            return {"documents": store.count_documents(), "chunks": store.count_chunks(),
                    "generation": self.collection.generation, "indexes": sorted(self.collection.indexes)}

    def close(self) -> None:
        for _ in self._workers:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                pass

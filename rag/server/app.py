"""The FastAPI app: OpenAI-compatible chat completions (SSE), retrieval, documents, health, metrics, web UI."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from anyio import CapacityLimiter, to_thread
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .citations import best_span
from .config import MODES, ServerConfig
from .engine import Engine, GenJob, QueueFull
from .metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` (the OpenAI shape) with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def clean_text(text: str) -> str:
    """Lone surrogates (valid JSON, invalid UTF-8) become U+FFFD, so nothing downstream fails to encode them."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# ----------------------------------------------------------------- request bodies
class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat request; ``mode``, ``k``, ``retriever`` and ``timeout`` are blockrag's extra fields."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    mode: Literal["full", "turbo", "block", "blend"] | None = None
    k: int | None = Field(default=None, ge=1, le=50)
    retriever: str | None = None
    timeout: float | None = Field(default=None, gt=0)


class RetrieveRequest(BaseModel):
    query: str = Field(min_length=1)
    k: int | None = Field(default=None, ge=1, le=100)
    retriever: str | None = None


class DocumentIn(BaseModel):
    id: str = Field(min_length=1, max_length=512)
    text: str
    title: str | None = None
    metadata: dict = Field(default_factory=dict)


class DocumentsRequest(BaseModel):
    documents: list[DocumentIn] = Field(min_length=1)


def _content(message: Message) -> str:
    if isinstance(message.content, list):  # [{"type": "text", "text": ...}, ...]
        return "\n".join(p.get("text", "") for p in message.content if isinstance(p, dict))
    return message.content or ""


def _document(d: DocumentIn):
    from blockrag.documents import Document

    text, title = clean_text(d.text), clean_text(d.title) if d.title is not None else None
    if title is None:  # as the folder loader does: a leading markdown heading is the title
        first, _, rest = text.lstrip().partition("\n")
        title, text = (first.lstrip("#").strip(), rest.strip()) if first.startswith("#") else ("", text)
    return Document(id=clean_text(d.id), text=text, title=title, metadata=d.metadata)


# ----------------------------------------------------------------- middleware
class Guard:
    """Pure ASGI middleware: Host header check, body size limit (413), per-route counts and latencies.

    Bodies are read up front (up to the limit) so that a chunked upload without Content-Length is bounded too.
    """

    def __init__(self, app, config: ServerConfig, metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.hosts = config.host_names()

    async def _reply(self, send, status: int, message: str, scope) -> None:
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.requests.labels("rejected", scope.get("method", ""), str(status)).inc()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        scope.setdefault("state", {})["t0"] = start
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts and host not in self.hosts:
                return await self._reply(send, 400, f"Host header {host!r} is not allowed by this server", scope)
        limit = self.config.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await self._reply(send, 400, "bad Content-Length header", scope)
        if declared > limit:
            return await self._reply(send, 413, f"request body of {declared} bytes exceeds the limit of {limit}", scope)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await self._reply(send, 413, f"request body exceeds the limit of {limit} bytes", scope)
            replayed = False

            async def receive_again():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
        else:
            receive_again = receive
        status = [500]

        async def send_and_measure(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = getattr(scope.get("route"), "path", None) or ("static" if scope["path"].startswith("/static/")
                                                                     else "unmatched")
                self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

        await self.app(scope, receive_again, send_and_measure)


# ----------------------------------------------------------------- the app
def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The app over ``config.store`` (or over ``engine``, already built)."""
    engine = engine or Engine(config)
    app = FastAPI(title="blockrag", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    metrics = engine.metrics
    app.add_middleware(Guard, config=config, metrics=metrics)
    # Retrieval is CPU-bound Python: a few threads (FIFO) are enough, and the shared pool stays free for the rest.
    retrieval_slots = CapacityLimiter(config.retrieval_threads)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return JSONResponse(error_body(err.status, err.message, err.kind), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404:
            message = f"no such resource: {request.url.path}"
        return JSONResponse(error_body(err.status_code, message), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        parts = []
        for e in err.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return JSONResponse(error_body(400, "invalid request: " + "; ".join(parts)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)

    def require_token(request: Request) -> None:
        if not config.writes_need_token:
            return
        if not config.api_key:
            raise ApiError(401, "write endpoints are disabled: this server is not bound to loopback and was "
                                "started without --api-key (or BLOCKRAG_API_KEY)", "authentication_error",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <api key>)",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------- reads
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        stats = await run_in_threadpool(engine.stats)
        return {"status": "ok", "model": engine.model_id, "generate": engine.generator is not None,
                "modes": list(MODES), "default_mode": config.mode, "k": config.k,
                "queue_depth": engine.queue_depth, "queue_size": config.queue_size,
                "writes_need_token": config.writes_need_token, **stats}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                             "owned_by": "blockrag"}]}

    async def _retrieve(question: str, k: int | None, retriever: str | None):
        if retriever is not None:
            try:
                engine.check_retriever(retriever)
            except ValueError as err:
                raise ApiError(400, str(err)) from None
        try:
            return await asyncio.wait_for(to_thread.run_sync(engine.retrieve, question, k or config.k, retriever,
                                                             limiter=retrieval_slots),
                                          config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"retrieval took longer than {config.request_timeout_s:.0f} s",
                           "server_error") from None

    @app.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest):
        chunks, cites, ms = await _retrieve(clean_text(body.query), body.k, body.retriever)
        return {"object": "list", "query": body.query, "data": cites, "timings": {"retrieve_ms": ms}}

    @app.get("/v1/documents")
    async def list_documents():
        return {"object": "list", "data": await run_in_threadpool(engine.documents)}

    # ------------------------------------------------------------- writes
    @app.post("/v1/documents", dependencies=[Depends(require_token)])
    async def add_documents(body: DocumentsRequest):
        docs = [_document(d) for d in body.documents]
        try:
            report = await run_in_threadpool(engine.add_documents, docs)
        except ValueError as err:  # bad input the collection refused (one line)
            raise ApiError(400, f"documents refused: {err}") from None
        return {"object": "ingest", **report}

    @app.delete("/v1/documents/{doc_id:path}", dependencies=[Depends(require_token)])
    async def delete_document(doc_id: str):
        removed = await run_in_threadpool(engine.delete_document, doc_id)
        if removed is None:
            raise ApiError(404, f"no document with id {doc_id!r}", "not_found_error")
        return {"id": doc_id, "object": "document", "deleted": True, "chunks_removed": removed}

    # ------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        t0 = request.scope.get("state", {}).get("t0", time.perf_counter())
        if body.model not in (engine.model_id, "blockrag"):
            raise ApiError(404, f"model {body.model!r} is not served here (try {engine.model_id!r})",
                           "not_found_error")
        users = [m for m in body.messages if m.role == "user"]
        question = clean_text(_content(users[-1])).strip() if users else ""
        if not question:
            raise ApiError(400, "the last user message is empty: nothing to answer")
        if engine.generator is None:
            raise ApiError(503, "this server has no generator: the store has no kv index (build it with "
                                "`blockrag index PATH --store STORE --index kv`) or it runs with --no-generate",
                           "server_error")
        mode = body.mode or config.mode
        max_new = min(body.max_completion_tokens or body.max_tokens or config.max_new_tokens,
                      config.max_new_tokens_limit)
        timeout = min(body.timeout or config.request_timeout_s, config.request_timeout_s)
        deadline = time.monotonic() + timeout - (time.perf_counter() - t0)
        chunks, cites, retrieve_ms = await _retrieve(question, body.k, body.retriever)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk_obj(delta: dict, finish=None, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        if not chunks:
            text = "No passage in the store matches this question."
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                     "prompt_tokens_details": {"cached_tokens": 0}}
            timings = {"retrieve_ms": retrieve_ms}
            if not body.stream:
                return _completion(cid, created, engine.model_id, text, "stop", usage, [], timings)

            async def empty():
                yield _sse(chunk_obj({"role": "assistant", "content": text}, "stop", usage=usage, citations=[],
                                     timings=timings))
                yield "data: [DONE]\n\n"
            return StreamingResponse(empty(), media_type="text/event-stream")

        loop = asyncio.get_running_loop()
        job = GenJob(question, chunks, mode, max_new, deadline, loop, asyncio.Queue())
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(503, f"server busy: {err}; retry shortly", "server_error", {"Retry-After": "2"}) from None

        def finish(result, started: dict) -> tuple[dict, dict]:
            for c in cites:
                c["span"] = best_span(c["text"], result.answer)
            cached = 0 if result.mode == "full" else max(result.n_context_tokens - result.n_recomputed, 0)
            prompt = result.n_context_tokens + result.n_question_tokens
            usage = {"prompt_tokens": prompt, "completion_tokens": len(result.token_ids),
                     "total_tokens": prompt + len(result.token_ids),
                     "prompt_tokens_details": {"cached_tokens": cached}}
            timings = {"retrieve_ms": retrieve_ms, "queue_ms": started.get("queue_ms", 0.0),
                       "ttft_ms": result.ttft_ms, "tokens_per_s": result.decode_tokens_per_s,
                       "cached_tokens": cached, "prefilled_tokens": prompt - cached,
                       "recomputed_tokens": result.n_recomputed, "mode": result.mode,
                       "cache_hits": started.get("cache_hits"), "cache_misses": started.get("cache_misses"),
                       "total_ms": (time.perf_counter() - t0) * 1e3}
            return usage, timings

        async def next_event():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(job.out.get(), timeout=remaining + 1.0)

        async def next_event_or_disconnect():
            """Like next_event, but a client that went away (non-streamed: nothing is sent until the end,
            so only polling notices) cancels the job."""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    return await asyncio.wait_for(job.out.get(), timeout=min(remaining, 0.5))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel_reason = "disconnect"
                        job.cancel.set()
                        return "gone", None

        if not body.stream:
            pieces, started = [], {}
            try:
                while True:
                    try:
                        kind, payload = await next_event_or_disconnect()
                    except asyncio.TimeoutError:
                        job.cancel_reason = "timeout"
                        raise ApiError(504, f"the request took longer than {timeout:.0f} s", "server_error") from None
                    if kind == "gone":
                        return Response(status_code=499)  # nobody reads it; recorded in the metrics
                    if kind == "start":
                        started = payload
                    elif kind == "token":
                        if not pieces:
                            metrics.ttft.labels(mode).observe(time.perf_counter() - t0)
                        pieces.append(payload)
                    elif kind == "error":
                        raise ApiError(payload[0], payload[1], "server_error")
                    else:
                        usage, timings = finish(payload, started)
                        finish_reason = "length" if len(payload.token_ids) >= max_new else "stop"
                        return _completion(cid, created, engine.model_id, payload.answer, finish_reason, usage,
                                           cites, timings)
            finally:
                job.cancel.set()  # a no-op once done; stops the worker when the client is gone or timed out

        async def events():
            first, started = True, {}
            try:
                yield _sse(chunk_obj({"role": "assistant", "content": ""}, citations=cites,
                                     timings={"retrieve_ms": retrieve_ms}))
                while True:
                    try:
                        kind, payload = await next_event()
                    except asyncio.TimeoutError:
                        job.cancel_reason = "timeout"
                        yield _sse(error_body(504, f"the request took longer than {timeout:.0f} s", "server_error"))
                        return
                    if kind == "start":
                        started = payload
                    elif kind == "token":
                        if first:
                            metrics.ttft.labels(mode).observe(time.perf_counter() - t0)
                            first = False
                        yield _sse(chunk_obj({"content": payload}))
                    elif kind == "error":
                        yield _sse(error_body(payload[0], payload[1], "server_error"))
                        return
                    else:
                        usage, timings = finish(payload, started)
                        finish_reason = "length" if len(payload.token_ids) >= max_new else "stop"
                        yield _sse(chunk_obj({}, finish_reason, usage=usage, citations=cites, timings=timings))
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancel.set()  # client gone (the generator is closed here) or finished: stop the worker

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _completion(cid, created, model, text, finish_reason, usage, cites, timings) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage, "citations": cites, "timings": timings}


"""``blockrag serve``: an OpenAI-compatible HTTP server and web UI over a store.

    blockrag serve --store .blockrag/store            # then open http://127.0.0.1:8000/

    from blockrag.server import ServerConfig, create_app
    app = create_app(ServerConfig(store="my_store"))  # an ASGI app (FastAPI)

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` = server-sent events; extra fields ``mode``,
``k``, ``retriever``, ``timeout``; the answer carries ``citations`` and ``timings``), ``POST /v1/retrieve``,
``GET|POST /v1/documents``, ``DELETE /v1/documents/{id}``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web UI).
"""
from __future__ import annotations

from .config import ServerConfig, add_arguments, from_args, is_loopback

__all__ = ["ServerConfig", "add_arguments", "create_app", "from_args", "is_loopback", "run", "serve"]


def create_app(config: ServerConfig, engine=None):
    """The ASGI app over ``config.store`` (loads and warms the model unless ``engine`` is given)."""
    from .app import create_app as _create

    return _create(config, engine)


def serve(config: ServerConfig, engine=None) -> None:
    """Load the store and the model, warm them up, and serve until interrupted."""
    import logging
    import time

    import uvicorn

    from .engine import Engine

    if not config.loopback and not config.api_key:
        logging.getLogger(__name__).warning(
            "bound to %s without --api-key: the write endpoints are disabled", config.host)
    t = time.perf_counter()
    if engine is None and config.ray is not None and config.generate:
        from blockrag.distributed.serving import ReplicaPool

        pool = ReplicaPool(config.store, replicas=config.replicas, routing=config.routing,
                           tier_bytes=int(config.tier_mb * (1 << 20)), address=config.ray or None)
        print(f"{config.replicas} generator replicas on Ray ({config.routing} routing)", flush=True)
        engine = Engine(config, generator=pool)
    engine = engine or Engine(config)
    print(f"loaded store {config.store} ({engine.stats()['chunks']} chunks), model {engine.model_id} "
          f"in {time.perf_counter() - t:.1f}s", flush=True)
    if config.warmup:
        warm = engine.warm_up()
        print("warmed up: " + ", ".join(f"{k}={v:.1f}" for k, v in warm.items()), flush=True)
    app = create_app(config, engine)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"serving on http://{host}:{config.port}/  (OpenAI base URL http://{host}:{config.port}/v1)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)


def run(args) -> int:
    """The ``blockrag serve`` subcommand; bad flags or a missing store: one line on stderr, exit 2."""
    import sys
    from pathlib import Path

    config = from_args(args)
    problems = [msg for bad, msg in [
        (not (Path(config.store) / "store.sqlite").exists(),
         f"no store at {config.store}; create one with `blockrag index PATH --store {config.store} --index kv`"),
        (not 0 <= config.port <= 65535, f"--port must be 0-65535, got {config.port}"),
        (config.k < 1, f"-k must be at least 1, got {config.k}"),
        (config.max_new_tokens < 1, f"--max-new-tokens must be at least 1, got {config.max_new_tokens}"),
        (config.queue_size < 1, f"--queue-size must be at least 1, got {config.queue_size}"),
        (config.request_timeout_s <= 0, f"--timeout must be positive, got {config.request_timeout_s}"),
        (config.max_body_bytes < 1024, "--max-body-mb must be at least 0.001 (1 KiB)"),
        (config.ray is not None and config.replicas < 1, f"--replicas must be at least 1, got {config.replicas}"),
    ] if bad]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    if config.ray is not None:
        from blockrag.distributed import RayNotInstalled, require_ray

        try:
            require_ray()
        except RayNotInstalled as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    serve(config)
    return 0

"""Server settings and their command-line flags (argparse only: importing this module loads nothing heavy)."""
from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field

MODES = ("full", "turbo", "block", "blend")
API_KEY_ENV = "BLOCKRAG_API_KEY"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; a wildcard or a LAN address is not loopback."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """Everything ``blockrag serve`` can be told; :func:`blockrag.server.create_app` takes one."""

    store: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    retriever: str = "hybrid"
    k: int = 4
    mode: str = "turbo"
    max_new_tokens: int = 96
    max_new_tokens_limit: int = 512
    generate: bool = True
    queue_size: int = 32
    retrieval_threads: int = 4
    request_timeout_s: float = 120.0
    max_body_bytes: int = 8 << 20
    allowed_hosts: list[str] = field(default_factory=list)
    warmup: bool = True
    ray: str | None = None  # generator replicas on Ray: "" = RAY_ADDRESS or a new local cluster
    replicas: int = 2
    routing: str = "cache-aware"
    tier_mb: float = 1024.0  # each replica's fast KV tier (GPU memory, else host RAM)
    batch: int = 1  # generations decoded together by the worker (continuous batching, cached modes); 1 = one at a time

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def writes_need_token(self) -> bool:
        """Writes always need the token off loopback; on loopback only when a key was given."""
        return bool(self.api_key) or not self.loopback

    def host_names(self) -> set[str] | None:
        """Host header values accepted (None: any). Loopback binds accept only loopback names, which is what
        stops a DNS-rebinding page from talking to a local server under a name of its own."""
        names = {h.lower() for h in self.allowed_hosts}
        if "*" in names:
            return None
        if self.loopback:
            return names | {"127.0.0.1", "localhost", "[::1]", "::1"}
        if self.host in ("0.0.0.0", "::") and not names:
            return None  # a wildcard bind without --allow-host: the token is the protection
        return names | {self.host.lower()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store folder built with `blockrag index`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"bearer token for the write endpoints (default: ${API_KEY_ENV}); "
                        "required for writes whenever --host is not loopback")
    p.add_argument("--retriever", default="hybrid", help="bm25, dense, hybrid or an index name")
    p.add_argument("-k", type=int, default=4, help="passages per answer")
    p.add_argument("--mode", default="turbo", choices=MODES, help="default generation mode")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--no-generate", action="store_true", help="retrieval only (no generator loaded)")
    p.add_argument("--queue-size", type=int, default=32, help="generation requests waiting at most (then 503)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request time limit in seconds")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (then 413)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="extra Host header value to accept (repeatable; '*' accepts any)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="generate on replicas on a Ray cluster (ADDRESS, else RAY_ADDRESS or a new local one); "
                        "needs the ray extra")
    p.add_argument("--replicas", type=int, default=2, help="generator replicas with --ray")
    p.add_argument("--routing", default="cache-aware", choices=("cache-aware", "round-robin"),
                   help="with --ray: to the replica holding most of the passages, or in turn")
    p.add_argument("--tier-mb", type=float, default=1024.0, help="with --ray: each replica's fast KV tier")
    p.add_argument("--batch", type=int, default=1,
                   help="generations decoded together in turbo/block mode (continuous batching; 1 = one at a time)")


def from_args(args) -> ServerConfig:
    return ServerConfig(store=args.store, host=args.host, port=args.port,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        retriever=args.retriever, k=args.k, mode=args.mode, max_new_tokens=args.max_new_tokens,
                        generate=not args.no_generate, queue_size=args.queue_size, request_timeout_s=args.timeout,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), allowed_hosts=list(args.allow_host),
                        ray=getattr(args, "ray", None), replicas=getattr(args, "replicas", 2),
                        routing=getattr(args, "routing", "cache-aware"), tier_mb=getattr(args, "tier_mb", 1024.0),
                        batch=getattr(args, "batch", 1))

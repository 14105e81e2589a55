"""Prometheus metrics of one server (its own registry, so two apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Request counts and latencies per route, TTFT, queue depth, cache hits, tokens."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("blockrag_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("blockrag_request_seconds", "HTTP request latency until the last byte",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("blockrag_ttft_seconds", "time to first token, from the request's arrival",
                              ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("blockrag_queue_wait_seconds", "time a generation waited for the model",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("blockrag_queue_depth", "generation requests waiting for the model", registry=r)
        self.in_flight = Gauge("blockrag_generations_in_flight", "generations running now", registry=r)
        self.rejected = Counter("blockrag_queue_rejected", "generations refused because the queue was full",
                                registry=r)
        self.cancelled = Counter("blockrag_generations_cancelled", "generations stopped early",
                                 ["reason"], registry=r)
        self.cache_hits = Counter("blockrag_kv_cache_hits", "retrieved passages whose KV cache was stored",
                                  registry=r)
        self.cache_misses = Counter("blockrag_kv_cache_misses", "retrieved passages encoded at question time",
                                    registry=r)
        self.tokens = Counter("blockrag_tokens", "tokens by kind (cached, prefilled, generated)", ["kind"],
                              registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics, on a registry per app so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mta_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "mta_request_latency_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.fusion_seconds = Histogram(
            "mta_fusion_seconds", "Fuse + materialize one adapter (cache misses)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.cache_hits = Counter("mta_adapter_cache_hits", "Adapter cache hits", registry=r)
        self.cache_misses = Counter("mta_adapter_cache_misses", "Adapter cache misses", registry=r)
        self.generated_tokens = Counter("mta_generated_tokens", "Completion tokens", ["personalized"], registry=r)
        self.bank = Gauge("mta_bank_info", "Loaded bank (value 1)", ["bank_version"], registry=r)
        self.bank_reloads = Counter("mta_bank_reloads", "Bank reloads", ["result"], registry=r)

    def set_bank(self, version: str) -> None:
        self.bank.clear()
        self.bank.labels(bank_version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

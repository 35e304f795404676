"""Prometheus metrics of one worker process (``GET /metrics``, text format).

A registry per process: each worker is scraped on its own (or through the shared socket, where
the ``worker`` label says which one answered). The cache and token figures are read from the
node when scraped (``NodeCollector``), never copied on the hot path. HSM operations are timed by
wrapping the node token's ``run``/``run_on_anchor`` (every ``hsm.ops`` call goes through one).
"""

from __future__ import annotations

import functools
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, worker: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kms_http_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("kms_http_request_seconds", "request latency by route",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.hsm_ops = Counter("kms_hsm_operations", "token operations by name",
                               ["operation"], registry=r)
        self.hsm_latency = Histogram("kms_hsm_operation_seconds", "token operation latency",
                                     ["operation"], buckets=_LATENCY, registry=r)
        self.refused = Counter("kms_authz_refusals", "requests refused by the client policy",
                               ["role"], registry=r)
        self.remote_invalidations = Counter(
            "kms_remote_invalidations", "cache invalidations received from other nodes",
            registry=r)
        self.inflight = Gauge("kms_http_inflight", "requests being handled (data and admin)",
                              registry=r)
        self.inline = Counter("kms_dek_inline", "DEK fetches answered on the event loop "
                              "(cache hit, SQLite store)", registry=r)
        self.shed = Counter("kms_requests_shed", "requests refused: worker at max_concurrent",
                            registry=r)
        self.client_cut = Counter("kms_client_connections_cut", "connections aborted at once: "
                                  "the client at max_connections_per_client", registry=r)
        self.client_limited = Counter("kms_client_requests_limited", "requests refused 429: "
                                      "the client over its rate or in-flight cap", ["code"],
                                      registry=r)
        self.refusals_unrecorded = Counter("kms_audit_refusals_aggregated", "refusals counted "
                                           "in an aggregate audit record instead of their own",
                                           registry=r)
        self._children: dict[tuple, tuple] = {}
        info = Gauge("kms_worker", "this worker process (value 1)", ["worker", "pid"],
                     registry=r)
        import os
        info.labels(str(worker), str(os.getpid())).set(1)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request and its latency. The labelled children are kept per (route,
        method, status): ``labels()`` per request cost twice the update (measured)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:   # routes are a fixed set; bounded all the same
                self._children.clear()
            children = self._children[key] = (self.requests.labels(route, method, str(status)),
                                              self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, kms) -> None:
        self.registry.register(NodeCollector(kms))
        _time_token(kms.token, self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class NodeCollector:
    """Cache counters and import refusals, read from the node at scrape time."""

    def __init__(self, kms):
        self.kms = kms

    def describe(self):
        return []

    def collect(self):
        stats = self.kms.cache.stats() if self.kms.started else {}
        for name in ("hits", "misses", "evictions", "invalidations", "flushes",
                     "integrity_failures"):
            c = CounterMetricFamily(f"kms_cache_{name}", f"DEK cache {name}")
            c.add_metric([], stats.get(name, 0))
            yield c
        g = GaugeMetricFamily("kms_cache_entries", "DEKs in the encrypted cache")
        g.add_metric([], stats.get("entries", 0))
        yield g
        refused = len(self.kms.report.refused) if self.kms.report else 0
        g = GaugeMetricFamily("kms_import_refusals", "release bundles refused at start-up")
        g.add_metric([], refused)
        yield g
        g = GaugeMetricFamily("kms_releases_held", "releases imported into the token")
        g.add_metric([], len(self.kms.report.held) if self.kms.report else 0)
        yield g


def _time_token(token, metrics: Metrics) -> None:
    """Count and time every token operation of this node (the layer's entry points)."""
    for name in ("run", "run_on_anchor"):
        inner = getattr(token, name)

        @functools.wraps(inner)
        def timed(operation, *args, _inner=inner, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(operation, *args, **kw)
            finally:
                metrics.hsm_ops.labels(operation).inc()
                metrics.hsm_latency.labels(operation).observe(time.perf_counter() - t0)
        setattr(token, name, timed)

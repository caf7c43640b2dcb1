"""All Prometheus metrics in one place, on a registry of their own (several proxies can live
in one process, e.g. in tests), plus the JSON snapshot served at /metrics.

Names: namespace ``comfy_ws_proxy_``, counters end in ``_total``, durations are
``_seconds`` histograms, label values are bounded (no user ids, no prompt ids).

No ``_created`` series: prometheus_client adds one per counter and histogram child (a
timestamp that doubles the series count and that Prometheus itself ignores in the text
format). They are dropped from our exposition (``_WithoutCreated``) rather than with
``prometheus_client.disable_created_metrics()``: that is a process-wide switch, so in a host
application that embeds the proxy (``add_routes``) it would also remove the host's own
``_created`` series, and the host (or ``PROMETHEUS_DISABLE_CREATED_SERIES`` unset, or any
library calling ``enable_created_metrics()``) would turn ours back on.
"""
from __future__ import annotations

import gc
import resource
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

NS = "comfy_ws_proxy"

DIRECTIONS = ("to_client", "to_comfy")
TYPE_CLASSES = ("status", "progress", "execution", "output", "preview", "text", "control", "error", "other")
PROMPT_OUTCOMES = ("accepted", "queued", "rejected", "rate_limited", "queue_full", "success", "error",
                   "interrupted", "timed_out", "cancelled", "resubmitted", "lost", "moved", "fenced")
AUTH_REASONS = ("missing_token", "malformed", "alg_not_allowed", "unknown_kid", "bad_signature", "expired",
                "not_yet_valid", "bad_issuer", "bad_audience", "missing_claim", "invalid", "timeout",
                "origin", "too_many_connections_ip")
BREAKER_STATES = ("closed", "half_open", "open")
# Why the server closed a TCP connection itself (server.py), and its accept errors.
TCP_DROP_REASONS = ("shed_idle", "over_total", "over_address", "first_request_timeout")
ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "other")

_EVENT_CLASS = {
    "status": "status", "progress": "progress", "progress_state": "progress",
    "execution_start": "execution", "execution_cached": "execution", "executing": "execution",
    "execution_success": "execution", "execution_error": "execution", "execution_interrupted": "execution",
    "executed": "output",
}


def type_class(kind: str) -> str:
    return _EVENT_CLASS.get(kind, "other")


class _WithoutCreated:
    """A registry's families minus the ``_created`` samples of counters, histograms and
    summaries, whatever prometheus_client's process-wide switch says (see the module doc)."""

    _WITH_CREATED = ("counter", "histogram", "summary", "gaugehistogram")

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if family.type in self._WITH_CREATED:
                created = family.name + "_created"
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = [s for s in family.samples if s.name != created]
                family = kept
            yield family


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._exported = _WithoutCreated(r)
        self.started = time.monotonic()
        self.sessions = Gauge(f"{NS}_sessions", "Sessions held (connected or not)", registry=r)
        self.connections = Gauge(f"{NS}_connections", "Client WebSocket connections open", registry=r)
        self.upstream_connections = Gauge(f"{NS}_upstream_connections", "Upstream sockets to ComfyUI open",
                                          registry=r)
        self.messages = Counter(f"{NS}_messages_total", "Messages relayed", ["direction", "type_class"],
                                registry=r)
        self.bytes = Counter(f"{NS}_bytes_total", "Bytes relayed", ["direction", "type_class"], registry=r)
        self.prompts = Counter(f"{NS}_prompts_total", "Prompts by outcome", ["outcome"], registry=r)
        self.queued_prompts = Gauge(f"{NS}_queued_prompts", "Prompts waiting in the proxy queue", registry=r)
        self.backend_jobs = Gauge(f"{NS}_backend_jobs", "Our jobs a backend holds (being sent, pending, running)",
                                  ["backend"], registry=r)
        self.breaker_state = Gauge(f"{NS}_breaker_state", "Breaker state (1 for the current state)",
                                   ["backend", "state"], registry=r)
        self.breaker_transitions = Counter(f"{NS}_breaker_transitions_total", "Breaker state changes",
                                           ["backend", "to"], registry=r)
        self.upstream_reconnects = Counter(f"{NS}_upstream_reconnects_total", "Upstream sockets re-established",
                                           registry=r)
        self.jwks_fetches = Counter(f"{NS}_jwks_fetches_total", "JWKS fetches", ["outcome"], registry=r)
        self.auth_failures = Counter(f"{NS}_auth_failures_total", "Refused upgrades", ["reason"], registry=r)
        self.client_errors = Counter(f"{NS}_client_errors_total", "error messages sent to clients", ["code"],
                                     registry=r)
        self.slow_consumers = Counter(f"{NS}_slow_consumer_closes_total",
                                      "Clients closed because they stopped reading", registry=r)
        self.tcp_connections = Gauge(f"{NS}_tcp_connections",
                                     "TCP connections held by the server (HTTP and WebSocket)", registry=r)
        self.tcp_dropped = Counter(f"{NS}_tcp_connections_dropped_total",
                                   "TCP connections the server closed or refused for its limits", ["reason"],
                                   registry=r)
        self.accept_errors = Counter(f"{NS}_accept_errors_total", "Failed accepts (EMFILE: out of descriptors)",
                                     ["error"], registry=r)
        self.http_duration = Histogram(f"{NS}_http_request_duration_seconds", "HTTP request durations",
                                       ["handler", "method", "code"], registry=r)
        self.comfy_duration = Histogram(f"{NS}_comfy_request_duration_seconds", "Calls to ComfyUI",
                                        ["backend", "outcome"], registry=r)
        self.loop_lag = Histogram(f"{NS}_event_loop_lag_seconds", "IOLoop scheduling lag",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
                                  registry=r)
        # the result cache: requests by result (hit, miss, shared: waited for an identical one,
        # bypass: not cacheable or opted out), its size, what it stored, what it dropped
        self.cache_requests = Counter(f"{NS}_cache_requests_total", "Result cache lookups by result", ["result"],
                                      registry=r)
        self.cache_entries = Gauge(f"{NS}_cache_entries", "Results in the result cache", registry=r)
        self.cache_bytes = Gauge(f"{NS}_cache_bytes", "Bytes of output files the result cache's entries hold",
                                 registry=r)
        self.cache_stored_bytes = Counter(f"{NS}_cache_stored_bytes_total", "Bytes copied into the result cache",
                                          registry=r)
        self.cache_evictions = Counter(f"{NS}_cache_evictions_total", "Result cache entries dropped", ["reason"],
                                       registry=r)
        self.uptime = Gauge(f"{NS}_uptime_seconds", "Seconds since start", registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self.started)
        # Create the bounded label values up front so dashboards see zeros, not gaps.
        # (children looked up once: relayed() runs for every message)
        self._relay = {(d, c): (self.messages.labels(d, c), self.bytes.labels(d, c))
                       for d in DIRECTIONS for c in TYPE_CLASSES}
        for o in PROMPT_OUTCOMES:
            self.prompts.labels(o)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for outcome in ("ok", "error"):
            self.jwks_fetches.labels(outcome)
        for reason in TCP_DROP_REASONS:
            self.tcp_dropped.labels(reason)
        for error in ACCEPT_ERRORS:
            self.accept_errors.labels(error)
        for result in ("hit", "miss", "shared", "bypass"):
            self.cache_requests.labels(result)
        for reason in ("expired", "bounds"):
            self.cache_evictions.labels(reason)

    def relayed(self, direction: str, kind_class: str, size: int) -> None:
        messages, relayed_bytes = self._relay[direction, kind_class]
        messages.inc()
        relayed_bytes.inc(size)

    def set_breaker(self, backend: str, state: str) -> None:
        for s in BREAKER_STATES:
            self.breaker_state.labels(backend, s).set(1 if s == state else 0)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self._exported), CONTENT_TYPE_LATEST


def memory_usage() -> dict:
    """RSS from /proc (current) or getrusage (peak), plus the Python-level figures."""
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss": rss if rss is not None else peak, "max_rss": peak,
            "python_allocated_blocks": sys.getallocatedblocks(),
            "gc_counts": list(gc.get_count())}

"""Wiring: make_app(settings) -> (Application, ProxyState); start()/stop() in a fixed order;
add_routes() mounts the proxy into an existing Tornado Application under a prefix.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import PeriodicCallback

from . import __version__
from .auth import build_verifier
from .backend import Backend, BackendPool
from .breaker import CircuitBreaker
from .connection import ClientConnection, ClientPinger
from .dispatch import PromptService
from .metrics import Metrics
from .session import SessionRegistry
from .store import Store
from .web import (DemoHandler, DemoWorkflowHandler, HealthHandler, LiveHandler, MetricsHandler, OutputsHandler,
                  PrometheusHandler, ReadyHandler, snapshot)

log = logging.getLogger(__name__)
access_log = logging.getLogger("comfy_ws_proxy.access")


class LoopLagMonitor:
    """Measures how late a PeriodicCallback runs: the IOLoop's scheduling lag."""

    def __init__(self, metrics: Metrics, interval: float = 0.5):
        self.metrics = metrics
        self.interval = interval
        self.lag = 0.0
        self._expected = None
        self._timer = PeriodicCallback(self._tick, interval * 1000)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._expected is not None:
            self.lag = max(0.0, now - self._expected)
            self.metrics.loop_lag.observe(self.lag)
        self._expected = now + self.interval

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()


class ProxyState:
    """Every long-lived object of one proxy, built once and passed to handlers."""

    def __init__(self, settings, *, clock: Callable[[], float] = time.monotonic,
                 http_client: AsyncHTTPClient | None = None):
        self.settings = settings
        self.clock = clock
        self.version = __version__
        self.metrics = Metrics()
        self.http = http_client or AsyncHTTPClient(force_instance=True, max_clients=100)
        self._own_http = http_client is None
        breaker = CircuitBreaker(failure_threshold=settings.breaker_failure_threshold,
                                 open_seconds=settings.breaker_open_ms / 1000,
                                 max_open_seconds=settings.breaker_max_open_ms / 1000)
        backend = Backend(settings.comfy_url, self.http, breaker=breaker, clock=clock,
                          connect_timeout=settings.comfy_connect_timeout_ms / 1000,
                          request_timeout=settings.comfy_request_timeout_ms / 1000,
                          probe_timeout=settings.breaker_probe_timeout_ms / 1000,
                          probe_interval_ms=min(500, settings.breaker_open_ms))
        self.metrics.set_breaker(backend.name, backend.breaker.state.value)
        backend.add_breaker_listener(lambda old, new: self._breaker_changed(backend.name, new.value))
        self.pool = BackendPool([backend])
        self.store = Store(settings.store_path)
        self.registry = SessionRegistry(settings, self.pool, self.store, self.metrics, clock)
        self.prompts = PromptService(self.registry, self.store, self.pool, self.metrics, settings, clock)
        self.registry.prompts = self.prompts
        self.verifier = build_verifier(settings, self.http,
                                       on_jwks_fetch=lambda outcome: self.metrics.jwks_fetches.labels(outcome).inc())
        self.lag_monitor = LoopLagMonitor(self.metrics, settings.loop_lag_interval_ms / 1000)
        self.pinger = ClientPinger(self.registry, settings)
        self.started = False
        self.metrics.queued_prompts.set(sum(self.store.queue_sizes().values()))

    def _breaker_changed(self, backend: str, state: str) -> None:
        self.metrics.set_breaker(backend, state)
        self.metrics.breaker_transitions.labels(backend, state).inc()

    @property
    def loop_lag(self) -> float:
        return self.lag_monitor.lag

    def snapshot(self, detailed: bool = False) -> dict:
        return snapshot(self, detailed)

    def handler_kwargs(self) -> dict:
        return {"app_state": self}

    def ws_kwargs(self) -> dict:
        return {"registry": self.registry, "prompts": self.prompts, "verifier": self.verifier,
                "settings": self.settings, "metrics": self.metrics, "app_state": self}

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the timers (call on the running IOLoop)."""
        if self.started:
            return
        self.started = True
        if self.settings.no_verify:
            log.warning("!!! NO_VERIFY=true: tokens are NOT verified; anyone can be any user. Development only !!!")
        self.pool.start()
        self.registry.start()
        self.prompts.start()
        self.lag_monitor.start()
        self.pinger.start()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new sockets, tell clients, let in-flight ComfyUI calls
        finish within the grace period, stop timers, close sockets, flush the store."""
        self.registry.accepting = False
        for session in self.registry.all():
            for conn in list(session.connections):
                conn.close_for_shutdown()
        grace = self.settings.shutdown_grace_ms / 1000 if grace is None else grace
        await asyncio.gather(*(b.wait_idle(grace) for b in self.pool))
        self.lag_monitor.stop()
        self.pinger.stop()
        self.prompts.stop()
        self.registry.stop()
        self.pool.stop()
        await self.registry.close_links()
        self.store.close()
        if self._own_http:
            self.http.close()
        self.started = False


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's log_function: path only (a ?token= query must never reach a log line)."""
    request = handler.request
    status = handler.get_status()
    duration = request.request_time()
    state = getattr(handler, "app_state", None)
    if state is not None:
        name = type(handler).__name__.replace("Handler", "").lower()
        state.metrics.http_duration.labels(name, request.method, str(status)).observe(duration)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access_log.log(level, "%d %s %s %s %.1fms", status, request.method, request.path, request.remote_ip,
                   1000 * duration)


def routes(state: ProxyState, prefix: str = "") -> list:
    prefix = prefix.rstrip("/")
    kw = state.handler_kwargs()
    return [
        (prefix + r"/ws", ClientConnection, state.ws_kwargs()),
        (prefix + r"/health", HealthHandler, kw),
        (prefix + r"/live", LiveHandler, kw),
        (prefix + r"/ready", ReadyHandler, kw),
        (prefix + r"/metrics", MetricsHandler, kw),
        (prefix + r"/metrics/prometheus", PrometheusHandler, kw),
        (prefix + r"/outputs/([0-9a-f-]{36})(?:/(view))?", OutputsHandler, kw),
    ] + ([
        (prefix + r"/demo", DemoHandler, kw),
        (prefix + r"/demo/workflows/([a-z0-9-]+)\.json", DemoWorkflowHandler, kw),
    ] if state.settings.demo_page else [])


def application_settings(settings) -> dict:
    # Tornado's own frame cap is a hard stop (close 1009); the proxy's max_message_bytes below it
    # gives a clear message_too_large error without closing.
    return {
        # (pings: ClientPinger, not Tornado's per-connection ping task)
        "websocket_max_message_size": settings.max_message_bytes * 4,
        "log_function": log_request,
    }


def make_app(settings, *, clock: Callable[[], float] = time.monotonic,
             http_client: AsyncHTTPClient | None = None) -> tuple[tornado.web.Application, ProxyState]:
    """Build the standalone Application and its state. Call ``state.start()`` once the loop runs."""
    state = ProxyState(settings, clock=clock, http_client=http_client)
    app = tornado.web.Application(routes(state), **application_settings(settings))
    return app, state


def add_routes(app: tornado.web.Application, settings, prefix: str = "/comfy", **kwargs) -> ProxyState:
    """Mount the proxy into an existing Tornado Application under ``prefix``.

    Returns the ProxyState: call its ``start()`` once the IOLoop runs and ``await stop()``
    on shutdown (its timers and sockets belong to it, not to the host app).
    """
    state = ProxyState(settings, **kwargs)
    app.add_handlers(r".*", routes(state, prefix))
    for key, value in application_settings(settings).items():
        if key.startswith("websocket_"):
            app.settings.setdefault(key, value)
    return state

"""Wiring: make_app(settings) -> (Application, ProxyState); start()/stop() in a fixed order;
add_routes() mounts the proxy into an existing Tornado Application under a prefix.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Callable

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import PeriodicCallback

from . import __version__
from .api.demo import ClientScriptHandler, DemoHandler, DemoWorkflowHandler
from .api.events import JobEvents, JobEventsHandler
from .api.jobs import (
    GenerateHandler,
    JobCancelHandler,
    JobHandler,
    JobImageHandler,
    JobsHandler,
    JobViews,
)
from .api.openapi import DocsHandler, OpenApiHandler
from .api.ops import (
    HealthHandler,
    LiveHandler,
    MetricsHandler,
    PrometheusHandler,
    ReadyHandler,
    snapshot,
)
from .api.outputs import DownloadSlots, OutputsHandler
from .api.templates import TemplateHandler, TemplatesHandler
from .api.uploads import UploadHandler
from .auth import build_verifier
from .config import BackendSpec, backend_specs
from .backends.backend import Backend
from .backends.breaker import CircuitBreaker
from .backends.capabilities import Capabilities
from .backends.links import LinkManager
from .backends.pool import BackendPool
from .backends.scheduler import Scheduler
from .config import ConfigError
from .gateway.connection import ClientConnection, ClientPinger
from .gateway.session import SessionRegistry
from .jobs.cache import BlobStore, ResultCache
from .jobs.isolation import UserIsolation
from .jobs.queue import JobQueue
from .jobs.validate import validate_prompt
from .jobs.reconcile import Reconciler
from .jobs.service import JobService
from .jobs.templates import TemplateRegistry
from .jobs.tracker import JobTracker
from .jobs.uploads import UploadStore
from .jobs.webhooks import WebhookSender
from .metrics import Metrics
from .store import StoreError, open_store

log = logging.getLogger(__name__)
access_log = logging.getLogger("comfy_ws_proxy.access")

# How often a backend checks whether its breaker's half-open probe is due: a probe starts at
# most this late after the open period ends (and never later than one open period).
PROBE_CHECK_MS = 500

# Calls to ComfyUI in flight at once (POSTs, /history, /outputs streams, probes): each holds a
# descriptor, which server.RESERVED_DESCRIPTORS keeps aside from users.
HTTP_CLIENT_MAX_CLIENTS = 100


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
    """Every long-lived object of one proxy, built once, in dependency order (store and
    backends, then the jobs, then the faces), started and stopped in a fixed order."""

    def __init__(self, settings, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, http_client: AsyncHTTPClient | None = None):
        self.settings = settings
        self.clock = clock
        self.version = __version__
        self.metrics = Metrics()
        self.http = http_client or AsyncHTTPClient(force_instance=True, max_clients=HTTP_CLIENT_MAX_CLIENTS)
        self._own_http = http_client is None
        backends = [self._backend(spec) for spec in backend_specs(settings)]
        self.pool = BackendPool(backends, queue_depth=settings.backend_queue_depth,
                                scheduler=Scheduler(clock, settings.affinity_max_wait_s),
                                validator=validate_prompt if settings.validate_prompts else None)
        self.templates = self._templates(settings)  # (before the store: a bad directory stops the start)
        self.store = open_store(settings.store_path)
        self._remember_capabilities(wall)
        # the domain
        self.tracker = JobTracker(self.store, self.metrics, clock, wall, settings.share_comfy_status,
                                  settings.strip_comfy_errors)
        for backend in self.pool:
            self.metrics.backend_jobs.labels(backend.name).set_function(
                lambda name=backend.name: self.tracker.placed_count(name))
        self._spare_client_ids: dict[tuple[str, str], str] = {}
        self.links = LinkManager(settings, self._client_id, self.tracker, self.metrics)
        self.queue = JobQueue(self.tracker, self.pool, self.links, self.metrics, clock,
                              max_attempts=settings.max_submit_attempts,
                              per_owner=settings.max_comfy_jobs_per_user)
        self.reconciler = Reconciler(self.tracker, self.queue, self.pool, self.links, settings, clock)
        self.isolation = UserIsolation(self.store.secret("user-folders"), file_inputs=settings.file_inputs,
                                       shared_cache_nodes=settings.shared_cache_nodes,
                                       shared_input_folder=settings.shared_input_folder) \
            if settings.isolate_users else None
        self.webhooks = WebhookSender(self.store, settings, wall, settings.public_url)
        if self.webhooks.enabled:
            self.tracker.webhook_message = self.webhooks.message
            self.tracker.outbox_listeners.append(self.webhooks.tick)
        self.downloads = DownloadSlots(settings.max_downloads_per_user)
        upload_dir = settings.upload_dir or (settings.store_path + ".uploads" if settings.store_path != ":memory:"
                                             else "")
        folder_of = self.isolation.folder if self.isolation is not None else \
            UserIsolation(self.store.secret("user-folders")).folder
        self.uploads = UploadStore(upload_dir, folder_of)
        if self.templates is not None:
            self.templates.upload_reference = self.uploads.reference
        self.cache = self._result_cache(settings, clock) if settings.result_cache else None
        self.service = JobService(self.tracker, self.queue, self.reconciler, self.pool, self.links, self.metrics,
                                  settings, clock, self.isolation, self.webhooks if self.webhooks.enabled else None,
                                  self.templates, cache=self.cache)
        self.queue.uploads = self.uploads
        self.idempotency_in_flight: set[tuple[str, str]] = set()  # (owner, key) being accepted now
        self.job_events: list = []  # the event logs of the routes mounted (JobEvents)
        # the WebSocket face
        self.registry = SessionRegistry(settings, self.service, self.metrics, clock)
        # A link is kept while its user has a socket open or a job not yet finished.
        self.links.keep = lambda owner, backend: self.registry.connected(owner) or self.tracker.has_unfinished(owner)
        self.verifier = build_verifier(settings, self.http,
                                       on_jwks_fetch=lambda outcome: self.metrics.jwks_fetches.labels(outcome).inc(),
                                       wall=wall)
        self.lag_monitor = LoopLagMonitor(self.metrics, settings.loop_lag_interval_ms / 1000)
        self.pinger = ClientPinger(self.registry, settings, wall)
        self.started = False
        self.metrics.queued_prompts.set(len(self.queue.fair))

    def _backend(self, spec: BackendSpec) -> Backend:
        """One ComfyUI, with its own breaker, probe and capabilities."""
        s = self.settings
        breaker = CircuitBreaker(failure_threshold=s.breaker_failure_threshold, open_seconds=s.breaker_open_ms / 1000,
                                 max_open_seconds=s.breaker_max_open_ms / 1000)
        backend = Backend(spec.url, self.http, name=spec.name, breaker=breaker, clock=self.clock,
                          connect_timeout=s.comfy_connect_timeout_ms / 1000,
                          request_timeout=s.comfy_request_timeout_ms / 1000,
                          probe_timeout=s.breaker_probe_timeout_ms / 1000,
                          probe_interval_ms=min(PROBE_CHECK_MS, s.breaker_open_ms), weight=spec.weight,
                          labels=spec.labels, capabilities_refresh_s=s.capabilities_refresh_s)
        self.metrics.set_breaker(backend.name, backend.breaker.state.value)
        backend.add_breaker_listener(lambda old, new: self._breaker_changed(backend.name, new.value))
        return backend

    def _remember_capabilities(self, wall: Callable[[], float]) -> None:
        """Each backend's capabilities as last learned come from the store, so that a backend
        down when the proxy starts is still known (a job only it could run waits for it; one
        nobody can run is refused at once); each new set learned is kept there."""
        try:
            saved = self.store.capabilities()
        except StoreError:
            saved = {}
        kept: dict[str, str | None] = {}  # backend -> the fingerprint of what the store has

        def keep(b: Backend) -> None:
            caps = b.capabilities
            if caps is None or caps.remembered or caps.fingerprint == kept.get(b.name):
                return
            try:
                self.store.save_capabilities(b.name, caps.to_json(), wall())
                kept[b.name] = caps.fingerprint
            except StoreError as e:
                log.warning("could not keep backend %s's capabilities: %s", b.name, e)
        for backend in self.pool:
            if backend.name in saved:
                try:
                    backend.capabilities = Capabilities.from_json(saved[backend.name][0])
                except (ValueError, KeyError, TypeError):
                    log.warning("the stored capabilities of backend %s are unreadable; ignored", backend.name)

            kept[backend.name] = backend.capabilities.fingerprint if backend.capabilities else None
            backend.capability_listeners.append(keep)

    def _model_exists(self, folder: str, name: str) -> bool | None:
        """Has some backend this model file? None while a backend's model lists are unknown
        (ComfyUI's own validation then says)."""
        known = [b.capabilities for b in self.pool]
        if any(c is not None and name in c.models.get(folder, ()) for c in known):
            return True
        if any(c is None or folder not in c.models for c in known):
            return None
        return False

    def _templates(self, settings) -> TemplateRegistry | None:
        """The templates of TEMPLATES_DIR, loaded (None without one)."""
        if not settings.templates_dir:
            return None
        if not os.path.isdir(settings.templates_dir):
            raise ConfigError(f"TEMPLATES_DIR: {settings.templates_dir} is not a directory")
        templates = TemplateRegistry(settings.templates_dir, max_templates=settings.templates_max_count,
                                     max_file_bytes=settings.templates_max_file_bytes,
                                     interval_s=settings.templates_reload_interval_s,
                                     model_exists=self._model_exists)
        templates.load()
        return templates

    def _result_cache(self, settings, clock) -> ResultCache:
        """RESULT_CACHE. A result is kept under the environment of the backend that made it, and
        looked up under those of the backends known now (their capabilities' fingerprints)."""
        pool = self.pool

        def fingerprints() -> list[str]:
            return sorted({b.capabilities.fingerprint for b in pool if b.capabilities is not None})

        def fingerprint_of(name: str) -> str | None:
            backend = pool.get(name)
            return backend.capabilities.fingerprint if backend is not None and backend.capabilities else None

        async def learn() -> None:
            await asyncio.gather(*(b.learn_capabilities(b.request_timeout) for b in pool))
        cache_dir = settings.cache_dir or (settings.store_path + ".cache" if settings.store_path != ":memory:"
                                           else "")
        cache = ResultCache(self.tracker, self.pool, BlobStore(cache_dir), self.metrics, settings,
                            fingerprints=fingerprints, fingerprint_of=fingerprint_of, learn=learn,
                            folder_of=self.isolation.folder if self.isolation is not None else None,
                            upload_exists=self.uploads.exists)
        cache.kick = self.queue.kick
        return cache

    def _client_id(self, owner: str, backend: str) -> str:
        """The pair's durable client id; while the store fails, one for this process only (a
        restart then loses the routing of that pair's running job: the watchdog finds it)."""
        try:
            return self.store.client_id(owner, backend)
        except StoreError:
            return self._spare_client_ids.setdefault((owner, backend), str(uuid.uuid4()))

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
        return {"registry": self.registry, "service": self.service, "verifier": self.verifier,
                "settings": self.settings, "metrics": self.metrics}

    def user_kwargs(self) -> dict:
        return {"verifier": self.verifier, "metrics": self.metrics}

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
        self.service.start()
        self.lag_monitor.start()
        self.pinger.start()
        if self.webhooks.enabled:
            self.webhooks.start()
        if self.templates is not None:
            self.templates.start()

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
        self.service.stop()
        if self.templates is not None:
            self.templates.stop()
        if self.cache is not None:
            await self.cache.close(grace)
        await self.webhooks.stop()
        for events in self.job_events:
            events.close()
        self.registry.stop()
        self.pool.stop()
        await self.links.close_all()
        self.store.close()
        self.uploads.close()
        if self._own_http:
            self.http.close()
        self.started = False


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's log_function: path only (a ?token= query must never reach a log line)."""
    request = handler.request
    status = handler.get_status()
    duration = request.request_time()
    metrics = getattr(handler, "metrics", None)
    if isinstance(metrics, Metrics):
        name = type(handler).__name__.replace("Handler", "").lower()
        metrics.http_duration.labels(name, request.method, str(status)).observe(duration)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access_log.log(level, "%d %s %s %s %.1fms", status, request.method, request.path, request.remote_ip,
                   1000 * duration)


def routes(state: ProxyState, prefix: str = "") -> list:
    prefix = prefix.rstrip("/")
    kw = state.handler_kwargs()
    views = JobViews(state.service, state.settings, prefix)
    jobs_kw = {**state.user_kwargs(), "service": state.service, "settings": state.settings, "views": views}
    state.job_events.append(JobEvents(state.service, views, state.settings))
    return [
        (prefix + r"/ws", ClientConnection, state.ws_kwargs()),
        (prefix + r"/health", HealthHandler, kw),
        (prefix + r"/live", LiveHandler, kw),
        (prefix + r"/ready", ReadyHandler, kw),
        (prefix + r"/metrics", MetricsHandler, kw),
        (prefix + r"/metrics/prometheus", PrometheusHandler, kw),
        (prefix + r"/openapi\.json", OpenApiHandler, {"settings": state.settings, "prefix": prefix,
                                                   "version": state.version, "templates": state.templates}),
        (prefix + r"/templates/?", TemplatesHandler, {**state.user_kwargs(), "templates": state.templates}),
        (prefix + r"/templates/([^/]{1,200})", TemplateHandler,
         {**state.user_kwargs(), "templates": state.templates}),
        (prefix + r"/docs", DocsHandler),
        (prefix + r"/upload", UploadHandler, {**state.user_kwargs(), "uploads": state.uploads,
                                              "settings": state.settings}),
        (prefix + r"/generate", GenerateHandler, {**jobs_kw, "in_flight": state.idempotency_in_flight}),
        (prefix + r"/jobs/?", JobsHandler, {**jobs_kw, "in_flight": state.idempotency_in_flight}),
        (prefix + r"/jobs?/([0-9a-f-]{36})", JobHandler, jobs_kw),
        (prefix + r"/jobs?/([0-9a-f-]{36})/cancel", JobCancelHandler, jobs_kw),
        (prefix + r"/jobs?/([0-9a-f-]{36})/events", JobEventsHandler,
         {**state.user_kwargs(), "service": state.service, "events": state.job_events[-1],
          "settings": state.settings}),
        (prefix + r"/jobs?/([0-9a-f-]{36})/(?:image|outputs)/([^/]{1,64})/([0-9]{1,6})", JobImageHandler,
         {**state.user_kwargs(), "service": state.service, "pool": state.pool, "isolation": state.isolation,
          "downloads": state.downloads, "stall_timeout": state.settings.download_stall_timeout_s,
          "retention": state.settings.finished_prompt_retention_s, "cache": state.cache}),
        (prefix + r"/outputs/([0-9a-f-]{36})(?:/(view))?", OutputsHandler,
         {**state.user_kwargs(), "service": state.service, "pool": state.pool, "isolation": state.isolation,
          "downloads": state.downloads, "stall_timeout": state.settings.download_stall_timeout_s,
          "cache": state.cache}),
        (prefix + r"/static/comfy-ws-proxy-client\.js", ClientScriptHandler),
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


def make_app(settings, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
             http_client: AsyncHTTPClient | None = None) -> tuple[tornado.web.Application, ProxyState]:
    """Build the standalone Application and its state. Call ``state.start()`` once the loop runs."""
    state = ProxyState(settings, clock=clock, wall=wall, http_client=http_client)
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

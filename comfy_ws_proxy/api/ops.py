"""Operations endpoints: /health /live /ready /metrics (JSON and Prometheus)."""
from __future__ import annotations

import asyncio
import hmac
import time

from ..metrics import memory_usage
from .base import JsonHandler


class OpsHandler(JsonHandler):
    """An operator's endpoint: reads across the whole proxy, so it gets the whole state."""

    def initialize(self, app_state):
        self.app_state = app_state
        self.metrics = app_state.metrics


class HealthHandler(OpsHandler):
    def get(self):
        state = self.app_state
        self.write_json({"status": "ok", "version": state.version,
                         "uptime_seconds": round(time.monotonic() - state.metrics.started, 3)})


class LiveHandler(OpsHandler):
    """The process and its IOLoop answer (this handler ran on the loop)."""

    def get(self):
        self.write_json({"status": "alive", "loop_lag_seconds": round(self.app_state.loop_lag, 4)})


class ReadyHandler(OpsHandler):
    """Ready for traffic: accepting, the store writing, and at least one backend able to take
    work: its breaker not open, ComfyUI answering HTTP, its WebSocket not refusing us. The
    answer details every backend. Broken template files are listed in every answer
    (``templates``) but never make the proxy unready: the other templates serve."""

    def write_json(self, data, status: int = 200) -> None:
        if self.app_state.templates is not None:
            data = {**data, "templates": self.app_state.templates.status()}
        super().write_json(data, status)

    async def get(self):
        state = self.app_state
        if not state.registry.accepting:
            return self.write_json({"status": "not_ready", "reason": "shutting_down"}, 503)
        if not state.tracker.store_healthy:
            return self.write_json({"status": "not_ready", "reason": "store_unavailable"}, 503)
        backends = list(state.pool)
        reasons = await asyncio.gather(*(self._backend_reason(b) for b in backends))
        detail = {b.name: {"status": reason or "ready", "breaker": b.breaker.state.value,
                           "jobs": state.tracker.placed_count(b.name),
                           "capabilities_known": b.capabilities is not None,
                           "capabilities_remembered": b.capabilities is not None and b.capabilities.remembered}
                  for b, reason in zip(backends, reasons)}
        default = state.pool.default
        if all(reasons):
            reason = reasons[0] if len(backends) == 1 else "no_backend_ready"
            return self.write_json({"status": "not_ready", "reason": reason, "breaker": default.breaker.state.value,
                                    "backends": detail}, 503)
        self.write_json({"status": "ready", "breaker": default.breaker.state.value, "backends": detail})

    async def _backend_reason(self, backend) -> str | None:
        settings = self.app_state.settings
        if not backend.available:
            return "breaker_open"
        if not await backend.answers_recently(timeout=settings.breaker_probe_timeout_ms / 1000,
                                              max_age=settings.ready_cache_ms / 1000):
            return "comfy_unreachable"
        if backend.websocket_refused:
            return "comfy_websocket_refused"
        return None


def secret_ok(header: str, secret: str) -> bool:
    """Constant-time comparison of a Bearer header with the metrics secret."""
    scheme, _, value = (header or "").partition(" ")
    return hmac.compare_digest(value.strip().encode(), secret.encode()) and scheme.lower() == "bearer"


class MetricsHandler(OpsHandler):
    """GET /metrics: JSON (default) or Prometheus text when the scraper asks for text/plain
    or OpenMetrics via Accept. Both behind METRICS_SECRET."""

    def prepare(self):
        if not secret_ok(self.request.headers.get("Authorization", ""), self.app_state.settings.metrics_secret):
            self.set_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.write_json({"error": {"code": "unauthorized", "message": "A valid metrics secret is required"}},
                            401)

    def get(self):
        accept = self.request.headers.get("Accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return _write_prometheus(self)
        detailed = self.get_query_argument("detailed", "false").lower() in ("1", "true", "yes")
        self.write_json(self.app_state.snapshot(detailed))


class PrometheusHandler(OpsHandler):
    """GET /metrics/prometheus: the text exposition; public only if METRICS_PUBLIC is on."""

    def prepare(self):
        state = self.app_state
        if not state.settings.metrics_public and not secret_ok(self.request.headers.get("Authorization", ""),
                                                               state.settings.metrics_secret):
            self.set_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.write_json({"error": {"code": "unauthorized", "message": "A valid metrics secret is required"}},
                            401)

    def get(self):
        _write_prometheus(self)


def _write_prometheus(handler: JsonHandler) -> None:
    body, content_type = handler.app_state.metrics.exposition()
    handler.set_header("Content-Type", content_type)
    handler.finish(body)


def snapshot(state, detailed: bool) -> dict:
    """The JSON document of /metrics."""
    now = state.clock()
    registry = state.registry
    sessions = registry.all()
    queued = state.queue.fair.sizes()
    data = {
        "active_sessions": len(sessions),
        "active_connections": registry.connection_count(),
        "uptime_seconds": round(time.monotonic() - state.metrics.started, 3),
        "memory_usage": memory_usage(),
        "circuit_breaker_state": state.pool.default.breaker.state.value,
        "circuit_breakers": {b.name: b.breaker.state.value for b in state.pool},
        "backends": {b.name: {"breaker": b.breaker.state.value, "jobs": state.tracker.placed_count(b.name),
                              "labels": sorted(b.labels), "weight": b.weight,
                              "capabilities": None if b.capabilities is None else {
                                  "node_classes": len(b.capabilities.classes),
                                  "model_files": sum(len(v) for v in b.capabilities.models.values()),
                                  "comfyui_version": b.capabilities.comfyui_version,
                                  "vram_total": b.capabilities.vram_total,
                                  # (remembered: as last seen before a restart, not read since)
                                  "age_s": None if b.capabilities.remembered else
                                  round(state.clock() - b.capabilities.learned_at, 1)},
                              **state.pool.scheduler.snapshot().get(b.name, {})}
                     for b in state.pool},
        "queued_prompts": queued,
        "queued_prompts_total": sum(queued.values()),
        "event_loop_lag_seconds": round(state.loop_lag, 4),
    }
    if state.templates is not None:
        data["templates"] = state.templates.status()
    if detailed:
        data["sessions"] = [
            s.describe(now, {"upstream_connected": any(link.ready.is_set() for link in state.links.of(s.user_id)),
                             **state.tracker.describe(s.user_id)})
            for s in sessions]
    return data




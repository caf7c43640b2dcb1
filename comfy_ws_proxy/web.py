"""HTTP handlers: /health /live /ready /metrics (JSON and Prometheus), one JSON write_error."""
from __future__ import annotations

import hmac
import json
import os
import time
from urllib.parse import urlencode

import tornado.web
from tornado.httpclient import HTTPRequest

from .auth import AuthError, extract_token
from .backend import ComfyRejected, ComfyUnavailable
from .metrics import memory_usage


class JsonHandler(tornado.web.RequestHandler):
    """Base: JSON bodies, JSON errors, no caching."""

    def initialize(self, app_state):
        self.app_state = app_state

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, separators=(",", ":")))

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json")
        reason = self._reason
        self.finish(json.dumps({"error": {"code": _code_for(status_code), "message": reason}}))


def _code_for(status: int) -> str:
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            429: "rate_limited", 503: "unavailable"}.get(status, "internal_error" if status >= 500 else "bad_request")


class HealthHandler(JsonHandler):
    def get(self):
        state = self.app_state
        self.write_json({"status": "ok", "version": state.version,
                         "uptime_seconds": round(time.monotonic() - state.metrics.started, 3)})


class LiveHandler(JsonHandler):
    """The process and its IOLoop answer (this handler ran on the loop)."""

    def get(self):
        self.write_json({"status": "alive", "loop_lag_seconds": round(self.app_state.loop_lag, 4)})


class ReadyHandler(JsonHandler):
    """Ready for traffic: accepting, the breaker not open, ComfyUI answering."""

    async def get(self):
        state = self.app_state
        if not state.registry.accepting:
            return self.write_json({"status": "not_ready", "reason": "shutting_down"}, 503)
        backend = state.pool.default
        if not backend.available:
            return self.write_json({"status": "not_ready", "reason": "breaker_open",
                                    "breaker": backend.breaker.state.value}, 503)
        if not await backend.check_reachable(timeout=state.settings.breaker_probe_timeout_ms / 1000):
            return self.write_json({"status": "not_ready", "reason": "comfy_unreachable",
                                    "breaker": backend.breaker.state.value}, 503)
        self.write_json({"status": "ready", "breaker": backend.breaker.state.value})


def secret_ok(header: str, secret: str) -> bool:
    """Constant-time comparison of a Bearer header with the metrics secret."""
    scheme, _, value = (header or "").partition(" ")
    return hmac.compare_digest(value.strip().encode(), secret.encode()) and scheme.lower() == "bearer"


class MetricsHandler(JsonHandler):
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


class PrometheusHandler(JsonHandler):
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
    data = {
        "active_sessions": len(sessions),
        "active_connections": registry.connection_count(),
        "uptime_seconds": round(time.monotonic() - state.metrics.started, 3),
        "memory_usage": memory_usage(),
        "circuit_breaker_state": state.pool.default.breaker.state.value,
        "circuit_breakers": {b.name: b.breaker.state.value for b in state.pool},
        "queued_prompts": state.store.queue_sizes(),
        "queued_prompts_total": sum(state.store.queue_sizes().values()),
        "event_loop_lag_seconds": round(state.loop_lag, 4),
    }
    if detailed:
        data["sessions"] = [s.describe(now) for s in sessions]
    return data


class OutputsHandler(JsonHandler):
    """GET /outputs/{prompt_id}: the caller's own prompt's output files (from ComfyUI's history);
    GET /outputs/{prompt_id}/view?filename=&subfolder=&type=: one of those files, streamed.

    ComfyUI's /view has no ownership check and predictable names (PROTOCOL.md 5): the proxy
    serves only files listed in the history of a prompt the caller owns.
    """

    async def prepare(self):
        token, _ = extract_token(self.request.headers, "", allow_query=False)
        try:
            self.identity = await self.app_state.verifier.verify(token)
        except AuthError as e:
            self.app_state.metrics.auth_failures.labels(e.reason).inc()
            self.write_json({"error": {"code": "unauthorized", "message": e.message}}, 401)

    async def _owned_outputs(self, prompt_id: str) -> list[dict] | None:
        record = self.app_state.store.get(prompt_id)
        if record is None or record.user_id != self.identity.user_id:
            self.write_json({"error": {"code": "not_found", "message": "No such prompt"}}, 404)
            return None
        try:
            history = await self.app_state.pool.get(record.backend).history(prompt_id)
        except (ComfyUnavailable, ComfyRejected):
            self.write_json({"error": {"code": "comfy_unavailable",
                                       "message": "ComfyUI is temporarily unavailable"}}, 503)
            return None
        files = []
        for node_id, output in ((history.get(prompt_id) or {}).get("outputs") or {}).items():
            for kind, items in (output or {}).items():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        files.append({"node": node_id, "kind": kind, "filename": item["filename"],
                                      "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
        return files

    async def get(self, prompt_id: str, view: str | None = None):
        files = await self._owned_outputs(prompt_id)
        if files is None:
            return
        if not view:
            return self.write_json({"prompt_id": prompt_id, "files": files})
        wanted = (self.get_query_argument("filename", ""), self.get_query_argument("subfolder", ""),
                  self.get_query_argument("type", "output"))
        if wanted not in {(f["filename"], f["subfolder"], f["type"]) for f in files}:
            return self.write_json({"error": {"code": "not_found", "message": "No such output"}}, 404)
        await self._stream_view(*wanted)

    async def _stream_view(self, filename: str, subfolder: str, kind: str) -> None:
        backend = self.app_state.pool.default
        url = f"{backend.base_url}/view?" + urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        self.clear_header("Content-Type")
        started = {"done": False}

        def on_headers(line):
            if not started["done"] and line.startswith("Content-Type:"):
                self.set_header("Content-Type", line.split(":", 1)[1].strip())

        def on_chunk(chunk: bytes) -> None:
            started["done"] = True
            self.write(chunk)
            self.flush()

        response = await backend.http.fetch(HTTPRequest(url, streaming_callback=on_chunk, header_callback=on_headers,
                                                        request_timeout=backend.request_timeout),
                                            raise_error=False)
        if response.code != 200 and not started["done"]:
            self.set_header("Content-Type", "application/json")
            return self.write_json({"error": {"code": "not_found", "message": "Output not available"}}, 404)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish()


STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
WORKFLOW_DIR = os.path.join(os.path.dirname(__file__), "testing", "workflows")


class DemoHandler(JsonHandler):
    """GET /demo: a small page to try the proxy from a browser (DEMO_PAGE=true)."""

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                        "script-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:")
        with open(os.path.join(STATIC_DIR, "demo.html"), "rb") as f:
            self.finish(f.read())


class DemoWorkflowHandler(JsonHandler):
    """GET /demo/workflows/NAME.json: the sample workflows shipped with the package."""

    def get(self, name: str):
        path = os.path.join(WORKFLOW_DIR, name + ".json")
        if not os.path.isfile(path):
            return self.write_json({"error": {"code": "not_found", "message": "No such workflow"}}, 404)
        with open(path, "rb") as f:
            self.finish(f.read())

"""Operations: health endpoints in each state, both metrics formats with and without the
secret, the pinned Prometheus names."""
import json

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, enable_created_metrics, \
    generate_latest
from prometheus_client.parser import text_string_to_metric_families

from comfy_ws_proxy.metrics import Metrics

from .helpers import ProxyHarness, workflow

SECRET = {"Authorization": "Bearer s3cret-metrics-value"}

PINNED_NAMES = {
    "comfy_ws_proxy_sessions", "comfy_ws_proxy_connections", "comfy_ws_proxy_upstream_connections",
    "comfy_ws_proxy_messages", "comfy_ws_proxy_bytes", "comfy_ws_proxy_prompts", "comfy_ws_proxy_queued_prompts",
    "comfy_ws_proxy_breaker_state", "comfy_ws_proxy_breaker_transitions", "comfy_ws_proxy_upstream_reconnects",
    "comfy_ws_proxy_jwks_fetches", "comfy_ws_proxy_auth_failures", "comfy_ws_proxy_client_errors",
    "comfy_ws_proxy_slow_consumer_closes", "comfy_ws_proxy_http_request_duration_seconds",
    "comfy_ws_proxy_comfy_request_duration_seconds", "comfy_ws_proxy_event_loop_lag_seconds",
    "comfy_ws_proxy_uptime_seconds", "comfy_ws_proxy_tcp_connections", "comfy_ws_proxy_tcp_connections_dropped",
    "comfy_ws_proxy_accept_errors",
}


async def test_health_live_ready(io_loop):
    async with ProxyHarness(ready_cache_ms=0) as h:  # every /ready asks ComfyUI (see test_hardening)
        for path in ("/health", "/live", "/ready"):
            response = await h.get(path)
            assert response.code == 200, path
            assert response.headers["Content-Type"].startswith("application/json")
        assert json.loads((await h.get("/ready")).body)["status"] == "ready"
        await h.sim.go_down()
        response = await h.get("/ready")
        assert response.code == 503
        assert json.loads(response.body)["reason"] == "comfy_unreachable"
        assert (await h.get("/live")).code == 200 and (await h.get("/health")).code == 200


async def test_ready_is_503_while_the_breaker_is_open(io_loop):
    async with ProxyHarness() as h:
        backend = h.state.pool.default
        for _ in range(5):
            backend.breaker.record_failure(backend.clock())
        response = await h.get("/ready")
        assert response.code == 503 and json.loads(response.body)["reason"] == "breaker_open"


async def test_json_metrics_need_the_secret(io_loop):
    async with ProxyHarness(metrics_secret="s3cret-metrics-value") as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))
        assert (await h.get("/metrics")).code == 401
        assert (await h.get("/metrics", {"Authorization": "Bearer wrong"})).code == 401
        response = await h.get("/metrics", SECRET)
        assert response.code == 200
        data = json.loads(response.body)
        for key in ("active_sessions", "active_connections", "uptime_seconds", "memory_usage",
                    "circuit_breaker_state", "queued_prompts"):
            assert key in data
        assert data["active_sessions"] == 1 and data["active_connections"] == 1
        assert data["memory_usage"]["rss"] > 0 and data["circuit_breaker_state"] == "closed"
        assert "sessions" not in data
        detailed = json.loads((await h.get("/metrics?detailed=true", SECRET)).body)
        assert detailed["sessions"][0]["user_id"] == "alice"
        assert detailed["sessions"][0]["connections"] == 1


async def test_prometheus_text_with_the_secret_and_pinned_names(io_loop):
    async with ProxyHarness(metrics_secret="s3cret-metrics-value") as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))
        assert (await h.get("/metrics/prometheus")).code == 401
        response = await h.get("/metrics", dict(SECRET, Accept="text/plain"))
        assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = response.body.decode()
        names = {family.name for family in text_string_to_metric_families(text)}
        assert PINNED_NAMES <= names, PINNED_NAMES - names
        for family in text_string_to_metric_families(text):
            assert family.name.startswith("comfy_ws_proxy_")
            if family.type == "counter":
                assert all(s.name.endswith("_total") for s in family.samples)
        assert "_created" not in text
        assert 'comfy_ws_proxy_prompts_total{outcome="success"} 1.0' in text
        assert (await h.get("/metrics/prometheus", SECRET)).code == 200


async def test_prometheus_can_be_public_on_its_own_path(io_loop):
    async with ProxyHarness(metrics_secret="s3cret-metrics-value", metrics_public=True) as h:
        assert (await h.get("/metrics/prometheus")).code == 200
        assert (await h.get("/metrics")).code == 401  # the JSON document stays behind the secret


def test_no_created_series_whatever_the_process_wide_switch_and_the_hosts_own_untouched():
    """prometheus_client's _created switch is global: with it on (its default, and what a host
    application embedding the proxy may rely on), the proxy exports none, and a host registry
    beside it keeps its own."""
    host = CollectorRegistry()
    Counter("host_requests", "A host application's counter", registry=host).inc()
    was_on = b"host_requests_created" in generate_latest(host)
    enable_created_metrics()
    try:
        metrics = Metrics()
        metrics.prompts.labels("success").inc()
        metrics.loop_lag.observe(0.01)
        metrics.comfy_duration.labels("default", "ok").observe(0.2)
        body, _ = metrics.exposition()
        names = {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}
        assert "comfy_ws_proxy_prompts_total" in names and "comfy_ws_proxy_event_loop_lag_seconds_count" in names
        assert not [name for name in names if name.endswith("_created")]
        assert b"host_requests_created" in generate_latest(host)
    finally:
        if not was_on:
            disable_created_metrics()

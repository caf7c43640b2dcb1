"""conf/grafana-dashboard.json: every PromQL expression in it names only metrics the proxy
exports (scraped from a running proxy), and the families a dashboard must show are there."""
import json
import os
import re

from prometheus_client.parser import text_string_to_metric_families

from .helpers import ProxyHarness, workflow

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "conf", "grafana-dashboard.json")

# PromQL's functions and aggregations the dashboard may call, and its keywords.
FUNCTIONS = {"sum", "max", "min", "avg", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
             "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs", "vector", "scalar", "time",
             "max_over_time", "min_over_time", "avg_over_time", "changes", "resets", "label_replace"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
            "gauge": ("",), "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects: what is left once strings, label matchers, range
    selectors, label lists, functions and keywords are taken out. Unknown functions fail."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    assert "$" not in text, f"a Grafana variable outside a matcher or a range: {expr}"
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if text[match.end():].lstrip().startswith("("):
            assert word in FUNCTIONS, f"{word}() in {expr!r} is not a PromQL function this test knows"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets (rows included) and the template variables' queries."""
    found = []

    def walk(panels):
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))
    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        found.append(label_values.group(1) if label_values else query)
    return found


def test_the_expression_parser_finds_names_and_only_names():
    assert metric_names('histogram_quantile(0.99, sum by (le, handler) (rate(a_seconds_bucket{x=~"$i"}'
                        '[$__rate_interval])))') == {"a_seconds_bucket"}
    assert metric_names('sum(increase(a_total{s="on"}[1h])) / 2 * max by (b) (c{state="open"}) and d') \
        == {"a_total", "c", "d"}


async def test_every_dashboard_expression_names_exported_metrics(io_loop):
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    async with ProxyHarness(metrics_public=True) as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))
        text = (await h.get("/metrics/prometheus")).body.decode()
    exported = {family.name + suffix for family in text_string_to_metric_families(text)
                for suffix in SUFFIXES[family.type]}
    used = set()
    exprs = expressions(dashboard)
    assert len(exprs) > 20
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{sorted(names - exported)} in {expr!r} are not exported"
        used |= names
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    for wanted in ("connections", "sessions", "upstream_connections", "prompts", "queued_prompts",
                   "breaker_state", "breaker_transitions", "upstream_reconnects", "comfy_request_duration_seconds",
                   "event_loop_lag_seconds", "auth_failures", "messages", "bytes", "http_request_duration_seconds",
                   "uptime_seconds"):
        assert "comfy_ws_proxy_" + wanted in families, wanted

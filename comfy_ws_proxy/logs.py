"""Logging set-up: plain lines or JSON objects (LOG_JSON), one handler on the root logger."""
from __future__ import annotations

import json
import logging
import sys
import time

import tornado.web

log = logging.getLogger("comfy_ws_proxy")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log would print full URIs (with any ?token=); ours logs paths only.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def log_uncaught(handler: tornado.web.RequestHandler, typ, value, tb) -> None:
    """An uncaught exception in a handler, logged with the request's method and path only
    (never its query: a ?token= must not reach a log line)."""
    if isinstance(value, tornado.web.HTTPError):
        return  # an HTTP answer we chose, not a failure
    log.error("uncaught exception %s %s", handler.request.method, handler.request.path, exc_info=(typ, value, tb))

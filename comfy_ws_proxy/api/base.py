"""The HTTP face's base handler: JSON bodies, one JSON error shape, no caching, and the
bearer-token check shared by every endpoint that serves a user."""
from __future__ import annotations

import json

import tornado.httputil
import tornado.web

from ..auth import AuthError, Identity, TokenVerifier, extract_token
from ..logs import log_uncaught
from ..metrics import Metrics


class JsonHandler(tornado.web.RequestHandler):
    """Base: JSON bodies, JSON errors, no caching."""

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, separators=(",", ":")))

    def log_exception(self, typ, value, tb):
        log_uncaught(self, typ, value, tb)

    def write_error(self, status_code, **kwargs):
        """Tornado's errors (an unknown method, an exception) in our JSON shape."""
        self.set_header("Content-Type", "application/json")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = (exc.log_message if isinstance(exc, tornado.web.HTTPError) and exc.log_message
                   else tornado.httputil.responses.get(status_code, "Error"))
        self.finish(json.dumps({"error": {"code": _code_for(status_code), "message": message}}))

    def write_json_error(self, status: int, code: str, message: str) -> None:
        self.write_json({"error": {"code": code, "message": message}}, status)


def _code_for(status: int) -> str:
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            429: "rate_limited", 503: "unavailable"}.get(status, "internal_error" if status >= 500 else "bad_request")




class UserHandler(JsonHandler):
    """An endpoint of one user's: the same JWT as /ws (Authorization: Bearer), verified
    before anything else; a refusal is 401 with the same JSON body."""

    def initialize(self, verifier: TokenVerifier, metrics: Metrics):
        self.verifier = verifier
        self.metrics = metrics
        self.identity: Identity | None = None

    async def prepare(self):
        token, _ = extract_token(self.request.headers, "", allow_query=False)
        try:
            self.identity = await self.verifier.verify(token)
        except AuthError as e:
            self.metrics.auth_failures.labels(e.reason).inc()
            self.set_header("WWW-Authenticate", 'Bearer realm="comfy_ws_proxy"')
            self.write_json({"error": {"code": "unauthorized", "message": e.message, "reason": e.reason}}, 401)

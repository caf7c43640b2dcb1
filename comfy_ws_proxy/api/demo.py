"""/demo: a small page to try the proxy from a browser, and its sample workflows."""
from __future__ import annotations

import os

import tornado.web

from .ops import OpsHandler

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")
CLIENT_SCRIPT = "comfy-ws-proxy-client.js"
WORKFLOW_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "testing", "workflows")


class DemoHandler(OpsHandler):
    """GET /demo: a small page to try the proxy from a browser (DEMO_PAGE=true)."""

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                        "script-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:")
        with open(os.path.join(STATIC_DIR, "demo.html"), "rb") as f:
            self.finish(f.read())


class ClientScriptHandler(tornado.web.RequestHandler):
    """GET /static/comfy-ws-proxy-client.js: the JavaScript client (one ES module, no
    dependencies), served whether or not the demo page is on: it is public code with nothing
    of this deployment in it, and pages of the same origin import it from here."""

    def get(self):
        with open(os.path.join(STATIC_DIR, CLIENT_SCRIPT), "rb") as f:
            body = f.read()
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")  # (revalidated: Tornado's ETag answers 304)
        self.finish(body)


class DemoWorkflowHandler(OpsHandler):
    """GET /demo/workflows/NAME.json: the sample workflows shipped with the package."""

    def get(self, name: str):
        path = os.path.join(WORKFLOW_DIR, name + ".json")
        if not os.path.isfile(path):
            return self.write_json({"error": {"code": "not_found", "message": "No such workflow"}}, 404)
        with open(path, "rb") as f:
            self.finish(f.read())

"""The proxy mounted into a host application: add_routes(app, settings, prefix="/comfy")."""
import asyncio
import json
import os
import tempfile

import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import websocket_connect

from comfy_ws_proxy.app import add_routes
from comfy_ws_proxy.config import settings_for_tests
from comfy_ws_proxy.testing.comfyui import ComfySimulator
from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, Client, workflow


class HelloHandler(tornado.web.RequestHandler):
    def get(self):
        self.write("host")


async def test_the_proxy_mounted_under_a_prefix_of_a_host_application(io_loop):
    key = DevKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        jwks_path = os.path.join(tmp, "jwks.json")
        with open(jwks_path, "w", encoding="utf-8") as f:
            json.dump(key.jwks(), f)
        sim = ComfySimulator()
        await asyncio.wait_for(sim.start(), TIMEOUT)
        app = tornado.web.Application([(r"/hello", HelloHandler)])
        settings = settings_for_tests(comfy_url=sim.url, jwt_key_file=jwks_path)
        state = add_routes(app, settings, prefix="/comfy")
        sockets = bind_sockets(0, "127.0.0.1")
        port = sockets[0].getsockname()[1]
        server = HTTPServer(app)
        server.add_sockets(sockets)
        state.start()
        http = AsyncHTTPClient(force_instance=True)
        client = None
        try:
            base = f"http://127.0.0.1:{port}"
            request = HTTPRequest(f"ws://127.0.0.1:{port}/comfy/ws",
                                  headers={"Authorization": "Bearer " + key.token("alice")})
            client = Client(await asyncio.wait_for(websocket_connect(request), TIMEOUT), "alice")
            session = await client.next("session")
            assert session["data"]["user_id"] == "alice"
            prompt_id, outcome = await client.run(workflow("success"))
            assert outcome == "execution_success"
            assert sim.execution_counts[prompt_id] == 1
            # The host's own routes still answer, and the proxy's HTTP endpoints live under the prefix.
            hello = await asyncio.wait_for(http.fetch(base + "/hello"), TIMEOUT)
            assert hello.body == b"host"
            health = await asyncio.wait_for(http.fetch(base + "/comfy/health"), TIMEOUT)
            assert json.loads(health.body)["status"] == "ok"
            unprefixed = await asyncio.wait_for(http.fetch(base + "/health", raise_error=False), TIMEOUT)
            assert unprefixed.code == 404
            # The proxy pings its own connections: nothing of the host application's changes.
            assert "websocket_ping_interval" not in app.settings and state.pinger.interval > 0
            # A bad token is refused before the upgrade, as in the standalone proxy.
            refused = await asyncio.wait_for(
                http.fetch(base + "/comfy/ws", headers={"Authorization": "Bearer garbage"}, raise_error=False),
                TIMEOUT)
            assert refused.code == 401
        finally:
            if client is not None:
                await client.close()
            server.stop()
            await asyncio.wait_for(state.stop(grace=0), TIMEOUT)
            await asyncio.wait_for(server.close_all_connections(), TIMEOUT)
            http.close()
            await asyncio.wait_for(sim.stop(), TIMEOUT)

"""conf/nginx.conf, run by Debian's nginx in front of the in-process proxy and simulator.

The shipped file itself is tested: it is read, its listen port and upstream port (and, for
the idle test, the /ws proxy_read_timeout) are substituted, and it is wrapped in a minimal
nginx.conf whose temp paths live in a temporary directory.
"""
import asyncio
import json
import logging
import os
import re
import struct
import subprocess
import tempfile

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from comfy_ws_proxy.config import DEFAULT_METRICS_SECRET

from .helpers import TIMEOUT, Client, ProxyHarness, free_port, workflow

NGINX = "/usr/sbin/nginx"
if not os.access(NGINX, os.X_OK):
    pytest.skip("nginx is not installed (apt-get install nginx-light)", allow_module_level=True)

SITE_CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "nginx.conf")
# Fast pings for every test here (the 25 s default would never matter in a short test).
PINGS = {"ws_ping_interval_s": 1.0, "ws_ping_timeout_s": 1.0}


def site_config(listen_port: int, upstream_port: int, ws_read_timeout: str | None = None) -> str:
    """conf/nginx.conf with the ports (and optionally the /ws read timeout) substituted."""
    with open(SITE_CONF, encoding="utf-8") as f:
        text = f.read()
    text, n = re.subn(r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert n == 1, "conf/nginx.conf: expected one 'listen 80;' line"
    text, n = re.subn(r"server 127\.0\.0\.1:8190;", f"server 127.0.0.1:{upstream_port};", text)
    assert n == 1, "conf/nginx.conf: expected one 'server 127.0.0.1:8190;' upstream line"
    if ws_read_timeout is not None:
        def replace(block):
            inner, k = re.subn(r"proxy_read_timeout \S+;", f"proxy_read_timeout {ws_read_timeout};", block.group(0))
            assert k == 1
            return inner
        text, n = re.subn(r"location = /ws \{[^}]*\}", replace, text)
        assert n == 1, "conf/nginx.conf: expected one 'location = /ws' block"
    return text


def nginx_modules_missing() -> set[str]:
    out = subprocess.run([NGINX, "-V"], capture_output=True, text=True, timeout=10)
    return set(re.findall(r"--without-http_(\w+)_module", out.stderr + out.stdout))


class Nginx:
    """nginx in the foreground on a free loopback port, proxying to ``upstream_port``."""

    def __init__(self, upstream_port: int, ws_read_timeout: str | None = None):
        self.upstream_port = upstream_port
        self.ws_read_timeout = ws_read_timeout
        self.port = free_port()
        self.clients: list[Client] = []
        self.stderr: list[str] = []

    async def __aenter__(self) -> "Nginx":
        self._tmp = tempfile.TemporaryDirectory()
        tmp = self._tmp.name
        missing = nginx_modules_missing()
        temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                             for kind in ("fastcgi", "uwsgi", "scgi") if kind not in missing)
        # Running as root, nginx would switch its worker to "nobody", which cannot use the
        # private temporary directory; as any other user it keeps its own user.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf_path = os.path.join(tmp, "nginx.conf")
        with open(self.conf_path, "w", encoding="utf-8") as f:
            f.write(f"{user}worker_processes 1;\n"
                    "events { worker_connections 256; }\n"
                    "http {\n"
                    f"    access_log {tmp}/access.log;\n"
                    f"    client_body_temp_path {tmp}/body;\n"
                    f"    proxy_temp_path {tmp}/proxy;\n"
                    f"{temp_paths}"
                    + site_config(self.port, self.upstream_port, self.ws_read_timeout) +
                    "}\n")
        directives = f"daemon off; pid {tmp}/nginx.pid; error_log stderr notice;"
        check = subprocess.run([NGINX, "-t", "-q", "-p", tmp, "-c", self.conf_path, "-g", directives],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = await asyncio.create_subprocess_exec(
            NGINX, "-p", tmp, "-c", self.conf_path, "-g", directives,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read_stderr(started))
        try:
            # The master logs "start worker process" (notice) after binding its sockets.
            await asyncio.wait_for(asyncio.shield(started), TIMEOUT)
        except BaseException:
            await self._stop()
            raise
        return self

    async def _read_stderr(self, started: asyncio.Future) -> None:
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            self.stderr.append(text)
            if "start worker process " in text and not started.done():
                started.set_result(None)
        if not started.done():
            started.set_exception(AssertionError("nginx exited:\n" + "\n".join(self.stderr)))

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close()
        await self._stop()

    async def _stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()  # SIGTERM: fast shutdown, open tunnels closed at once
        try:
            await asyncio.wait_for(self.proc.wait(), TIMEOUT)
        except asyncio.TimeoutError:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), TIMEOUT)
        await asyncio.wait_for(self._reader, TIMEOUT)
        self._tmp.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connect(self, token: str, user: str, *, via: str = "header", headers: dict | None = None,
                      source_ip: str | None = None) -> Client:
        request_headers = dict(headers or {})
        subprotocols = None
        if via == "header":
            request_headers["Authorization"] = f"Bearer {token}"
        else:
            subprotocols = ["comfy-ws-proxy.v1", "bearer." + token]
        request = HTTPRequest(f"ws://127.0.0.1:{self.port}/ws", headers=request_headers,
                              network_interface=source_ip)
        conn = await asyncio.wait_for(websocket_connect(request, subprotocols=subprotocols), TIMEOUT)
        client = Client(conn, user)
        self.clients.append(client)
        await client.next("session")
        return client


async def test_the_shipped_config_is_valid_and_keeps_pings_below_the_idle_timeout(io_loop):
    text = site_config(8080, 8190)
    ws_block = re.search(r"location = /ws \{[^}]*\}", text).group(0)
    timeout = re.search(r"proxy_read_timeout (\d+)s;", ws_block)
    assert timeout and int(timeout.group(1)) > 25  # the proxy's default WS_PING_INTERVAL_S
    for needle in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;", "proxy_buffering off;"):
        assert needle in text
    # nginx -t on the generated config happens in every Nginx() below; this one also serves
    # the HTTP endpoints: each answers from the proxy (JSON), anything else from nginx.
    async with ProxyHarness(trust_forwarded=True, demo_page=True, **PINGS) as h:
        async with Nginx(h.port) as ngx:
            for path in ("/health", "/live", "/ready"):
                response = await h.http.fetch(ngx.url + path, raise_error=False)
                assert response.code == 200, (path, response.code, response.body)
                assert json.loads(response.body)["status"] in ("ok", "alive", "ready")
            metrics = await h.http.fetch(ngx.url + "/metrics", raise_error=False,
                                         headers={"Authorization": "Bearer " + DEFAULT_METRICS_SECRET})
            assert metrics.code == 200 and "active_connections" in json.loads(metrics.body)
            unauthorized = await h.http.fetch(ngx.url + "/metrics", raise_error=False)
            assert unauthorized.code == 401 and json.loads(unauthorized.body)["error"]["code"] == "unauthorized"
            prometheus = await h.http.fetch(ngx.url + "/metrics/prometheus", raise_error=False,
                                            headers={"Authorization": "Bearer " + DEFAULT_METRICS_SECRET})
            assert prometheus.code == 200 and b"# HELP" in prometheus.body
            demo = await h.http.fetch(ngx.url + "/demo", raise_error=False)
            assert demo.code == 200 and b'id="connect"' in demo.body
            sample = await h.http.fetch(ngx.url + "/demo/workflows/success.json", raise_error=False)
            assert sample.code == 200 and json.loads(sample.body) == workflow("success")
            outputs = await h.http.fetch(ngx.url + "/outputs/00000000-0000-4000-8000-000000000000",
                                         raise_error=False)
            assert outputs.code == 401 and json.loads(outputs.body)["error"]["code"] == "unauthorized"
            elsewhere = await h.http.fetch(ngx.url + "/prompt", raise_error=False)
            assert elsewhere.code == 404 and b"nginx" in elsewhere.body  # ComfyUI's API is not exposed
            # A plain GET /ws (no upgrade) reaches the proxy, which refuses it before any upgrade.
            plain = await h.http.fetch(ngx.url + "/ws", raise_error=False)
            assert plain.code in (400, 401) and b"nginx" not in plain.body


async def test_a_client_runs_a_workflow_through_nginx(io_loop):
    async with ProxyHarness(trust_forwarded=True, max_connections_per_user=2, **PINGS) as h:
        async with Nginx(h.port) as ngx:
            alice = await ngx.connect(h.token("alice"), "alice")  # Authorization: Bearer
            assert alice.received[0]["data"]["user_id"] == "alice"
            prompt_id, outcome = await alice.run(workflow("success"))
            assert outcome == "execution_success"
            kinds = [m["type"] for m in alice.json_messages() if m["data"].get("prompt_id") == prompt_id]
            for kind in ("prompt_accepted", "execution_start", "executing", "executed", "execution_success"):
                assert kind in kinds, kind
            assert h.sim.execution_counts[prompt_id] == 1
            # The browser form of the token (subprotocol list) passes through nginx too.
            bob = await ngx.connect(h.token("bob"), "bob", via="subprotocol")
            assert bob.conn.selected_subprotocol == "comfy-ws-proxy.v1"
            assert bob.received[0]["data"]["user_id"] == "bob"
            await bob.close()
            # A page served by this nginx (same origin) may open the socket; nginx keeps the
            # Host with its port, so the proxy's same-origin check matches. A foreign page may not.
            same = await ngx.connect(h.token("carol"), "carol", via="subprotocol",
                                     headers={"Origin": f"http://127.0.0.1:{ngx.port}"})
            assert same.received[0]["data"]["user_id"] == "carol"
            request = HTTPRequest(f"ws://127.0.0.1:{ngx.port}/ws", headers={"Origin": "http://evil.example"})
            with pytest.raises(HTTPClientError) as refused:
                await asyncio.wait_for(websocket_connect(request, subprotocols=["comfy-ws-proxy.v1",
                                                                                "bearer." + h.token("eve")]),
                                       TIMEOUT)
            assert refused.value.code == 403
            assert json.loads(refused.value.response.body)["error"]["code"] == "forbidden_origin"


async def test_an_8mb_preview_frame_passes_through_nginx_intact(io_loop):
    async with ProxyHarness(trust_forwarded=True, **PINGS) as h:
        async with Nginx(h.port) as ngx:
            alice = await ngx.connect(h.token("alice"), "alice")
            _, outcome = await alice.run(workflow("success-ws-large"), timeout=30)
            assert outcome == "execution_success"
            big = [f for f in alice.binary_frames() if len(f) > 8_000_000]
            assert len(big) == 1
            frame = big[0]
            kind = struct.unpack(">I", frame[:4])[0]
            assert kind in (1, 4)
            if kind == 4:  # metadata JSON, then the image
                (length,) = struct.unpack(">I", frame[4:8])
                assert "prompt_id" in json.loads(frame[8:8 + length])
                image = frame[8 + length:]
            else:
                image = frame[8:]
            assert image[:8] == b"\x89PNG\r\n\x1a\n" or image[:3] == b"\xff\xd8\xff"


async def idle_for(seconds: float) -> None:
    """Let the connection idle: a timer (not a sleep in the test body) resolves a future."""
    loop = asyncio.get_running_loop()
    elapsed = loop.create_future()
    handle = loop.call_later(seconds, lambda: elapsed.done() or elapsed.set_result(None))
    try:
        await asyncio.wait_for(elapsed, seconds + TIMEOUT)
    finally:
        handle.cancel()


async def test_an_idle_connection_is_kept_open_by_the_proxys_pings(io_loop):
    # nginx's proxy_read_timeout is 2 s here; the proxy pings every 0.5 s. The client sends
    # nothing for 3 s. That the socket is still open afterwards proves nginx did not cut the
    # idle tunnel: Tornado's pings (answered by the client's pongs) are the traffic that
    # keeps it alive, which is why WS_PING_INTERVAL_S must stay below proxy_read_timeout.
    async with ProxyHarness(trust_forwarded=True, ws_ping_interval_s=0.5, ws_ping_timeout_s=0.5) as h:
        async with Nginx(h.port, ws_read_timeout="2s") as ngx:
            alice = await ngx.connect(h.token("alice"), "alice")
            before = len(alice.received)
            await idle_for(3.0)
            assert not alice.closed.done(), alice.closed.result()
            assert len(alice.received) == before  # no application message kept it busy
            alice.send("ping", {"n": 7})
            pong = await alice.next("pong")
            assert pong["data"] == {"n": 7}


async def test_without_pings_nginx_cuts_the_idle_connection(io_loop):
    # The control experiment of the test above: the same 2 s proxy_read_timeout, no pings.
    async with ProxyHarness(trust_forwarded=True, ws_ping_interval_s=0) as h:
        async with Nginx(h.port, ws_read_timeout="2s") as ngx:
            alice = await ngx.connect(h.token("alice"), "alice")
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.wait_for(asyncio.shield(alice.closed), 15)
            assert loop.time() - start > 1.5  # cut by nginx's idle timer, not at once
            code, _ = alice.closed.result()
            assert code is None  # no close frame: nginx dropped the tunnel, the proxy did not close it


async def test_the_proxy_sees_the_client_address_nginx_forwards(io_loop, caplog):
    caplog.set_level(logging.INFO, logger="comfy_ws_proxy.access")
    async with ProxyHarness(trust_forwarded=True, **PINGS) as h:
        async with Nginx(h.port) as ngx:
            # The client connects from 127.0.0.5 (nginx itself reaches the proxy from
            # 127.0.0.1) and tries to spoof its address in both forwarding headers.
            spoof = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "198.51.100.7"}
            alice = await ngx.connect(h.token("alice"), "alice", headers=spoof, source_ip="127.0.0.5")
            # nginx replaces X-Real-IP with the peer address, and the proxy trusts X-Real-IP:
            # the per-IP accounting uses the real client, neither nginx nor the spoofed values.
            assert dict(h.state.registry.ip_connections) == {"127.0.0.5": 1}
            health = await h.http.fetch(HTTPRequest(ngx.url + "/health", headers=spoof, network_interface="127.0.0.5"))
            assert health.code == 200
            await alice.close()
            lines = [r.getMessage() for r in caplog.records if r.name == "comfy_ws_proxy.access"]
            assert any(" GET /ws 127.0.0.5 " in line for line in lines), lines
            assert any(line.startswith("200 GET /health 127.0.0.5 ") for line in lines), lines
            assert not any("203.0.113.9" in line or "198.51.100.7" in line for line in lines), lines


@pytest.mark.parametrize("trust, expected", [(True, "203.0.113.9"), (False, "127.0.0.1")])
async def test_forwarded_headers_are_trusted_only_when_configured(io_loop, trust, expected):
    # Directly to the proxy (no nginx): with TRUST_FORWARDED the X-Real-IP header is the
    # client's address; without it the header is ignored and the socket peer counts.
    async with ProxyHarness(trust_forwarded=trust, **PINGS) as h:
        await h.connect("alice", headers={"X-Real-IP": "203.0.113.9"})
        assert dict(h.state.registry.ip_connections) == {expected: 1}

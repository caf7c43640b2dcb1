"""A real headless Chromium against the proxy: the demo page end to end (the subprotocol
token from a browser's own WebSocket API), and cross-site WebSocket hijacking refused.

Uses Debian's /usr/bin/chromium through the playwright package (never `playwright install`).
"""
import asyncio
import json
import logging
import os

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .helpers import TIMEOUT, ProxyHarness, workflow

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "test-artifacts")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MS = TIMEOUT * 1000  # playwright's own timeouts, in milliseconds


class Browser:
    """Playwright + headless Chromium + one page; everything closed on exit."""

    async def __aenter__(self):
        self._pw = await asyncio.wait_for(playwright_api.async_playwright().start(), 60)
        try:
            self.browser = await asyncio.wait_for(
                self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True), 60)
            self.page = await asyncio.wait_for(self.browser.new_page(), TIMEOUT)
        except BaseException:
            await asyncio.wait_for(self._pw.stop(), TIMEOUT)
            raise
        self.page.set_default_timeout(MS)
        self.console: list[str] = []
        self.page.on("console", lambda msg: self.console.append(msg.text))
        return self

    async def __aexit__(self, *exc):
        try:
            await asyncio.wait_for(self.browser.close(), TIMEOUT)
        finally:
            await asyncio.wait_for(self._pw.stop(), TIMEOUT)


async def test_the_demo_page_runs_a_workflow_in_a_real_browser(io_loop):
    async with ProxyHarness(demo_page=True, sim_kwargs={"step_delay": 0.05}) as h:
        async with Browser() as b:
            page = b.page
            # The page's own Content-Security-Policy stays on: no eval, so every check below
            # is a function, not an expression string.
            await asyncio.wait_for(page.goto(h.url + "/demo"), TIMEOUT)
            await asyncio.wait_for(page.fill("#token", h.token("alice")), TIMEOUT)
            await asyncio.wait_for(page.click("#connect"), TIMEOUT)
            # The browser's WebSocket carries the token in its subprotocol list.
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('status').textContent === 'connected'", timeout=MS), TIMEOUT)
            await asyncio.wait_for(page.select_option("#sample", "success-ws"), TIMEOUT)
            await asyncio.wait_for(page.evaluate("() => { document.getElementById('workflow').value = ''; }"), TIMEOUT)
            await asyncio.wait_for(page.click("#load"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('workflow').value.trim().startsWith('{')", timeout=MS), TIMEOUT)
            loaded = json.loads(await asyncio.wait_for(page.input_value("#workflow"), TIMEOUT))
            assert any(node["class_type"] == "SaveImageWebsocket" for node in loaded.values())
            await asyncio.wait_for(page.click("#submit"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.state === 'done'", timeout=MS), TIMEOUT)
            # Final images are fetched from /outputs/<prompt_id>/view with the bearer token
            # after "executed"; wait until at least one has loaded and decoded.
            await asyncio.wait_for(page.wait_for_function(
                "() => [...document.querySelectorAll('#outputs img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=MS), TIMEOUT)
            previews = await asyncio.wait_for(page.eval_on_selector_all(
                "#previews img", "imgs => imgs.map(i => i.naturalWidth)"), TIMEOUT)
            assert previews, "no live preview reached the page"
            prompt_id = (await asyncio.wait_for(page.text_content("#prompt"), TIMEOUT)).strip()
            assert h.sim.execution_counts[prompt_id] == 1
            assert (await asyncio.wait_for(page.text_content("#status"), TIMEOUT)) == "connected"
            os.makedirs(ARTIFACTS, exist_ok=True)
            path = os.path.join(ARTIFACTS, "demo-finished.png")
            await asyncio.wait_for(page.screenshot(path=path, full_page=True), TIMEOUT)
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class ForeignPage(tornado.web.RequestHandler):
    """A page of another site that tries to open the proxy's WebSocket with a stolen token."""

    def initialize(self, ws_url: str, token: str):
        self.ws_url = ws_url
        self.token = token

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish("""<!doctype html><html><body><script>
const ws = new WebSocket(%s, ["comfy-ws-proxy.v1", "bearer." + %s]);
ws.onopen = () => { document.body.dataset.result = "open"; ws.close(); };
ws.onclose = (ev) => { if (!document.body.dataset.result) document.body.dataset.result = "closed " + ev.code; };
</script></body></html>""" % (json.dumps(self.ws_url), json.dumps(self.token)))


@pytest.mark.parametrize("listed", [False, True])
async def test_a_foreign_origin_cannot_open_the_websocket(io_loop, caplog, listed):
    caplog.set_level(logging.INFO, logger="comfy_ws_proxy.access")
    sockets = bind_sockets(0, "127.0.0.1")
    foreign_origin = "http://127.0.0.1:%d" % sockets[0].getsockname()[1]
    # The control case: the same page is allowed once ALLOWED_ORIGINS lists its origin.
    overrides = {"allowed_origins": [foreign_origin]} if listed else {}
    async with ProxyHarness(**overrides) as h:
        app = tornado.web.Application([(r"/", ForeignPage, {"ws_url": f"ws://127.0.0.1:{h.port}/ws",
                                                            "token": h.token("alice")})])
        server = HTTPServer(app)
        server.add_sockets(sockets)
        try:
            async with Browser() as b:
                await asyncio.wait_for(b.page.goto(foreign_origin + "/"), TIMEOUT)
                await asyncio.wait_for(b.page.wait_for_function("() => document.body.dataset.result !== undefined",
                                                                timeout=MS), TIMEOUT)
                result = await asyncio.wait_for(b.page.evaluate("() => document.body.dataset.result"), TIMEOUT)
        finally:
            server.stop()
            await asyncio.wait_for(server.close_all_connections(), TIMEOUT)
        lines = [r.getMessage() for r in caplog.records if r.name == "comfy_ws_proxy.access"]
        if listed:
            assert result == "open"
            assert any(line.startswith("101 GET /ws ") for line in lines), lines
        else:
            assert result == "closed 1006", result  # the handshake failed: no socket
            assert any(line.startswith("403 GET /ws ") for line in lines), lines
            assert not any(line.startswith("101 GET /ws ") for line in lines), lines
            assert h.state.registry.connection_count() == 0


async def test_the_demo_page_says_at_once_why_a_submission_was_refused(io_loop):
    async with ProxyHarness(demo_page=True) as h:
        async with Browser() as b:
            page = b.page
            await asyncio.wait_for(page.goto(h.url + "/demo"), TIMEOUT)
            await asyncio.wait_for(page.fill("#token", h.token("alice")), TIMEOUT)
            await asyncio.wait_for(page.click("#connect"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('status').textContent === 'connected'", timeout=MS), TIMEOUT)
            # {} is refused by the proxy itself; the page stayed "submitting" forever
            await asyncio.wait_for(page.fill("#workflow", "{}"), TIMEOUT)
            await asyncio.wait_for(page.click("#submit"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.state === 'rejected'", timeout=MS), TIMEOUT)
            log = await asyncio.wait_for(page.text_content("#log"), TIMEOUT)
            assert "invalid_message: submit_prompt needs a non-empty object 'prompt'" in log, log
            # ComfyUI's refusal: the per-node errors are shown
            await asyncio.wait_for(page.select_option("#sample", "validation-fail"), TIMEOUT)
            await asyncio.wait_for(page.evaluate("() => { document.getElementById('workflow').value = ''; }"), TIMEOUT)
            await asyncio.wait_for(page.click("#load"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('workflow').value.trim().startsWith('{')", timeout=MS), TIMEOUT)
            await asyncio.wait_for(page.click("#submit"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.state === 'rejected' && "
                "document.getElementById('log').textContent.includes('Prompt outputs failed validation')",
                timeout=MS), TIMEOUT)
            log = await asyncio.wait_for(page.text_content("#log"), TIMEOUT)
            assert "node 5 (PreviewImage) input images: Return type mismatch between linked nodes" in log, log
            assert "node 2 (ImageScale) input width: Value 99999 bigger than max of 16384" in log, log


async def test_the_demo_page_resumes_after_its_socket_drops(io_loop, tmp_path):
    """The page's JS client reconnects, sends resume from the last seq it saw, and the prompt
    it was watching ends on the page (run once, its outputs shown)."""
    async with ProxyHarness(demo_page=True, max_connections_per_user=2) as h:
        async with Browser() as b:
            page = b.page
            await asyncio.wait_for(page.goto(h.url + "/demo"), TIMEOUT)
            await asyncio.wait_for(page.fill("#token", h.token("alice")), TIMEOUT)
            await asyncio.wait_for(page.click("#connect"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('status').textContent === 'connected'", timeout=MS), TIMEOUT)
            await asyncio.wait_for(page.select_option("#sample", "long-running"), TIMEOUT)
            await asyncio.wait_for(page.evaluate("() => { document.getElementById('workflow').value = ''; }"), TIMEOUT)
            await asyncio.wait_for(page.click("#load"), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.getElementById('workflow').value.trim().startsWith('{')", timeout=MS), TIMEOUT)
            hold = h.sim.hold_node("3")
            await asyncio.wait_for(page.click("#submit"), TIMEOUT)
            prompt_id = await asyncio.wait_for(hold.reached, TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.state === 'running'", timeout=MS), TIMEOUT)
            # The TCP connection just ends (no close frame), as when a network drops.
            (session,) = h.state.registry.all()
            (conn,) = list(session.connections)
            conn.ws_connection.stream.close()
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.resumes === '1' && "
                "document.getElementById('status').textContent === 'connected'", timeout=MS), TIMEOUT)
            hold.release()
            await asyncio.wait_for(page.wait_for_function(
                "() => document.body.dataset.state === 'done'", timeout=MS), TIMEOUT)
            await asyncio.wait_for(page.wait_for_function(
                "() => [...document.querySelectorAll('#outputs img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=MS), TIMEOUT)
            assert (await asyncio.wait_for(page.text_content("#prompt"), TIMEOUT)).strip() == prompt_id
            assert h.sim.execution_counts[prompt_id] == 1
            log = await asyncio.wait_for(page.text_content("#log"), TIMEOUT)
            assert "reconnected: resuming after seq" in log and "resumed: " in log, log
            path = str(tmp_path / "comfy-ws-proxy-demo.png")
            await asyncio.wait_for(page.screenshot(path=path, full_page=True), TIMEOUT)
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            print("screenshot of the demo page:", path)


async def test_the_js_client_imported_by_a_page_of_its_own(io_loop):
    """The module as any same-origin page would use it: imported from /static, with the
    demo page off (the script is served anyway)."""
    async with ProxyHarness() as h:
        app_page = """<!doctype html><html><body><script type="module">
import {ProxyClient, ProxyError} from "/static/comfy-ws-proxy-client.js";
const client = new ProxyClient("ws://" + location.host + "/ws", {token: %s});
await client.connect();
try { await client.submit({}); } catch (e) { document.body.dataset.refused = e instanceof ProxyError ? e.code : "?"; }
const job = await client.submit(%s);
const kinds = [];
job.on((event) => kinds.push(event instanceof ArrayBuffer ? "binary" : event.type));
const result = await job.result();
document.body.dataset.kinds = kinds.join(" ");
document.body.dataset.result = result.status + " " + Object.keys(result.outputs).length;
client.close();
</script></body></html>""" % (json.dumps(h.token("alice")), json.dumps(workflow("success-ws")))

        class Page(tornado.web.RequestHandler):
            def get(self):
                self.finish(app_page)
        # served from the proxy's own origin: the page is added to its Application
        h.app.wildcard_router.add_rules([(r"/app", Page)])
        async with Browser() as b:
            await asyncio.wait_for(b.page.goto(h.url + "/app"), TIMEOUT)
            await asyncio.wait_for(b.page.wait_for_function("() => document.body.dataset.result !== undefined",
                                                            timeout=MS), TIMEOUT)
            data = await asyncio.wait_for(b.page.evaluate("() => ({...document.body.dataset})"), TIMEOUT)
        assert data["refused"] == "invalid_message", (data, b.console)
        assert data["result"].startswith("success ") and data["result"] != "success 0", data
        assert "execution_success" in data["kinds"].split() and "binary" in data["kinds"].split(), data

"""The JavaScript client (comfy_ws_proxy/static/comfy-ws-proxy-client.js) in Node.js against
the in-process proxy: tests/js/client.test.mjs, given the URL and tokens in its environment.
The proxy's epoch clock is a FakeClock: the script prints "STEP <name>" and this test moves
the clock (and checks the connections' tokens) before it answers "GO". Skipped without a Node
with a WebSocket (Node 20: --experimental-websocket; 22+: built in)."""
import asyncio
import os
import shutil
import subprocess
import time

import pytest

from .helpers import TIMEOUT, WORKFLOWS, FakeClock, ProxyHarness

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "js", "client.test.mjs")
NODE = shutil.which("node")


def node_command() -> list[str]:
    if NODE is None:
        pytest.skip("node is not installed")
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        if subprocess.run([NODE, *flags, "-e", probe], capture_output=True, timeout=TIMEOUT).returncode == 0:
            return [NODE, *flags]
    pytest.skip("this node has no WebSocket")


@pytest.mark.parametrize("demo_page", [False, True])
async def test_the_js_client_is_served_as_javascript(io_loop, demo_page):
    """At /static/comfy-ws-proxy-client.js, the demo page on or off (public code, nothing of
    this deployment in it), byte for byte the file in the package, revalidated by ETag."""
    async with ProxyHarness(demo_page=demo_page) as h:
        response = await h.get("/static/comfy-ws-proxy-client.js")
        assert response.code == 200
        assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        with open(os.path.join(os.path.dirname(HERE), "comfy_ws_proxy", "static", "comfy-ws-proxy-client.js"),
                  "rb") as f:
            assert response.body == f.read()
        again = await h.get("/static/comfy-ws-proxy-client.js", headers={"If-None-Match": response.headers["Etag"]})
        assert again.code == 304
        assert (await h.get("/static/demo.html")).code == 404  # only the client is served from /static
        assert (await h.get("/demo")).code == (200 if demo_page else 404)


async def test_the_js_client_in_node(io_loop):
    command = node_command()
    wall = FakeClock(time.time())
    async with ProxyHarness(wall=wall, jwt_leeway_s=30, ws_ping_interval_s=0, max_connections_per_user=4,
                            sim_kwargs={"step_delay": 0.02}) as h:
        env = {**os.environ, "PROXY_WS_URL": f"ws://127.0.0.1:{h.port}/ws", "WORKFLOW_DIR": WORKFLOWS,
               "TOKEN_ALICE": h.token("alice"), "TOKEN_CAROL": h.token("carol"), "TOKEN_SHORT": h.token("bob", ttl=60),
               "TOKEN_FRESH": h.token("bob", ttl=7200), "NODE_NO_WARNINGS": "1"}
        proc = await asyncio.create_subprocess_exec(
            *command, "--test-reporter=spec", SCRIPT, env=env, cwd=os.path.dirname(HERE),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output: list[str] = []
        holds = []
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 40)
                if not line:
                    break
                text = line.decode(errors="replace").rstrip("\n")
                output.append(text)
                print(text)
                if text.startswith("STEP "):
                    step = text.split()[1]
                    if step == "hold":
                        holds.append(h.sim.hold_node("3"))
                    elif step == "release":
                        holds[-1].release()
                    elif step == "drop":
                        for session in h.state.registry.all():
                            if session.user_id == "carol":
                                for conn in list(session.connections):
                                    conn.ws_connection.stream.close()  # no close frame
                    else:
                        # warn: past the short token's warn_at (half its time left: deadline = exp +
                        # leeway = now + 90 s, warn_at = now + 45 s); expire: past the deadline
                        wall.advance({"warn": 50, "expire": 50}[step])
                        h.state.pinger.tick()
                    proc.stdin.write(b"GO\n")
                    await proc.stdin.drain()
            code = await asyncio.wait_for(proc.wait(), TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        print("\n".join(output))
        assert code == 0, "\n".join(output)
        assert any("pass 5" in line for line in output), "\n".join(output)

"""The proxy as a real process: SIGKILL with 100 prompts queued loses none; SIGTERM during a
running prompt shuts down gracefully (1001 + shutting_down), exits 0 and loses nothing; a
SIGKILL or SIGTERM with jobs running, pending in ComfyUI and queued in the proxy loses no
outcome and tells each exactly once."""
import asyncio
import json
import os
import signal
import sys
import uuid

import pytest

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, Client, free_port, workflow

ROOT = os.path.join(os.path.dirname(__file__), "..")


class ProxyProcess:
    def __init__(self, tmp_path, comfy_url: str, key: DevKey, port: int | None = None, **env):
        self.tmp_path = tmp_path
        self.comfy_url = comfy_url
        self.port = port or free_port()
        self.jwks = tmp_path / "jwks.json"
        self.jwks.write_text(json.dumps(key.jwks()))
        self.store = tmp_path / "store.sqlite3"
        self.proc = None
        self.lines: list[str] = []
        self.env = {name.upper(): str(value) for name, value in env.items()}

    def environ(self) -> dict:
        return dict(os.environ, PYTHONPATH=ROOT, COMFY_URL=self.comfy_url, DEV_MODE="true",
                    JWT_KEY_FILE=str(self.jwks), STORE_PATH=str(self.store), PORT=str(self.port),
                    UPSTREAM_RECONNECT_MIN_MS="20", UPSTREAM_RECONNECT_MAX_MS="200", BREAKER_OPEN_MS="50",
                    BREAKER_MAX_OPEN_MS="300", SUBMIT_BURST="1000", SUBMIT_RATE_PER_S="1000",
                    SHUTDOWN_GRACE_MS="5000", **self.env)

    async def spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "comfy_ws_proxy", env=self.environ(),
                                                         stderr=asyncio.subprocess.PIPE)

    async def start(self) -> None:
        await self.spawn()
        await self.wait_for_line("listening on")

    async def wait_for_line(self, text: str) -> str:
        async def read():
            while True:
                line = (await self.proc.stderr.readline()).decode()
                if not line:
                    raise AssertionError("proxy exited:\n" + "".join(self.lines[-20:]))
                self.lines.append(line)
                if text in line:
                    return line
        return await asyncio.wait_for(read(), TIMEOUT)

    async def drain_output(self) -> None:
        rest = await self.proc.stderr.read()
        self.lines.extend(rest.decode().splitlines(True))

    async def connect(self, token: str) -> Client:
        request = HTTPRequest(f"ws://127.0.0.1:{self.port}/ws", headers={"Authorization": "Bearer " + token})
        conn = await asyncio.wait_for(websocket_connect(request), TIMEOUT)
        client = Client(conn, "x")
        await client.next("session")
        return client


async def test_sigkill_with_100_prompts_queued_loses_none(io_loop, tmp_path):
    from comfy_ws_proxy.testing.comfyui import ComfySimulator
    sim = ComfySimulator()
    await sim.start()
    key = DevKey.generate()
    proxy = ProxyProcess(tmp_path, sim.url, key)
    try:
        await proxy.start()
        alice = await proxy.connect(key.token("alice"))
        await sim.go_down()
        ids = []
        for _ in range(100):
            reply = await alice.submit(workflow("success"))
            assert reply["data"]["queued"] is True, reply
            ids.append(reply["data"]["prompt_id"])
        proxy.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proxy.proc.wait(), TIMEOUT) == -signal.SIGKILL
        await alice.close()
        await sim.come_up()
        await proxy.start()  # the same store
        alice = await proxy.connect(key.token("alice"))
        alice.send("resume", {"session_id": "gone", "last_seq": 0})
        await alice.next("prompts_state")
        for prompt_id in ids:
            await alice.next(where=lambda m, p=prompt_id: m.get("type") == "execution_success"
                             and m["data"]["prompt_id"] == p, timeout=60)
        await sim.wait_idle()
        assert [sim.execution_counts[p] for p in ids] == [1] * 100
        await alice.close()
    finally:
        if proxy.proc and proxy.proc.returncode is None:
            proxy.proc.kill()
            await proxy.proc.wait()
        await sim.stop()


async def test_sigterm_during_a_running_prompt_is_graceful_and_loses_nothing(io_loop, tmp_path):
    from comfy_ws_proxy.testing.comfyui import ComfySimulator
    sim = ComfySimulator(node_delay=0.05)
    await sim.start()
    key = DevKey.generate()
    proxy = ProxyProcess(tmp_path, sim.url, key)
    try:
        await proxy.start()
        alice = await proxy.connect(key.token("alice"))
        running = (await alice.submit(workflow("long-running")))["data"]["prompt_id"]
        await alice.next("execution_start", lambda m: m["data"]["prompt_id"] == running)
        await sim.go_down()
        queued = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        proxy.proc.send_signal(signal.SIGTERM)
        notice = await alice.next("shutting_down")
        assert notice["data"]["message"]
        code, _ = await asyncio.wait_for(alice.closed, TIMEOUT)
        assert code == 1001
        await alice.close()
        assert await asyncio.wait_for(proxy.proc.wait(), TIMEOUT) == 0
        await proxy.drain_output()
        assert any("stopped" in line for line in proxy.lines)
        await sim.come_up()
        await proxy.start()
        alice = await proxy.connect(key.token("alice"))
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == queued, timeout=60)
        await sim.wait_idle()
        assert sim.execution_counts[queued] == 1
        await alice.close()
    finally:
        if proxy.proc and proxy.proc.returncode is None:
            proxy.proc.kill()
            await proxy.proc.wait()
        await sim.stop()


@pytest.mark.parametrize("owner", ["reconnects", "stays_away"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_a_killed_or_stopped_proxy_process_loses_no_outcome(io_loop, tmp_path, signum, owner):
    from comfy_ws_proxy.testing.comfyui import ComfySimulator

    from .test_restart import FINALS, finals, fresh, submit
    sim = ComfySimulator()
    await sim.start()
    key = DevKey.generate()
    proxy = ProxyProcess(tmp_path, sim.url, key, backend_queue_depth=2)
    try:
        await proxy.start()
        alice = await proxy.connect(key.token("alice"))
        ids = [str(uuid.uuid4()) for _ in range(3)]
        hold = sim.hold_node("3", ids[0])
        assert (await submit(alice, fresh("long-running"), ids[0]))["data"]["queued"] is False
        await asyncio.wait_for(hold.reached, TIMEOUT)
        assert (await submit(alice, fresh("success"), ids[1]))["data"]["queued"] is False
        assert (await submit(alice, fresh("success"), ids[2]))["data"]["queued"] is True
        proxy.proc.send_signal(signum)
        await asyncio.wait_for(proxy.proc.wait(), TIMEOUT)
        await asyncio.wait_for(alice.closed, TIMEOUT)
        await alice.close()
        await proxy.start()  # the same store
        if owner == "stays_away":
            hold.release()
            await sim.wait_idle()  # two of them ran; the third is still in the proxy's queue
        back = await proxy.connect(key.token("alice"))
        hold.release()
        for prompt_id in ids:
            back._cursor = 0
            await back.next(where=lambda m, p=prompt_id: m.get("type") in FINALS and m["data"]["prompt_id"] == p,
                            timeout=30)
        await sim.wait_idle()
        back.send("ping")
        await back.next("pong")
        assert [len(finals(back, p)) for p in ids] == [1, 1, 1]
        assert [sim.execution_counts[p] for p in ids] == [1, 1, 1]
        await back.close()
        later = await proxy.connect(key.token("alice"))  # a later socket is told nothing twice
        later.send("resume", {"session_id": "x", "last_seq": 0})
        state = await later.next("prompts_state")
        assert {p["prompt_id"]: p["state"] for p in state["data"]["prompts"]} == {p: "success" for p in ids}
        assert not any(finals(later, p) for p in ids)
        await later.close()
    finally:
        if proxy.proc and proxy.proc.returncode is None:
            proxy.proc.kill()
            await proxy.proc.wait()
        await sim.stop()


async def test_a_second_proxy_on_the_same_store_refuses_to_start(io_loop, tmp_path):
    """Issue 15, finding 11: two proxies on one STORE_PATH would each run every queued job."""
    from comfy_ws_proxy.testing.comfyui import ComfySimulator
    sim = ComfySimulator()
    await sim.start()
    key = DevKey.generate()
    first = ProxyProcess(tmp_path, sim.url, key)
    second = ProxyProcess(tmp_path, sim.url, key)  # the same tmp_path: the same store file
    try:
        await first.start()
        await second.spawn()
        _, err = await asyncio.wait_for(second.proc.communicate(), TIMEOUT)
        assert second.proc.returncode == 2
        lines = err.decode().strip().splitlines()
        assert lines[-1] == (f"comfy-ws-proxy: error: STORE_PATH: {first.store} is in use by another proxy "
                             f"process (pid {first.proc.pid}); give each proxy a store of its own")
        # The first one is unharmed, and once it is gone (even by SIGKILL) the store is free.
        first.proc.send_signal(signal.SIGKILL)
        await first.proc.wait()
        await second.start()
        alice = await second.connect(key.token("alice"))
        await alice.close()
    finally:
        for proxy in (first, second):
            if proxy.proc and proxy.proc.returncode is None:
                proxy.proc.kill()
                await proxy.proc.wait()
        await sim.stop()

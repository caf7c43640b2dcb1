"""Test harness: the simulator and the proxy in-process on ephemeral ports, and clients.

pytest-tornasync runs only async tests (no async fixtures), so the harness is an async
context manager used inside each test::

    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        msg = await alice.next("session")
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.netutil import bind_sockets
from tornado.websocket import websocket_connect

from comfy_ws_proxy.app import make_app
from comfy_ws_proxy.config import settings_for_tests
from comfy_ws_proxy.server import LimitedHTTPServer
from comfy_ws_proxy.testing.tokens import DevKey

WORKFLOWS = os.path.join(os.path.dirname(__file__), "..", "comfy_ws_proxy", "testing", "workflows")
TIMEOUT = 15


def workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


async def until(predicate: Callable[[], bool], listeners: list[list], timeout: float = TIMEOUT) -> None:
    """Wait until ``predicate()`` holds, checked again whenever one of ``listeners`` (lists
    of callbacks, such as the tracker's) is called."""
    changed = asyncio.Event()

    def poke(*args) -> None:
        changed.set()
    for callbacks in listeners:
        callbacks.append(poke)
    try:
        async def wait():
            while not predicate():
                changed.clear()
                await changed.wait()
        await asyncio.wait_for(wait(), timeout)
    finally:
        for callbacks in listeners:
            callbacks.remove(poke)


def job_finished(state, job_id: str) -> asyncio.Future:
    """A future resolved with the job once the tracker has finished it (at once if it has)."""
    future = asyncio.get_running_loop().create_future()
    job = state.tracker.get(job_id)
    if job is not None and job.finished:
        future.set_result(job)
        return future

    def listener(job, old):
        if job.job_id == job_id and job.finished and not future.done():
            future.set_result(job)
    state.tracker.listeners.append(listener)
    future.add_done_callback(lambda _: state.tracker.listeners.remove(listener))
    return future


class FakeClock:
    """An injected monotonic clock that tests move by hand."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A test client of the proxy: reads in the background, lets tests await messages."""

    def __init__(self, conn, user: str):
        self.conn = conn
        self.user = user
        self.received: list[Any] = []  # JSON dicts and binary frames, in order
        self.closed = asyncio.get_running_loop().create_future()
        self._cursor = 0
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.conn.read_message()
            if msg is None:
                if not self.closed.done():
                    self.closed.set_result((self.conn.close_code, self.conn.close_reason))
                self._changed.set()
                return
            self.received.append(json.loads(msg) if isinstance(msg, str) else msg)
            self._changed.set()

    def send(self, kind: str, data: Any = None) -> None:
        self.conn.write_message(json.dumps({"type": kind, "data": data if data is not None else {}}))

    def send_raw(self, payload, binary: bool = False):
        return self.conn.write_message(payload, binary=binary)

    async def next(self, kind: str | None = None, where: Callable[[Any], bool] | None = None,
                   timeout: float = TIMEOUT) -> Any:
        """The next message (after the previous match) of this type / matching ``where``."""
        async def find():
            while True:
                while self._cursor < len(self.received):
                    item = self.received[self._cursor]
                    self._cursor += 1
                    if kind == "binary":
                        if isinstance(item, bytes) and (where is None or where(item)):
                            return item
                        continue
                    if isinstance(item, dict) and (kind is None or item.get("type") == kind) \
                            and (where is None or where(item)):
                        return item
                if self.closed.done():
                    raise AssertionError(f"{self.user}: closed {self.closed.result()} while waiting for {kind}")
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(find(), timeout)

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait until ``predicate()`` holds, checked again on every message received."""
        async def wait():
            while not predicate():
                if self.closed.done():
                    raise AssertionError(f"{self.user}: closed {self.closed.result()}")
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    def json_messages(self) -> list[dict]:
        return [m for m in self.received if isinstance(m, dict)]

    def binary_frames(self) -> list[bytes]:
        return [m for m in self.received if isinstance(m, bytes)]

    async def submit(self, prompt: dict, **data) -> dict:
        self.send("submit_prompt", {"prompt": prompt, **data})
        return await self.next(where=lambda m: m.get("type") in ("prompt_accepted", "error"))

    async def run(self, prompt: dict, timeout: float = TIMEOUT, **data) -> tuple[str, str]:
        """Submit and wait for the final outcome: (prompt_id, final event type)."""
        accepted = await self.submit(prompt, **data)
        assert accepted["type"] == "prompt_accepted", accepted
        prompt_id = accepted["data"]["prompt_id"]
        final = await self.next(where=lambda m: m.get("type") in ("execution_success", "execution_error",
                                                                   "execution_interrupted")
                                and m["data"].get("prompt_id") == prompt_id, timeout=timeout)
        return prompt_id, final["type"]

    async def close(self) -> None:
        self.conn.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), TIMEOUT)
        except asyncio.TimeoutError:
            pass
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


class ProxyHarness:
    def __init__(self, *, simulator: bool = True, clock=None, wall=None, sim_kwargs: dict | None = None,
                 fleet: dict[str, dict] | None = None, **overrides):
        """``fleet``: several backends, name -> that simulator's arguments (``h.sims[name]``;
        ``h.sim`` is the first)."""
        self.overrides = overrides
        self.fleet = fleet
        self.sims: dict = {}
        self.use_simulator = simulator
        self.sim_kwargs = sim_kwargs or {}
        self.clock = clock
        self.wall = wall  # the epoch clock of stored timestamps and time limits
        self.key = DevKey.generate()
        self.clients: list[Client] = []
        self.sim = None

    async def __aenter__(self) -> "ProxyHarness":
        self._tmp = tempfile.TemporaryDirectory()
        jwks_path = os.path.join(self._tmp.name, "jwks.json")
        with open(jwks_path, "w") as f:
            json.dump(self.key.jwks(), f)
        comfy_url = "http://127.0.0.1:%d" % free_port()
        backends = []
        if self.fleet:
            from comfy_ws_proxy.testing.comfyui import ComfySimulator

            for name, kwargs in self.fleet.items():
                self.sims[name] = ComfySimulator(**kwargs)
                await self.sims[name].start()
                backends.append({"name": name, "url": self.sims[name].url})
            self.sim = next(iter(self.sims.values()))
        elif self.use_simulator:
            from comfy_ws_proxy.testing.comfyui import ComfySimulator

            self.sim = ComfySimulator(**self.sim_kwargs)
            await self.sim.start()
            comfy_url = self.sim.url
        values = {"comfy_url": comfy_url, "backends": backends, "jwt_key_file": jwks_path, "upstream_reconnect_min_ms": 20,
                  "upstream_reconnect_max_ms": 200, "breaker_open_ms": 50, "breaker_max_open_ms": 400,
                  "comfy_connect_timeout_ms": 2000, "comfy_request_timeout_ms": 5000, "submit_burst": 1000,
                  "submit_rate_per_s": 1000.0}
        values.update(self.overrides)
        if values.get("store_path") == "file":  # a store that outlives restart_proxy()
            values["store_path"] = os.path.join(self._tmp.name, "store.sqlite3")
        self.settings = settings_for_tests(**values)
        self._start_proxy(0)
        self.http = AsyncHTTPClient(force_instance=True)
        return self

    def _start_proxy(self, port: int) -> None:
        kwargs = {name: value for name, value in (("clock", self.clock), ("wall", self.wall)) if value is not None}
        self.app, self.state = make_app(self.settings, **kwargs)
        sockets = bind_sockets(port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = LimitedHTTPServer.from_settings(self.app, self.settings, metrics=self.state.metrics)
        self.server.add_sockets(sockets)
        self.state.start()

    async def restart_proxy(self, how: str, while_down: Callable[[], Any] | None = None) -> None:
        """Stop the proxy and start a new one on the same port and store (use store_path="file").
        ``how``: "term", the graceful stop of a SIGTERM; "kill", as if SIGKILLed: nothing more
        is said to anyone (clients and upstream sockets are cut, calls in flight abandoned).
        ``while_down``: awaited between the two (the world goes on without a proxy)."""
        state = self.state
        self.server.stop()
        if how == "term":
            await state.stop(grace=5)
        else:
            for timer_owner in (state.lag_monitor, state.pinger, state.service, state.registry, state.pool):
                timer_owner.stop()
            for session in state.registry.all():
                for conn in list(session.connections):
                    conn.ws_connection.stream.close()  # the clients' TCP connections just end
            for link in state.links.all():
                if link._conn is not None:
                    link._conn.abort()  # no close frame: the TCP connection just ends
            await state.links.close_all()
            state.store.close()
            state.http.close()
        await self.server.close_all_connections()
        if while_down is not None:
            await while_down()
        self._start_proxy(self.port)

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close()
        self.server.stop()
        await self.state.stop(grace=0)
        await self.server.close_all_connections()
        self.http.close()
        for sim in self.sims.values() or ([self.sim] if self.sim is not None else []):
            await sim.stop()
        self._tmp.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, **kwargs) -> str:
        if self.wall is not None:
            kwargs.setdefault("now", self.wall())  # the proxy checks tokens on its epoch clock
        return self.key.token(user, **kwargs)

    async def connect(self, user: str = "alice", *, token: str | None = None, via: str = "header",
                      headers: dict | None = None, session_message: bool = True) -> Client:
        token = self.token(user) if token is None else token
        request_headers = dict(headers or {})
        subprotocols = None
        url = f"ws://127.0.0.1:{self.port}/ws"
        if via == "header":
            request_headers["Authorization"] = f"Bearer {token}"
        elif via == "subprotocol":
            subprotocols = ["comfy-ws-proxy.v1", "bearer." + token]
        elif via == "query":
            url += "?token=" + token
        request = HTTPRequest(url, headers=request_headers)
        conn = await asyncio.wait_for(websocket_connect(request, subprotocols=subprotocols), TIMEOUT)
        client = Client(conn, user)
        self.clients.append(client)
        if session_message:
            await client.next("session")
        return client

    async def refused(self, token: str | None, *, via: str = "header", headers: dict | None = None
                      ) -> tuple[int, dict]:
        """Try an upgrade that must fail: returns (HTTP status, JSON body)."""
        request_headers = dict(headers or {})
        subprotocols = None
        url = f"ws://127.0.0.1:{self.port}/ws"
        if token is not None and via == "header":
            request_headers["Authorization"] = f"Bearer {token}"
        elif token is not None and via == "subprotocol":
            subprotocols = ["comfy-ws-proxy.v1", "bearer." + token]
        elif token is not None and via == "query":
            url += "?token=" + token
        try:
            conn = await asyncio.wait_for(websocket_connect(HTTPRequest(url, headers=request_headers),
                                                            subprotocols=subprotocols), TIMEOUT)
        except HTTPClientError as e:
            body = json.loads(e.response.body) if e.response is not None and e.response.body else {}
            return e.code, body
        conn.close()
        raise AssertionError("the upgrade was accepted")

    async def get(self, path: str, headers: dict | None = None):
        return await self.http.fetch(self.url + path, headers=headers, raise_error=False)

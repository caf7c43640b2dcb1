"""Connection-level limits (attack review, finding 6): idle TCP connections are capped in total
and per address and time out before their first request; at the cap the connection idle
longest makes room, so /health keeps answering; the descriptor budget; accept errors.

The real thing, a proxy process at a low RLIMIT_NOFILE, is in test_descriptors.py.
"""
import asyncio
import errno
import os
import subprocess
import sys

import pytest
import tornado.web
from tornado.netutil import bind_sockets

from comfy_ws_proxy.app import HTTP_CLIENT_MAX_CLIENTS, add_routes
from comfy_ws_proxy.config import ConfigError, load_settings, settings_for_tests
from comfy_ws_proxy.metrics import Metrics
from comfy_ws_proxy.server import (RESERVED_DESCRIPTORS, DescriptorBudget, LimitedHTTPServer, LogThrottle,
                                   capped_peer)

from .helpers import TIMEOUT, FakeClock, ProxyHarness

ROOT = os.path.join(os.path.dirname(__file__), "..")


# --- raw TCP clients ----------------------------------------------------------------------------
async def idle(port: int, source: str = "127.0.0.1"):
    """A connection that never sends a request (the attacker's kind)."""
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT)


async def get(port: int, path: str = "/health", source: str = "127.0.0.1") -> int:
    """One HTTP/1.0 request on a new connection: the status code (0: closed without an answer)."""
    reader, writer = await idle(port, source)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]) if answer else 0


async def closed_by_server(reader) -> bool:
    """Waits until the server closes the connection (an EOF or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    except ConnectionResetError:
        return True


async def until(server: LimitedHTTPServer, predicate) -> None:
    """Wait until ``predicate()`` holds: re-checked each time the server's bookkeeping
    changes (it runs a step behind the client's view)."""
    pulse = asyncio.Event()
    server.changed = pulse.set

    async def wait():
        while not predicate():
            pulse.clear()
            await pulse.wait()
    try:
        await asyncio.wait_for(wait(), TIMEOUT)
    finally:
        server.changed = lambda: None


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("comfy_ws_proxy_tcp_connections_dropped_total", {"reason": reason})


def accept_errors(metrics: Metrics, error: str) -> float:
    return metrics.registry.get_sample_value("comfy_ws_proxy_accept_errors_total", {"error": error})


class Health(tornado.web.RequestHandler):
    def get(self):
        self.write("ok")


class LimitedServer:
    """A LimitedHTTPServer with the given limits on an ephemeral port, serving /health."""

    def __init__(self, **kwargs):
        self.metrics = Metrics()
        kwargs.setdefault("max_connections", 1000)
        self.server = LimitedHTTPServer(tornado.web.Application([(r"/health", Health)]), metrics=self.metrics,
                                        **kwargs)

    async def __aenter__(self):
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server.add_sockets(sockets)
        self.writers = []
        return self

    async def idle(self, source: str = "127.0.0.1"):
        reader, writer = await idle(self.port, source)
        self.writers.append(writer)
        return reader, writer

    async def __aexit__(self, *exc):
        for writer in self.writers:
            writer.close()
        self.server.stop()
        await asyncio.wait_for(self.server.close_all_connections(), TIMEOUT)


# --- the total cap ----------------------------------------------------------------------------
async def test_health_answers_while_an_attacker_holds_every_connection(io_loop):
    async with ProxyHarness(max_tcp_connections=20) as h:
        alice = await h.connect("alice")  # a WebSocket: one of the 20, never shed
        attacker = [await idle(h.port) for _ in range(19)]
        assert await get(h.port, "/health") == 200  # (answered: every attacker connection was accepted before)
        assert await closed_by_server(attacker[0][0])  # the one idle longest made room
        assert h.server.connection_count == 19 and dropped(h.state.metrics, "shed_idle") == 1
        attacker.append(await idle(h.port))  # the attacker fills the place again: 20
        for _ in range(3):
            assert await get(h.port, "/health") == 200
        assert await closed_by_server(attacker[1][0])  # oldest first
        alice.send("ping")
        await alice.next("pong")  # shedding never takes a WebSocket
        assert h.server.connection_count == 19 and h.server.idle_count == 18
        for _, writer in attacker:
            writer.close()


async def test_at_the_cap_with_nothing_idle_a_new_connection_is_refused_and_said_once(io_loop, caplog):
    async with ProxyHarness(max_tcp_connections=2) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        for _ in range(3):
            assert await get(h.port, "/health") == 0  # closed at once, never read
        assert dropped(h.state.metrics, "over_total") == 3
        warnings = [r for r in caplog.records if r.name == "comfy_ws_proxy.server"]
        assert len(warnings) == 1 and "1 refused over the total" in warnings[0].getMessage()
        await bob.close()
        assert await get(h.port, "/health") == 200
        alice.send("ping")
        await alice.next("pong")


async def test_keep_alive_connections_between_requests_make_room_too(io_loop):
    """An attacker who sends one request and then idles holds a keep-alive connection: idle too."""
    async with LimitedServer(max_connections=3) as s:
        kept = []
        for _ in range(3):
            reader, writer = await s.idle()
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"ok"), TIMEOUT)
            kept.append(reader)
        await until(s.server, lambda: s.server.idle_count == 3)  # each waits for its next request
        assert await get(s.port) == 200
        assert await closed_by_server(kept[0])
        assert dropped(s.metrics, "shed_idle") == 1


# --- the first request's timeout ------------------------------------------------------------------
async def test_a_connection_without_a_first_request_is_closed_a_keep_alive_one_is_not(io_loop):
    clock = FakeClock()
    async with LimitedServer(first_request_timeout=10, clock=clock) as s:
        silent, _ = await s.idle()
        partial, partial_writer = await s.idle()
        partial_writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the header, never finished
        kept, kept_writer = await s.idle()
        kept_writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(kept.readuntil(b"ok"), TIMEOUT)  # (all three accepted by now)
        clock.advance(9)
        s.server.sweep()
        assert s.server.connection_count == 3
        clock.advance(1)
        s.server.sweep()
        assert await closed_by_server(silent) and await closed_by_server(partial)
        assert s.server.connection_count == 1 and dropped(s.metrics, "first_request_timeout") == 2
        kept_writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the keep-alive one still serves
        await asyncio.wait_for(kept.readuntil(b"ok"), TIMEOUT)


async def test_the_first_request_timeout_runs_on_its_own(io_loop):
    async with LimitedServer(first_request_timeout=0.1) as s:
        reader, _ = await s.idle()
        assert await closed_by_server(reader)
        assert dropped(s.metrics, "first_request_timeout") == 1


# --- the per-address cap -----------------------------------------------------------------------
async def test_the_per_address_cap_refuses_that_address_only(io_loop):
    # 127.0.0.1 plays a remote attacker (loopback is normally exempt), 127.0.0.2 someone else.
    async with LimitedServer(max_connections_per_address=3, capped=lambda peer: peer == "127.0.0.1") as s:
        held = [await s.idle("127.0.0.1") for _ in range(3)]
        assert await get(s.port, source="127.0.0.2") == 200
        assert await get(s.port, source="127.0.0.1") == 0
        assert dropped(s.metrics, "over_address") == 1 and s.server.per_address == {"127.0.0.1": 3}
        held[0][1].close()
        await until(s.server, lambda: s.server.per_address["127.0.0.1"] == 2)
        assert await get(s.port, source="127.0.0.1") == 200


def test_which_peers_the_per_address_cap_applies_to():
    assert capped_peer("203.0.113.5") and capped_peer("2001:db8::1") and capped_peer("fe80::1%eth0")
    assert not capped_peer("127.0.0.1") and not capped_peer("127.8.0.1") and not capped_peer("::1")
    assert not capped_peer("::ffff:127.0.0.1")  # IPv4-mapped loopback
    assert not capped_peer("")  # a Unix socket's peer


def test_from_settings_behind_a_proxy_has_no_per_address_cap():
    app = tornado.web.Application()
    budget = DescriptorBudget(limit=1024, in_use=20)
    direct = LimitedHTTPServer.from_settings(app, settings_for_tests(), budget=budget)
    assert direct.max_connections_per_address == 200 and direct.max_connections == budget.users == 438
    assert direct.first_request_timeout == 10.0
    behind = LimitedHTTPServer.from_settings(app, settings_for_tests(trust_forwarded=True, max_tcp_connections=50),
                                             budget=budget)
    assert behind.max_connections_per_address == 0 and behind.max_connections == 50 and behind.xheaders
    with pytest.raises(ValueError, match="TLS"):
        LimitedHTTPServer(app, max_connections=1, ssl_options={"certfile": "x.pem"})


# --- accept errors -----------------------------------------------------------------------------
class FailingListener:
    """A listening socket whose accept() fails (as at the descriptor limit) while ``error`` is set."""

    def __init__(self, error):
        self.sock = bind_sockets(0, "127.0.0.1")[0]
        self.port = self.sock.getsockname()[1]
        self.error = error
        self.accepts = 0

    def fileno(self):
        return self.sock.fileno()

    def accept(self):
        self.accepts += 1
        if self.error is not None:
            raise self.error
        return self.sock.accept()

    def close(self):
        self.sock.close()


async def test_out_of_descriptors_an_idle_connection_makes_room_else_accepting_pauses(io_loop, caplog):
    """In-process, with a listener that fails on demand; test_descriptors.py does it for real."""
    failing = FailingListener(OSError(errno.EMFILE, "Too many open files"))
    async with LimitedServer() as s:
        silent, _ = await s.idle()
        assert await get(s.port) == 200  # (silent is accepted)
        s.server.add_sockets([failing])
        pending = asyncio.ensure_future(get(failing.port))  # waits in the failing listener's backlog
        assert await closed_by_server(silent)  # the idle one made room
        # Then, nothing idle: accepting pauses, resumes, fails, pauses... (a few rounds)
        await until(s.server, lambda: accept_errors(s.metrics, "EMFILE") >= 4)
        failing.error = None
        assert await pending == 200  # accepting resumed
        assert await get(s.port) == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "comfy_ws_proxy.server"]
        assert len(lines) == 1 and lines[0].startswith("cannot accept connections: Too many open files x1;")
        assert "1 idle connections closed to make room" in lines[0]


def test_log_throttle_reports_once_per_interval_with_the_counts_since():
    throttle = LogThrottle(10)
    assert throttle.note(100.0, "EMFILE", "paused") == {"EMFILE": 1, "paused": 1}
    assert throttle.note(101.0, "EMFILE", "shed") is None
    assert throttle.note(109.9, "EMFILE", "paused") is None
    assert throttle.note(110.0, "EMFILE", "paused") == {"EMFILE": 3, "paused": 2, "shed": 1}
    assert throttle.note(110.5, "ENFILE") is None


# --- the descriptor budget ---------------------------------------------------------------------
def test_the_descriptor_budget_and_what_is_said_at_start():
    budget = DescriptorBudget(limit=20000, in_use=14)
    assert budget.users == (20000 - 14 - RESERVED_DESCRIPTORS) // 2 == 9929
    assert budget.connection_cap(0) == 9929 and budget.connection_cap(500) == 500
    [(level, line)] = budget.report(0, raised_from=1024)
    assert "limit 20000 (raised from 1024)" in line and "room for 9929 users" in line
    assert "MAX_TCP_CONNECTIONS 9929 (from the limit)" in line
    over = budget.report(20000)
    assert len(over) == 2 and "MAX_TCP_CONNECTIONS=20000 is more than the descriptor limit allows (9929 users)" \
        in over[1][1]
    tiny = DescriptorBudget(limit=64, in_use=14)
    assert tiny.users == 0 and tiny.connection_cap(0) == 1 and "room for no users" in tiny.report(0)[1][1]
    # What is kept aside covers the proxy's HTTP client to ComfyUI and its files.
    assert RESERVED_DESCRIPTORS >= HTTP_CLIENT_MAX_CLIENTS + 16


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    code = ("import resource; from comfy_ws_proxy.server import raise_descriptor_limit, descriptor_budget\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
            "print(raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard,"
            " descriptor_budget().limit == hard)\n")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["64", "True", "True"], result.stderr


# --- options -----------------------------------------------------------------------------------
BASE_ENV = {"COMFY_URL": "http://127.0.0.1:8188", "DEV_MODE": "true", "NO_VERIFY": "true"}
OPTIONS = ("MAX_TCP_CONNECTIONS", "MAX_TCP_CONNECTIONS_PER_ADDRESS", "FIRST_REQUEST_TIMEOUT_S",
           "CONNECTION_LOG_INTERVAL_S")


def test_the_options_defaults_validation_and_documentation():
    s = load_settings([], BASE_ENV)
    assert (s.max_tcp_connections, s.max_tcp_connections_per_address, s.first_request_timeout_s,
            s.connection_log_interval_s) == (0, 200, 10.0, 10.0)
    for flag, pattern in (("--max-tcp-connections=-1", "MAX_TCP_CONNECTIONS.*at least 0"),
                          ("--first-request-timeout-s=0", "FIRST_REQUEST_TIMEOUT_S.*between 0.1 and 75"),
                          ("--first-request-timeout-s=80", "FIRST_REQUEST_TIMEOUT_S.*between 0.1 and 75"),
                          ("--connection-log-interval-s=0", "CONNECTION_LOG_INTERVAL_S.*at least"),
                          ("--max-tcp-connections-per-address=50", "MAX_CONNECTIONS_PER_IP: 100 WebSockets")):
        with pytest.raises(ConfigError, match=pattern):
            load_settings([flag], BASE_ENV)
    # Behind nginx the per-address TCP cap does not apply, so it cannot conflict.
    assert load_settings(["--max-tcp-connections-per-address=50", "--trust-forwarded"], BASE_ENV)
    with open(os.path.join(ROOT, "docs", "configuration.rst"), encoding="utf-8") as f:
        readme = f.read()  # (the options' documentation moved from the README)
    for name in OPTIONS:
        assert f"``{name}``" in readme, name


# --- embedded ----------------------------------------------------------------------------------
async def test_a_host_application_on_the_limited_server_keeps_answering(io_loop):
    """The embedder owns the server: LimitedHTTPServer.from_settings gives it the same limits."""
    app = tornado.web.Application([(r"/hello", Health)])
    settings = settings_for_tests(comfy_url="http://127.0.0.1:1", no_verify=True, max_tcp_connections=10)
    state = add_routes(app, settings, prefix="/comfy")
    server = LimitedHTTPServer.from_settings(app, settings, metrics=state.metrics)
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server.add_sockets(sockets)
    state.start()
    attacker = []
    try:
        attacker = [await idle(port) for _ in range(10)]
        assert await get(port, "/comfy/health") == 200
        assert await closed_by_server(attacker[0][0])
        assert await get(port, "/hello") == 200
        text = state.metrics.exposition()[0].decode()
        assert "comfy_ws_proxy_tcp_connections 9.0" in text
        assert 'comfy_ws_proxy_tcp_connections_dropped_total{reason="shed_idle"} 1.0' in text
    finally:
        for _, writer in attacker:
            writer.close()
        server.stop()
        await asyncio.wait_for(state.stop(grace=0), TIMEOUT)
        await asyncio.wait_for(server.close_all_connections(), TIMEOUT)

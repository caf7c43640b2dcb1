"""The proxy as a real process at a low RLIMIT_NOFILE (attack review, finding 6): idle
connections never exhaust it at the cap derived from the limit; past the limit (a cap set
too high) accepts fail, and the proxy neither spins nor floods its log, closes idle
connections to make room, pauses accepting when none is idle, and /health answers again.

Linux only: /proc gives the child's CPU time. The limit is set by a tiny wrapper around
``python -m comfy_ws_proxy`` (``resource.setrlimit``, then ``runpy``) rather than a
``preexec_fn``, which is unsafe in a process with threads.
"""
import asyncio
import os
import re
import sys

import pytest

from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, free_port
from .test_durability import ProxyProcess
from .test_limits import closed_by_server, get, idle

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")

WRAPPER = ("import resource, runpy, sys\n"
           "limit = int(sys.argv[1])\n"
           "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
           "sys.argv[1:] = []\n"
           "runpy.run_module('comfy_ws_proxy', run_name='__main__', alter_sys=True)\n")


class LimitedProxyProcess(ProxyProcess):
    def __init__(self, tmp_path, nofile: int, **env):
        super().__init__(tmp_path, f"http://127.0.0.1:{free_port()}", DevKey.generate(), **env)
        self.nofile = nofile

    async def spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WRAPPER, str(self.nofile),
                                                         env=self.environ(), stderr=asyncio.subprocess.PIPE)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.drain_output()
            await asyncio.wait_for(self.proc.wait(), TIMEOUT)

    def server_lines(self) -> list[str]:
        return [line for line in self.lines if "comfy_ws_proxy.server" in line]


async def open_idle(port: int, n: int) -> list:
    return [await idle(port) for _ in range(n)]


async def busy(port: int):
    """A connection in the middle of a request (a POST's header, never its body): never idle,
    so never closed to make room. Its reader gets Tornado's "100 Continue" once it is."""
    reader, writer = await idle(port)
    writer.write(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
    return reader, writer


def close_all(connections) -> None:
    for _, writer in connections:
        writer.close()


async def test_at_the_cap_the_limit_allows_idle_connections_make_room(io_loop, tmp_path):
    proxy = LimitedProxyProcess(tmp_path, 300, metrics_public="true", connection_log_interval_s="60")
    attacker = []
    try:
        await proxy.start()
        line = await proxy.wait_for_line("descriptors: limit 300")
        cap = int(re.search(r"room for (\d+) users", line).group(1))
        assert f"MAX_TCP_CONNECTIONS {cap} (from the limit)" in line and 0 < cap < 150
        attacker = await open_idle(proxy.port, 2 * cap)
        assert await get(proxy.port, "/health") == 200
        assert await closed_by_server(attacker[0][0])
        metrics = await proxy_metrics(proxy.port)
        assert metrics["comfy_ws_proxy_tcp_connections"] <= cap
        assert metrics['comfy_ws_proxy_tcp_connections_dropped_total{reason="shed_idle"}'] >= 2  # (and more)
        assert metrics['comfy_ws_proxy_accept_errors_total{error="EMFILE"}'] == 0  # the cap came first
    finally:
        close_all(attacker)
        await proxy.stop()
    assert not any("cannot accept" in line for line in proxy.lines)
    [line] = proxy.server_lines()  # "at the connection caps ...": one per 60 s at most
    assert "at the connection caps" in line
    assert not any("Traceback" in line for line in proxy.lines)


async def test_out_of_descriptors_no_spin_no_flood_and_health_answers_again(io_loop, tmp_path):
    # A cap above what the limit allows: the process runs out of descriptors first.
    proxy = LimitedProxyProcess(tmp_path, 200, max_tcp_connections="1000", connection_log_interval_s="0.5")
    attacker = []
    try:
        await proxy.start()
        await proxy.wait_for_line("MAX_TCP_CONNECTIONS=1000 is more than the descriptor limit allows")
        # 1. Idle connections past the limit: the longest idle makes room for each new one.
        attacker = await open_idle(proxy.port, 300)
        await proxy.wait_for_line("cannot accept connections: Too many open files")
        assert await get(proxy.port, "/health") == 200
        close_all(attacker)
        # 2. Connections in the middle of a request (never idle) past the limit: nothing to
        # close, accepting pauses. Two reports in a row, one interval apart, and between them
        # nothing else from the server, and little CPU (a spinning accept loop: all of it).
        # (in waves, each one accepted before the next: connects faster than the proxy accepts
        # would overflow the listen backlog, and the kernel would hold them back meanwhile)
        attacker = []
        paused = asyncio.ensure_future(proxy.wait_for_line(", 0 idle (one line"))
        while not paused.done():
            wave = [await busy(proxy.port) for _ in range(20)]
            attacker += wave
            accepted = asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in wave),
                                      return_exceptions=True)  # (or closed to make room: an error)
            await asyncio.wait([paused, accepted], return_when=asyncio.FIRST_COMPLETED)
        await paused
        before, cpu_before = len(proxy.lines), proxy.cpu_seconds()
        report = await proxy.wait_for_line("cannot accept connections")
        assert proxy.cpu_seconds() - cpu_before < 0.25  # the interval is 0.5 s
        assert not any("comfy_ws_proxy.server" in line for line in proxy.lines[before:-1])
        assert int(re.search(r"accepting paused (\d+) times", report).group(1)) > 0 and ", 0 idle " in report
        health = asyncio.ensure_future(get(proxy.port, "/health"))  # waits in the listen backlog
        close_all(attacker)
        attacker = []
        assert await health == 200
    finally:
        close_all(attacker)
        await proxy.stop()
    # (A flood is thousands of lines a second; the proxy writes about one a second here.)
    assert len(proxy.server_lines()) < 100 and len(proxy.lines) < 1000, "".join(proxy.lines[-20:])
    assert not any("Traceback" in line or "Exception in callback" in line for line in proxy.lines)


async def proxy_metrics(port: int) -> dict:
    from tornado.httpclient import AsyncHTTPClient
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await asyncio.wait_for(client.fetch(f"http://127.0.0.1:{port}/metrics/prometheus"), TIMEOUT)
    finally:
        client.close()
    values = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values

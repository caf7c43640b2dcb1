#!/usr/bin/env python3
"""Jobs API figures: polling latency beside a bare Tornado handler, SSE fan-out, memory per
waiting ``Prefer: wait`` request.

    python scripts/bench_jobs_api.py                  # 200 polls/s for 10 s, 100 watchers, 1000 waiters
    python scripts/bench_jobs_api.py --rate 200 --seconds 20 --watchers 100 --waiters 2000

Real processes on loopback: the ComfyUI simulator, the proxy (``python -m comfy_ws_proxy``,
DEV_MODE with a real EdDSA key), and a bare Tornado server answering a JSON body of the same
size as a job (the baseline: what Tornado alone costs per request on this machine, in the same
run). The load comes from this process. Nothing is asserted; figures are printed (and written
with ``--json``).

1. ``poll``: GET /job/<id> of a finished job at ``--rate`` requests/s, keep-alive, spread over
   ``--clients`` connections; p50/p99 latency of the proxy and of the baseline, and their ratio.
   The proxy verifies the bearer token on every request (the baseline does not).
2. ``sse``: ``--watchers`` event streams on one job of ``--events`` images (a progress and a
   preview event each); the time from the job's start until every watcher had ``done``, events
   delivered, and the proxy's CPU seconds over it.
3. ``wait``: ``--waiters`` GET /job/<id> with ``Prefer: wait=60`` on a job that cannot run (the
   simulator paused); the proxy's RSS before and with them, per waiter.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from comfy_ws_proxy.testing.tokens import DevKey  # noqa: E402

BARE = r'''
import sys, tornado.ioloop, tornado.web
body = b"x" * int(sys.argv[2])
class H(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(body)
app = tornado.web.Application([(r"/job/.*", H)])
app.listen(int(sys.argv[1]), "127.0.0.1")
print("ready", flush=True)
tornado.ioloop.IOLoop.current().start()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


async def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def poll(url: str, headers: dict, rate: float, seconds: float, clients: int) -> list[float]:
    """Open-loop: requests start on schedule whatever the answers' latency."""
    http = AsyncHTTPClient(force_instance=True, max_clients=clients)
    latencies: list[float] = []

    async def one():
        started = time.perf_counter()
        response = await http.fetch(url, headers=headers, raise_error=False)
        if response.code == 200:
            latencies.append((time.perf_counter() - started) * 1000)

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    http.close()
    return latencies


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--json")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    key = DevKey.generate()
    jwks = os.path.join(tmp.name, "jwks.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    sim_port, proxy_port, bare_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    children = [subprocess.Popen([sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(sim_port),
                                  "--control"],
                                 env=env, stderr=subprocess.DEVNULL)]
    proxy = subprocess.Popen([sys.executable, "-m", "comfy_ws_proxy"], stderr=subprocess.DEVNULL, env=dict(
        env, COMFY_URL=f"http://127.0.0.1:{sim_port}", DEV_MODE="true", JWT_KEY_FILE=jwks, PORT=str(proxy_port),
        STORE_PATH=os.path.join(tmp.name, "store.sqlite3"), SUBMIT_BURST="100000", SUBMIT_RATE_PER_S="100000",
        MAX_EVENT_STREAMS_PER_USER="100000", LOG_LEVEL="warning"))
    children.append(proxy)
    results: dict = {}
    try:
        await wait_port(sim_port)
        await wait_port(proxy_port)
        token = key.token("alice", ttl=3600 * 4)
        auth = {"Authorization": "Bearer " + token}
        http = AsyncHTTPClient(force_instance=True)
        base = f"http://127.0.0.1:{proxy_port}"
        with open(os.path.join(ROOT, "comfy_ws_proxy", "testing", "workflows", "success.json")) as f:
            workflow = json.load(f)
        answer = await http.fetch(base + "/generate", method="POST", body=json.dumps(workflow),
                                  headers={**auth, "Prefer": "wait=30"})
        job = json.loads(answer.body)
        size = len(answer.body)
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port), str(size)], stdout=subprocess.PIPE)
        children.append(bare)
        bare.stdout.readline()

        # 1. polling
        for name, url in (("baseline", f"http://127.0.0.1:{bare_port}/job/{job['job_id']}"),
                          ("proxy", f"{base}/job/{job['job_id']}")):
            await poll(url, auth, args.rate, 1, args.clients)  # warm-up
            latencies = await poll(url, auth, args.rate, args.seconds, args.clients)
            results[f"poll_{name}"] = {"n": len(latencies), "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99)}
        p, b = results["poll_proxy"], results["poll_baseline"]
        print(f"poll GET /job/<id> at {args.rate:g}/s for {args.seconds:g} s ({size} B body):")
        print(f"  proxy    p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms  (n={p['n']})")
        print(f"  baseline p50 {b['p50_ms']:.2f} ms  p99 {b['p99_ms']:.2f} ms  (n={b['n']}; bare Tornado handler)")
        print(f"  ratio    p50 x{p['p50_ms'] / b['p50_ms']:.2f}  p99 x{p['p99_ms'] / b['p99_ms']:.2f}  (target p99 <= 5 ms)")

        # 2. SSE fan-out
        heavy = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": args.events,
                                                              "color": random.randrange(0xFFFFFF)}},
                 "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
        await http.fetch(f"http://127.0.0.1:{sim_port}/__sim/pause", method="POST", body=b"", raise_error=False)
        answer = await http.fetch(base + "/generate", method="POST", body=json.dumps(heavy), headers=auth)
        heavy_id = json.loads(answer.body)["job_id"]

        async def watch() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(f"GET /job/{heavy_id}/events HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data.count(b"\nevent: ")

        watchers = [asyncio.ensure_future(watch()) for _ in range(args.watchers)]
        await asyncio.sleep(1.0)  # every watcher connected (a bench, not a test)
        cpu0, t0 = cpu_seconds(proxy.pid), time.perf_counter()
        await http.fetch(f"http://127.0.0.1:{sim_port}/__sim/resume", method="POST", body=b"", raise_error=False)
        counts = await asyncio.gather(*watchers)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proxy.pid) - cpu0
        results["sse"] = {"watchers": args.watchers, "events_per_watcher_min": min(counts),
                          "events_total": sum(counts), "seconds": elapsed, "proxy_cpu_s": cpu}
        print(f"sse: {args.watchers} watchers of one job of {args.events} images: every watcher done after "
              f"{elapsed:.2f} s, {sum(counts)} events delivered (min {min(counts)} per watcher), proxy CPU "
              f"{cpu:.2f} s ({cpu / max(1, sum(counts)) * 1e6:.0f} us per event delivered)")

        # 3. memory per Prefer: wait
        await http.fetch(f"http://127.0.0.1:{sim_port}/__sim/pause", method="POST", body=b"", raise_error=False)
        answer = await http.fetch(base + "/generate", method="POST", body=json.dumps(heavy), headers=auth)
        stuck = json.loads(answer.body)["job_id"]
        await asyncio.sleep(0.5)
        before = rss_mib(proxy.pid)
        socks = []
        for _ in range(args.waiters):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(f"GET /job/{stuck} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         f"Prefer: wait=60\r\n\r\n".encode())
            socks.append(writer)
        await asyncio.sleep(2.0)  # every request parsed and waiting
        during = rss_mib(proxy.pid)
        per = (during - before) * 1024 * 1024 / args.waiters
        results["wait"] = {"waiters": args.waiters, "rss_before_mib": before, "rss_during_mib": during,
                           "bytes_per_waiter": per}
        print(f"wait: {args.waiters} requests waiting (Prefer: wait=60): proxy RSS {before:.1f} -> {during:.1f} MiB, "
              f"{per / 1024:.1f} KiB per waiting request (connection, parsed request, handler, one future)")
        for w in socks:
            w.close()
        http.close()
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
        tmp.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

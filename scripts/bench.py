#!/usr/bin/env python3
"""Benchmark harness of comfy_ws_proxy (see docs/bench.rst).

    python scripts/bench.py            # full run (several minutes)
    python scripts/bench.py --smoke    # small N, a few seconds per scenario

Every server and every load client is a separate process on loopback: the ComfyUI simulator
(``python -m comfy_ws_proxy.testing.comfyui``), the proxy (``python -m comfy_ws_proxy``), a
"rate source" (a tiny ComfyUI look-alike in this file that streams ``progress`` events at a
fixed rate), nginx as a blind WebSocket relay (if /usr/sbin/nginx exists), and load-client
workers (this file with ``--worker``, driven over stdin/stdout). Figures are printed as one
table beside their targets and written as JSON (``--json``). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NGINX = "/usr/sbin/nginx"
METRICS_SECRET = "dev-metrics-secret"
PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {}}}
HEAVY_PREFIX = "ffffffff-"  # prompt ids of the rate source's heavy stream (slow-consumer scenario)
LARGE_WORKFLOW = os.path.join(ROOT, "comfy_ws_proxy", "testing", "workflows", "success-ws-large.json")
KIB = 1024
MIB = 1024 * 1024


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (and beyond if allowed). Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, 262144, 65536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values, p: float):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =============================================================================================
# The rate source: a minimal ComfyUI look-alike that streams progress events at a fixed rate.
# =============================================================================================

def rate_source_main(port: int, rate: float, heavy_rate: float, heavy_pad: int) -> int:
    import tornado.web
    from tornado.websocket import WebSocketClosedError, WebSocketHandler

    raise_nofile()
    sockets: dict = {}
    streams: set = set()
    active: dict = {}  # prompt_id -> (number, client_id, task): reported as running by GET /queue
    history: dict = {}  # prompt_id -> ComfyUI's history entry, once its stream stopped
    counter = {"number": 0}

    def ended(cid: str, pid: str) -> None:
        """A stream that stops (stop_all, the deadline, its socket gone) ends its prompt as an
        interrupt ends one in ComfyUI: in /history, and its socket told. A prompt that merely
        vanished would be, to the proxy, one a restarted ComfyUI forgot: after JOB_WATCHDOG_S
        it is sent again, and its new stream, to a user who left, would load the next rounds."""
        history[pid] = {"prompt": [0, pid, PROMPT, {"client_id": cid}, []], "outputs": {},
                        "status": {"status_str": "error", "completed": False,
                                   "messages": [["execution_interrupted", {"prompt_id": pid}]]}}
        ws = sockets.get(cid)
        if ws is None:
            return
        for kind, data in (("execution_interrupted", {"prompt_id": pid, "node_id": "3", "node_type": "KSampler",
                                                      "executed": []}),
                           ("executing", {"node": None, "prompt_id": pid})):
            try:
                ws.write_message(json.dumps({"type": kind, "data": data}, separators=(",", ":")))
            except WebSocketClosedError:
                return

    async def stream(cid: str, pid: str) -> None:
        try:
            await _stream(cid, pid)
        finally:
            ended(cid, pid)

    async def _stream(cid: str, pid: str) -> None:
        heavy = pid.startswith(HEAVY_PREFIX)
        r = heavy_rate if heavy else rate
        pad = ("x" * heavy_pad) if heavy else None
        loop = asyncio.get_running_loop()
        start = loop.time() + random.random() / r  # spread the streams' phases
        deadline = loop.time() + 600
        gone_since = None
        i = 0
        while loop.time() < deadline:
            delay = start + i / r - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            ws = sockets.get(cid)
            if ws is None:
                gone_since = gone_since or loop.time()
                if loop.time() - gone_since > 5:
                    return
                continue
            gone_since = None
            data = {"value": i, "max": 1000000, "prompt_id": pid, "node": "3", "t": time.time_ns()}
            if pad is not None:
                data["pad"] = pad
            try:
                ws.write_message(json.dumps({"type": "progress", "data": data}, separators=(",", ":")))
            except WebSocketClosedError:
                pass

    class Ws(WebSocketHandler):
        def check_origin(self, origin):
            return True

        def open(self):
            self.cid = self.get_query_argument("clientId", "") or uuid.uuid4().hex
            sockets[self.cid] = self
            self.write_message(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": 0}}, "sid": self.cid}}))

        def on_message(self, message):
            if isinstance(message, str) and '"feature_flags"' in message:
                self.write_message(json.dumps({"type": "feature_flags",
                                               "data": {"supports_preview_metadata": True}}))

        def on_close(self):
            if sockets.get(self.cid) is self:
                del sockets[self.cid]

    class Json(tornado.web.RequestHandler):
        def reply(self, data, status=200):
            self.set_status(status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(data))

    class Prompt(Json):
        def get(self):
            self.reply({"exec_info": {"queue_remaining": 0}})

        def post(self):
            body = json.loads(self.request.body or b"{}")
            pid = str(body.get("prompt_id") or uuid.uuid4())
            cid = body.get("client_id") or (body.get("extra_data") or {}).get("client_id")
            counter["number"] += 1
            self.reply({"prompt_id": pid, "number": counter["number"], "node_errors": {}})
            # ComfyUI broadcasts a status (no sid) when its queue changes; the proxy relies on it
            # to know its upstream socket is still routed to. Sent to the owner only here.
            ws = sockets.get(cid) if cid else None
            if ws is not None:
                try:
                    ws.write_message(json.dumps({"type": "status", "data": {
                        "status": {"exec_info": {"queue_remaining": len(streams) + 1}}}}))
                except WebSocketClosedError:
                    pass
            if cid and pid not in active:  # a re-POST of a streaming prompt does not start a second stream
                task = asyncio.ensure_future(stream(cid, pid))
                active[pid] = (counter["number"], cid, task)
                streams.add(task)

                def done(t, pid=pid):
                    streams.discard(t)
                    active.pop(pid, None)
                task.add_done_callback(done)

    class StopAll(Json):
        def post(self):
            n = len(streams)
            for task in list(streams):
                task.cancel()
            self.reply({"stopped": n})

    class Queue(Json):
        def get(self):
            running = [[n, pid, {}, {"client_id": cid}, []] for pid, (n, cid, _) in active.items()]
            self.reply({"queue_running": running, "queue_pending": []})

        def post(self):
            self.reply({})

    class Empty(Json):
        def get(self, *args):
            self.reply({})

        def post(self, *args):
            self.reply({})

    class History(Json):
        def get(self, pid=None):
            entry = history.get(pid) if pid else None
            self.reply({pid: entry} if entry is not None else {})

    class Stats(Json):
        def get(self):
            self.reply({"system": {"comfyui_version": "bench-rate-source"}, "devices": []})

    routes = []
    for prefix in ("", "/api"):
        routes += [(prefix + "/ws", Ws), (prefix + "/prompt", Prompt), (prefix + "/queue", Queue),
                   (prefix + "/system_stats", Stats), (prefix + "/history", History), (prefix + "/history/([^/]+)", History),
                   (prefix + "/interrupt", Empty), (prefix + "/features", Empty)]
    routes.append(("/bench/stop_all", StopAll))

    async def run():
        app = tornado.web.Application(routes, websocket_max_message_size=64 * MIB)
        app.listen(port, "127.0.0.1")
        print(f"RATE SOURCE listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def tcp_relay_main(port: int, upstream_port: int) -> int:
    """A blind TCP relay in plain asyncio (Protocols, no parsing, no Tornado): what relaying
    costs CPython at the least. Beside nginx it shows how much of the proxy's CPU per event
    is the language and its event loop rather than the proxy's own work."""

    scratch = memoryview(bytearray(64 * 1024))  # shared: get_buffer/buffer_updated run back to back

    class Pipe(asyncio.BufferedProtocol):  # (a plain Protocol pays a 256 KiB allocation per recv)
        def __init__(self, peer=None):
            self.peer = peer  # the other side's transport
            self.transport = None
            self.pending = []

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            return scratch

        def buffer_updated(self, nbytes):
            data = bytes(scratch[:nbytes])
            if self.peer is None:
                self.pending.append(data)
            else:
                self.peer.write(data)

        def connection_lost(self, exc):
            if self.peer is not None:
                self.peer.close()

    async def run():
        loop = asyncio.get_running_loop()

        async def connect_upstream(client: Pipe):
            try:
                _, up = await loop.create_connection(lambda: Pipe(client.transport), "127.0.0.1", upstream_port)
            except OSError:
                client.transport.close()
                return
            client.peer = up.transport
            for chunk in client.pending:
                up.transport.write(chunk)
            client.pending = []

        def accept():
            client = Pipe()
            loop.call_soon(lambda: asyncio.ensure_future(connect_upstream(client)))
            return client

        server = await loop.create_server(accept, "127.0.0.1", port)
        print(f"TCP RELAY listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        async with server:
            await server.serve_forever()

    raise_nofile()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


# =============================================================================================
# Load-client workers: one process each, driven over stdin/stdout with JSON lines.
#   stdin line 1: the spec; then "GO <t0> <t1>" (wall-clock seconds) or "CLOSE".
#   stdout: "READY {...}", "RESULT {...}".
# =============================================================================================

def worker_main() -> int:
    raise_nofile()
    spec = json.loads(sys.stdin.readline())
    try:
        return asyncio.run(_worker(spec))
    except KeyboardInterrupt:
        return 1


def _out(tag: str, data) -> None:
    sys.stdout.write(tag + " " + json.dumps(data) + "\n")
    sys.stdout.flush()


async def _stdin_line() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


async def _ws(url: str, token: str | None = None, timeout: float = 30.0):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect
    headers = {"Authorization": "Bearer " + token} if token else {}
    req = HTTPRequest(url, headers=headers, connect_timeout=timeout, request_timeout=timeout)
    return await asyncio.wait_for(websocket_connect(req, max_message_size=64 * MIB), timeout)


async def _read_until(conn, pred, timeout: float):
    async def go():
        while True:
            msg = await conn.read_message()
            if msg is None:
                raise ConnectionError(f"closed {conn.close_code} {conn.close_reason}")
            if pred(msg):
                return msg
    return await asyncio.wait_for(go(), timeout)


def _is_type(kind):
    return lambda m: isinstance(m, str) and json.loads(m).get("type") == kind


async def _worker(spec: dict) -> int:
    kind = spec["kind"]
    if kind == "stream":
        return await _worker_stream(spec)
    if kind == "idle":
        return await _worker_idle(spec)
    if kind == "churn":
        return await _worker_churn(spec)
    if kind == "storm":
        return await _worker_storm(spec)
    if kind == "large":
        return await _worker_large(spec)
    raise SystemExit(f"unknown worker kind {kind}")


async def _worker_stream(spec: dict) -> int:
    """Users receiving progress events: directly from the source, via nginx, or via the proxy."""
    from tornado.httpclient import AsyncHTTPClient
    http = AsyncHTTPClient(force_instance=True, max_clients=50)
    window = [float("inf"), float("-inf")]  # ns
    lat: list[float] = []
    first = {}
    errors: list[str] = []
    conns = []
    sem = asyncio.Semaphore(50)

    async def reader(idx, conn, heavy=False):
        while True:
            msg = await conn.read_message()
            if msg is None:
                return
            if not isinstance(msg, str) or '"progress"' not in msg:
                continue
            now = time.time_ns()
            if idx not in first:
                first[idx] = now
            if window[0] <= now <= window[1] and not heavy:  # a heavy stream's own latency is not counted
                try:
                    lat.append((now - json.loads(msg)["data"]["t"]) / 1e6)
                except (ValueError, KeyError, TypeError):
                    pass

    async def one(idx, user):
        try:
            async with sem:
                if spec["path"] == "proxy":
                    conn = await _ws(spec["ws_url"], user["token"])
                    conns.append(conn)
                    await _read_until(conn, _is_type("session"), 30)
                    data = {"prompt": PROMPT}
                    if user.get("heavy"):  # the rate source streams this prompt at --stall-rate, padded
                        data["prompt_id"] = HEAVY_PREFIX + str(uuid.uuid4())[9:]
                    conn.write_message(json.dumps({"type": "submit_prompt", "data": data}))
                    acc = await _read_until(conn, lambda m: isinstance(m, str) and json.loads(m).get("type") in
                                            ("prompt_accepted", "error"), 30)
                    if json.loads(acc)["type"] == "error":
                        raise RuntimeError(acc[:200])
                else:
                    cid = user["cid"]
                    conn = await _ws(spec["ws_url"] + "?clientId=" + cid)
                    conns.append(conn)
                    await _read_until(conn, _is_type("status"), 30)
                    body = json.dumps({"prompt": PROMPT, "client_id": cid, "prompt_id": str(uuid.uuid4())})
                    resp = await http.fetch(spec["post_url"], method="POST", body=body, request_timeout=30)
                    assert resp.code == 200
            await reader(idx, conn, bool(user.get("heavy")))
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            errors.append(f"{type(e).__name__}: {e}"[:200])

    tasks = [asyncio.ensure_future(one(i, u)) for i, u in enumerate(spec["users"])]
    deadline = time.monotonic() + 60
    while len(first) + len(errors) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    _out("READY", {"streaming": len(first), "errors": len(errors)})
    cmd = await _stdin_line()
    if cmd.startswith("GO"):
        _, t0, t1 = cmd.split()
        window[0], window[1] = int(float(t0) * 1e9), int(float(t1) * 1e9)
        await asyncio.sleep(max(0.0, float(t1) - time.time()) + 0.3)
    _out("RESULT", {"lat_ms": lat, "count": len(lat), "streaming": len(first), "errors": errors[:5],
                    "n_errors": len(errors)})
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    http.close()
    return 0


async def _worker_idle(spec: dict) -> int:
    """Connected idle users of the proxy: connect, wait for session, hold until CLOSE."""
    conns, errors = [], []
    sem = asyncio.Semaphore(100)

    async def one(token):
        try:
            async with sem:
                conn = await _ws(spec["ws_url"], token, timeout=60)
                await _read_until(conn, _is_type("session"), 60)
                conns.append(conn)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}"[:200])

    await asyncio.gather(*(one(t) for t in spec["tokens"]))
    _out("READY", {"connected": len(conns), "n_errors": len(errors), "errors": errors[:3]})

    async def drain(conn):  # keep reading pings/status so nothing backs up
        while await conn.read_message() is not None:
            pass
    drains = [asyncio.ensure_future(drain(c)) for c in conns]
    await _stdin_line()
    for conn in conns:
        conn.close()
    await asyncio.wait(drains, timeout=10)
    _out("RESULT", {"closed": len(conns)})
    return 0


async def _worker_churn(spec: dict) -> int:
    """Connect and disconnect users in batches: their sessions stay in the proxy."""
    done, errors = 0, []
    tokens = spec["tokens"]
    batch = spec.get("batch", 200)

    async def one(token):
        nonlocal done
        try:
            conn = await _ws(spec["ws_url"], token, timeout=60)
            await _read_until(conn, _is_type("session"), 60)
            conn.close()
            await asyncio.wait_for(_read_until(conn, lambda m: False, 10), 10)
        except ConnectionError:
            done += 1  # the close completed
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}"[:200])

    for i in range(0, len(tokens), batch):
        await asyncio.gather(*(one(t) for t in tokens[i:i + batch]))
    _out("RESULT", {"done": done, "n_errors": len(errors), "errors": errors[:3]})
    return 0


async def _worker_storm(spec: dict) -> int:
    """All users connect at t0 at once; time from t0 to each one's session message."""
    _out("READY", {})
    cmd = await _stdin_line()
    t0 = float(cmd.split()[1])
    await asyncio.sleep(max(0.0, t0 - time.time()))
    times, errors, conns = [], [], []

    async def one(token):
        try:
            conn = await _ws(spec["ws_url"], token, timeout=30)
            conns.append(conn)
            await _read_until(conn, _is_type("session"), 30)
            times.append(time.time() - t0)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}"[:200])

    await asyncio.gather(*(one(t) for t in spec["tokens"]))
    _out("RESULT", {"times": times, "n_errors": len(errors), "errors": errors[:3]})
    await _stdin_line()
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.3)
    return 0


async def _worker_large(spec: dict) -> int:
    """The 8 MB SaveImageWebsocket frame, directly from the simulator and through the proxy,
    alternating; time from POST (or submit_prompt) to the binary frame."""
    from tornado.httpclient import AsyncHTTPClient
    http = AsyncHTTPClient(force_instance=True)
    with open(LARGE_WORKFLOW, encoding="utf-8") as f:
        base = json.load(f)
    results = {"direct": [], "proxy": []}
    sizes, errors = [], []

    def fresh_prompt():
        prompt = json.loads(json.dumps(base))
        for node in prompt.values():  # a new seed each run: an identical re-run would be cached
            if "seed" in node.get("inputs", {}):
                node["inputs"]["seed"] = random.randrange(1 << 31)
        return prompt

    def is_done(m):
        return isinstance(m, str) and json.loads(m).get("type") in ("execution_success", "execution_error")

    async def direct():
        cid = uuid.uuid4().hex
        conn = await _ws(spec["sim_ws"] + "?clientId=" + cid)
        try:
            conn.write_message(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            await _read_until(conn, _is_type("status"), 30)
            t0 = time.perf_counter()
            body = json.dumps({"prompt": fresh_prompt(), "client_id": cid})
            await http.fetch(spec["sim_http"] + "/prompt", method="POST", body=body, request_timeout=60)
            frame = await _read_until(conn, lambda m: isinstance(m, bytes) and len(m) > MIB, 60)
            results["direct"].append(time.perf_counter() - t0)
            sizes.append(len(frame))
            await _read_until(conn, is_done, 60)
        finally:
            conn.close()

    async def proxied(token):
        conn = await _ws(spec["ws_url"], token)
        try:
            await _read_until(conn, _is_type("session"), 30)
            t0 = time.perf_counter()
            conn.write_message(json.dumps({"type": "submit_prompt", "data": {"prompt": fresh_prompt()}}))
            frame = await _read_until(conn, lambda m: isinstance(m, bytes) and len(m) > MIB, 60)
            results["proxy"].append(time.perf_counter() - t0)
            sizes.append(len(frame))
            await _read_until(conn, is_done, 60)
        finally:
            conn.close()

    for i, token in enumerate(spec["tokens"]):
        order = [direct, lambda: proxied(token)] if i % 2 == 0 else [lambda: proxied(token), direct]
        for step in order:
            try:
                await step()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}"[:200])
            await asyncio.sleep(0.2)
    _out("RESULT", {"direct_s": results["direct"], "proxy_s": results["proxy"], "frame_bytes": max(sizes or [0]),
                    "n_errors": len(errors), "errors": errors[:3]})
    http.close()
    return 0


# =============================================================================================
# The orchestrator (synchronous): child processes, /proc readings, scenarios, the table.
# =============================================================================================

class Child:
    """A child process whose stderr (or stdout) lines are collected by a thread."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, ready: tuple[str, ...] = (),
                 timeout: float = 30.0, cwd: str = ROOT):
        self.name = name
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._patterns = ready
        self.matched = False
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     start_new_session=True)
        CHILDREN.append(self)
        threading.Thread(target=self._drain, daemon=True).start()
        if ready:
            self._ready.wait(timeout)
            if not self.matched:
                tail = "\n".join(self.lines[-20:])
                raise RuntimeError(f"{name} not ready within {timeout}s (exit {self.proc.poll()}):\n{tail}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            if len(self.lines) < 2000:
                self.lines.append(line.rstrip())
            if not self.matched and any(p in line for p in self._patterns):
                self.matched = True
                self._ready.set()
        self._ready.set()  # exited: wake the waiter (it checks poll())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass


class Worker:
    """A load-client process (this file with --worker), spoken to over stdin/stdout."""

    def __init__(self, spec: dict, logdir: str):
        self.log = open(os.path.join(logdir, f"worker-{uuid.uuid4().hex[:8]}.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=ROOT,
                                     env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        WORKERS.append(self)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(json.dumps(spec))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def expect(self, tag: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker: no {tag} within {timeout:.0f}s")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"worker exited ({self.proc.poll()}) before {tag}; see {self.log.name}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self.log.close()


CHILDREN: list[Child] = []
WORKERS: list[Worker] = []


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()
        if w in WORKERS:
            WORKERS.remove(w)


def proc_status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM value of /proc/<pid>/status in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of /proc/<pid>/stat, in seconds: user-space work and kernel work."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def http_get(port: int, path: str, headers: dict | None = None, timeout: float = 10) -> str:
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def http_post(port: int, path: str, body: dict, timeout: float = 10) -> str:
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def scrape(port: int) -> str:
    return http_get(port, "/metrics", {"Authorization": "Bearer " + METRICS_SECRET, "Accept": "text/plain"})


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def lag_buckets(text: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'^comfy_ws_proxy_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    return out


def lag_p99(before: str, after: str) -> tuple[float | None, int]:
    """The upper bound of the bucket holding the 99th percentile of the samples between two scrapes."""
    b, a = lag_buckets(before), lag_buckets(after)
    delta = {le: a.get(le, 0) - b.get(le, 0) for le in a}
    total = delta.get(float("inf"), 0)
    if total <= 0:
        return None, 0
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return le, int(total)
    return None, int(total)


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.tmp = tempfile.mkdtemp(prefix="comfy-bench-")
        from comfy_ws_proxy.testing.tokens import DevKey
        self.key = DevKey.generate("bench-1")
        self.jwks = os.path.join(self.tmp, "jwks.json")
        with open(self.jwks, "w") as f:
            json.dump(self.key.jwks(), f)
        self.rows: list[dict] = []
        self.details: dict = {}
        self.notes: list[str] = []
        self.nofile = raise_nofile()
        self._n = 0

    # --- processes ---------------------------------------------------------------------------
    def start_simulator(self) -> tuple[Child, int]:
        port = free_port()
        child = Child("simulator", [sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(port)],
                      env=child_env(), ready=("listening on",))
        return child, port

    def start_rate_source(self, rate: float | None = None) -> tuple[Child, int]:
        port = free_port()
        argv = [sys.executable, os.path.abspath(__file__), "--rate-source", "--port", str(port),
                "--rate", str(rate or self.args.rate), "--heavy-rate", str(self.args.stall_rate),
                "--heavy-pad", str(self.args.stall_pad)]
        return Child("rate source", argv, env=child_env(), ready=("listening on",)), port

    def start_proxy(self, comfy_port: int, **extra) -> tuple[Child, int]:
        port = free_port()
        self._n += 1
        env = child_env({"COMFY_URL": f"http://127.0.0.1:{comfy_port}", "DEV_MODE": "true",
                         "JWT_KEY_FILE": self.jwks, "STORE_PATH": os.path.join(self.tmp, f"store-{self._n}.sqlite3"),
                         "PORT": str(port), "HOST": "127.0.0.1", "MAX_CONNECTIONS_PER_IP": "0",
                         "SUBMIT_RATE_PER_S": "100000", "SUBMIT_BURST": "100000", "LOG_LEVEL": "warning",
                         **{k.upper(): str(v) for k, v in extra.items()}})
        for k in ("COMFY_WS_PROXY_CONFIG", "METRICS_SECRET", "NO_VERIFY", "JWT_JWKS_URL"):
            env.pop(k, None)
        # "listening on" is an INFO line; at LOG_LEVEL=warning the DEV_MODE warning, logged right
        # after the socket is bound, is the readiness line.
        child = Child("proxy", [sys.executable, "-m", "comfy_ws_proxy"], env=env,
                      ready=("listening on", "DEV_MODE is on"))
        return child, port

    def start_nginx(self, upstream_port: int) -> tuple[Child, int] | None:
        if not os.path.exists(NGINX):
            return None
        port = free_port()
        d = tempfile.mkdtemp(dir=self.tmp, prefix="nginx-")
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""{user}worker_processes 1;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
            proxy_buffering off;
        }}
    }}
}}
""")
        directives = f"daemon off; pid {d}/nginx.pid; error_log stderr notice;"
        try:
            child = Child("nginx", [NGINX, "-p", d, "-c", conf, "-g", directives], ready=("start worker process",))
        except RuntimeError as e:
            self.notes.append(f"nginx failed to start, column skipped: {str(e)[:300]}")
            return None
        return child, port

    def tokens(self, prefix: str, n: int) -> list[str]:
        return [self.key.token(f"{prefix}-{i}", ttl=7200) for i in range(n)]

    def row(self, scenario: str, figure: str, value, unit: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append({"scenario": scenario, "figure": figure, "value": value, "unit": unit, "target": target,
                          "ok": ok})

    # --- 1. relay ------------------------------------------------------------------------------
    def stream_segment(self, path: str, ws_url: str, post_url: str, users: list[dict], duration: float,
                       cpu_pid: int | None = None, rss_pid: int | None = None, during=None) -> dict:
        workers = [Worker({"kind": "stream", "path": path, "ws_url": ws_url, "post_url": post_url, "users": part},
                          self.tmp) for part in split(users, self.args.procs)]
        try:
            ready = [w.expect("READY", 90) for w in workers]
            if during is not None:
                during("start")
            t0 = time.time() + 1.0  # 1 s warm-up
            t1 = t0 + duration
            for w in workers:
                w.send(f"GO {t0} {t1}")
            rss_samples = []
            time.sleep(max(0.0, t0 - time.time()))
            cpu0 = proc_cpu_split(cpu_pid) if cpu_pid else None
            while time.time() < t1:
                if rss_pid:
                    rss_samples.append(proc_status(rss_pid, "VmRSS"))
                time.sleep(min(0.5, max(0.0, t1 - time.time())))
            cpu1 = proc_cpu_split(cpu_pid) if cpu_pid else None
            if rss_pid:
                rss_samples.append(proc_status(rss_pid, "VmRSS"))
            results = [w.expect("RESULT", duration + 60) for w in workers]
        finally:
            stop_workers(workers)
        lat = [x for r in results for x in r["lat_ms"]]
        errs = [e for r in results for e in r["errors"]]
        return {"path": path, "p50": pct(lat, 50), "p99": pct(lat, 99), "count": len(lat),
                "rate": len(lat) / duration, "streaming": sum(r["streaming"] for r in ready),
                "errors": sum(r["n_errors"] for r in results), "error_samples": errs[:3],
                "cpu_s": (cpu1[0] + cpu1[1] - cpu0[0] - cpu0[1]) if cpu_pid else None,
                "cpu_user_s": (cpu1[0] - cpu0[0]) if cpu_pid else None,
                "cpu_sys_s": (cpu1[1] - cpu0[1]) if cpu_pid else None, "rss_samples": rss_samples}

    def relay_paths(self, rate: float) -> dict:
        """A rate source streaming ``rate`` events/s per user, and in front of it: the proxy,
        nginx (if installed) and a blind asyncio TCP relay."""
        p = {}
        p["src"], p["src_port"] = self.start_rate_source(rate)
        p["proxy"], p["proxy_port"] = self.start_proxy(p["src_port"])
        p["ng"] = self.start_nginx(p["src_port"])
        p["tcp_port"] = free_port()
        p["tcp"] = Child("asyncio relay", [sys.executable, os.path.abspath(__file__), "--tcp-relay", "--port",
                                           str(p["tcp_port"]), "--upstream-port", str(p["src_port"])],
                         env=child_env(), ready=("listening on",))
        return p

    @staticmethod
    def nginx_worker(ng) -> int | None:
        """The pid of nginx's single worker (forked after its master printed it started)."""
        if ng is None:
            return None
        for _ in range(50):
            workers = child_pids(ng[0].pid)
            if len(workers) == 1:
                return workers[0]
            time.sleep(0.1)
        return None

    @staticmethod
    def stop_paths(p: dict) -> None:
        for c in (p.get("tcp"), p["ng"][0] if p.get("ng") else None, p.get("proxy"), p.get("src")):
            if c:
                c.stop()

    def relay_segment(self, path: str, tag: str, n: int, p: dict, duration: float) -> dict:
        if path == "proxy":
            users = [{"token": t} for t in self.tokens(tag, n)]
            ws_url = f"ws://127.0.0.1:{p['proxy_port']}/ws"
        else:
            users = [{"cid": uuid.uuid4().hex} for _ in range(n)]
            port = {"direct": p["src_port"], "nginx": p["ng"][1] if p["ng"] else None,
                    "asyncio": p["tcp_port"]}[path]
            ws_url = f"ws://127.0.0.1:{port}/ws"
        cpu_pid = {"proxy": p["proxy"].pid, "nginx": self.nginx_worker(p["ng"]), "asyncio": p["tcp"].pid}.get(path)
        seg = self.stream_segment(path, ws_url, f"http://127.0.0.1:{p['src_port']}/prompt", users, duration,
                                  cpu_pid=cpu_pid)
        http_post(p["src_port"], "/bench/stop_all", {})
        time.sleep(0.5)
        return seg

    def scenario_relay(self) -> None:
        n, m = self.args.users, self.args.rate
        rounds, duration = (1, 3.0) if self.smoke else (3, 10.0)
        p = self.relay_paths(m)
        if p["ng"] is None:
            self.notes.append("relay: /usr/sbin/nginx not found (or failed): the nginx column is skipped")
        paths = ["direct", "proxy"] + (["nginx"] if p["ng"] else []) + ["asyncio"]
        segs = {path: [] for path in paths}
        try:
            for r in range(rounds):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                for path in order:
                    seg = self.relay_segment(path, f"relay-r{r}", n, p, duration)
                    segs[path].append(seg)
                    print(f"  relay round {r + 1}/{rounds} {path:7}: p50 {fmt(seg['p50'])} ms, p99 {fmt(seg['p99'])}"
                          f" ms, {seg['rate']:.0f} msg/s, streaming {seg['streaming']}/{n}, errors {seg['errors']}",
                          flush=True)
        finally:
            self.stop_paths(p)
        self.details["relay"] = {path: [{k: v for k, v in s.items() if k != "rss_samples"} for s in segs[path]]
                                 for path in paths}
        med = {path: {k: median([s[k] for s in segs[path]]) for k in ("p50", "p99", "rate")} for path in paths}
        sc = f"1 relay ({n} users x {m:g}/s)"
        for path in paths:
            self.row(sc, f"{path}: latency p50 / p99", f"{fmt(med[path]['p50'])} / {fmt(med[path]['p99'])}", "ms")
        for path in paths[1:]:
            a50 = _sub(med[path]["p50"], med["direct"]["p50"])
            a99 = _sub(med[path]["p99"], med["direct"]["p99"])
            self.row(sc, f"added by {path}: p50", fmt(a50), "ms", "<= 1 ms", _le(a50, 1.0))
            self.row(sc, f"added by {path}: p99", fmt(a99), "ms", "<= 5 ms", _le(a99, 5.0))
        self.row(sc, "relayed through proxy", fmt(med["proxy"]["rate"], 0), "msg/s", f"~{n * m:,.0f} offered",
                 None)
        self.cpu_rows(sc, segs, target=True)
        errors = sum(s["errors"] for path in paths for s in segs[path])
        if errors:
            self.notes.append(f"relay: {errors} client errors, e.g. "
                              f"{[e for path in paths for s in segs[path] for e in s['error_samples']][:2]}")
        if self.args.high_rate and not self.smoke:
            self.relay_high_rate(n)

    def relay_high_rate(self, n: int) -> None:
        """The same relay at a higher offered rate: CPU per message once the loop handles several
        events per wake-up (at 10/s per user nearly every event costs a wake-up of its own)."""
        m = self.args.high_rate
        p = self.relay_paths(m)
        paths = ["proxy"] + (["nginx"] if p["ng"] else []) + ["asyncio"]
        segs = {path: [] for path in paths}
        try:
            for path in paths:
                seg = self.relay_segment(path, "relay-high", n, p, 10.0)
                segs[path].append(seg)
                print(f"  relay {m:g}/s per user {path:7}: p50 {fmt(seg['p50'])} ms, p99 {fmt(seg['p99'])} ms, "
                      f"{seg['rate']:.0f} msg/s", flush=True)
        finally:
            self.stop_paths(p)
        self.details["relay_high_rate"] = {path: [{k: v for k, v in s.items() if k != "rss_samples"}
                                                  for s in segs[path]] for path in segs}
        sc = f"1b relay ({n} users x {m:g}/s)"
        self.row(sc, "proxy: latency p50 / p99", f"{fmt(segs['proxy'][0]['p50'])} / {fmt(segs['proxy'][0]['p99'])}",
                 "ms")
        self.row(sc, "relayed through proxy", fmt(segs["proxy"][0]["rate"], 0), "msg/s", f"~{n * m:,.0f} offered")
        self.cpu_rows(sc, segs, target=True)

    def cpu_rows(self, sc: str, segs: dict, target: bool) -> None:
        """CPU per 1,000 messages of the proxy (user + kernel), and of the two blind relays of
        the same stream: nginx's is mostly the kernel's loopback work, a floor for any relay;
        the asyncio relay's is the least CPython and its event loop cost for it."""
        for path in ("proxy", "nginx", "asyncio"):
            runs = [s for s in segs.get(path, []) if s.get("cpu_s") is not None]
            cnt = sum(s["count"] for s in runs)
            if not cnt:
                continue
            cpu = sum(s["cpu_s"] for s in runs)
            user = sum(s["cpu_user_s"] for s in runs)
            kernel = sum(s["cpu_sys_s"] for s in runs)
            per_1000 = cpu / cnt * 1000
            self.row(sc, f"{path} CPU per 1,000 msgs (user + kernel)",
                     f"{fmt(per_1000, 3)} ({fmt(user / cnt * 1000, 3)} + {fmt(kernel / cnt * 1000, 3)})", "CPU s",
                     "<= 0.100 s" if path == "proxy" and target else "",
                     _le(per_1000, 0.1) if path == "proxy" and target else None)
            if path == "proxy":
                per_cpu_s = cnt / cpu if cpu else None
                self.row(sc, "events per proxy CPU-second", fmt(per_cpu_s, 0), "msg/CPU-s",
                         ">= 10,000" if target else "", (per_cpu_s >= 10000 if per_cpu_s else None) if target else None)

    # --- 2. memory --------------------------------------------------------------------------------
    def scenario_memory(self) -> None:
        max_users = max(100, (self.nofile - 300) // 2)  # the proxy holds 2 sockets per user
        levels = [200] if self.smoke else [1000, 10000]
        capped = [min(lv, max_users) for lv in levels]
        if capped != levels:
            self.notes.append(f"memory: RLIMIT_NOFILE is {self.nofile} (hard limit, cannot be raised here): "
                              f"{levels[-1]} users capped to {capped[-1]} (2 sockets per user in the proxy)")
        sim, sim_port = self.start_simulator()
        proxy, port = self.start_proxy(sim_port)
        ws_url = f"ws://127.0.0.1:{port}/ws"
        sc = "2 memory"
        workers: list[Worker] = []
        try:
            time.sleep(0.5)
            base = proc_status(proxy.pid, "VmRSS")
            have = 0
            for want in capped:
                toks = self.tokens(f"idle{want}", want - have)
                new = [Worker({"kind": "idle", "ws_url": ws_url, "tokens": part}, self.tmp)
                       for part in split(toks, max(1, min(10, len(toks) // 500 + 1)))]
                workers += new
                ready = [w.expect("READY", 600) for w in new]
                have += sum(r["connected"] for r in ready)
                up = self.wait_metric(port, "comfy_ws_proxy_upstream_connections", have, 120)
                time.sleep(1.0)
                rss = proc_status(proxy.pid, "VmRSS")
                per = (rss - base) / have if have else None
                print(f"  memory: {have} connected ({int(up)} upstream): RSS {rss / MIB:.1f} MiB "
                      f"(base {base / MIB:.1f})", flush=True)
                tgt = "<= 24 KiB at 10,000" if want == capped[-1] else ""
                self.row(sc, f"RSS per connected idle user @ {have}", fmt(per / KIB if per else None, 1), "KiB",
                         tgt, _le(per / KIB if per else None, 24.0) if tgt else None)
                self.details.setdefault("memory", []).append({"users": have, "upstream": up, "rss": rss,
                                                              "base": base,
                                                              "errors": [e for r in ready for e in r["errors"]]})
        finally:
            stop_workers(workers)
            proxy.stop()
        # Disconnected sessions: a fresh proxy; connect+disconnect in batches (few sockets at once).
        proxy, port = self.start_proxy(sim_port)
        ws_url = f"ws://127.0.0.1:{port}/ws"
        warm, n = (100, 400) if self.smoke else (1000, 10000)
        n = min(n, max_users)
        try:
            time.sleep(0.5)
            self.churn(ws_url, self.tokens("warm", warm))
            time.sleep(1.0)
            rss_a = proc_status(proxy.pid, "VmRSS")
            self.churn(ws_url, self.tokens("gone", n))
            time.sleep(1.0)
            rss_b = proc_status(proxy.pid, "VmRSS")
            text = scrape(port)
            sessions = metric_value(text, "comfy_ws_proxy_sessions")
            upstream = metric_value(text, "comfy_ws_proxy_upstream_connections")
            per = (rss_b - rss_a) / n
            print(f"  memory: {n} disconnected sessions: RSS {rss_a / MIB:.1f} -> {rss_b / MIB:.1f} MiB, sessions "
                  f"gauge {sessions:.0f}, upstream sockets {upstream:.0f}", flush=True)
            self.row(sc, f"RSS per disconnected session ({n})", fmt(per / KIB, 2), "KiB", "<= 2 KiB",
                     _le(per / KIB, 2.0))
            self.details["memory_disconnected"] = {"n": n, "warm": warm, "rss_a": rss_a, "rss_b": rss_b,
                                                   "sessions_gauge": sessions, "upstream_gauge": upstream}
        finally:
            proxy.stop()
            sim.stop()

    def churn(self, ws_url: str, tokens: list[str]) -> None:
        ws = [Worker({"kind": "churn", "ws_url": ws_url, "tokens": part, "batch": 100}, self.tmp)
              for part in split(tokens, self.args.procs)]
        try:
            res = [w.expect("RESULT", 900) for w in ws]
        finally:
            stop_workers(ws)
        errs = sum(r["n_errors"] for r in res)
        if errs:
            self.notes.append(f"memory churn: {errs} errors, e.g. {[e for r in res for e in r['errors']][:2]}")

    def wait_metric(self, port: int, name: str, want: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            try:
                value = metric_value(scrape(port), name)
            except OSError:
                pass
            if value >= want:
                break
            time.sleep(0.5)
        return value

    # --- 3. connect storm -------------------------------------------------------------------------
    def scenario_storm(self) -> None:
        n = 200 if self.smoke else 1000
        sim, sim_port = self.start_simulator()
        proxy, port = self.start_proxy(sim_port, loop_lag_interval_ms=20)  # many lag samples
        ws = []
        try:
            time.sleep(1.2)  # a few loop-lag samples before
            before = scrape(port)
            ws = [Worker({"kind": "storm", "ws_url": f"ws://127.0.0.1:{port}/ws", "tokens": part}, self.tmp)
                  for part in split(self.tokens("storm", n), self.args.procs)]
            for w in ws:
                w.expect("READY", 60)
            t0 = time.time() + 1.0
            for w in ws:
                w.send(f"GO {t0}")
            res = [w.expect("RESULT", 120) for w in ws]
            time.sleep(0.1)  # the lag monitor's last sample
            after = scrape(port)
            for w in ws:
                w.send("CLOSE")
        finally:
            stop_workers(ws)
            proxy.stop()
            sim.stop()
        times = [t for r in res for t in r["times"]]
        errs = sum(r["n_errors"] for r in res)
        all_in = max(times) if times and not errs else None
        lag, samples = lag_p99(before, after)
        sc = f"3 connect storm ({n})"
        self.row(sc, "time until all have session", fmt(all_in, 2), "s", "<= 3 s", _le(all_in, 3.0))
        self.row(sc, "session time p50 / p99", f"{fmt(pct(times, 50), 2)} / {fmt(pct(times, 99), 2)}", "s")
        self.row(sc, f"event-loop lag p99 ({samples} samples)", f"<= {fmt(lag * 1000 if lag else None, 0)}", "ms",
                 "<= 100 ms", _le(lag * 1000 if lag is not None else None, 100.0))
        if errs:
            self.notes.append(f"storm: {errs} users failed, e.g. {[e for r in res for e in r['errors']][:2]}")
        self.details["storm"] = {"n": n, "ok": len(times), "errors": errs, "lag_bucket_p99_s": lag,
                                 "lag_samples": samples}

    # --- 4. large frames --------------------------------------------------------------------------
    def scenario_large(self) -> None:
        rounds = 2 if self.smoke else 6
        sim, sim_port = self.start_simulator()
        proxy, port = self.start_proxy(sim_port)
        w = None
        try:
            time.sleep(0.5)
            rss0 = proc_status(proxy.pid, "VmRSS")
            hwm0 = proc_status(proxy.pid, "VmHWM")
            w = Worker({"kind": "large", "ws_url": f"ws://127.0.0.1:{port}/ws", "sim_ws": f"ws://127.0.0.1:{sim_port}/ws",
                        "sim_http": f"http://127.0.0.1:{sim_port}", "tokens": self.tokens("large", rounds)}, self.tmp)
            res = w.expect("RESULT", 60 * rounds + 60)
            hwm1 = proc_status(proxy.pid, "VmHWM")
        finally:
            if w:
                stop_workers([w])
            proxy.stop()
            sim.stop()
        frame = res["frame_bytes"] or 8_646_722
        d, p = median(res["direct_s"]), median(res["proxy_s"])
        growth = max(0, hwm1 - rss0)
        sc = f"4 large frame ({frame / 1e6:.1f} MB)"
        self.row(sc, "POST -> frame: direct / proxy (median)", f"{fmt(d and d * 1000, 0)} / {fmt(p and p * 1000, 0)}",
                 "ms")
        self.row(sc, "added by proxy", fmt(_sub(p, d) * 1000 if d and p else None, 1), "ms")
        self.row(sc, "proxy peak RSS growth (VmHWM - RSS before)", f"{growth / MIB:.1f} MiB = {growth / frame:.2f}x",
                 "frame", "<= 3x frame", growth <= 3 * frame)
        self.details["large"] = {**res, "rss_before": rss0, "hwm_before": hwm0, "hwm_after": hwm1}
        if res["n_errors"]:
            self.notes.append(f"large: {res['n_errors']} errors, e.g. {res['errors'][:2]}")

    # --- 5. slow consumer -------------------------------------------------------------------------
    def scenario_slow(self) -> None:
        n = self.args.users
        duration = 10.0 if self.smoke else 30.0
        src, src_port = self.start_rate_source()
        proxy, port = self.start_proxy(src_port)
        ws_url = f"ws://127.0.0.1:{port}/ws"
        stalled = {}
        try:
            def base_start(_):
                stalled["base_rss0"] = proc_status(proxy.pid, "VmRSS")

            # A short warm-up run on the fresh proxy (discarded), then the same run without the
            # stalled client: the others' own growth (their resume buffers fill as they
            # receive) is subtracted from the stalled run's.
            self.stream_segment("proxy", ws_url, "", [{"token": t} for t in self.tokens("slow-warm", n)], 3.0)
            http_post(src_port, "/bench/stop_all", {})
            time.sleep(0.5)
            base = self.stream_segment("proxy", ws_url, "", [{"token": t} for t in self.tokens("slow-base", n)],
                                       duration, rss_pid=proxy.pid, during=base_start)
            http_post(src_port, "/bench/stop_all", {})
            time.sleep(0.5)
            slow0 = metric_value(scrape(port), "comfy_ws_proxy_slow_consumer_closes_total")

            def during(_):
                stalled["rss0"] = proc_status(proxy.pid, "VmRSS")
                stalled["sock"] = stalled_client(port, self.key.token("slow-stalled", ttl=7200))

            stall = self.stream_segment("proxy", ws_url, "", [{"token": t} for t in self.tokens("slow-run", n)],
                                        duration, rss_pid=proxy.pid, during=during)
            slow1 = metric_value(scrape(port), "comfy_ws_proxy_slow_consumer_closes_total")
            stalled.pop("sock").close()
            http_post(src_port, "/bench/stop_all", {})
            time.sleep(0.5)
            # Without the stalled client once more, after it: the comparison is interleaved.
            base2 = self.stream_segment("proxy", ws_url, "", [{"token": t} for t in self.tokens("slow-base2", n)],
                                        duration)
            http_post(src_port, "/bench/stop_all", {})
            time.sleep(0.5)
            # The others' p99 with and without the stall, the machine's load alike: interleaved
            # rounds in which the same heavy stream is read by a normal client (the control) or
            # by a client that stalls. (Without any heavy stream the machine itself, 2 cores
            # shared with the event source and the load clients, carries less work.)
            matched = {"reading": [], "stalled": []}
            for r in range(1 if self.smoke else 3):
                for kind in (("reading", "stalled") if r % 2 == 0 else ("stalled", "reading")):
                    users = [{"token": t} for t in self.tokens(f"slow-{kind}-{r}", n)]
                    start = None
                    if kind == "reading":
                        users.append({"token": self.key.token(f"slow-heavy-{r}", ttl=7200), "heavy": True})
                    else:
                        def start(_, r=r):
                            stalled["round_sock"] = stalled_client(port, self.key.token(f"slow-stall-{r}", ttl=7200))
                    seg = self.stream_segment("proxy", ws_url, "", users, 3.0 if self.smoke else 10.0, during=start)
                    if stalled.get("round_sock"):
                        stalled.pop("round_sock").close()
                    http_post(src_port, "/bench/stop_all", {})
                    time.sleep(0.5)
                    matched[kind].append(seg["p99"])
                    print(f"  slow round {r + 1} {kind:8}: others' p99 {fmt(seg['p99'])} ms", flush=True)
        finally:
            for key in ("sock", "round_sock"):
                if stalled.get(key):
                    stalled[key].close()
            proxy.stop()
            src.stop()
        raw = max(stall["rss_samples"]) - stalled["rss0"] if stall["rss_samples"] else None
        own = max(base["rss_samples"]) - stalled["base_rss0"] if base["rss_samples"] else None
        net = raw - max(0, own) if raw is not None and own is not None else None
        sc = (f"5 slow consumer ({n} users + 1 stalled at {self.args.stall_rate:.0f}/s x "
              f"{self.args.stall_pad / KIB:.0f} KiB)")
        self.row(sc, f"proxy RSS growth over {duration:.0f} s, peak: without / with stalled",
                 f"{fmt(own / MIB if own is not None else None)} / {fmt(raw / MIB if raw is not None else None)}",
                 "MiB")
        self.row(sc, "RSS growth due to the stalled client (with - without)",
                 fmt(net / MIB if net is not None else None, 2), "MiB", "<= 2 MiB",
                 _le(net / MIB if net is not None else None, 2.0))
        without = median([base["p99"], base2["p99"]])
        self.row(sc, "others' p99 without (before, after) / with stalled",
                 f"{fmt(without)} ({fmt(base['p99'])}, {fmt(base2['p99'])}) / {fmt(stall['p99'])}", "ms")
        ratio = stall["p99"] / without if without and stall["p99"] else None
        self.row(sc, "others' p99 change vs no heavy stream at all", fmt((ratio - 1) * 100 if ratio else None, 1),
                 "%")
        reading, stalling = median(matched["reading"]), median(matched["stalled"])
        self.row(sc, f"others' p99, heavy stream read / stalled (median of {len(matched['stalled'])} rounds)",
                 f"{fmt(reading)} / {fmt(stalling)}", "ms")
        change = (stalling / reading - 1) * 100 if reading and stalling else None
        self.row(sc, "others' p99 change due to the stall", fmt(change, 1), "%", "<= +10 %", _le(change, 10.0))
        self.row(sc, "stalled client closed as slow (4009)", "yes" if slow1 > slow0 else "no", "")
        self.details["slow"] = {"matched_p99": matched,
                                "base": {k: v for k, v in base.items() if k != "rss_samples"},
                                "base_after": {k: v for k, v in base2.items() if k != "rss_samples"},
                                "stall": {k: v for k, v in stall.items() if k != "rss_samples"},
                                "rss_samples": stall["rss_samples"], "rss0": stalled["rss0"],
                                "base_rss_samples": base["rss_samples"], "base_rss0": stalled["base_rss0"],
                                "slow_closes": slow1 - slow0}

    # --- the run ---------------------------------------------------------------------------------
    def machine(self) -> dict:
        model = "unknown"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
                "platform": platform.platform(), "nofile": self.nofile, "nginx": os.path.exists(NGINX),
                "mode": "smoke" if self.smoke else "full", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def run(self) -> int:
        m = self.machine()
        print(f"comfy_ws_proxy benchmark ({m['mode']}) - {m['date']}")
        print(f"CPU: {m['cpu']} x {m['cores']} cores; Python {m['python']}; {m['platform']}; "
              f"RLIMIT_NOFILE {m['nofile']}", flush=True)
        wanted = [s.strip() for s in self.args.scenarios.split(",") if s.strip()]
        for name in wanted:
            print(f"== {name}", flush=True)
            t = time.monotonic()
            try:
                getattr(self, "scenario_" + name)()
            except Exception as e:  # noqa: BLE001 - one failed scenario must not stop the others
                self.notes.append(f"{name}: FAILED: {type(e).__name__}: {str(e)[:400]}")
                print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
            finally:
                cleanup()
            print(f"  ({time.monotonic() - t:.0f} s)", flush=True)
        self.print_table(m)
        with open(self.args.json, "w") as f:
            json.dump({"machine": m, "rows": self.rows, "notes": self.notes, "details": self.details}, f, indent=1,
                      default=str)
        print(f"JSON written to {self.args.json}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return 0

    def print_table(self, m: dict) -> None:
        head = ("scenario", "figure", "value", "unit", "target", "")
        rows = [(r["scenario"], r["figure"], str(r["value"]), r["unit"], r["target"],
                 "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")) for r in self.rows]
        widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
        line = "  ".join("-" * w for w in widths)
        print()
        print(f"Results ({m['mode']}): {m['cpu']}, {m['cores']} cores, Python {m['python']}")
        print(line)
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        print(line)
        last = None
        for r in rows:
            cells = list(r)
            if cells[0] == last:
                cells[0] = ""
            else:
                last = cells[0]
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        print(line)
        for note in self.notes:
            print("note:", note)


def fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _sub(a, b):
    return None if a is None or b is None else a - b


def _le(v, limit):
    return None if v is None else v <= limit


def stalled_client(port: int, token: str) -> socket.socket:
    """A raw client that completes the upgrade, submits a heavy prompt, and never reads again."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n")
              .encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("stalled client: closed during the upgrade")
        buf += chunk
    if b" 101 " not in buf.split(b"\r\n", 1)[0]:
        raise ConnectionError("stalled client: upgrade refused: " + buf.split(b"\r\n", 1)[0].decode())
    payload = json.dumps({"type": "submit_prompt", "data": {"prompt": PROMPT,
                                                            "prompt_id": HEAVY_PREFIX + str(uuid.uuid4())[9:]}}).encode()
    mask = os.urandom(4)
    header = bytes([0x81]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                              else bytes([0x80 | 126]) + struct.pack(">H", len(payload)))
    s.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return s


def cleanup() -> None:
    for w in list(WORKERS):
        w.stop()
        WORKERS.remove(w)
    for c in list(CHILDREN):
        c.stop()
        CHILDREN.remove(c)


def main() -> int:
    parser = argparse.ArgumentParser(description="comfy_ws_proxy benchmark harness (see docs/bench.rst)")
    parser.add_argument("--smoke", action="store_true", help="small N, a few seconds per scenario")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results as JSON")
    parser.add_argument("--users", type=int, default=100, help="users of the relay and slow-consumer scenarios")
    parser.add_argument("--rate", type=float, default=10.0, help="progress events per user per second")
    parser.add_argument("--high-rate", type=float, default=50.0,
                        help="events per user per second of the second relay run (0: skip it)")
    parser.add_argument("--procs", type=int, default=4, help="load-client processes per scenario")
    parser.add_argument("--stall-rate", type=float, default=200.0,
                        help="events/s streamed to the stalled client (slow-consumer scenario)")
    parser.add_argument("--stall-pad", type=int, default=4096,
                        help="padding bytes per event streamed to the stalled client")
    parser.add_argument("--scenarios", default="relay,memory,storm,large,slow",
                        help="comma-separated subset of relay,memory,storm,large,slow")
    # internal modes
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate-source", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tcp-relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--heavy-rate", type=float, default=200.0, help=argparse.SUPPRESS)
    parser.add_argument("--heavy-pad", type=int, default=4096, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    if args.tcp_relay:
        return tcp_relay_main(args.port, args.upstream_port)
    if args.rate_source:
        return rate_source_main(args.port, args.rate, args.heavy_rate, args.heavy_pad)
    bench = Bench(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())

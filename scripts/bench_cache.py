#!/usr/bin/env python3
"""Result cache figures: a hit's latency (p50/p99) through the WebSocket and through HTTP
(``POST /generate`` with ``Prefer: wait``), against a miss in the same run.

    python scripts/bench_cache.py                 # 200 requests of each kind
    python scripts/bench_cache.py --requests 500 --json out.json

Real processes on loopback: the ComfyUI simulator (no node delay, so a miss is the proxy's
whole path plus the simulator's run of success.json: 7 nodes, 2 images) and the proxy
(``python -m comfy_ws_proxy``, DEV_MODE, RESULT_CACHE=true, a real EdDSA key, a SQLite store).
One client, one request at a time (closed loop): the latency of a request, not a throughput.

- miss: each request a new prompt (its colour changes), so it runs on ComfyUI (and its result
  is copied into the cache after it succeeded, off the answer's path);
- hit: the same prompt again, answered from the cache.

Via the WebSocket: from sending ``submit_prompt`` to receiving its ``execution_success``.
Via HTTP: one ``POST /generate`` with ``Prefer: wait=30``, answered with the finished job.
Nothing is asserted; figures are printed (and written with ``--json``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

from comfy_ws_proxy.testing.tokens import DevKey  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_jobs_api import free_port, pct, wait_port  # noqa: E402


def prompt_with(color: int) -> dict:
    with open(os.path.join(ROOT, "comfy_ws_proxy", "testing", "workflows", "success.json")) as f:
        workflow = json.load(f)
    workflow["1"]["inputs"]["color"] = color
    return workflow


async def http_once(http, base: str, auth: dict, prompt: dict) -> tuple[float, bool]:
    started = time.perf_counter()
    answer = await http.fetch(base + "/generate", method="POST", body=json.dumps(prompt),
                              headers={**auth, "Prefer": "wait=30"}, request_timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    job = json.loads(answer.body)
    assert job["status"] == "completed", job
    return elapsed, job["cached"]


async def ws_once(conn, prompt: dict) -> tuple[float, bool]:
    prompt_id = str(uuid.uuid4())
    started = time.perf_counter()
    await conn.write_message(json.dumps({"type": "submit_prompt", "data": {"prompt": prompt,
                                                                          "prompt_id": prompt_id}}))
    cached = False
    while True:
        message = await conn.read_message()
        if message is None:
            raise RuntimeError("the proxy closed the WebSocket")
        if isinstance(message, bytes):
            continue
        msg = json.loads(message)
        data = msg.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if msg["type"] == "prompt_accepted":
            cached = bool(data.get("cached"))
        elif msg["type"] == "execution_success":
            return (time.perf_counter() - started) * 1000, cached
        elif msg["type"] in ("error", "execution_error"):
            raise RuntimeError(msg)


def figures(latencies: list[float]) -> dict:
    return {"n": len(latencies), "p50_ms": round(pct(latencies, 50), 3), "p99_ms": round(pct(latencies, 99), 3)}


async def warm_hit(http, base: str, auth: dict, prompt: dict) -> None:
    """Run the prompt once, then until it is answered from the cache (its copy is stored after
    the answer)."""
    for _ in range(200):
        _, cached = await http_once(http, base, auth, prompt)
        if cached:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the result was never cached")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    key = DevKey.generate()
    jwks = os.path.join(tmp.name, "jwks.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    sim_port, proxy_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    children = [subprocess.Popen([sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(sim_port)],
                                 env=env, stderr=subprocess.DEVNULL)]
    children.append(subprocess.Popen([sys.executable, "-m", "comfy_ws_proxy"], stderr=subprocess.DEVNULL, env=dict(
        env, COMFY_URL=f"http://127.0.0.1:{sim_port}", DEV_MODE="true", JWT_KEY_FILE=jwks, PORT=str(proxy_port),
        STORE_PATH=os.path.join(tmp.name, "store.sqlite3"), SUBMIT_BURST="100000", SUBMIT_RATE_PER_S="100000",
        RESULT_CACHE="true", CACHE_MAX_ENTRIES="100000", LOG_LEVEL="warning")))
    results: dict = {}
    try:
        await wait_port(sim_port)
        await wait_port(proxy_port)
        token = key.token("alice", ttl=3600 * 4)
        auth = {"Authorization": "Bearer " + token}
        base = f"http://127.0.0.1:{proxy_port}"
        http = AsyncHTTPClient(force_instance=True)
        conn = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{proxy_port}/ws", headers=auth))
        color = 0
        hit_prompt = prompt_with(0xABCDEF)
        await warm_hit(http, base, auth, hit_prompt)
        for face, once in (("http", lambda p: http_once(http, base, auth, p)), ("ws", lambda p: ws_once(conn, p))):
            misses, hits = [], []
            for _ in range(args.requests):  # interleaved: both see the same machine
                color += 1
                elapsed, cached = await once(prompt_with(color))
                assert not cached
                misses.append(elapsed)
                elapsed, cached = await once(hit_prompt)
                assert cached
                hits.append(elapsed)
            results[face] = {"miss": figures(misses), "hit": figures(hits),
                             "miss_over_hit_p50": round(pct(misses, 50) / pct(hits, 50), 1)}
        conn.close()
        http.close()
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        tmp.cleanup()
    print(f"result cache, {args.requests} requests of each kind, one at a time (ms)")
    print(f"{'face':6} {'kind':6} {'p50':>9} {'p99':>9}")
    for face in ("ws", "http"):
        for kind in ("miss", "hit"):
            r = results[face][kind]
            print(f"{face:6} {kind:6} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f}")
        print(f"{face:6} miss/hit at p50: {results[face]['miss_over_hit_p50']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

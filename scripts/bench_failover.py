"""Failover figures (issue 12): three simulated ComfyUI backends behind the proxy, jobs from
two users; one backend fails mid-run, in two ways:

* ``crash``: killed (connections refused, its queue and running job gone), back later as an
  empty process;
* ``partition``: unreachable while it goes on running the job it had, back later with that
  job finished in its history.

Printed per scenario: jobs, outcomes delivered (each owner must hear each job once), jobs moved
and fenced, duplicated deliveries (must be 0), lost jobs (must be 0), jobs executed twice (a
partitioned backend finishing a job that was moved: fenced, never delivered), and the time from
the failure to the moved jobs' new placement (FAILOVER_AFTER_S plus the breaker's detection).

    .venv/bin/python scripts/bench_failover.py [--jobs 30] [--failover-after 1.0]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tornado.httpclient import HTTPRequest  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

from comfy_ws_proxy.app import make_app  # noqa: E402
from comfy_ws_proxy.config import settings_for_tests  # noqa: E402
from comfy_ws_proxy.server import LimitedHTTPServer  # noqa: E402
from comfy_ws_proxy.testing.comfyui import ComfySimulator, txt2img_workflow  # noqa: E402
from comfy_ws_proxy.testing.tokens import DevKey  # noqa: E402

FINALS = ("execution_success", "execution_error", "execution_interrupted")


class User:
    def __init__(self, conn):
        self.conn = conn
        self.messages: list[tuple[float, dict]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while (message := await self.conn.read_message()) is not None:
            if isinstance(message, str):
                self.messages.append((time.monotonic(), json.loads(message)))
                self.changed.set()

    def finals(self, prompt_id: str) -> list[dict]:
        return [m for _, m in self.messages if m.get("type") in FINALS and m["data"].get("prompt_id") == prompt_id]

    async def until(self, predicate, timeout: float) -> None:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)


async def scenario(how: str, jobs: int, failover_after: float, tmp: str) -> dict:
    sims = {name: ComfySimulator(step_delay=0.02, models=["base.safetensors"]) for name in ("a", "b", "c")}
    for sim in sims.values():
        await sim.start()
    key = DevKey.generate()
    jwks = os.path.join(tmp, f"jwks-{how}.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    settings = settings_for_tests(
        comfy_url="", backends=[{"name": n, "url": s.url} for n, s in sims.items()], jwt_key_file=jwks,
        failover_after_s=failover_after, max_comfy_jobs_per_user=0, upstream_reconnect_min_ms=20,
        upstream_reconnect_max_ms=200, breaker_open_ms=50, breaker_max_open_ms=400, comfy_connect_timeout_ms=1000,
        comfy_request_timeout_ms=3000, submit_burst=100000, submit_rate_per_s=100000.0)
    app, state = make_app(settings)
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server = LimitedHTTPServer.from_settings(app, settings, metrics=state.metrics)
    server.add_sockets(sockets)
    state.start()
    users = {}
    try:
        await asyncio.gather(*(b.learn_capabilities(5) for b in state.pool))
        for name in ("alice", "bob"):
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Authorization": f"Bearer {key.token(name)}"})
            users[name] = User(await websocket_connect(request))
        owner = {}
        for i in range(jobs):
            name = ("alice", "bob")[i % 2]
            prompt_id = str(uuid.uuid4())
            owner[prompt_id] = name
            users[name].conn.write_message(json.dumps({"type": "submit_prompt", "data": {
                "prompt_id": prompt_id, "prompt": txt2img_workflow("base.safetensors", steps=10, seed=i)}}))
        victim = sims["b"]
        started = asyncio.get_running_loop().create_future()

        def on_record(event, record) -> None:
            if event == "started" and not started.done():
                started.set_result(record.prompt_id)
        victim.on_record = on_record
        await asyncio.wait_for(started, 30)
        failed_at = time.monotonic()
        if how == "crash":
            await victim.crash()
        else:
            await victim.go_down()  # it goes on running what it has
        for user in users.values():
            await user.until(lambda u=user: all(u.finals(p) for p, o in owner.items() if users[o] is u), 120)
        done_at = time.monotonic()
        await victim.come_up()
        await asyncio.wait_for(_until_unfenced(state), 30)
        for sim in sims.values():
            await sim.wait_idle()
        completed = collections.Counter()
        for sim in sims.values():
            completed.update(sim.completed_counts)
        moved = {}
        for user in users.values():
            for at, m in user.messages:
                if m.get("type") == "prompt_accepted" and m["data"].get("moved"):
                    moved.setdefault(m["data"]["prompt_id"], at - failed_at)
        delivered = {p: len(users[o].finals(p)) for p, o in owner.items()}
        return {
            "scenario": how, "jobs": jobs, "delivered_once": sum(1 for n in delivered.values() if n == 1),
            "duplicated": sum(1 for n in delivered.values() if n > 1),
            "lost": sum(1 for p in owner if completed[p] == 0 or delivered[p] == 0),
            "moved": len(moved), "fenced": int(state.metrics.prompts.labels("fenced")._value.get()),
            "executed_twice": sum(1 for p in owner if completed[p] > 1),
            "time_to_move_s": round(min(moved.values()), 2) if moved else None,
            "all_done_after_failure_s": round(done_at - failed_at, 2),
        }
    finally:
        for user in users.values():
            user.conn.close()
        server.stop()
        await state.stop(grace=0)
        for sim in sims.values():
            await sim.stop()


async def _until_unfenced(state) -> None:
    changed = asyncio.Event()
    state.tracker.listeners.append(lambda *args: changed.set())
    while any(job.fenced for job in state.tracker.jobs.values()):
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), 1.0)  # (the reconciler's tick lifts fences too)
        except asyncio.TimeoutError:
            pass


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [await scenario(how, args.jobs, args.failover_after, tmp) for how in ("crash", "partition")]
    columns = ("scenario", "jobs", "delivered_once", "duplicated", "lost", "moved", "fenced", "executed_twice",
               "time_to_move_s", "all_done_after_failure_s")
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("  ".join(f"{str(row[c]):>14}" for c in columns))
    print(f"FAILOVER_AFTER_S={args.failover_after}; 3 backends, 2 users, depth 1 per backend")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--failover-after", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))

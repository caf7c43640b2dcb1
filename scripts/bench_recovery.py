#!/usr/bin/env python3
"""Recovery figure (issue 3): the time from ComfyUI's return to an empty proxy queue.

    python scripts/bench_recovery.py              # 3 runs, a table of the medians
    python scripts/bench_recovery.py --runs 5 --json recovery.json

Real processes on loopback, started as scripts/bench.py starts them: the ComfyUI simulator
(``python -m comfy_ws_proxy.testing.comfyui``) and the proxy (``python -m comfy_ws_proxy``,
configured through environment variables). Each run:

1. start ComfyUI and a fresh proxy; connect USERS users with real EdDSA tokens;
2. stop ComfyUI (its process exits: connections are refused, its sockets drop);
3. each user submits PROMPTS distinct prompts (``success.json``, a different colour each, so
   nothing is cached); the table shows how many were answered ``queued: true``;
4. after ``--down-s`` seconds start ComfyUI again on the same port (a restarted ComfyUI, with
   an empty queue); time zero is the moment it listens again.

Figures, from time zero (``/metrics`` is sampled every 10 ms): ``links up`` (every user's
upstream socket is registered again, ``?detailed=true``), ``first accepted`` (the first
``prompt_accepted queued: false`` reached its owner: the proxy noticed ComfyUI is back),
``queue empty`` (``queued_prompts_total`` is 0: every prompt has left the proxy's queue),
``last accepted``, ``all told`` (every prompt's final outcome reached its owner) and
``breaker open`` (how long after time zero the breaker was still not closed, and its share of
``all told``). Nothing is asserted; ``told twice`` counts prompts whose owner heard two final
outcomes (a prompt run twice).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import ROOT, Child, child_env, cleanup, free_port, median  # noqa: E402  (scripts/bench.py)

METRICS_SECRET = "dev-metrics-secret"  # the DEV_MODE default of METRICS_SECRET
WORKFLOW = os.path.join(ROOT, "comfy_ws_proxy", "testing", "workflows", "success.json")
FINALS = ("execution_success", "execution_error", "execution_interrupted")
# The proxy's options of this scenario (its defaults, spelled out so the report can name them).
PROXY_OPTIONS = {"BREAKER_FAILURE_THRESHOLD": 5, "BREAKER_OPEN_MS": 5000, "BREAKER_MAX_OPEN_MS": 60000,
                 "BREAKER_PROBE_TIMEOUT_MS": 2000, "UPSTREAM_RECONNECT_MIN_MS": 250,
                 "UPSTREAM_RECONNECT_MAX_MS": 30000, "MAX_QUEUED_PROMPTS_PER_USER": 100}


class TimedChild(Child):
    """bench.Child that also notes when its readiness line arrived (time.monotonic())."""

    ready_at: float | None = None

    def _drain(self) -> None:
        for line in self.proc.stderr:
            if len(self.lines) < 2000:
                self.lines.append(line.rstrip())
            if not self.matched and any(p in line for p in self._patterns):
                self.ready_at = time.monotonic()
                self.matched = True
                self._ready.set()
        self._ready.set()


def start_simulator(port: int) -> TimedChild:
    return TimedChild("simulator", [sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(port)],
                      env=child_env(), ready=("listening on",))


def start_proxy(comfy_port: int, jwks: str, store: str, options: dict) -> tuple[Child, int]:
    port = free_port()
    env = child_env({"COMFY_URL": f"http://127.0.0.1:{comfy_port}", "DEV_MODE": "true", "JWT_KEY_FILE": jwks,
                     "STORE_PATH": store, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "warning",
                     "SUBMIT_RATE_PER_S": "100000", "SUBMIT_BURST": "100000",
                     **{k: str(v) for k, v in options.items()}})
    for k in ("COMFY_WS_PROXY_CONFIG", "METRICS_SECRET", "NO_VERIFY", "JWT_JWKS_URL"):
        env.pop(k, None)
    # At LOG_LEVEL=warning the DEV_MODE warning, logged right after the socket is bound, is the ready line.
    return Child("proxy", [sys.executable, "-m", "comfy_ws_proxy"], env=env, ready=("DEV_MODE is on",)), port


class User:
    """One user's socket to the proxy; notes when each of its prompts' messages arrived."""

    def __init__(self, conn, name: str, all_told: asyncio.Event, tally: dict):
        self.conn = conn
        self.name = name
        self.replies: dict[str, asyncio.Future] = {}  # prompt_id -> the reply to its submit
        self.accepted_at: dict[str, float] = {}  # prompt_id -> prompt_accepted queued: false
        self.finals: dict[str, list[float]] = {}  # prompt_id -> arrival times of final outcomes
        self.resubmitted: set[str] = set()
        self._all_told = all_told
        self._tally = tally
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            text = await self.conn.read_message()
            if text is None:
                return
            if not isinstance(text, str):
                continue  # a binary preview
            now = time.monotonic()
            msg = json.loads(text)
            data = msg.get("data") or {}
            prompt_id = data.get("prompt_id")
            reply = self.replies.get(prompt_id)
            if reply is not None and not reply.done() and msg["type"] in ("prompt_accepted", "error"):
                reply.set_result(msg)
            if msg["type"] == "prompt_accepted" and not data.get("queued"):
                self.accepted_at.setdefault(prompt_id, now)
                if data.get("resubmitted"):
                    self.resubmitted.add(prompt_id)
            if msg["type"] in FINALS and prompt_id in self.replies:
                self.finals.setdefault(prompt_id, []).append(now)
                if len(self.finals[prompt_id]) == 1:
                    self._tally["told"] += 1
                    if self._tally["told"] == self._tally["expected"]:
                        self._all_told.set()

    async def submit(self, prompt: dict) -> dict:
        prompt_id = str(uuid.uuid4())
        self.replies[prompt_id] = asyncio.get_running_loop().create_future()
        self.conn.write_message(json.dumps({"type": "submit_prompt",
                                            "data": {"prompt": prompt, "prompt_id": prompt_id}}))
        return await asyncio.wait_for(self.replies[prompt_id], 30)


async def sample_metrics(port: int, samples: list, stop: asyncio.Event) -> None:
    """/metrics (JSON) every 10 ms: (time, queued_prompts_total, circuit_breaker_state, upstream
    sockets registered)."""
    from tornado.httpclient import AsyncHTTPClient
    http = AsyncHTTPClient(force_instance=True)
    headers = {"Authorization": "Bearer " + METRICS_SECRET}
    try:
        while not stop.is_set():
            try:
                response = await http.fetch(f"http://127.0.0.1:{port}/metrics?detailed=true", headers=headers,
                                            request_timeout=5)
                body = json.loads(response.body)
                links = sum(1 for session in body["sessions"] if session["upstream_connected"])
                samples.append((time.monotonic(), body["queued_prompts_total"], body["circuit_breaker_state"], links))
            except Exception as e:  # noqa: BLE001 - a missed sample is a gap, not fatal
                samples.append((time.monotonic(), None, f"error: {e}", None))
            await asyncio.sleep(0.01)
    finally:
        http.close()


async def one_run(args, tmp: str, run_no: int) -> dict:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    from comfy_ws_proxy.testing.tokens import DevKey

    key = DevKey.generate("recovery")
    jwks = os.path.join(tmp, f"jwks-{run_no}.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    with open(WORKFLOW) as f:
        workflow = json.load(f)
    comfy_port = free_port()
    comfy = await asyncio.to_thread(start_simulator, comfy_port)
    proxy, port = await asyncio.to_thread(start_proxy, comfy_port, jwks, os.path.join(tmp, f"store-{run_no}.sqlite3"),
                                          PROXY_OPTIONS)
    all_told = asyncio.Event()
    tally = {"told": 0, "expected": args.users * args.prompts}
    users: list[User] = []
    samples: list = []
    stop_sampling = asyncio.Event()
    sampler = None
    try:
        for i in range(args.users):
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws",
                                  headers={"Authorization": "Bearer " + key.token(f"user{i}", ttl=3600)})
            conn = await asyncio.wait_for(websocket_connect(request), 30)
            hello = json.loads(await asyncio.wait_for(conn.read_message(), 30))
            assert hello["type"] == "session", hello
            users.append(User(conn, f"user{i}", all_told, tally))
        sampler = asyncio.ensure_future(sample_metrics(port, samples, stop_sampling))
        await asyncio.to_thread(comfy.stop)  # ComfyUI goes down
        went_down = time.monotonic()
        replies = []
        for n in range(args.prompts):
            prompts = []
            for i in range(args.users):
                prompt = json.loads(json.dumps(workflow))
                prompt["1"]["inputs"]["color"] = n * args.users + i  # a distinct prompt: no cache hits
                prompts.append(prompt)
            replies += await asyncio.gather(*(user.submit(p) for user, p in zip(users, prompts)))
        queued = sum(1 for r in replies if r["type"] == "prompt_accepted" and r["data"]["queued"])
        await asyncio.sleep(max(0.0, args.down_s - (time.monotonic() - went_down)))
        comfy = await asyncio.to_thread(start_simulator, comfy_port)  # ComfyUI is back, its queue empty
        back = comfy.ready_at
        try:
            await asyncio.wait_for(all_told.wait(), args.timeout)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.05)  # a last metrics sample after the end
        stop_sampling.set()
        await sampler
    finally:
        stop_sampling.set()
        for user in users:
            user.conn.close()
            user.task.cancel()
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(comfy.stop)

    accepted = [t for u in users for t in u.accepted_at.values()]
    finals = [times for u in users for times in u.finals.values()]
    after = [s for s in samples if s[0] >= back and s[1] is not None]
    empty_at = next((t for t, total, _, _ in after if total == 0), None)
    links_at = next((t for t, _, _, links in after if links == args.users), None)
    before = [s for s in samples if s[0] < back and s[1] is not None]
    if before and before[-1][2] == "closed":
        breaker_open = 0.0  # closed when ComfyUI came back: the proxy needed no probe
    else:
        closed_at = next((t for t, _, state, _ in after if state == "closed"), None)
        breaker_open = closed_at - back if closed_at is not None else None
    down_states = sorted({state for t, _, state, _ in samples if went_down <= t < back})
    told = max((times[0] for times in finals), default=None)
    result = {
        "queued": queued, "submitted": len(replies), "told": len(finals),
        "told_twice": sum(1 for times in finals if len(times) > 1),
        "resubmitted": sum(len(u.resubmitted) for u in users),
        "breaker_states_while_down": down_states,
        "links_up_s": links_at - back if links_at is not None else None,
        "first_accepted_s": min(accepted) - back if accepted else None,
        "queue_empty_s": empty_at - back if empty_at is not None else None,
        "last_accepted_s": max(accepted) - back if len(accepted) == len(replies) else None,
        "all_told_s": told - back if told is not None and len(finals) == len(replies) else None,
        "breaker_open_s": breaker_open,
        "samples": len(samples),
    }
    if result["breaker_open_s"] is not None and result["all_told_s"]:
        result["breaker_share"] = result["breaker_open_s"] / result["all_told_s"]
    return result


def fmt(value, unit="s") -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.0f} %"
    return f"{value:.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description="Time from ComfyUI's return to an empty proxy queue (issue 3)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=10, help="prompts per user")
    parser.add_argument("--down-s", type=float, default=5.0, help="how long ComfyUI stays down")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on a run after this long")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)  # children are stopped on the way out
    tmp = tempfile.mkdtemp(prefix="comfy-recovery-")
    results = []
    try:
        for run_no in range(1, args.runs + 1):
            results.append(asyncio.run(one_run(args, tmp, run_no)))
            print(f"run {run_no}: {json.dumps(results[-1])}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    options = " ".join(f"{k}={v}" for k, v in PROXY_OPTIONS.items())
    print(f"{args.users} users x {args.prompts} prompts queued while ComfyUI was down for {args.down_s:g} s; "
          f"times from ComfyUI listening again. Proxy: {options}")
    columns = [("links up", "links_up_s", "s"), ("first accepted", "first_accepted_s", "s"),
               ("queue empty", "queue_empty_s", "s"), ("last accepted", "last_accepted_s", "s"), ("all told", "all_told_s", "s"),
               ("breaker open", "breaker_open_s", "s"), ("breaker share", "breaker_share", "%")]
    header = ["run", "queued", "told", "told twice", "resubmitted", "breaker while down"] + [c[0] for c in columns]
    rows = []
    for i, r in enumerate(results, 1):
        rows.append([str(i), f"{r['queued']}/{r['submitted']}", str(r["told"]), str(r["told_twice"]),
                     str(r["resubmitted"]), ",".join(r["breaker_states_while_down"]) or "-"]
                    + [fmt(r.get(key), unit) for _, key, unit in columns])
    rows.append(["median", "", "", "", "", ""] + [fmt(median([r.get(key) for r in results]), unit)
                                                  for _, key, unit in columns])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "proxy_options": PROXY_OPTIONS, "runs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

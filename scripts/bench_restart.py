#!/usr/bin/env python3
"""Restart figure: jobs held by ComfyUI survive a restart of the proxy itself.

    python scripts/bench_restart.py                    # 3 runs, SIGKILL, owners back at once
    python scripts/bench_restart.py --signal TERM      # a graceful stop instead
    python scripts/bench_restart.py --owner away       # owners back only once ComfyUI is idle
    python scripts/bench_restart.py --users 100 --prompts 2 --json restart.json

Real processes on loopback, started as scripts/bench_recovery.py starts them: the ComfyUI
simulator (``python -m comfy_ws_proxy.testing.comfyui --node-delay S``) and the proxy
(``python -m comfy_ws_proxy``, configured through environment variables, its SQLite store in
a temporary directory). Each run:

1. start ComfyUI and a proxy; connect USERS users with real EdDSA tokens; each submits PROMPTS
   distinct prompts (``success.json``, a different colour each, so nothing is cached) at once.
   All go to ComfyUI (answered ``queued: false``) and wait there: one runs, the rest pending;
2. as soon as every submit was answered, stop the proxy with ``--signal`` (KILL, or TERM and
   wait for its exit) and start a new proxy process on the same port with the same store
   file; time zero is the moment its ready line is seen;
3. ``--owner now``: every user reconnects at once (new sockets, no resume). ``--owner away``:
   users reconnect only once ComfyUI has finished everything (``GET /queue`` polled until both
   lists are empty), so every outcome must come from ComfyUI's history (``replayed``).

Figures, from time zero: ``reconnected`` (the last user got its ``session`` message), ``comfy
done`` (the last completion in ComfyUI, read from ``GET /history``: the epoch-ms timestamp of
each entry's final status message, put on the monotonic clock through a time.time() /
time.monotonic() pair sampled together), ``all told`` (every prompt's final outcome reached
its owner), ``overhead`` (``all told - comfy done``, with ``--owner now``). Counts: prompts
submitted, told exactly once, told twice (or more), never told, told before the stop, told
``replayed``; ComfyUI's history: entries of our prompt ids (one per prompt: each must have run),
entries in all, and ``posts`` (the highest queue ``number`` in history + 1: ComfyUI numbers
every POST /prompt, so more posts than prompts means something was sent twice). After ``all
told`` the run waits ``--grace`` seconds more so that a late second telling is counted.
Nothing is asserted; prompts told twice or never told are listed (their messages, ComfyUI's
status and the proxy's stderr lines naming them) on stderr and in ``--json``.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import child_env, cleanup, free_port, median  # noqa: E402  (scripts/bench.py)
from bench_recovery import FINALS, PROXY_OPTIONS, WORKFLOW, TimedChild, User  # noqa: E402


def start_simulator(port: int, node_delay: float) -> TimedChild:
    """bench_recovery.start_simulator with --node-delay."""
    return TimedChild("simulator", [sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(port),
                                    "--node-delay", str(node_delay)], env=child_env(), ready=("listening on",))


def start_proxy_at(port: int, comfy_port: int, jwks: str, store: str, options: dict,
                   log_level: str = "warning") -> TimedChild:
    """bench_recovery.start_proxy on a given port, as a TimedChild (its ready line is time zero)."""
    env = child_env({"COMFY_URL": f"http://127.0.0.1:{comfy_port}", "DEV_MODE": "true", "JWT_KEY_FILE": jwks,
                     "STORE_PATH": store, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": log_level,
                     "SUBMIT_RATE_PER_S": "100000", "SUBMIT_BURST": "100000",
                     **{k: str(v) for k, v in options.items()}})
    for k in ("COMFY_WS_PROXY_CONFIG", "METRICS_SECRET", "NO_VERIFY", "JWT_JWKS_URL"):
        env.pop(k, None)
    # The DEV_MODE warning, logged right after the socket is bound, is the ready line.
    return TimedChild("proxy", [sys.executable, "-m", "comfy_ws_proxy"], env=env, ready=("DEV_MODE is on",))


class Recorded:
    """A client socket that keeps every text message it reads: (monotonic time, socket no, text)."""

    def __init__(self, conn, log: list, socket_no: int, early: list | None = None):
        self.conn = conn
        self.log = log
        self.socket_no = socket_no
        self.early = list(early or [])  # (time, text) read before the 'session' message: handed out first

    async def read_message(self):
        if self.early:
            t, message = self.early.pop(0)
            self.log.append((t, self.socket_no, message))
            return message
        message = await self.conn.read_message()
        if isinstance(message, str):
            self.log.append((time.monotonic(), self.socket_no, message))
        return message

    def write_message(self, message):
        return self.conn.write_message(message)

    def close(self):
        self.conn.close()


class RestartUser(User):
    """bench_recovery.User that can take a new socket (its replies and finals are kept)."""

    def __init__(self, conn, name: str, all_told: asyncio.Event, tally: dict):
        self.log: list = []
        self.replayed: set[str] = set()  # prompt ids told with a top-level "replayed": true
        super().__init__(Recorded(conn, self.log, 1), name, all_told, tally)

    def attach(self, conn, socket_no: int, early: list) -> None:
        self.conn = Recorded(conn, self.log, socket_no, early)
        self.task = asyncio.ensure_future(self._read())

    def messages_for(self, prompt_id: str, t0: float) -> list[str]:
        out = []
        for t, socket_no, text in self.log:
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
            if data.get("prompt_id") == prompt_id:
                extra = ""
                if msg["type"] == "prompt_accepted":
                    extra = f"(queued={data.get('queued')})"
                elif msg["type"] == "executing":
                    extra = f"(node={data.get('node')})"
                elif msg["type"] == "error":
                    extra = f"({data.get('code')})"
                out.append(f"s{socket_no} {t - t0:+.3f} {msg['type']}{extra}{' replayed' if msg.get('replayed') else ''}")
        return out

    def scan_replayed(self) -> None:
        for _, _, text in self.log:
            msg = json.loads(text)
            if msg.get("replayed") and msg.get("type") in FINALS:
                self.replayed.add((msg.get("data") or {}).get("prompt_id"))


async def connect(port: int, token: str):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Authorization": "Bearer " + token})
    conn = await asyncio.wait_for(websocket_connect(request), 30)
    early = []  # messages before 'session' (the protocol has 'session' first: counted, then handled)
    while True:
        text = await asyncio.wait_for(conn.read_message(), 30)
        if text is None:
            raise RuntimeError(f"closed before 'session' ({len(early)} messages before)")
        if not isinstance(text, str):
            continue
        if json.loads(text).get("type") == "session":
            return conn, time.monotonic(), early
        early.append((time.monotonic(), text))


async def get_json(http, url: str):
    response = await http.fetch(url, request_timeout=10)
    return json.loads(response.body)


async def wait_comfy_idle(http, comfy_port: int, timeout: float) -> bool:
    """Poll GET /queue until nothing runs or waits (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            queue = await get_json(http, f"http://127.0.0.1:{comfy_port}/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                return True
        except Exception:  # noqa: BLE001 - asked again
            pass
        await asyncio.sleep(0.02)
    return False


def final_timestamp(entry: dict) -> int | None:
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind in FINALS:
            return data.get("timestamp")
    return None


async def one_run(args, tmp: str, run_no: int) -> dict:
    from tornado.httpclient import AsyncHTTPClient

    from comfy_ws_proxy.testing.tokens import DevKey

    key = DevKey.generate("restart")
    jwks = os.path.join(tmp, f"jwks-{run_no}.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    with open(WORKFLOW) as f:
        workflow = json.load(f)
    store = os.path.join(tmp, f"store-{run_no}.sqlite3")
    comfy_port, port = free_port(), free_port()
    comfy = await asyncio.to_thread(start_simulator, comfy_port, args.node_delay)
    old = await asyncio.to_thread(start_proxy_at, port, comfy_port, jwks, store, PROXY_OPTIONS, args.log_level)
    new = None
    http = AsyncHTTPClient(force_instance=True)
    all_told = asyncio.Event()
    tally = {"told": 0, "expected": args.users * args.prompts}
    users: list[RestartUser] = []
    try:
        for i in range(args.users):
            conn, _, early = await connect(port, key.token(f"user{i}", ttl=3600))
            users.append(RestartUser(conn, f"user{i}", all_told, tally))
            users[-1].conn.early = early
        jobs = []
        for i, user in enumerate(users):
            for n in range(args.prompts):
                prompt = json.loads(json.dumps(workflow))
                prompt["1"]["inputs"]["color"] = i * args.prompts + n + 1  # a distinct prompt: no cache hits
                jobs.append(user.submit(prompt))
        replies = await asyncio.gather(*jobs)

        # Stop the proxy the moment every submit was answered.
        stopped_at = time.monotonic()
        old.proc.send_signal(signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM)
        await asyncio.to_thread(old.proc.wait, 30)
        exited_at = time.monotonic()
        new = await asyncio.to_thread(start_proxy_at, port, comfy_port, jwks, store, PROXY_OPTIONS, args.log_level)
        t0 = new.ready_at
        wall_minus_mono = time.time() - time.monotonic()  # sampled together: epoch = monotonic + this
        t0_wall = t0 + wall_minus_mono
        pending_at_t0 = None
        try:
            queue = await get_json(http, f"http://127.0.0.1:{comfy_port}/queue")
            pending_at_t0 = len(queue["queue_running"]) + len(queue["queue_pending"])
        except Exception:  # noqa: BLE001
            pass

        if args.owner == "away":
            await wait_comfy_idle(http, comfy_port, args.timeout)
        for user in users:  # the old sockets are gone (SIGKILL: reset; SIGTERM: closed)
            try:
                await asyncio.wait_for(user.task, 10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                user.task.cancel()
        reconnect_started = time.monotonic()
        opened = await asyncio.gather(*(connect(port, key.token(u.name, ttl=3600)) for u in users))
        for user, (conn, _, early) in zip(users, opened):
            user.attach(conn, 2, early)
        reconnected = max(t for _, t, _ in opened)
        before_session = [(user.name, early) for user, (_, _, early) in zip(users, opened) if early]

        try:
            await asyncio.wait_for(all_told.wait(), args.timeout)
        except asyncio.TimeoutError:
            pass
        comfy_idle = await wait_comfy_idle(http, comfy_port, args.timeout)
        await asyncio.sleep(args.grace)  # a late second telling is counted too
        history = await get_json(http, f"http://127.0.0.1:{comfy_port}/history")
    finally:
        for user in users:
            user.conn.close()
            user.task.cancel()
        http.close()
        if new is not None:
            await asyncio.to_thread(new.stop)
        await asyncio.to_thread(old.stop)
        await asyncio.to_thread(comfy.stop)

    ids = {pid: user for user in users for pid in user.replies}
    for user in users:
        user.scan_replayed()
    counts = {pid: len(user.finals.get(pid, [])) for pid, user in ids.items()}
    firsts = [user.finals[pid][0] for pid, user in ids.items() if user.finals.get(pid)]
    ours = {pid: entry for pid, entry in history.items() if pid in ids}
    done_ts = [final_timestamp(entry) for entry in ours.values()]
    done_ts = [ts for ts in done_ts if ts is not None]
    numbers = [entry["prompt"][0] for entry in history.values() if isinstance(entry.get("prompt"), list)]
    told = [pid for pid, c in counts.items() if c >= 1]
    result = {
        "submitted": len(replies),
        "accepted": sum(1 for r in replies if r["type"] == "prompt_accepted" and not r["data"].get("queued")),
        "queued": sum(1 for r in replies if r["type"] == "prompt_accepted" and r["data"].get("queued")),
        "rejected": sum(1 for r in replies if r["type"] != "prompt_accepted"),
        "in_comfy_at_t0": pending_at_t0,
        "told_once": sum(1 for c in counts.values() if c == 1),
        "told_twice": sum(1 for c in counts.values() if c > 1),
        "never_told": sum(1 for c in counts.values() if c == 0),
        "told_before_stop": sum(1 for t in firsts if t < stopped_at),
        "replayed": sum(1 for pid, user in ids.items() if pid in user.replayed),
        "history_ours": len(ours),
        "history_total": len(history),
        "posts": max(numbers) + 1 if numbers else 0,
        "comfy_idle": comfy_idle,
        "before_session": sum(len(early) for _, early in before_session),
        "users_before_session": len(before_session),
        "exit_s": exited_at - stopped_at,
        "restart_s": t0 - exited_at,
        "reconnected_s": reconnected - t0,
        "reconnect_started_s": reconnect_started - t0,
        "comfy_done_s": max(done_ts) / 1000 - t0_wall if done_ts else None,
        "all_told_s": max(firsts) - t0 if firsts and len(told) == len(ids) else None,
    }
    if args.owner == "now" and result["all_told_s"] is not None and result["comfy_done_s"] is not None:
        result["overhead_s"] = result["all_told_s"] - result["comfy_done_s"]

    problems = []
    for pid, c in counts.items():
        if c == 1 and pid in ours:
            continue
        user = ids[pid]
        entry = history.get(pid)
        lines = [line for child in (old, new) if child is not None for line in child.lines if pid in line]
        problems.append({
            "prompt_id": pid, "user": user.name, "told": c,
            "reply": user.replies[pid].result() if user.replies[pid].done() else None,
            "received": user.messages_for(pid, t0),
            "history": None if entry is None else {
                "number": entry["prompt"][0], "status_str": entry["status"].get("status_str"),
                "final_at_s": (final_timestamp(entry) / 1000 - t0_wall) if final_timestamp(entry) else None},
            "proxy_lines": lines[:20],
        })
    result["problems"] = problems
    result["user0_received"] = {pid: users[0].messages_for(pid, t0) for pid in users[0].replies} if users else {}
    result["before_session_examples"] = [
        {"user": name, "types": [json.loads(text)["type"] for _, text in early][:10], "first": early[0][1][:300]}
        for name, early in before_session[:3]]
    result["proxy_stderr"] = {"old": old.lines[-40:], "new": new.lines[-40:] if new is not None else []}
    return result


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description="Jobs in ComfyUI across a restart of the proxy")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per user")
    parser.add_argument("--node-delay", type=float, default=0.05, help="seconds per node in ComfyUI (7 nodes)")
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL", help="how the first proxy stops")
    parser.add_argument("--owner", choices=("now", "away"), default="now",
                        help="users reconnect at once, or only once ComfyUI is idle")
    parser.add_argument("--grace", type=float, default=0.5, help="seconds to wait after 'all told' for duplicates")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up waiting after this long (default: 30 s + 3x ComfyUI's work)")
    parser.add_argument("--log-level", default="warning", help="the proxies' LOG_LEVEL")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 30 + 3 * args.users * args.prompts * 7 * args.node_delay

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)  # children are stopped on the way out
    tmp = tempfile.mkdtemp(prefix="comfy-restart-")
    results = []
    try:
        for run_no in range(1, args.runs + 1):
            started = time.monotonic()
            results.append(asyncio.run(one_run(args, tmp, run_no)))
            r = results[-1]
            brief = {k: v for k, v in r.items() if k not in ("problems", "proxy_stderr")}
            print(f"run {run_no} ({time.monotonic() - started:.1f} s): {json.dumps(brief)}", file=sys.stderr)
            for p in r["problems"]:
                print(f"run {run_no} PROBLEM: {json.dumps(p)}", file=sys.stderr)
            for example in r["before_session_examples"]:
                print(f"run {run_no} BEFORE SESSION: {json.dumps(example)}", file=sys.stderr)
            if r["problems"]:
                print(f"run {run_no} new proxy's stderr (last lines):\n  " + "\n  ".join(r["proxy_stderr"]["new"]),
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{args.users} users x {args.prompts} prompts in ComfyUI (node delay {args.node_delay:g} s x 7 nodes); "
          f"proxy stopped with SIG{args.signal} and restarted on the same port and store; owners reconnect "
          f"{'at once' if args.owner == 'now' else 'once ComfyUI is idle'}; times from the new proxy's ready line")
    columns = [("reconnected", "reconnected_s"), ("comfy done", "comfy_done_s"), ("all told", "all_told_s")]
    if args.owner == "now":
        columns.append(("overhead", "overhead_s"))
    header = ["run", "submitted", "in comfy", "told once", "told twice", "never told", "before stop", "replayed",
              "history ours/all", "posts", "pre-session", "exit"] + [c[0] for c in columns]
    rows = []
    for i, r in enumerate(results, 1):
        rows.append([str(i), f"{r['submitted']} ({r['accepted']} sent)", str(r["in_comfy_at_t0"]), str(r["told_once"]),
                     str(r["told_twice"]), str(r["never_told"]), str(r["told_before_stop"]), str(r["replayed"]),
                     f"{r['history_ours']}/{r['history_total']}", str(r["posts"]),
                     f"{r['before_session']} ({r['users_before_session']} users)", fmt(r["exit_s"])]
                    + [fmt(r.get(key)) for _, key in columns])
    rows.append(["median"] + [""] * 10 + [fmt(median([r["exit_s"] for r in results]))]
                + [fmt(median([r.get(key) for r in results])) for _, key in columns])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "proxy_options": PROXY_OPTIONS, "runs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

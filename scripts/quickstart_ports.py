#!/usr/bin/env python3
"""Ports and processes for scripts/quickstart.sh (standard library only).

    quickstart_ports.py pick PORT --what "the proxy" [--insist] [--avoid PORT ...]
        prints PORT if it is free, else (saying what holds it) the next free port not to
        avoid; with --insist (the user chose PORT) it stops instead, exit status 1
    quickstart_ports.py wait --pid PID --port PORT --url URL --what NAME --log FILE
        returns once process PID itself listens on PORT and URL answers 200; exit status 1,
        with the end of FILE, if the process exits first or nothing answers in time
    quickstart_ports.py ready --url URL [--url URL ...]
        returns once every URL answers 200 (an unready proxy's /ready says why)

"Listens itself" is checked through /proc (Linux) or lsof: a port that answers is not
enough, since whatever held it before (ComfyUI on 8188, say) answers too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"  # where the quick start binds everything (conf/dev.py: host)
POLL_S = 0.1
SEARCH = 100  # ports tried above a taken one


def is_free(port: int) -> bool:
    """Could a server bind HOST:port now? (SO_REUSEADDR, as Tornado binds.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the sockets listening on ``port`` (Linux), or None without /proc."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found if readable else None


def _has_socket(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
        text = " ".join(" ".join(w.decode(errors="replace").split()) for w in words if w)
    except OSError:
        text = ""
    return text if len(text) <= 80 else text[:77] + "..."


def _lsof(*args: str) -> list[str] | None:
    if shutil.which("lsof") is None:
        return None
    result = subprocess.run(["lsof", "-nP", *args], capture_output=True, text=True, timeout=20)
    return result.stdout.splitlines()


def holders(port: int) -> str:
    """Who listens on ``port``, as words for the operator."""
    inodes = _listening_inodes(port)
    if inodes is not None:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and _has_socket(int(e), inodes)] if inodes else []
        if pids:
            return ", ".join(f"pid {pid} ({_command(pid) or '?'})" for pid in sorted(pids))
    lines = _lsof(f"-iTCP:{port}", "-sTCP:LISTEN", "-Fpc")
    if lines:
        pid = next((line[1:] for line in lines if line.startswith("p")), "?")
        name = next((line[1:] for line in lines if line.startswith("c")), "?")
        return f"pid {pid} ({name})"
    return "a process this user cannot see (try: sudo ss -ltnp 'sport = :%d')" % port


def listens(pid: int, port: int) -> bool | None:
    """Does process ``pid`` itself hold a listening socket on ``port``? None: cannot tell."""
    inodes = _listening_inodes(port)
    if inodes is not None:
        return bool(inodes) and _has_socket(pid, inodes)
    lines = _lsof("-a", "-p", str(pid), f"-iTCP:{port}", "-sTCP:LISTEN", "-t")
    return None if lines is None else bool(lines)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return True


def answer(url: str) -> tuple[int | None, str]:
    """(status, body) of a GET, (None, why) if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(2000).decode(errors="replace")
    except (OSError, ValueError) as e:
        return None, str(getattr(e, "reason", e))


def tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def fail(message: str) -> int:
    print(f"quickstart: error: {message}", file=sys.stderr)
    return 1


def cmd_pick(args) -> int:
    if args.port not in args.avoid and is_free(args.port):
        print(args.port)
        return 0
    if args.port in args.avoid:
        held = f"port {args.port} is the quick start's other server's"
        if args.insist:
            return fail(f"{held}; give {args.what} another (PORT and SIM_PORT must differ)")
    else:
        held = f"port {args.port} is already in use, by {holders(args.port)}"
        if args.insist:
            return fail(f"{held}; {args.what} cannot use it. Stop that process or choose another port.")
    for port in range(args.port + 1, args.port + 1 + SEARCH):
        if port not in args.avoid and is_free(port):
            print(f"==> {held}: {args.what} uses port {port} instead", file=sys.stderr)
            print(port)
            return 0
    return fail(f"{held}, and so are the {SEARCH} ports above it")


def cmd_wait(args) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        if not alive(args.pid):
            return fail(f"{args.what} (pid {args.pid}) exited before it listened on port {args.port}. "
                        f"The end of {args.log}:\n{tail(args.log)}")
        mine = listens(args.pid, args.port)
        if mine is not False:
            status, _ = answer(args.url)
            # (cannot tell who listens: the process must still be there once the port answers)
            if status == 200 and alive(args.pid):
                return 0
        if time.monotonic() > deadline:
            return fail(f"{args.what} (pid {args.pid}) did not answer on port {args.port} within "
                        f"{args.timeout:g} s. The end of {args.log}:\n{tail(args.log)}")
        time.sleep(POLL_S)


def cmd_ready(args) -> int:
    deadline = time.monotonic() + args.timeout
    pending = list(args.url)
    while pending:
        status, body = answer(pending[0])
        if status == 200:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            try:
                why = json.loads(body).get("reason") or body
            except (ValueError, AttributeError):
                why = body
            return fail(f"{pending[0]} answers {status or 'nothing'} ({why.strip()[:200]}){args.hint}")
        time.sleep(POLL_S)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pick = sub.add_parser("pick")
    pick.add_argument("port", type=int)
    pick.add_argument("--what", required=True)
    pick.add_argument("--insist", action="store_true")
    pick.add_argument("--avoid", type=int, action="append", default=[])
    wait = sub.add_parser("wait")
    wait.add_argument("--pid", type=int, required=True)
    wait.add_argument("--port", type=int, required=True)
    wait.add_argument("--url", required=True)
    wait.add_argument("--what", required=True)
    wait.add_argument("--log", required=True)
    wait.add_argument("--timeout", type=float, default=60)
    ready = sub.add_parser("ready")
    ready.add_argument("--url", action="append", required=True)
    ready.add_argument("--timeout", type=float, default=30)
    ready.add_argument("--hint", default="")
    args = parser.parse_args(argv)
    return {"pick": cmd_pick, "wait": cmd_wait, "ready": cmd_ready}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

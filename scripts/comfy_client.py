#!/usr/bin/env python3
"""Submit a workflow through comfy_ws_proxy, show its progress, print the output images.

    python scripts/comfy_client.py --token "$(python scripts/dev_token.py --sub alice)" \
        comfy_ws_proxy/testing/workflows/success.json

Exit status: 0 the prompt succeeded; 1 it failed, was refused (the per-node validation
errors are printed) or the proxy cannot be reached; 2 the token was refused (the line says
why: expired, malformed, ...); 130 interrupted (Ctrl-C cancels the prompt first).
"""
import argparse
import asyncio
import json
import os
import signal
import struct
import sys
import uuid
from urllib.parse import urlencode, urlsplit, urlunsplit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from comfy_ws_proxy.client import AuthenticationError, ProxyClient, ProxyError  # noqa: E402
from comfy_ws_proxy.client.http import JobsClient  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 2, 130
CANCEL_WAIT_S = 5.0  # after Ctrl-C: for the cancel's answer, then for the prompt's end


def bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


def node_error_lines(node_errors: dict) -> list[str]:
    """ComfyUI's per-node validation errors, one line each: node id, class, input, message."""
    lines = []
    for node_id, node in (node_errors or {}).items():
        node = node if isinstance(node, dict) else {}
        for error in node.get("errors") or [{}]:
            extra = error.get("extra_info") or {}
            where = f"node {node_id} ({node.get('class_type', '?')})"
            if extra.get("input_name"):
                where += f" input {extra['input_name']}"
            message = error.get("message") or "invalid"
            if error.get("details"):
                message += f" ({error['details']})"
            lines.append(f"{where}: {message}")
    return lines


def execution_error_line(error: dict) -> str:
    """ComfyUI's execution_error as one line: the node, its class, the exception."""
    where = f"node {error.get('node_id', '?')} ({error.get('node_type', '?')})"
    return f"{where}: {error.get('exception_type', 'error')}: {error.get('exception_message', '')}".rstrip()


def http_base(ws_url: str) -> str:
    """ws://host:port/prefix/ws -> http://host:port/prefix"""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path[:-3] if parts.path.endswith("/ws") else parts.path
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def images_of(outputs: dict) -> list[tuple[str, dict]]:
    return [(node_id, image) for node_id, output in sorted(outputs.items())
            for image in (output or {}).get("images", []) if isinstance(image, dict) and image.get("filename")]


async def download(args, prompt_id: str, outputs: dict) -> list[str]:
    """Each output image into args.download, by HTTP from /outputs/{id}/view (the token's
    user's own files only). Returns the paths written."""
    os.makedirs(args.download, exist_ok=True)
    http = AsyncHTTPClient(force_instance=True)
    saved = []
    try:
        for _node_id, image in images_of(outputs):
            query = urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                               "type": image.get("type", "output")})
            response = await http.fetch(f"{http_base(args.url)}/outputs/{prompt_id}/view?{query}",
                                        headers={"Authorization": "Bearer " + args.token}, raise_error=False)
            if response.code != 200:
                print(f"error: {image['filename']}: HTTP {response.code}", file=sys.stderr)
                continue
            name = os.path.basename(image["filename"]) or "output"
            path, n = os.path.join(args.download, name), 1
            stem, ext = os.path.splitext(name)
            while os.path.exists(path):  # never overwrite
                path, n = os.path.join(args.download, f"{stem}-{n}{ext}"), n + 1
            with open(path, "wb") as f:
                f.write(response.body)
            saved.append(path)
    finally:
        http.close()
    return saved


class Progress:
    """The progress bars on stderr (none with --json)."""

    def __init__(self, total_nodes: int, quiet: bool):
        self.total = total_nodes
        self.quiet = quiet
        self.finished: set = set()
        self.previews = 0

    def event(self, event) -> None:
        if self.quiet:
            return
        if isinstance(event, bytes):
            self.previews += 1
            kind = struct.unpack(">I", event[:4])[0] if len(event) >= 4 else None
            if kind in (1, 4):
                sys.stderr.write(f"\r  preview {self.previews} ({len(event)} bytes)".ljust(60) + "\n")
            return
        kind, data = event.get("type"), event.get("data", {})
        if kind == "execution_cached":
            self.finished.update(data.get("nodes", []))
        elif kind == "progress_state":
            self.finished.update(n for n, s in data.get("nodes", {}).items() if s.get("state") == "finished")
        elif kind == "progress":
            sys.stderr.write(f"\r  node {data.get('node')}: {bar(data['value'], data['max'])}".ljust(60))
        if kind in ("progress_state", "execution_cached", "executing"):
            sys.stderr.write(f"\r{bar(len(self.finished), self.total)} nodes".ljust(60))
        sys.stderr.flush()


async def follow(client: ProxyClient, workflow: dict, prompt_id: str, progress: Progress, say):
    handle = await client.submit(workflow, prompt_id=prompt_id)
    queued = " (queued in the proxy: ComfyUI is unavailable)" if handle.accepted.get("queued") else ""
    say(f"prompt {handle.prompt_id} accepted{queued}")
    async for event in handle.events():
        progress.event(event)
    result = await handle.result()
    if not progress.quiet:
        sys.stderr.write("\n")
    return result


async def interrupt(client: ProxyClient, prompt_id: str, say) -> dict:
    """Ctrl-C: cancel the prompt, wait briefly for the answer and the prompt's end."""
    say(f"interrupted: cancelling prompt {prompt_id}", err=True)
    outcome = {"prompt_id": prompt_id, "status": "interrupted", "cancel": None}
    try:
        answer = await asyncio.wait_for(client.cancel(prompt_id), CANCEL_WAIT_S)
        outcome["cancel"] = answer["type"]
        handle = client.handles.get(prompt_id)
        if answer["type"] == "cancel_accepted" and handle is not None:
            result = await asyncio.wait_for(handle.result(), CANCEL_WAIT_S)  # execution_interrupted
            outcome["status"] = result.status
        elif answer["type"] == "prompt_cancelled":
            outcome["status"] = "cancelled"
        say(f"prompt {prompt_id}: {outcome['status']}", err=True)
    except ProxyError as e:  # not accepted yet, or finished meanwhile
        outcome["cancel"] = e.code
        say(f"cancel: {e.code}: {e.message}", err=True)
    except (asyncio.TimeoutError, ConnectionError):
        say("cancel: no answer from the proxy", err=True)
    return outcome


def refused_lines(e: ProxyError) -> list[str]:
    if isinstance(e, AuthenticationError):
        reason = f" ({e.reason})" if e.reason else ""
        return [f"error: the proxy refused the token{reason}: {e.message}"]
    lines = [f"error: {e.code}: {e.message}"]
    lines += ["  " + line for line in node_error_lines(e.node_errors)]
    if isinstance(e.details, dict) and not e.node_errors:
        lines += [f"  {key}: {value}" for key, value in e.details.items()]
    return lines


def read_workflow(path: str) -> dict:
    """The workflow file, or SystemExit with one line saying what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
    except OSError as e:
        raise SystemExit(f"error: {path}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None
    if not isinstance(workflow, dict):
        raise SystemExit(f"error: {path}: not a workflow (a JSON object of nodes)")
    return workflow


async def run(args) -> int:
    workflow = read_workflow(args.workflow)
    as_json = args.json

    def say(line: str, err: bool = False) -> None:
        if not as_json or err:
            print(line, file=sys.stderr if err or as_json else sys.stdout, flush=True)

    def emit(outcome: dict) -> None:
        if as_json:
            print(json.dumps(outcome, separators=(",", ":")), flush=True)

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    prompt_id = str(uuid.uuid4())  # ours: a Ctrl-C can cancel it before its acceptance arrives
    client = ProxyClient(args.url, args.token, reconnect=True)
    try:
        stop = asyncio.ensure_future(interrupted.wait())
        connecting = asyncio.ensure_future(client.connect())
        await asyncio.wait({connecting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            emit({"prompt_id": None, "status": "interrupted"})
            return EXIT_INTERRUPTED
        connecting.result()
        work = asyncio.ensure_future(follow(client, workflow, prompt_id, Progress(len(workflow), as_json), say))
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            # A second Ctrl-C ends at once.
            loop.add_signal_handler(signal.SIGINT, lambda: os._exit(EXIT_INTERRUPTED))
            outcome = await interrupt(client, prompt_id, say)
            work.cancel()
            emit(outcome)
            return EXIT_INTERRUPTED
        stop.cancel()
        result = work.result()
    except ProxyError as e:
        for line in refused_lines(e):
            print(line, file=sys.stderr)
        status = "unauthorized" if isinstance(e, AuthenticationError) else "rejected"
        emit({"prompt_id": e.prompt_id, "status": status, "error": e.data})
        return EXIT_AUTH if isinstance(e, AuthenticationError) else EXIT_FAILED
    except OSError as e:
        print(f"error: cannot reach the proxy at {args.url}: {e}", file=sys.stderr)
        emit({"prompt_id": None, "status": "unreachable", "error": {"message": str(e)}})
        return EXIT_FAILED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await client.close()
    say(f"prompt {result.prompt_id}: {result.status}")
    if result.error:
        print("error: " + execution_error_line(result.error), file=sys.stderr)
    for node_id, image in images_of(result.outputs):
        folder = f"{image['subfolder']}/" if image.get("subfolder") else ""
        say(f"  node {node_id}: {image.get('type')}/{folder}{image.get('filename')}")
    saved = await download(args, result.prompt_id, result.outputs) if args.download else []
    for path in saved:
        say(f"  saved {path}")
    emit({"prompt_id": result.prompt_id, "status": result.status, "outputs": result.outputs, "error": result.error,
          **({"downloaded": saved} if args.download else {})})
    return EXIT_OK if result.status == "success" else EXIT_FAILED


async def run_http(args) -> int:
    """--http: the same run through the jobs REST API (POST /generate, GET /job with Prefer:
    wait, the outputs by URL, POST /job/<id>/cancel on Ctrl-C)."""
    workflow = read_workflow(args.workflow)
    base = args.url if args.url.startswith("http") else http_base(args.url)
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    prompt_id = str(uuid.uuid4())  # ours: a Ctrl-C can cancel it whatever has been answered
    jobs = JobsClient(base, args.token)

    async def follow() -> dict:
        job = await jobs.submit(workflow, prompt_id=prompt_id)
        say(f"prompt {job['job_id']} accepted ({job['status']})")
        while job["status"] not in ("completed", "failed", "cancelled", "timed_out"):
            job = await jobs.get(job["job_id"], wait=2)
            progress = job.get("progress") or {}
            if not args.json and job["status"] == "processing":
                sys.stderr.write(f"\r{bar(progress.get('nodes_done') or 0, progress.get('nodes_total') or 1)} nodes"
                                 .ljust(60))
                sys.stderr.flush()
        return job

    try:
        work = asyncio.ensure_future(follow())
        stop = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            loop.add_signal_handler(signal.SIGINT, lambda: os._exit(EXIT_INTERRUPTED))
            work.cancel()
            print(f"interrupted: cancelling prompt {prompt_id}", file=sys.stderr)
            try:
                job = await asyncio.wait_for(jobs.cancel(prompt_id), CANCEL_WAIT_S)
                job = await asyncio.wait_for(jobs.wait(prompt_id, CANCEL_WAIT_S), CANCEL_WAIT_S + 5)
                print(f"prompt {prompt_id}: {job['status']}", file=sys.stderr)
            except (ProxyError, asyncio.TimeoutError, ConnectionError) as e:
                job = {"job_id": prompt_id, "status": "interrupted"}
                print(f"cancel: {e}", file=sys.stderr)
            if args.json:
                print(json.dumps({"prompt_id": prompt_id, "status": "interrupted", "job": job}))
            return EXIT_INTERRUPTED
        stop.cancel()
        job = work.result()
        if not args.json:
            sys.stderr.write("\n")
        saved = await jobs.download(job, args.download) if args.download and job["status"] == "completed" else []
    except ProxyError as e:
        for line in refused_lines(e):
            print(line, file=sys.stderr)
        if args.json:
            print(json.dumps({"prompt_id": e.prompt_id, "status": "rejected", "error": e.data}))
        return EXIT_AUTH if isinstance(e, AuthenticationError) else EXIT_FAILED
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        jobs.close()
    say(f"prompt {job['job_id']}: {job['status']}")
    if job.get("error"):
        print(f"error: {job['error'].get('code')}: {job['error'].get('message')}", file=sys.stderr)
    for output in job.get("outputs") or []:
        folder = f"{output['subfolder']}/" if output.get("subfolder") else ""
        say(f"  node {output['node_id']}: {output['type']}/{folder}{output['filename']}")
    for path in saved:
        say(f"  saved {path}")
    if args.json:
        print(json.dumps({"prompt_id": job["job_id"], "status": job["status"], "job": job,
                          **({"downloaded": saved} if args.download else {})}))
    return EXIT_OK if job["status"] == "completed" else EXIT_FAILED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog="exit status: 0 success, 1 failed or refused, 2 token refused, "
                                            "130 interrupted")
    parser.add_argument("workflow", help="an API-format workflow JSON file")
    parser.add_argument("--url", default="ws://127.0.0.1:8190/ws")
    parser.add_argument("--token", default=os.environ.get("COMFY_WS_PROXY_TOKEN"), required=False,
                        help="a JWT (or set COMFY_WS_PROXY_TOKEN)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (prompt_id, status, outputs, error) on stdout, no progress")
    parser.add_argument("--http", action="store_true",
                        help="use the jobs REST API (POST /generate, GET /job/<id>) instead of the WebSocket")
    parser.add_argument("--download", metavar="DIR",
                        help="save the output images into DIR (by HTTP, from /outputs/<prompt_id>/view)")
    args = parser.parse_args()
    if not args.token:
        parser.error("--token is required (mint one with scripts/dev_token.py --sub alice)")
    try:
        return asyncio.run(run_http(args) if args.http else run(args))
    except KeyboardInterrupt:  # before the handler was in place
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

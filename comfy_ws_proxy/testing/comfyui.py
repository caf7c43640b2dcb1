"""A ComfyUI simulator: a test double that behaves like ComfyUI 0.3.64 on the wire.

Faithful to the recordings in shared/comfyui/transcripts (where PROTOCOL.md and the
recordings disagree, the recordings win):

- routes (each also under ``/api``): ``/ws``, ``POST/GET /prompt``, ``GET/POST /queue``,
  ``POST /interrupt``, ``GET/POST /history``, ``GET /history/{id}``, ``/view``,
  ``/system_stats``, ``/features``, ``/object_info``, with the recorded status codes and shapes
  (200 ``{prompt_id, number, node_errors}``, the 400 validation bodies, 500 text/plain for a
  non-JSON body, ``{}`` from ``/history/{id}`` while queued or running, 404 empty from ``/view``);
- one worker runs one prompt at a time from a priority heap (lower ``number`` first,
  ``front`` gives a negative number), one global event FIFO, events awaited socket by socket;
- routing: per-prompt events only to the socket whose clientId is the prompt's ``client_id``;
  ``status`` and TEXT (type 3) frames to every socket; a prompt without ``client_id`` sends
  its ``execution_*``/``executing``/``executed`` to nobody and its progress, previews (type 1),
  TEXT and ``execution_interrupted`` to everybody;
- the first text frame may be ``feature_flags``: that socket then gets type-4 previews;
- a reused clientId evicts the old socket without closing it, and the old socket's close
  removes the new one's entry (ComfyUI's bug, PROTOCOL.md 3.2); reconnecting while the
  prompt runs replays ``executing {node}`` without prompt_id;
- message order per node: progress_state(running), executing, node frames, executed,
  progress_state(finished); then execution_success/error/interrupted, status, executing null;
  an identical prompt re-run is fully cached (``cached_rerun``).

Simplified: node execution is emulated for the node classes used by the shipped workflows
(no tensors); the order among independent nodes is "ready nodes by id, outputs first", which
matches most recordings but not every one; PNG previews are real but tiny, and the 8 MB
SaveImageWebsocket frame is a PNG signature plus random bytes.

Fault injection for tests: go_down/come_up/restart, drop_websockets, http_error_status,
response_delay, stall_post_prompt, paused. Counters: execution_counts (starts),
completed_counts (finished with any outcome).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import json
import logging
import os
import random
import string
import struct
import time
import uuid
import zlib
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketClosedError, WebSocketHandler

log = logging.getLogger("comfyui-simulator")

SERVER_FLAGS = {"supports_preview_metadata": True, "max_upload_size": 104857600.0}
OUTPUT_NODES = {"SaveImage", "PreviewImage", "SaveImageWebsocket", "PreviewAny"}
KNOWN_NODES = {"EmptyImage", "ImageInvert", "ImageBlur", "GetImageSize", "ImageScale", "SaveImage", "PreviewImage",
               "SaveImageWebsocket", "SolidMask", "JoinImageWithAlpha", "ImageBatch", "ImageAddNoise", "PreviewAny"}
MASK_NODES = {"SolidMask"}
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LARGE_FRAME_LEN = 8_646_706  # the SaveImageWebsocket frame of a 2048x2048 noise image (large_binary)


def now_ms() -> int:
    return int(time.time() * 1000)


def png(width: int, height: int, rgb: tuple[int, int, int] = (0, 0, 255)) -> bytes:
    """A real (tiny) PNG of one colour."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + bytes(rgb) * width
    raw = zlib.compress(row * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


class ExecutionFailed(Exception):
    def __init__(self, exception_type: str, message: str):
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


class Interrupted(Exception):
    pass


class QueueItem:
    __slots__ = ("number", "prompt_id", "prompt", "extra_data", "outputs")

    def __init__(self, number, prompt_id, prompt, extra_data, outputs):
        self.number = number
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.extra_data = extra_data
        self.outputs = outputs

    def as_list(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self):
        return self.extra_data.get("client_id")


# --- validation -------------------------------------------------------------------------------

def _error(kind, message, details="", extra=None, node_errors=None) -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": extra or {}},
            "node_errors": node_errors or {}}


def _node_own_errors(prompt: dict, node_id: str) -> list[dict]:
    node = prompt[node_id]
    cls, inputs = node.get("class_type"), node.get("inputs") or {}
    errors = []
    if cls == "ImageScale":
        for name in ("width", "height"):
            value = inputs.get(name)
            if isinstance(value, int) and value > 16384:
                errors.append({"type": "value_bigger_than_max", "message": f"Value {value} bigger than max of 16384",
                               "details": name, "extra_info": {
                                   "input_name": name,
                                   "input_config": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
                                   "received_value": value}})
        method = inputs.get("upscale_method")
        if method not in UPSCALE_METHODS:
            errors.append({"type": "value_not_in_list", "message": "Value not in list",
                           "details": f"upscale_method: '{method}' not in {UPSCALE_METHODS}",
                           "extra_info": {"input_name": "upscale_method", "input_config": [UPSCALE_METHODS, {}],
                                          "received_value": method}})
    if cls == "ImageBlur":
        for name in ("blur_radius", "sigma"):
            if name not in inputs:
                errors.append({"type": "required_input_missing", "message": "Required input is missing",
                               "details": name, "extra_info": {"input_name": name}})
    if cls in ("PreviewImage", "SaveImage", "SaveImageWebsocket"):
        link = inputs.get("images")
        if isinstance(link, list) and link and link[0] in prompt and prompt[link[0]].get("class_type") in MASK_NODES:
            errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                           "details": "images, received_type(MASK) mismatch input_type(IMAGE)",
                           "extra_info": {"input_name": "images", "input_config": ["IMAGE", {}],
                                          "received_type": "MASK", "linked_node": link}})
    return errors


def validate_prompt(prompt: Any, partial_targets: list | None) -> tuple[dict | None, list[str], dict]:
    """(error body or None, outputs to execute, node_errors for a partial success)."""
    if not isinstance(prompt, dict):
        return _error("no_prompt", "No prompt provided", "No prompt provided"), [], {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                          f"Node ID '#{node_id}'"), [], {}
        if node["class_type"] not in KNOWN_NODES:
            return _error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                          f"Node ID '#{node_id}'"), [], {}
    outputs = [n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
    if partial_targets is not None:
        outputs = [n for n in outputs if n in partial_targets]
    if not outputs:
        return _error("prompt_no_outputs", "Prompt has no outputs"), [], {}
    validated: dict[str, bool] = {}
    node_errors: dict[str, dict] = {}
    first_failure = None

    def check(node_id: str) -> bool:
        if node_id in validated:
            return validated[node_id]
        validated[node_id] = True
        ok = True
        for value in (prompt[node_id].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt:
                ok = check(value[0]) and ok
        errors = _node_own_errors(prompt, node_id)
        if errors:
            node_errors[node_id] = {"errors": errors, "dependent_outputs": [],
                                    "class_type": prompt[node_id]["class_type"]}
            ok = False
        validated[node_id] = ok
        return ok

    good = []
    for output in sorted(outputs, key=lambda n: (len(n), n), reverse=True):
        if check(output):
            good.append(output)
            continue
        for node_id, entry in node_errors.items():
            entry["dependent_outputs"].append(output)
        if first_failure is None:
            first_failure = next(iter(node_errors.values()))["errors"][0]
    if not good:
        details = f"{first_failure['message']}: {first_failure['details']}" if first_failure else ""
        return _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details,
                      node_errors=node_errors), [], {}
    return None, sorted(good, key=lambda n: (len(n), n)), node_errors


def execution_order(prompt: dict, outputs: list[str]) -> list[str]:
    """Nodes the outputs need, in dependency order; among ready nodes, outputs first, then by id."""
    needed: set[str] = set()

    def deps(node_id: str) -> list[str]:
        return [v[0] for v in (prompt[node_id].get("inputs") or {}).values()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in prompt]

    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(deps(n))
    done: list[str] = []
    remaining = set(needed)
    key = lambda n: (prompt[n]["class_type"] not in OUTPUT_NODES, len(n), n)  # noqa: E731
    while remaining:
        ready = sorted((n for n in remaining if all(d in done for d in deps(n))), key=key)
        done.append(ready[0])
        remaining.discard(ready[0])
    return done


# --- the server -------------------------------------------------------------------------------

class ComfySimulator:
    def __init__(self, *, node_delay: float = 0.0, step_delay: float = 0.0):
        self.node_delay = node_delay
        self.step_delay = step_delay
        self.port: int | None = None
        self.address = "127.0.0.1"
        self.http_error_status: int | None = None
        self.response_delay = 0.0
        self.stall_post_prompt: str | None = None
        self.execution_counts: collections.Counter = collections.Counter()
        self.completed_counts: collections.Counter = collections.Counter()
        self.started_order: list[str] = []  # prompt ids in the order their executions started
        self.completions: list[tuple[str, int]] = []  # (prompt id, process generation) per completion
        self.requests: list[tuple[str, str]] = []
        self._last_headers: dict = {}
        self._server: HTTPServer | None = None
        self._stalled: list[asyncio.Future] = []
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._reset_state()
        self._worker_task: asyncio.Task | None = None
        self._publisher_task: asyncio.Task | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._file_counter = collections.Counter()
        self.files: dict[tuple[str, str, str], bytes] = {}
        self._temp_prefix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))

    def _reset_state(self) -> None:
        # A restart is a new process: handlers of the old one must not touch the new state.
        self.generation = getattr(self, "generation", 0) + 1
        self.sockets: dict[str, "SimSocket"] = {}  # clientId -> the socket events go to
        self.live: set["SimSocket"] = set()
        self.flags: dict[str, dict] = {}
        self.pending: list = []  # heap of (number, seq, QueueItem)
        self._seq = 0
        self.running: QueueItem | None = None
        self.history: collections.OrderedDict = collections.OrderedDict()
        self.number = 0
        self.current_client_id: str | None = None
        self.last_node_id: str | None = None
        self._interrupt = False
        self._cache: dict[str, dict] = {}  # prompt json -> outputs of its UI nodes
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- properties ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.address}:{self.port}/ws"

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    @paused.setter
    def paused(self, value: bool) -> None:
        if value:
            self._unpaused.clear()
        else:
            self._unpaused.set()

    @property
    def ws_clients(self) -> dict[str, int]:
        counts: collections.Counter = collections.Counter()
        for sock in self.live:
            counts[sock.sid] += 1
        return dict(counts)

    def last_request_headers(self) -> dict:
        return dict(self._last_headers)

    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, port: int = 0, address: str = "127.0.0.1") -> None:
        self.address = address
        self._listen(port)
        self._worker_task = asyncio.ensure_future(self._worker())
        self._publisher_task = asyncio.ensure_future(self._publisher())

    def _listen(self, port: int) -> None:
        sockets = bind_sockets(port, self.address)
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(self._make_app())
        self._server.add_sockets(sockets)

    def _make_app(self) -> tornado.web.Application:
        kw = {"sim": self}
        routes = []
        for prefix in ("", "/api"):
            routes += [
                (prefix + r"/ws", SimSocket, kw),
                (prefix + r"/prompt", PromptHandler, kw),
                (prefix + r"/queue", QueueHandler, kw),
                (prefix + r"/interrupt", InterruptHandler, kw),
                (prefix + r"/history", HistoryHandler, kw),
                (prefix + r"/history/([^/]+)", HistoryItemHandler, kw),
                (prefix + r"/view", ViewHandler, kw),
                (prefix + r"/system_stats", SystemStatsHandler, kw),
                (prefix + r"/features", FeaturesHandler, kw),
                (prefix + r"/object_info", ObjectInfoHandler, kw),
            ]
        return tornado.web.Application(routes, websocket_max_message_size=4 * 1024 * 1024)

    async def go_down(self) -> None:
        """A network partition: refuse connections, drop every socket; keep the queue."""
        if self._server is not None:
            self._server.stop()
            server, self._server = self._server, None
            self.drop_websockets()
            for future in self._stalled:
                if not future.done():
                    future.set_result(None)
            await server.close_all_connections()

    async def come_up(self) -> None:
        if self._server is None:
            self._listen(self.port)

    async def restart(self) -> None:
        """A ComfyUI restart: down, queue, running prompt and history lost, up again."""
        await self.go_down()
        if self._worker_task is not None:
            self._worker_task.cancel()
        self._reset_state()
        self._worker_task = asyncio.ensure_future(self._worker())
        await self.come_up()

    def drop_websockets(self) -> None:
        for sock in list(self.live):
            sock.abort()
        self.sockets.clear()

    def release_stalled(self) -> None:
        for future in self._stalled:
            if not future.done():
                future.set_result(None)
        self._stalled.clear()

    async def stop(self) -> None:
        await self.go_down()
        for task in (self._worker_task, self._publisher_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._worker_task = self._publisher_task = None

    async def wait_idle(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self._idle.wait(), timeout)

    # --- events -------------------------------------------------------------------------------
    def send(self, event: str, data: dict, sid: str | None) -> None:
        self._events.put_nowait(("json", json.dumps({"type": event, "data": data}), sid))

    def send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._events.put_nowait(("binary", payload, sid))

    def send_to_cid(self, event: str, data: dict, cid: str | None, broadcast_if_none: bool = False) -> None:
        if cid is None and not broadcast_if_none:
            return
        self.send(event, data, cid)

    def broadcast_status(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}, None)

    async def _publisher(self) -> None:
        """One FIFO; each send awaited in turn (a slow socket delays everyone, as in ComfyUI)."""
        while True:
            kind, payload, sid = await self._events.get()
            targets = list(self.sockets.values()) if sid is None else (
                [self.sockets[sid]] if sid in self.sockets else [])
            for sock in targets:
                try:
                    await sock.write_message(payload, binary=kind == "binary")
                except (WebSocketClosedError, Exception):  # a socket gone mid-send: skip it
                    pass

    # --- the queue ----------------------------------------------------------------------------
    def put(self, item: QueueItem) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (item.number, self._seq, item))
        self._idle.clear()
        self.broadcast_status()
        self._work.set()

    async def _worker(self) -> None:
        while True:
            await self._unpaused.wait()
            if not self.pending:
                self._work.clear()
                if self.running is None:
                    self._idle.set()
                await self._work.wait()
                continue
            if self.paused:
                continue
            _, _, item = heapq.heappop(self.pending)
            self.running = item
            self.broadcast_status()
            try:
                await self._execute(item)
            finally:
                self.running = None
                self.current_client_id = None
                self.last_node_id = None

    async def _pause_point(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)

    async def _execute(self, item: QueueItem) -> None:
        prompt_id, prompt, cid = item.prompt_id, item.prompt, item.client_id
        self.execution_counts[prompt_id] += 1
        self.started_order.append(prompt_id)
        self.current_client_id = cid
        self._interrupt = False
        messages: list = []

        def add_message(event: str, data: dict, broadcast: bool) -> None:
            data = dict(data, timestamp=now_ms())
            messages.append([event, data])
            self.send_to_cid(event, data, cid, broadcast_if_none=broadcast)

        add_message("execution_start", {"prompt_id": prompt_id}, False)
        cache_key = json.dumps(prompt, sort_keys=True) + json.dumps(item.outputs)
        cached = self._cache.get(cache_key)
        order = execution_order(prompt, item.outputs)
        outputs: dict[str, dict] = {}
        states: dict[str, dict] = {}
        status_str, completed = "success", True

        def node_state(node_id, value, maximum, state):
            states[node_id] = {"value": value, "max": maximum, "state": state, "node_id": node_id,
                               "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
                               "real_node_id": node_id}
            self.send_to_cid("progress_state", {"prompt_id": prompt_id, "nodes": dict(states)}, cid, True)

        if cached is not None:
            add_message("execution_cached", {"nodes": order, "prompt_id": prompt_id}, False)
            for node_id, output in sorted(cached.items(), key=lambda kv: (len(kv[0]), kv[0])):
                outputs[node_id] = output
                self.send_to_cid("executed", {"node": node_id, "display_node": node_id, "output": output,
                                              "prompt_id": prompt_id}, cid)
                node_state(node_id, 1, 1, "finished")
            add_message("execution_success", {"prompt_id": prompt_id}, False)
        else:
            add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id}, False)
            values: dict[str, dict] = {}
            executed: list[str] = []
            try:
                for node_id in order:
                    if self._interrupt:
                        raise Interrupted(node_id)
                    node_state(node_id, 0.0, 1.0, "running")
                    self.last_node_id = node_id
                    self.send_to_cid("executing", {"node": node_id, "display_node": node_id,
                                                   "prompt_id": prompt_id}, cid)
                    await self._pause_point(self.node_delay)
                    ui = await self._run_node(item, node_id, values, node_state)
                    if ui is not None:
                        outputs[node_id] = ui
                        self.send_to_cid("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                                      "prompt_id": prompt_id}, cid)
                    executed.append(node_id)
                    node_state(node_id, 1.0, 1.0, "finished")
                add_message("execution_success", {"prompt_id": prompt_id}, False)
                self._cache[cache_key] = dict(outputs)
            except Interrupted as e:
                node_id = e.args[0]
                add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                      "node_type": prompt[node_id]["class_type"],
                                                      "executed": executed}, True)
                status_str, completed = "error", False
            except ExecutionFailed as e:
                node_id = self.last_node_id
                add_message("execution_error", {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": prompt[node_id]["class_type"],
                    "executed": executed, "exception_message": e.message, "exception_type": e.exception_type,
                    "traceback": ['  File "/opt/ComfyUI/execution.py", line 496, in execute\n'],
                    "current_inputs": {}, "current_outputs": []}, False)
                status_str, completed = "error", False
        extra = {k: v for k, v in item.extra_data.items() if k not in ("auth_token_comfy_org", "api_key_comfy_org")}
        self.history[prompt_id] = {
            "prompt": [item.number, prompt_id, prompt, extra, item.outputs],
            "outputs": outputs,
            "status": {"status_str": status_str, "completed": completed, "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs},
        }
        while len(self.history) > 10000:
            self.history.popitem(last=False)
        self.completed_counts[prompt_id] += 1
        self.completions.append((prompt_id, self.generation))
        self.running = None
        self.broadcast_status()
        self.send_to_cid("executing", {"node": None, "prompt_id": prompt_id}, cid)

    async def _run_node(self, item: QueueItem, node_id: str, values: dict, node_state) -> dict | None:
        prompt, cid = item.prompt, item.client_id
        node = prompt[node_id]
        cls, inputs = node["class_type"], node.get("inputs") or {}

        def linked(name, default=None):
            v = inputs.get(name, default)
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                return values.get(v[0], {})
            return v

        if cls == "EmptyImage":
            values[node_id] = {"w": inputs.get("width", 512), "h": inputs.get("height", 512),
                               "b": inputs.get("batch_size", 1), "c": 3}
        elif cls == "SolidMask":
            values[node_id] = {"w": inputs.get("width", 512), "h": inputs.get("height", 512), "b": 1, "c": 1}
        elif cls in ("ImageInvert", "ImageBlur", "ImageAddNoise"):
            values[node_id] = dict(linked("image"))
        elif cls == "JoinImageWithAlpha":
            values[node_id] = dict(linked("image"), c=4)
        elif cls == "ImageBatch":
            a, b = linked("image1"), linked("image2")
            if a.get("c") != b.get("c") or (a.get("w"), a.get("h")) != (b.get("w"), b.get("h")):
                raise ExecutionFailed("RuntimeError", f"Sizes of tensors must match except in dimension 0. Expected "
                                      f"size {a.get('c')} but got size {b.get('c')} for tensor number 1 in the list.\n")
            values[node_id] = dict(a, b=a.get("b", 1) + b.get("b", 1))
        elif cls == "GetImageSize":
            image = linked("image")
            values[node_id] = {"int": image.get("w"), "w": image.get("w"), "h": image.get("h")}
            text = f"width: {image.get('w')}, height: {image.get('h')}\n batch size: {image.get('b')}"
            # send_progress_text defaults to sid=None: a broadcast to every socket
            self.send_bytes(struct.pack(">I", 3) + struct.pack(">I", len(node_id)) + node_id.encode()
                            + text.encode(), None)
        elif cls == "ImageScale":
            image = linked("image")
            width = inputs.get("width")
            width = values.get(width[0], {}).get("int") if isinstance(width, list) else width
            values[node_id] = dict(image, w=width, h=inputs.get("height"))
        elif cls in ("SaveImage", "PreviewImage"):
            image = linked("images")
            images = []
            for _ in range(image.get("b", 1)):
                if cls == "SaveImage":
                    prefix = inputs.get("filename_prefix", "ComfyUI")
                    kind = "output"
                else:
                    prefix, kind = f"ComfyUI_temp_{self._temp_prefix}", "temp"
                self._file_counter[prefix] += 1
                filename = f"{prefix}_{self._file_counter[prefix]:05}_.png"
                self.files[(filename, "", kind)] = png(min(image.get("w") or 8, 64), min(image.get("h") or 8, 64))
                images.append({"filename": filename, "subfolder": "", "type": kind})
            return {"images": images}
        elif cls == "SaveImageWebsocket":
            image = linked("images")
            total = image.get("b", 1)
            large = (image.get("w") or 0) >= 2048
            metadata = bool(cid is not None and self.flags.get(cid, {}).get("supports_preview_metadata") is True)
            for step in range(total):
                if self._interrupt:
                    raise Interrupted(node_id)
                node_state(node_id, float(step), float(total), "running")
                if large:
                    body = b"\x89PNG\r\n\x1a\n" + os.urandom(LARGE_FRAME_LEN - 16)
                else:
                    body = png(image.get("w") or 8, image.get("h") or 8, (0, 0, 255 - step))
                progress = {"value": step, "max": total, "prompt_id": item.prompt_id, "node": node_id}
                if metadata:
                    meta = json.dumps({"node_id": node_id, "prompt_id": item.prompt_id, "display_node_id": node_id,
                                       "parent_node_id": None, "real_node_id": node_id,
                                       "image_type": "image/png"}).encode()
                    self.send_bytes(struct.pack(">II", 4, len(meta)) + meta + body, cid)
                    self.send_to_cid("progress", progress, cid, True)
                else:
                    self.send_to_cid("progress", progress, cid, True)
                    self.send_bytes(struct.pack(">II", 1, 2) + body, cid)
                await self._pause_point(self.step_delay)
        return None


class SimHandler(tornado.web.RequestHandler):
    def initialize(self, sim: ComfySimulator):
        self.sim = sim

    async def prepare(self):
        sim = self.sim
        sim.requests.append((self.request.method, self.request.path))
        sim._last_headers = dict(self.request.headers)
        if sim.response_delay:
            await asyncio.sleep(sim.response_delay)
        if sim.http_error_status:
            self.set_status(sim.http_error_status)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{sim.http_error_status} Internal Server Error\n\nServer got itself in trouble")

    def json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data))

    def body_json(self):
        return json.loads(self.request.body or b"null")

    def server_error(self) -> None:
        self.set_status(500)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("500 Internal Server Error\n\nServer got itself in trouble")


class PromptHandler(SimHandler):
    def get(self):
        self.json({"exec_info": {"queue_remaining": self.sim.queue_remaining()}})

    async def post(self):
        sim = self.sim
        try:
            body = self.body_json()
        except ValueError:
            return self.server_error()
        if not isinstance(body, dict):
            return self.server_error()
        if sim.stall_post_prompt == "before_enqueue":
            await self._stall()  # the request "never arrived": not queued, no answer
            return self._drop()
        if "number" in body:
            number = float(body["number"])
        else:
            number = -sim.number if body.get("front") else sim.number
            sim.number += 1
        if "prompt" not in body:
            return self.json(_error("no_prompt", "No prompt provided", "No prompt provided"), 400)
        prompt = body["prompt"]
        error, outputs, node_errors = validate_prompt(prompt, body.get("partial_execution_targets"))
        if error is not None:
            return self.json(error, 400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        sim.put(QueueItem(number, prompt_id, prompt, extra_data, outputs))
        if sim.stall_post_prompt == "after_enqueue":
            await self._stall()  # queued; the answer comes only when released (if anyone still listens)
        if not self.request.connection.stream.closed():
            self.json({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _stall(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sim._stalled.append(future)
        await future

    def _drop(self) -> None:
        stream = self.request.connection.stream
        if not stream.closed():
            stream.close()


class QueueHandler(SimHandler):
    def get(self):
        sim = self.sim
        self.json({"queue_running": [sim.running.as_list()] if sim.running else [],
                   "queue_pending": [entry[2].as_list() for entry in sim.pending]})

    def post(self):
        sim = self.sim
        try:
            body = self.body_json() or {}
        except ValueError:
            return self.server_error()
        if body.get("clear"):
            sim.pending.clear()
            sim.broadcast_status()
        for prompt_id in body.get("delete") or []:
            for i, entry in enumerate(sim.pending):
                if entry[2].prompt_id == prompt_id:
                    sim.pending.pop(i)
                    heapq.heapify(sim.pending)
                    sim.broadcast_status()
                    break
        self.set_status(200)
        self.finish()


class InterruptHandler(SimHandler):
    def post(self):
        sim = self.sim
        try:
            body = self.body_json() or {}
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id is None:
            sim._interrupt = sim.running is not None  # a GLOBAL interrupt
        elif sim.running is not None and sim.running.prompt_id == prompt_id:
            sim._interrupt = True
        else:
            log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        self.set_status(200)
        self.finish()


class HistoryHandler(SimHandler):
    def get(self):
        items = list(self.sim.history.items())
        max_items = self.get_query_argument("max_items", None)
        offset = self.get_query_argument("offset", None)
        try:
            if offset is not None:
                items = items[int(offset):]
                if max_items is not None:
                    items = items[:int(max_items)]
            elif max_items is not None:
                items = items[-int(max_items):]
        except ValueError:
            return self.server_error()
        self.json(dict(items))

    def post(self):
        try:
            body = self.body_json() or {}
        except ValueError:
            return self.server_error()
        if body.get("clear"):
            self.sim.history.clear()
        for prompt_id in body.get("delete") or []:
            self.sim.history.pop(prompt_id, None)
        self.set_status(200)
        self.finish()


class HistoryItemHandler(SimHandler):
    def get(self, prompt_id):
        entry = self.sim.history.get(prompt_id)
        self.json({prompt_id: entry} if entry is not None else {})


class ViewHandler(SimHandler):
    def get(self):
        key = (self.get_query_argument("filename", ""), self.get_query_argument("subfolder", ""),
               self.get_query_argument("type", "output"))
        data = self.sim.files.get(key)
        if data is None:
            self.set_status(404)
            return self.finish()
        self.set_header("Content-Type", "image/png")
        self.set_header("Content-Disposition", f'filename="{key[0]}"')
        self.finish(data)


class SystemStatsHandler(SimHandler):
    def get(self):
        self.json({"system": {"os": "posix", "ram_total": 25276510208, "ram_free": 24248344576,
                              "comfyui_version": "0.3.64", "required_frontend_version": "1.27.10",
                              "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                              "python_version": "3.11.7", "pytorch_version": "simulated", "embedded_python": False,
                              "argv": ["main.py", "--cpu"]},
                   "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                                "torch_vram_total": 0, "torch_vram_free": 0}]})


class FeaturesHandler(SimHandler):
    def get(self):
        self.json({"supports_preview_metadata": True, "max_upload_size": 104857600})


class ObjectInfoHandler(SimHandler):
    def get(self):
        self.json({name: {"name": name, "display_name": name, "output_node": name in OUTPUT_NODES,
                          "category": "simulated", "input": {}, "output": [], "python_module": "nodes"}
                   for name in sorted(KNOWN_NODES)})


class SimSocket(WebSocketHandler):
    def initialize(self, sim: ComfySimulator):
        self.sim = sim
        self.sid = ""
        self.first_text = True

    def check_origin(self, origin):
        return True  # the loopback Host/Origin rule is not simulated

    async def get(self, *args, **kwargs):
        self.sim._last_headers = dict(self.request.headers)
        self.sim.requests.append(("GET", self.request.path))
        await super().get(*args, **kwargs)

    def open(self):
        sim = self.sim
        sid = self.get_query_argument("clientId", "")
        if sid:
            sim.sockets.pop(sid, None)  # "Reusing existing session, remove old" (old one NOT closed)
        else:
            sid = uuid.uuid4().hex
        self.sid = sid
        self.generation = sim.generation
        sim.sockets[sid] = self
        sim.flags[sid] = {}
        sim.live.add(self)
        try:
            self.write_message(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": sim.queue_remaining()}}, "sid": sid}}))
            if sim.current_client_id == sid and sim.last_node_id is not None:
                self.write_message(json.dumps({"type": "executing", "data": {"node": sim.last_node_id}}))
        except WebSocketClosedError:
            pass  # the client went away during the handshake

    def on_message(self, message):
        if isinstance(message, bytes) or not self.first_text:
            return
        self.first_text = False
        try:
            msg = json.loads(message)
        except ValueError:
            log.warning("invalid json from a client")
            return
        if isinstance(msg, dict) and msg.get("type") == "feature_flags" and isinstance(msg.get("data"), dict):
            self.sim.flags[self.sid] = msg["data"]
            self.write_message(json.dumps({"type": "feature_flags", "data": SERVER_FLAGS}))

    def on_close(self):
        sim = self.sim
        sim.live.discard(self)
        if getattr(self, "generation", None) != sim.generation:
            return  # a socket of the process before a restart
        # ComfyUI's finally: pops the clientId even when a newer socket holds it (the eviction bug).
        sim.sockets.pop(self.sid, None)
        sim.flags.pop(self.sid, None)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network failure)."""
        self.sim.live.discard(self)
        connection = self.ws_connection
        stream = getattr(connection, "stream", None)
        if stream is not None and not stream.closed():
            stream.close()
        else:
            self.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="A ComfyUI 0.3.64 SIMULATOR (a test double, not ComfyUI)")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--node-delay", type=float, default=0.0, help="seconds per node")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per SaveImageWebsocket step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        sim = ComfySimulator(node_delay=args.node_delay, step_delay=args.step_delay)
        await sim.start(args.port, args.address)
        log.warning("ComfyUI SIMULATOR (not ComfyUI) listening on %s", sim.url)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

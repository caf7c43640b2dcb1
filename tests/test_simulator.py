"""The ComfyUI simulator held against the recordings of a real ComfyUI 0.3.64
(tests/transcripts, copied from shared/comfyui/transcripts; where the recordings and PROTOCOL.md disagree, the recordings
are right), then its fault injection.

Each scenario test drives the simulator the way the recorder drove ComfyUI, with the
recorded prompts (their colours decide PNG sizes), and compares what every socket
received: the sequence of (message type, key fields, frame length) per socket, the data
keys per message type, binary layouts, HTTP statuses, content types and bodies, history
entries. ``hold_node`` stops the simulator inside a node, so interleavings that took real
time in the recordings (an interrupt during node 4, a reconnect during node 3) are
reproduced without sleeps or timing assumptions.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import struct
import sys
import time
import urllib.parse
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream
from tornado.websocket import websocket_connect

from comfy_ws_proxy.testing.comfyui import ComfySimulator

TIMEOUT = 10
HERE = os.path.dirname(os.path.abspath(__file__))
# The recordings of a real ComfyUI 0.3.64 travel with the project (copied from
# ../shared/comfyui/transcripts), so a fresh clone runs every test below.
TRANSCRIPTS = os.path.join(HERE, "transcripts")
WORKFLOWS = os.path.join(HERE, "..", "comfy_ws_proxy", "testing", "workflows")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


# --- the recordings -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple:
    with open(os.path.join(TRANSCRIPTS, name + ".jsonl"), encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def load(name: str) -> list[dict]:
    return json.loads(json.dumps(_load(name)))  # a fresh copy for each test


def http_records(name: str, method: str | None = None, path: str | None = None) -> list[dict]:
    return [r for r in load(name) if r["ev"] == "http" and (method is None or r["method"] == method)
            and (path is None or r["path"] == path)]


def recorded_prompt(name: str, index: int) -> dict:
    """The full prompt of the index-th POST /prompt of a recording, found in its /history
    or /queue answers (the recorder randomised colours, so prompts differ from the files)."""
    prompt_id = http_records(name, "POST", "/prompt")[index]["body"]["prompt_id"]
    for record in http_records(name, "GET"):
        body = record.get("body")
        if record["path"].startswith("/history/") and body and prompt_id in body:
            return body[prompt_id]["prompt"][2]
        if record["path"] == "/queue" and body:
            for item in body["queue_running"] + body["queue_pending"]:
                if item[1] == prompt_id:
                    return item[2]
    raise LookupError(f"{name}: prompt {index} not recorded")


def recorded_history(name: str, index: int = 0) -> dict:
    record = [r for r in http_records(name, "GET") if r["path"].startswith("/history/") and r["body"]][index]
    return next(iter(record["body"].values()))


def describe_recorded(record: dict) -> dict:
    if record["frame"] == "binary":
        return {"binary": True, "event": record["event"], "len": record["len"], "node_id": record.get("node_id"),
                "text": record.get("text"), "metadata": record.get("metadata"),
                "image_len": record.get("image_len")}
    # The length of the recorded data: the wire length of every frame, except execution_error's, 55 bytes
    # shorter once the recorder rewrote the server paths in its 5 traceback lines ("/opt/ComfyUI").
    length = len(json.dumps({"type": record["type"], "data": record["data"]}))
    return {"binary": False, "type": record["type"], "data": record["data"], "len": length}


def describe_frame(frame) -> dict:
    """A received frame in the shape of a recorded one (binary frames decoded)."""
    if isinstance(frame, str):
        message = json.loads(frame)
        return {"binary": False, "type": message["type"], "data": message["data"], "len": len(frame.encode())}
    event = struct.unpack(">I", frame[:4])[0]
    described = {"binary": True, "event": event, "len": len(frame), "node_id": None, "text": None,
                 "metadata": None, "image_len": None}
    if event == 3:
        (n,) = struct.unpack(">I", frame[4:8])
        described.update(node_id=frame[8:8 + n].decode(), text=frame[8 + n:].decode())
    elif event == 1:
        assert struct.unpack(">I", frame[4:8])[0] == 2 and frame[8:16] == PNG_MAGIC  # PNG
        described.update(image_len=len(frame) - 8)
    elif event == 4:
        (n,) = struct.unpack(">I", frame[4:8])
        assert frame[8 + n:16 + n] == PNG_MAGIC
        described.update(metadata=json.loads(frame[8:8 + n]), image_len=len(frame) - 8 - n)
    return described


def token(d: dict) -> str:
    """What must match between the recording and the simulator for one frame: its type,
    the fields that carry order and routing, and its length."""
    if d["binary"]:
        if d["event"] == 3:
            return f"TEXT:{d['node_id']}:{d['text']!r}#{d['len']}"
        if d["event"] == 4:
            return f"PREVIEW4:{d['metadata']['node_id']}#{d['len']}"
        return f"PREVIEW{d['event']}#{d['len']}"
    kind, data = d["type"], d["data"]
    if kind == "status":
        detail = f"{data['status']['exec_info']['queue_remaining']}{':sid' if 'sid' in data else ''}"
    elif kind == "executing":
        detail = f"{data['node']}:{','.join(data)}"
    elif kind == "executed":
        detail = f"{data['node']}:{[image['type'] for image in (data['output'] or {}).get('images', [])]}"
    elif kind == "execution_cached":
        detail = ",".join(data["nodes"])
    elif kind == "progress":
        detail = f"{data['node']}:{data['value']}/{data['max']}"
    elif kind == "progress_state":
        detail = ",".join(f"{n}:{s['state']}:{s['value']!r}/{s['max']!r}" for n, s in data["nodes"].items())
    elif kind in ("execution_error", "execution_interrupted"):
        detail = f"{data['node_id']}:{data['node_type']}:{data['executed']}"
    elif kind == "feature_flags":
        detail = json.dumps(data, sort_keys=True)
    else:
        detail = ""
    return f"{kind}:{detail}#{d['len']}"


def recorded_tokens(name: str, who: str) -> list[str]:
    return [token(describe_recorded(r)) for r in load(name) if r["ev"] == "ws_recv" and r["who"] == who]


def data_keys(descriptions: list[dict]) -> dict[str, set]:
    keys: dict[str, set] = {}
    for d in descriptions:
        if not d["binary"]:
            keys.setdefault(d["type"], set()).update(d["data"])
    return keys


def normalize(value):
    """Replace what differs from run to run: ids, timestamps, file counters, temp prefixes."""
    text = json.dumps(value)
    text = re.sub(r'"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"', '"ID"', text)
    text = re.sub(r'"timestamp": \d+', '"timestamp": 0', text)
    text = re.sub(r"_\d{5}_\.png", "_#####_.png", text)
    text = re.sub(r"ComfyUI_temp_[a-z]{5}_", "ComfyUI_temp_xxxxx_", text)
    return json.loads(text)


def stem(filename: str) -> str:
    """A saved file's name without its counter and random temp prefix."""
    return re.sub(r"_\d{5}_\.png$", "", re.sub(r"ComfyUI_temp_[a-z]{5}_", "ComfyUI_temp_", filename))


def normalize_history(entry: dict) -> dict:
    entry = normalize(entry)
    entry["prompt"][0] = 0  # number
    return entry


# --- driving the simulator ------------------------------------------------------------------

class Socket:
    """A raw ComfyUI WebSocket client that records every frame it receives."""

    def __init__(self, who: str, conn):
        self.who = who
        self.conn = conn
        self.frames: list = []
        self.described: list[dict] = []
        self.tokens: list[str] = []
        self.closed = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self.conn.read_message()
            if frame is None:
                self.closed.set_result(self.conn.close_code)
                self._changed.set()
                return
            self.frames.append(frame)
            self.described.append(describe_frame(frame))
            self.tokens.append(token(self.described[-1]))
            self._changed.set()

    async def wait_for(self, predicate, count: int = 1) -> None:
        """Until ``count`` received tokens match ``predicate`` (the socket must stay open)."""
        async def wait() -> None:
            while sum(1 for t in self.tokens if predicate(t)) < count:
                assert not self.closed.done(), f"{self.who} closed while waiting: {self.tokens}"
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), TIMEOUT)

    async def close(self) -> None:
        self.conn.close()  # also after the server dropped us: releases the client's resources
        await asyncio.wait_for(asyncio.shield(self.closed), TIMEOUT)
        await self._task


def done(t: str) -> bool:
    return t.startswith("executing:None:")


def starts(prefix: str):
    return lambda t: t.startswith(prefix)


class Env:
    """A simulator on an ephemeral port, an HTTP client and WebSocket clients, all closed
    on exit."""

    def __init__(self, **sim_kwargs):
        self.sim = ComfySimulator(**sim_kwargs)
        self.sockets: list[Socket] = []

    async def __aenter__(self) -> "Env":
        await self.sim.start()
        self.http = AsyncHTTPClient(force_instance=True)
        return self

    async def __aexit__(self, *exc) -> None:
        for sock in self.sockets:
            await sock.close()
        self.http.close()
        await self.sim.stop()

    async def connect(self, who: str, client_id: str | None = None, *, flags: bool = False,
                      path: str = "/ws", headers: dict | None = None) -> Socket:
        url = f"ws://127.0.0.1:{self.sim.port}{path}" + (f"?clientId={client_id}" if client_id else "")
        conn = await asyncio.wait_for(websocket_connect(HTTPRequest(url, headers=headers),
                                                        max_message_size=64 * 1024 * 1024), TIMEOUT)
        if flags:
            await conn.write_message(json.dumps({"type": "feature_flags",
                                                 "data": {"supports_preview_metadata": True}}))
        sock = Socket(who, conn)
        self.sockets.append(sock)
        await sock.wait_for(starts("status:"))  # registered
        if flags:
            await sock.wait_for(starts("feature_flags:"))
        return sock

    async def fetch(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, content type, body): JSON bodies parsed, others as bytes."""
        if method == "POST" and not isinstance(body, (str, bytes)):
            body = "" if body is None else json.dumps(body)
        response = await asyncio.wait_for(self.http.fetch(
            self.sim.url + path, method=method, body=body, headers=headers, raise_error=False), TIMEOUT)
        content_type = response.headers.get("Content-Type", "")
        payload = response.body or b""
        if content_type.startswith("application/json"):
            payload = json.loads(payload)
        return response.code, content_type, payload

    async def post_prompt(self, prompt: dict, client_id: str | None = None, **extra) -> dict:
        body = {"prompt": prompt, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        code, content_type, answer = await self.fetch("POST", "/prompt", body)
        assert code == 200, answer
        assert content_type == "application/json; charset=utf-8"
        return answer

    async def settle(self, probe: Socket) -> None:
        """Wait until every event emitted so far has been published: the FIFO is global, so
        once ``probe`` sees a status broadcast sent now, everything before it went out."""
        count = sum(1 for t in probe.tokens if t.startswith("status:"))
        code, _, _ = await self.fetch("POST", "/queue", {"clear": True})  # always broadcasts a status
        assert code == 200
        await probe.wait_for(starts("status:"), count + 1)


def assert_same_keys(name: str, sockets: list[Socket]) -> None:
    recorded = data_keys([describe_recorded(r) for r in load(name) if r["ev"] == "ws_recv"])
    got = data_keys([d for sock in sockets for d in sock.described])
    assert got == {kind: recorded[kind] for kind in got}, (got, recorded)


# --- scenarios of one prompt ----------------------------------------------------------------

@pytest.mark.parametrize("name, flags", [("success", False), ("success_ws", False), ("success_ws_meta", True),
                                         ("large_binary", False), ("long_running", False)])
async def test_one_prompt_matches_the_recording(io_loop, name, flags):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id, flags=flags)
        answer = await env.post_prompt(recorded_prompt(name, 0), client_id)
        post = http_records(name, "POST", "/prompt")[0]
        assert list(answer) == list(post["body"]) and answer["node_errors"] == {}
        assert len(json.dumps({**answer, "number": post["body"]["number"]})) == post["len"]  # the same bytes
        await a.wait_for(done)
        assert a.tokens == recorded_tokens(name, "A")
        assert_same_keys(name, [a])
        # timestamps are epoch milliseconds
        start = next(d for d in a.described if not d["binary"] and d["type"] == "execution_start")
        assert abs(start["data"]["timestamp"] - time.time() * 1000) < 60_000
        # binary layouts: previews are real PNGs, type 4 metadata names the prompt
        for d in a.described:
            if d["binary"] and d["event"] == 4:
                assert d["metadata"] == {"node_id": "3", "prompt_id": answer["prompt_id"], "display_node_id": "3",
                                         "parent_node_id": None, "real_node_id": "3", "image_type": "image/png"}
        recorded_images = [r["image_len"] for r in load(name) if r.get("frame") == "binary" and "image_len" in r]
        assert [d["image_len"] for d in a.described if d["binary"] and d["event"] != 3] == recorded_images
        # history, /queue and /view, as the recorder read them afterwards
        code, _, history = await env.fetch("GET", "/history/" + answer["prompt_id"])
        entry = history[answer["prompt_id"]]
        assert list(entry) == ["prompt", "outputs", "status", "meta"]
        assert normalize_history(entry) == normalize_history(recorded_history(name))
        assert (await env.fetch("GET", "/queue"))[2] == {"queue_running": [], "queue_pending": []}
        images = [img for out in entry["outputs"].values() for img in out["images"]]
        for view in http_records(name, "GET"):
            if view["path"].startswith("/view"):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(view["path"]).query)
                image = next(img for img in images if img["type"] == query["type"][0]
                             and stem(img["filename"]) == stem(query["filename"][0]))
                images.remove(image)
                code, content_type, png = await env.fetch(
                    "GET", f"/view?filename={image['filename']}&subfolder=&type={image['type']}")
                assert (code, content_type) == (view["status"], view["content_type"])
                assert png[:24] == bytes.fromhex(view["head_hex"])[:24]  # PNG, IHDR, width, height


async def test_cached_rerun_matches_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        prompt = recorded_prompt("cached_rerun", 1)
        first = await env.post_prompt(prompt, client_id)
        await a.wait_for(done)
        second = await env.post_prompt(json.loads(json.dumps(prompt)), client_id)
        await a.wait_for(done, 2)
        assert a.tokens == recorded_tokens("cached_rerun", "A")
        assert_same_keys("cached_rerun", [a])
        # the cached run reports the same files
        executed = [d["data"] for d in a.described if not d["binary"] and d["type"] == "executed"]
        first_run = {e["node"]: e["output"] for e in executed[:2]}
        assert {e["node"]: e["output"] for e in executed[2:]} == first_run
        _, _, history = await env.fetch("GET", "/history/" + second["prompt_id"])
        assert normalize_history(history[second["prompt_id"]]) == normalize_history(recorded_history("cached_rerun"))
        assert env.sim.execution_counts[first["prompt_id"]] == env.sim.execution_counts[second["prompt_id"]] == 1


async def test_server_assigned_sid_matches_the_recording(io_loop):
    async with Env() as env:
        a = await env.connect("A")
        sid = a.described[0]["data"]["sid"]
        assert re.fullmatch(r"[0-9a-f]{32}", sid)
        assert env.sim.ws_clients == {sid: 1}
        await env.post_prompt(workflow("success"), sid)
        await a.wait_for(done)
        assert a.tokens == recorded_tokens("server_assigned_sid", "A")


# --- errors ---------------------------------------------------------------------------------

async def test_validation_failures_match_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        bodies = [{"prompt": workflow("validation-fail"), "client_id": client_id},
                  {"prompt": workflow("validation-fail-unknown-node"), "client_id": client_id},
                  {"prompt": workflow("validation-fail-no-outputs"), "client_id": client_id},
                  {"client_id": client_id},
                  "{not json"]
        for body, record in zip(bodies, http_records("validation_fail", "POST", "/prompt"), strict=True):
            code, content_type, answer = await env.fetch("POST", "/prompt", body)
            assert (code, content_type) == (record["status"], record["content_type"])
            if isinstance(answer, bytes):
                assert answer.decode() == record["text"]
            else:
                assert answer == record["body"]
                assert len(json.dumps(answer)) == record["len"]  # key order and all
        assert (await env.fetch("GET", "/queue"))[2] == {"queue_running": [], "queue_pending": []}
        # the four rejected prompts consumed numbers 0-3 (the non-JSON body did not)
        assert (await env.post_prompt(workflow("success"), client_id))["number"] == 4
        await a.wait_for(done)
        assert a.tokens[0] == recorded_tokens("validation_fail", "A")[0]
        assert a.tokens[1].startswith("status:1#")  # nothing was sent for the rejected ones


async def test_a_partly_valid_prompt_runs_its_valid_outputs(io_loop):
    async with Env() as env:
        prompt = workflow("validation-fail")
        prompt["7"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}}
        answer = await env.post_prompt(prompt)
        assert set(answer["node_errors"]) == {"2", "3", "5"}  # 200 with node_errors: skipped outputs
        await env.sim.wait_idle()
        _, _, history = await env.fetch("GET", "/history/" + answer["prompt_id"])
        assert list(history[answer["prompt_id"]]["outputs"]) == ["7"]
        assert history[answer["prompt_id"]]["prompt"][4] == ["7"]


async def test_exec_fail_matches_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        answer = await env.post_prompt(recorded_prompt("exec_fail", 0), client_id)
        await a.wait_for(done)
        assert a.tokens == recorded_tokens("exec_fail", "A")
        assert_same_keys("exec_fail", [a])
        error = next(d["data"] for d in a.described if not d["binary"] and d["type"] == "execution_error")
        recorded = next(r["data"] for r in load("exec_fail") if r.get("type") == "execution_error")
        assert normalize(error) == normalize(recorded)  # message, traceback, tensor reprs, set orders
        _, _, history = await env.fetch("GET", "/history/" + answer["prompt_id"])
        assert normalize_history(history[answer["prompt_id"]]) == normalize_history(recorded_history("exec_fail"))


async def test_interrupt_matches_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        at_3 = env.sim.hold_node("3")
        answer = await env.post_prompt(recorded_prompt("interrupt", 0), client_id)
        await asyncio.wait_for(at_3.reached, TIMEOUT)
        # a prompt_id that is not running: no effect
        interrupts = http_records("interrupt", "POST", "/interrupt")
        code, content_type, body = await env.fetch("POST", "/interrupt", interrupts[0]["req"])
        assert (code, content_type, body) == (200, "", b"")
        at_4 = env.sim.hold_node("4")
        at_3.release()
        await asyncio.wait_for(at_4.reached, TIMEOUT)
        # an empty body: a global interrupt, effective when node 5 starts
        code, content_type, body = await env.fetch("POST", "/interrupt", None)
        assert (code, content_type, body) == (200, "", b"")
        at_4.release()
        await a.wait_for(done)
        assert a.tokens == recorded_tokens("interrupt", "A")
        _, _, history = await env.fetch("GET", "/history/" + answer["prompt_id"])
        assert normalize_history(history[answer["prompt_id"]]) == normalize_history(recorded_history("interrupt"))


async def test_save_image_websocket_is_interrupted_mid_node(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        hold = env.sim.hold_node("3")
        await env.post_prompt(workflow("success-ws"), client_id)
        await asyncio.wait_for(hold.reached, TIMEOUT)
        await env.fetch("POST", "/interrupt", {})
        hold.release()
        await a.wait_for(done)
        interrupted = next(d["data"] for d in a.described if not d["binary"] and d["type"] == "execution_interrupted")
        assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "SaveImageWebsocket")
        assert sorted(interrupted["executed"]) == ["1", "2"]
        assert not any(d["binary"] for d in a.described)


async def test_an_interrupt_while_idle_is_forgotten_when_the_next_prompt_starts(io_loop):
    async with Env() as env:
        code, _, _ = await env.fetch("POST", "/interrupt", "")
        assert code == 200
        code, _, _ = await env.fetch("POST", "/interrupt", "[]")  # JSON but not an object
        assert code == 500
        answer = await env.post_prompt(workflow("success"))
        await env.sim.wait_idle()
        _, _, history = await env.fetch("GET", "/history/" + answer["prompt_id"])
        assert history[answer["prompt_id"]]["status"]["status_str"] == "success"


# --- the queue ------------------------------------------------------------------------------

def normalize_queue(queue: dict, first_number: float) -> dict:
    """Queue items with their numbers relative to the first prompt's, and ids normalised."""
    def item(entry):
        number = entry[0]
        relative = number - first_number if number >= 0 else number + first_number
        return [relative] + normalize(entry[1:])
    return {key: [item(entry) for entry in queue[key]] for key in ("queue_running", "queue_pending")}


async def test_queue_ops_match_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        hold = env.sim.hold_node("2")
        running = await env.post_prompt(recorded_prompt("queue_ops", 0), client_id)
        await asyncio.wait_for(hold.reached, TIMEOUT)
        deleted = await env.post_prompt(recorded_prompt("queue_ops", 1), client_id)
        front = await env.post_prompt(recorded_prompt("queue_ops", 2), client_id, front=True)
        assert (running["number"], deleted["number"], front["number"]) == (0, 1, -2)  # recorded: 46, 47, -48
        queues = http_records("queue_ops", "GET", "/queue")
        _, _, queue = await env.fetch("GET", "/queue")
        recorded_first = queues[0]["body"]["queue_running"][0][0]
        assert normalize_queue(queue, 0) == normalize_queue(queues[0]["body"], recorded_first)
        code, content_type, body = await env.fetch("POST", "/queue", {"delete": [deleted["prompt_id"]]})
        assert (code, content_type, body) == (200, "", b"")
        _, _, queue = await env.fetch("GET", "/queue")
        assert normalize_queue(queue, 0) == normalize_queue(queues[1]["body"], recorded_first)
        code, _, _ = await env.fetch("POST", "/interrupt", {"prompt_id": running["prompt_id"]})
        assert code == 200
        hold.release()
        await a.wait_for(done, 2)
        assert (await env.fetch("GET", "/queue"))[2] == {"queue_running": [], "queue_pending": []}
        # Statuses arrive wherever the HTTP requests fell; apart from them the order is the recording's.
        expected = recorded_tokens("queue_ops", "A")
        assert [t for t in a.tokens if not t.startswith("status")] == \
            [t for t in expected if not t.startswith("status")]
        assert [t for t in a.tokens if t.startswith("status")] == [t for t in expected if t.startswith("status")]
        assert env.sim.execution_counts[deleted["prompt_id"]] == 0
        assert env.sim.started_order == [running["prompt_id"], front["prompt_id"]]


async def test_queue_clear_history_paging_and_client_prompt_ids(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        env.sim.paused = True
        ids = [(await env.post_prompt(workflow("success"), "a", prompt_id=f"mine-{i}"))["prompt_id"]
               for i in range(3)]
        assert ids == ["mine-0", "mine-1", "mine-2"]  # any string is accepted
        assert (await env.fetch("POST", "/prompt", {"prompt": workflow("success"), "number": 7.5}))[2]["number"] == 7.5
        code, _, _ = await env.fetch("POST", "/queue", {"clear": True})
        assert code == 200 and (await env.fetch("GET", "/prompt"))[2] == {"exec_info": {"queue_remaining": 0}}
        await a.wait_for(starts("status:0#"), 1)
        env.sim.paused = False
        for i in range(3):  # the same id twice: no uniqueness check, history overwritten
            await env.post_prompt(workflow("success"), "a", prompt_id="dup" if i < 2 else "last")
            await a.wait_for(done, i + 1)
        history = (await env.fetch("GET", "/history"))[2]
        assert list(history) == ["dup", "last"]
        assert list((await env.fetch("GET", "/history?max_items=1"))[2]) == ["last"]
        assert list((await env.fetch("GET", "/history?offset=1"))[2]) == ["last"]
        assert (await env.fetch("GET", "/history?max_items=x"))[0] == 500
        assert (await env.fetch("POST", "/history", {"delete": ["dup"]}))[:2] == (200, "")
        assert (await env.fetch("GET", "/history/dup"))[2] == {}
        assert (await env.fetch("POST", "/history", {"clear": True}))[0] == 200
        assert (await env.fetch("GET", "/history"))[2] == {}


# --- routing between sockets ----------------------------------------------------------------

async def test_two_clients_match_the_recording(io_loop):
    async with Env() as env:
        ca, cb = str(uuid.uuid4()), str(uuid.uuid4())
        a = await env.connect("A", ca)
        b = await env.connect("B", cb)
        await env.post_prompt(workflow("success"), ca)
        await a.wait_for(done)
        await b.wait_for(starts("status:0#"))
        # a success-ws prompt whose previews have the recorded size
        await env.post_prompt(recorded_prompt("success_ws_meta", 0), ca)
        await a.wait_for(done, 2)
        await b.wait_for(starts("status:0#"), 2)
        assert a.tokens == recorded_tokens("two_clients", "A")
        assert b.tokens == recorded_tokens("two_clients", "B")  # statuses, and A's TEXT frame (a leak)


async def test_no_client_id_matches_the_recording(io_loop):
    async with Env() as env:
        a = await env.connect("A", str(uuid.uuid4()))
        b = await env.connect("B", str(uuid.uuid4()), flags=True)
        for index in range(4):
            hold = env.sim.hold_node("4") if index == 3 else None
            await env.post_prompt(recorded_prompt("no_client_id", index))  # no client_id
            if hold is not None:  # long-running: a global interrupt ({}) during node 4
                await asyncio.wait_for(hold.reached, TIMEOUT)
                assert (await env.fetch("POST", "/interrupt", {}))[0] == 200
                hold.release()
            for sock in (a, b):
                await sock.wait_for(starts("status:0#"), index + 1)
        assert a.tokens == recorded_tokens("no_client_id", "A")
        assert b.tokens == recorded_tokens("no_client_id", "B")  # type 1 previews despite its feature flags
        assert_same_keys("no_client_id", [a, b])
        # the outcomes (success, success, error, interrupted) are only in /history
        history = list((await env.fetch("GET", "/history"))[2].values())
        assert [normalize_history(h) for h in history] == \
            [normalize_history(recorded_history("no_client_id", i)) for i in range(4)]


async def test_reconnect_matches_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a = await env.connect("A", client_id)
        hold = env.sim.hold_node("3")
        await env.post_prompt(recorded_prompt("long_running", 0), client_id)
        await a.wait_for(starts("executing:3:"))
        await a.close()  # during node 3
        await env.sim.wait_ws_clients(lambda clients: client_id not in clients)
        a2 = await env.connect("A2", client_id)
        await a2.wait_for(starts("executing:3:node#"))  # the replay: no prompt_id, no display_node
        hold.release()
        await a2.wait_for(done)
        assert a.tokens == recorded_tokens("reconnect", "A")
        assert a2.tokens == recorded_tokens("reconnect", "A2")


async def test_duplicate_client_id_matches_the_recording(io_loop):
    async with Env() as env:
        client_id = str(uuid.uuid4())
        a1 = await env.connect("A1", client_id)
        a2 = await env.connect("A2", client_id)
        assert env.sim.ws_clients == {client_id: 2}
        await env.post_prompt(workflow("success"), client_id)
        await a2.wait_for(done)
        await a1.close()  # the older socket's close unregisters the newer one
        await env.sim.wait_ws_clients(lambda clients: clients == {client_id: 1})
        second = await env.post_prompt(recorded_prompt("duplicate_client_id", 1), client_id)
        await env.sim.wait_idle()
        await env.settle(await env.connect("probe", "probe"))
        assert a1.tokens == recorded_tokens("duplicate_client_id", "A1")  # open, but received nothing
        assert a2.tokens == recorded_tokens("duplicate_client_id", "A2")  # nothing of the second prompt
        _, _, history = await env.fetch("GET", "/history/" + second["prompt_id"])
        assert normalize_history(history[second["prompt_id"]]) == \
            normalize_history(recorded_history("duplicate_client_id"))


async def test_feature_flags_count_only_as_the_first_valid_text_frame(io_loop):
    async with Env() as env:
        late = await env.connect("late", "late")
        await late.conn.write_message(json.dumps({"type": "hello", "data": {}}))
        await late.conn.write_message(json.dumps({"type": "feature_flags",
                                                  "data": {"supports_preview_metadata": True}}))
        # invalid JSON does not use up the first message (ComfyUI's except path)
        early = await env.connect("early", "early")
        await early.conn.write_message("{not json")
        await early.conn.write_message(json.dumps({"type": "feature_flags",
                                                   "data": {"supports_preview_metadata": True}}))
        await early.wait_for(starts("feature_flags:"))
        for sock in (late, early):
            await env.post_prompt(workflow("success-ws"), sock.who)
            await sock.wait_for(done)
        assert not any(t.startswith("feature_flags") for t in late.tokens)
        assert {d["event"] for d in late.described if d["binary"]} == {1}
        assert {d["event"] for d in early.described if d["binary"]} == {4}


# --- HTTP -----------------------------------------------------------------------------------

async def test_http_basics_match_the_recording(io_loop):
    async with Env() as env:
        for record in http_records("http_basics", "GET"):
            code, content_type, body = await env.fetch("GET", record["path"])
            assert (code, content_type) == (record["status"], record["content_type"]), record["path"]
            if record["path"] in ("/prompt", "/queue", "/features", "/embeddings", "/object_info/EmptyImage"):
                assert body == record["body"]
            elif record["path"].endswith("system_stats"):
                assert normalize(body).keys() == record["body"].keys()
                assert body["system"].keys() == record["body"]["system"].keys()
                assert body["devices"][0].keys() == record["body"]["devices"][0].keys()
                assert body["system"]["comfyui_version"] == "0.3.64"
            elif record["path"].startswith("/history"):
                assert body == {}  # a fresh server
            elif record["path"] == "/object_info":
                assert {"EmptyImage", "ImageBatch", "SaveImageWebsocket", "GetImageSize"} <= set(body)
                assert all(info["name"] == name for name, info in body.items())
            elif record["path"].startswith("/view"):
                assert body == b""
        assert (await env.fetch("GET", "/object_info/NoSuchNode"))[2] == {}
        assert (await env.fetch("GET", "/no/such/route"))[:2] == (404, "text/plain; charset=utf-8")
        assert (await env.fetch("DELETE", "/prompt"))[0] == 405


async def test_every_route_also_answers_under_api(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a", path="/api/ws")
        code, _, answer = await env.fetch("POST", "/api/prompt", {"prompt": workflow("success"), "client_id": "a"})
        assert code == 200
        await a.wait_for(done)
        for path in ("/api/prompt", "/api/queue", "/api/history", "/api/history/" + answer["prompt_id"],
                     "/api/system_stats", "/api/features", "/api/object_info"):
            code, content_type, _ = await env.fetch("GET", path)
            assert (code, content_type) == (200, "application/json; charset=utf-8"), path
        output = (await env.fetch("GET", "/api/history/" + answer["prompt_id"]))[2][answer["prompt_id"]]["outputs"]
        image = output["6"]["images"][0]
        code, content_type, png = await env.fetch("GET", f"/api/view?filename={image['filename']}&type=output")
        assert (code, content_type, png[:8]) == (200, "image/png", PNG_MAGIC)
        assert (await env.fetch("POST", "/api/interrupt", ""))[0] == 200


async def test_a_foreign_origin_to_a_loopback_host_is_forbidden(io_loop):
    async with Env() as env:
        origin = {"Origin": "https://evil.example"}
        assert (await env.fetch("GET", "/queue", headers=origin))[:3] == (403, "", b"")
        assert env.sim.last_request_headers()["Origin"] == "https://evil.example"
        with pytest.raises(HTTPClientError) as refused:
            await env.connect("A", "a", headers=origin)
        assert refused.value.code == 403
        same = {"Origin": f"http://127.0.0.1:{env.sim.port}"}
        assert (await env.fetch("GET", "/queue", headers=same))[0] == 200
        sock = await env.connect("B", "b", headers={"X-Probe": "1"})
        assert "Origin" not in env.sim.last_request_headers()
        assert env.sim.last_request_headers()["X-Probe"] == "1"
        assert ("GET", "/ws") in env.sim.requests and ("GET", "/queue") in env.sim.requests
        assert env.sim.ws_clients == {"b": 1} and not sock.closed.done()


# --- fault injection ------------------------------------------------------------------------

async def test_go_down_refuses_connections_and_keeps_the_queue(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        env.sim.paused = True
        answer = await env.post_prompt(workflow("success"), "a")
        port = env.sim.port
        await env.sim.go_down()
        assert await asyncio.wait_for(a.closed, TIMEOUT) is None  # dropped: no close frame
        with pytest.raises(ConnectionRefusedError):
            await env.http.fetch(env.sim.url + "/queue")
        with pytest.raises(ConnectionRefusedError):
            await websocket_connect(env.sim.ws_url)
        assert env.sim.ws_clients == {}
        await env.sim.come_up()
        assert env.sim.port == port
        _, _, queue = await env.fetch("GET", "/queue")
        assert [item[1] for item in queue["queue_pending"]] == [answer["prompt_id"]]
        b = await env.connect("B", "a")
        env.sim.paused = False
        await b.wait_for(done)
        await env.sim.wait_idle()
        assert answer["prompt_id"] in (await env.fetch("GET", "/history"))[2]
        await env.sim.come_up()  # already up: nothing happens


async def test_restart_loses_queue_running_prompt_and_history(io_loop):
    async with Env() as env:
        done_once = await env.post_prompt(workflow("success"))
        await env.sim.wait_idle()
        _, _, history = await env.fetch("GET", "/history/" + done_once["prompt_id"])
        saved = history[done_once["prompt_id"]]["outputs"]
        hold = env.sim.hold_node("3")
        running = await env.post_prompt(workflow("long-running"))
        await asyncio.wait_for(hold.reached, TIMEOUT)
        pending = await env.post_prompt(workflow("success-ws"))
        port = env.sim.port
        await env.sim.restart()
        assert env.sim.port == port
        assert (await env.fetch("GET", "/queue"))[2] == {"queue_running": [], "queue_pending": []}
        assert (await env.fetch("GET", "/history"))[2] == {}
        await env.sim.wait_idle()
        # execution_counts survive: the lost prompt did start once, the pending one never
        assert env.sim.execution_counts[running["prompt_id"]] == 1
        assert env.sim.execution_counts[pending["prompt_id"]] == 0
        assert env.sim.completed_counts[running["prompt_id"]] == 0
        # files: output/ survives a restart, temp/ is wiped
        for kind, images in (("output", saved["6"]["images"]), ("temp", saved["7"]["images"])):
            code, _, _ = await env.fetch("GET", f"/view?filename={images[0]['filename']}&type={kind}")
            assert code == (200 if kind == "output" else 404)
        assert (await env.post_prompt(workflow("success")))["number"] == 0  # a new process counts anew


@pytest.mark.parametrize("status", [500, 503])
async def test_http_error_status(io_loop, status):
    async with Env() as env:
        env.sim.http_error_status = status
        expected = {500: b"500 Internal Server Error\n\nServer got itself in trouble",
                    503: b"503: Service Unavailable"}[status]
        for method, path in (("GET", "/queue"), ("POST", "/prompt"), ("GET", "/history"), ("GET", "/view")):
            code, content_type, body = await env.fetch(method, path, {} if method == "POST" else None)
            assert (code, content_type, body) == (status, "text/plain; charset=utf-8", expected)
        with pytest.raises(HTTPClientError) as refused:
            await env.connect("A", "a")
        assert refused.value.code == status
        env.sim.http_error_status = None
        assert (await env.fetch("GET", "/queue"))[0] == 200
        assert env.sim.execution_counts == {}


async def test_response_delay_still_answers(io_loop):
    async with Env() as env:
        env.sim.response_delay = 0.01
        a = await env.connect("A", "a")
        await env.post_prompt(workflow("success"), "a")
        await a.wait_for(done)
        assert (await env.fetch("GET", "/prompt"))[2] == {"exec_info": {"queue_remaining": 0}}


async def test_stall_before_enqueue(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        env.sim.stall_post_prompt = "before_enqueue"
        post = asyncio.ensure_future(env.post_prompt(workflow("success"), "a", prompt_id="stalled"))
        await env.sim.wait_stalled(1)
        assert (await env.fetch("GET", "/queue"))[2] == {"queue_running": [], "queue_pending": []}
        assert not post.done()
        env.sim.stall_post_prompt = None
        env.sim.release_stalled()  # it answers normally, and only now is it queued
        assert (await asyncio.wait_for(post, TIMEOUT))["prompt_id"] == "stalled"
        await a.wait_for(done)
        # a stalled request whose client gives up is never processed
        env.sim.stall_post_prompt = "before_enqueue"
        stream = IOStream(socket.socket())
        await stream.connect(("127.0.0.1", env.sim.port))
        body = json.dumps({"prompt": workflow("success"), "prompt_id": "abandoned"}).encode()
        await stream.write(b"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await env.sim.wait_stalled(1)
        stream.close()
        await env.sim.wait_stalled(0)
        env.sim.release_stalled()
        await env.sim.wait_idle()
        assert env.sim.execution_counts["abandoned"] == 0 and env.sim.execution_counts["stalled"] == 1


async def test_stall_after_enqueue(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        env.sim.stall_post_prompt = "after_enqueue"
        post = asyncio.ensure_future(env.post_prompt(workflow("success"), "a"))
        await a.wait_for(done)  # queued and run: the outcome-unknown case
        assert not post.done()
        prompt_id = a.described[-1]["data"]["prompt_id"]
        assert env.sim.execution_counts[prompt_id] == 1
        env.sim.release_stalled()
        assert (await asyncio.wait_for(post, TIMEOUT))["prompt_id"] == prompt_id
        # stop() ends a stalled request too
        stuck = asyncio.ensure_future(env.http.fetch(env.sim.url + "/prompt", method="POST",
                                                     body=json.dumps({"prompt": workflow("success")})))
        await env.sim.wait_stalled(1)
        await env.sim.stop()
        with pytest.raises(HTTPClientError):  # 599: the connection closed without an answer
            await asyncio.wait_for(stuck, TIMEOUT)


async def test_drop_websockets_keeps_the_server_up(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        b = await env.connect("B", "b")
        env.sim.drop_websockets()
        assert env.sim.ws_clients == {}
        for sock in (a, b):
            assert await asyncio.wait_for(sock.closed, TIMEOUT) is None  # no close frame
        again = await env.connect("A again", "a")  # at once, with the same clientId
        await env.post_prompt(workflow("success"), "a")
        await again.wait_for(done)


async def test_paused_holds_the_queue(io_loop):
    async with Env() as env:
        a = await env.connect("A", "a")
        env.sim.paused = True
        assert env.sim.paused
        ids = [(await env.post_prompt(workflow("success"), "a", prompt_id=f"p{i}"))["prompt_id"] for i in range(2)]
        with pytest.raises(asyncio.TimeoutError):
            await env.sim.wait_idle(timeout=0)
        assert [item[1] for item in (await env.fetch("GET", "/queue"))[2]["queue_pending"]] == ids
        assert env.sim.execution_counts == {}
        env.sim.paused = False
        await env.sim.wait_idle()
        await a.wait_for(done, 2)
        assert env.sim.started_order == ids


async def test_stop_is_idempotent(io_loop):
    sim = ComfySimulator(node_delay=0.0)
    await sim.start()
    assert sim.url == f"http://127.0.0.1:{sim.port}" and sim.ws_url == f"ws://127.0.0.1:{sim.port}/ws"
    await sim.stop()
    await sim.stop()


async def test_standalone_command_line(io_loop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(port), "--node-delay", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=os.path.join(HERE, ".."))
    try:
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        assert b"SIMULATOR" in line, line
        http = AsyncHTTPClient(force_instance=True)
        try:
            response = await http.fetch(f"http://127.0.0.1:{port}/prompt")
            assert json.loads(response.body) == {"exec_info": {"queue_remaining": 0}}
        finally:
            http.close()
    finally:
        process.terminate()
        await process.stdout.read()
        await process.wait()

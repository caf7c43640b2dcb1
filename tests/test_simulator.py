"""The ComfyUI simulator held against the recordings of a real ComfyUI 0.3.64
(shared/comfyui/transcripts): message types and order, routing (who receives what),
binary layouts, HTTP shapes. Where they disagree, the recording is right."""
import asyncio
import json
import os
import struct
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from comfy_ws_proxy.testing.comfyui import ComfySimulator

from .helpers import TIMEOUT, workflow

TRANSCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "comfyui", "transcripts")
pytestmark = pytest.mark.skipif(not os.path.isdir(TRANSCRIPTS), reason="shared/comfyui/transcripts not beside the project")


def load(name: str) -> list[dict]:
    with open(os.path.join(TRANSCRIPTS, name + ".jsonl")) as f:
        return [json.loads(line) for line in f]


def token(record: dict) -> str:
    """A comparable token for one received frame: type, plus the fields that carry order."""
    if record.get("frame") == "binary" or record.get("binary"):
        return f"BIN{record['event']}"
    kind, data = record["type"], record["data"]
    if kind == "executing":
        return f"executing:{data.get('node')}:{'pid' if 'prompt_id' in data else 'nopid'}"
    if kind == "executed":
        return f"executed:{data['node']}"
    if kind == "progress":
        return f"progress:{data['value']}/{data['max']}"
    if kind == "progress_state":
        return "progress_state:" + ",".join(f"{n}={s['state']}" for n, s in data["nodes"].items())
    if kind == "status":
        return f"status:{data['status']['exec_info']['queue_remaining']}{':sid' if 'sid' in data else ''}"
    return kind


def recorded(name: str, who: str) -> list[str]:
    return [token(r) for r in load(name) if r["ev"] == "ws_recv" and r["who"] == who]


class Socket:
    """A raw ComfyUI client: records tokens of everything it receives."""

    def __init__(self, conn):
        self.conn = conn
        self.frames: list = []
        self.tokens: list[str] = []
        self._changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, sim, client_id: str | None, flags: bool = False) -> "Socket":
        url = sim.ws_url + (f"?clientId={client_id}" if client_id else "")
        conn = await asyncio.wait_for(websocket_connect(url, max_message_size=64 * 1024 * 1024), TIMEOUT)
        if flags:
            await conn.write_message(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        sock = cls(conn)
        await sock.wait_for(lambda t: t.startswith("status"))
        return sock

    async def _read(self):
        while True:
            msg = await self.conn.read_message()
            if msg is None:
                self._changed.set()
                return
            if isinstance(msg, bytes):
                event = struct.unpack(">I", msg[:4])[0]
                self.frames.append(msg)
                self.tokens.append(f"BIN{event}")
            else:
                parsed = json.loads(msg)
                self.frames.append(parsed)
                self.tokens.append(token({"type": parsed["type"], "data": parsed["data"]}))
            self._changed.set()

    async def wait_for(self, predicate, count: int = 1):
        async def wait():
            while sum(1 for t in self.tokens if predicate(t)) < count:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), TIMEOUT)

    async def close(self):
        self.conn.close()
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


class Sim:
    async def __aenter__(self):
        self.sim = ComfySimulator()
        await self.sim.start()
        self.http = AsyncHTTPClient(force_instance=True)
        self.sockets = []
        return self

    async def __aexit__(self, *exc):
        for s in self.sockets:
            await s.close()
        self.http.close()
        await self.sim.stop()

    async def socket(self, client_id=None, flags=False):
        s = await Socket.open(self.sim, client_id, flags)
        self.sockets.append(s)
        return s

    async def post(self, path, body, raw=False):
        payload = body if raw else json.dumps(body)
        r = await self.http.fetch(self.sim.url + path, method="POST", body=payload, raise_error=False)
        return r.code, (json.loads(r.body) if r.body and r.headers.get("Content-Type", "").startswith(
            "application/json") else r.body)

    async def get(self, path):
        r = await self.http.fetch(self.sim.url + path, raise_error=False)
        return r.code, (json.loads(r.body) if r.headers.get("Content-Type", "").startswith("application/json")
                        else r.body)


def done(t: str) -> bool:
    return t.startswith("executing:None")


@pytest.mark.parametrize("scenario,wf,flags", [
    ("success", "success", False),
    ("success_ws", "success-ws", False),
    ("success_ws_meta", "success-ws", True),
    ("large_binary", "success-ws-large", False),
])
async def test_one_prompt_matches_the_recording(io_loop, scenario, wf, flags):
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a = await s.socket(cid, flags)
        code, body = await s.post("/prompt", {"prompt": workflow(wf), "client_id": cid})
        assert code == 200 and set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
        await a.wait_for(done)
        expected = [t for t in recorded(scenario, "A") if t != "feature_flags"]
        got = [t for t in a.tokens if t != "feature_flags"]
        assert got == expected
        if flags:
            assert a.frames[1] == {"type": "feature_flags",
                                   "data": {"supports_preview_metadata": True, "max_upload_size": 104857600.0}}
        for frame in a.frames:
            if isinstance(frame, bytes) and frame[:4] == b"\x00\x00\x00\x04":
                (n,) = struct.unpack(">I", frame[4:8])
                meta = json.loads(frame[8:8 + n])
                assert set(meta) == {"node_id", "prompt_id", "display_node_id", "parent_node_id", "real_node_id",
                                     "image_type"} and meta["prompt_id"] == body["prompt_id"]
                assert frame[8 + n:8 + n + 8] == b"\x89PNG\r\n\x1a\n"
            elif isinstance(frame, bytes) and frame[:4] == b"\x00\x00\x00\x01":
                assert struct.unpack(">I", frame[4:8])[0] == 2 and frame[8:16] == b"\x89PNG\r\n\x1a\n"
        if scenario == "large_binary":
            big = [len(f) for f in a.frames if isinstance(f, bytes)]
            recorded_len = [r["len"] for r in load("large_binary") if r.get("frame") == "binary"]
            assert big == recorded_len
        code, history = await s.get("/history/" + body["prompt_id"])
        entry = history[body["prompt_id"]]
        assert set(entry) == {"prompt", "outputs", "status", "meta"}
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                              "execution_success"]


async def test_cached_rerun_matches_the_recording(io_loop):
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        for n in (1, 2):
            await s.post("/prompt", {"prompt": workflow("success"), "client_id": cid})
            await a.wait_for(done, count=n)
        assert a.tokens == recorded("cached_rerun", "A")


async def test_validation_failures_match_the_recording(io_loop):
    recorded_bodies = [r for r in load("validation_fail") if r["ev"] == "http" and r["method"] == "POST"]
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        cases = [{"prompt": workflow("validation-fail"), "client_id": cid},
                 {"prompt": workflow("validation-fail-unknown-node"), "client_id": cid},
                 {"prompt": workflow("validation-fail-no-outputs"), "client_id": cid},
                 {"client_id": cid}]
        for body, rec in zip(cases, recorded_bodies):
            code, answer = await s.post("/prompt", body)
            assert code == rec["status"] == 400
            assert answer == rec["body"]
        code, _ = await s.post("/prompt", "{not json", raw=True)
        assert code == 500
        assert a.tokens == ["status:0:sid"]  # nothing on the socket, not even a status


async def test_exec_fail_sends_execution_error_after_a_partial_output(io_loop):
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        code, body = await s.post("/prompt", {"prompt": workflow("exec-fail"), "client_id": cid})
        await a.wait_for(done)
        expected = recorded("exec_fail", "A")
        # The order among independent nodes is simplified (see the module docstring);
        # the set of messages and the ending are the recording's.
        assert sorted(a.tokens[:-3]) != [] and a.tokens[-3:] == expected[-3:]
        assert sorted(t for t in a.tokens if not t.startswith("progress_state")) == \
            sorted(t for t in expected if not t.startswith("progress_state"))
        error = next(f for f in a.frames if isinstance(f, dict) and f["type"] == "execution_error")["data"]
        rec = next(r for r in load("exec_fail") if r.get("type") == "execution_error")["data"]
        assert set(error) | {"timestamp"} == set(rec) | {"timestamp"}
        assert error["node_type"] == rec["node_type"] == "ImageBatch"
        _, history = await s.get("/history/" + body["prompt_id"])
        assert history[body["prompt_id"]]["status"]["status_str"] == "error"
        assert list(history[body["prompt_id"]]["outputs"]) == ["7"]


async def test_two_clients_routing_text_frames_leak_to_everyone(io_loop):
    async with Sim() as s:
        ca, cb = str(uuid.uuid4()), str(uuid.uuid4())
        a = await s.socket(ca)
        b = await s.socket(cb)
        await s.post("/prompt", {"prompt": workflow("success"), "client_id": ca})
        await a.wait_for(done)
        await b.wait_for(lambda t: t == "status:0", count=1)
        assert b.tokens == [t for t in recorded("two_clients", "B")][:len(b.tokens)]
        assert "BIN3" in b.tokens and not any(t.startswith(("execution", "executing", "progress")) for t in b.tokens)


async def test_no_client_id_routing(io_loop):
    async with Sim() as s:
        a = await s.socket(str(uuid.uuid4()), flags=True)
        await s.post("/prompt", {"prompt": workflow("success-ws")})
        await a.wait_for(lambda t: t == "status:0", count=1)
        kinds = set(a.tokens)
        assert "BIN1" in kinds and "BIN4" not in kinds  # type 1 even with metadata negotiated
        assert not any(t.startswith(("execution_start", "executing", "executed", "execution_success"))
                       for t in a.tokens)
        assert any(t.startswith("progress_state") for t in a.tokens)


async def test_reconnect_replays_executing_without_prompt_id(io_loop):
    async with Sim() as s:
        s.sim.node_delay = 0.02
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        await s.post("/prompt", {"prompt": workflow("long-running"), "client_id": cid})
        await a.wait_for(lambda t: t == "executing:3:pid")
        await a.close()
        s.sockets.remove(a)
        a2 = await s.socket(cid)
        await a2.wait_for(done)
        assert a2.tokens[0] == "status:0:sid".replace("0", str(1)) or a2.tokens[0].endswith(":sid")
        assert a2.tokens[1].endswith(":nopid")  # the replay: executing {node} without prompt_id


async def test_duplicate_client_id_evicts_the_older_socket(io_loop):
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a1 = await s.socket(cid)
        a2 = await s.socket(cid)
        await s.post("/prompt", {"prompt": workflow("success"), "client_id": cid})
        await a2.wait_for(done)
        assert a1.tokens == ["status:0:sid"]  # still open, receives nothing
        await a1.close()
        s.sockets.remove(a1)
        await s.post("/prompt", {"prompt": workflow("success-ws"), "client_id": cid})
        await s.sim.wait_idle()
        assert not any(t.startswith("execution_start") for t in a2.tokens[a2.tokens.index("executing:None:pid") + 1:])


async def test_server_assigned_sid_and_http_basics(io_loop):
    async with Sim() as s:
        a = await s.socket(None)
        sid = a.frames[0]["data"]["sid"]
        assert len(sid) == 32 and all(c in "0123456789abcdef" for c in sid)
        for path in ("/system_stats", "/api/system_stats", "/prompt", "/queue", "/features"):
            code, body = await s.get(path)
            assert code == 200 and isinstance(body, dict), path
        assert (await s.get("/queue"))[1] == {"queue_running": [], "queue_pending": []}
        code, _ = await s.get("/view?filename=nope.png&type=output")
        assert code == 404


async def test_queue_ops_front_and_delete_and_interrupt(io_loop):
    async with Sim() as s:
        s.sim.paused = True
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        _, first = await s.post("/prompt", {"prompt": workflow("success"), "client_id": cid})
        _, front = await s.post("/prompt", {"prompt": workflow("success-ws"), "client_id": cid, "front": True})
        assert front["number"] < 0
        _, queue = await s.get("/queue")
        assert {item[1] for item in queue["queue_pending"]} == {first["prompt_id"], front["prompt_id"]}
        assert all(len(item) == 5 and item[3]["client_id"] == cid for item in queue["queue_pending"])
        code, body = await s.post("/queue", {"delete": [first["prompt_id"]]})
        assert code == 200 and body == b""
        s.sim.paused = False
        await a.wait_for(done)
        assert s.sim.execution_counts[first["prompt_id"]] == 0
        # interrupt: with another prompt_id it is a no-op; with the running one it interrupts
        s.sim.node_delay = 0.02
        _, long = await s.post("/prompt", {"prompt": workflow("long-running"), "client_id": cid})
        await a.wait_for(lambda t: t == "executing:3:pid")
        assert (await s.post("/interrupt", {"prompt_id": str(uuid.uuid4())}))[0] == 200
        assert (await s.post("/interrupt", {"prompt_id": long["prompt_id"]}))[0] == 200
        await a.wait_for(done, count=2)
        assert "execution_interrupted" in a.tokens
        _, history = await s.get("/history/" + long["prompt_id"])
        status = history[long["prompt_id"]]["status"]
        assert status["status_str"] == "error" and status["completed"] is False


async def test_fault_injection(io_loop):
    async with Sim() as s:
        cid = str(uuid.uuid4())
        a = await s.socket(cid)
        s.sim.http_error_status = 503
        assert (await s.get("/queue"))[0] == 503
        s.sim.http_error_status = None
        s.sim.paused = True
        _, body = await s.post("/prompt", {"prompt": workflow("success"), "client_id": cid})
        await s.sim.restart()
        assert (await s.get("/queue"))[1] == {"queue_running": [], "queue_pending": []}
        assert (await s.get("/history/" + body["prompt_id"]))[1] == {}
        await s.sim.go_down()
        with pytest.raises(ConnectionRefusedError):
            await s.http.fetch(s.sim.url + "/queue", raise_error=False)
        await s.sim.come_up()
        assert (await s.get("/queue"))[0] == 200
        s.sim.paused = False
        # stall_post_prompt="after_enqueue": queued, answered only when released
        s.sim.stall_post_prompt = "after_enqueue"
        b = await s.socket(cid)
        post = asyncio.ensure_future(s.post("/prompt", {"prompt": workflow("success"), "client_id": cid}))
        await b.wait_for(done)
        assert not post.done()
        s.sim.release_stalled()
        code, answer = await asyncio.wait_for(post, TIMEOUT)
        assert code == 200 and s.sim.execution_counts[answer["prompt_id"]] == 1
        s.sim.stall_post_prompt = None
        # drop_websockets: the server closes every socket
        s.sim.drop_websockets()
        await asyncio.wait_for(b.task, TIMEOUT)
        assert a.tokens[0].endswith(":sid")

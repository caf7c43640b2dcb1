"""An importable async client for comfy_ws_proxy (and the core of scripts/comfy_client.py).

    async with ProxyClient("ws://127.0.0.1:8190/ws", token) as client:
        handle = await client.submit(workflow)
        async for event in handle.events():
            ...                       # ComfyUI's messages for this prompt, and binary previews
        result = await handle.result()  # {"status": "success", "outputs": {...}, ...}

A dropped connection is re-established and ``resume``d from the last ``seq`` seen, so
events are not lost across short disconnects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ..gateway.protocol import SUBPROTOCOL
from ..model import FINAL_EVENTS

log = logging.getLogger(__name__)

FINAL = FINAL_EVENTS  # ComfyUI's final event -> the Result's status


class ProxyError(Exception):
    def __init__(self, data: dict):
        super().__init__(f"{data.get('code')}: {data.get('message')}")
        self.code = data.get("code")
        self.data = data


@dataclass
class Result:
    prompt_id: str
    status: str  # success | error | interrupted | cancelled | rejected
    outputs: dict = field(default_factory=dict)  # node id -> ComfyUI's output (images: filename/subfolder/type)
    error: dict | None = None


class PromptHandle:
    def __init__(self, prompt_id: str):
        self.prompt_id = prompt_id
        self.accepted: dict | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._outputs: dict = {}

    def _event(self, item: Any) -> None:
        if isinstance(item, dict):
            kind, data = item.get("type"), item.get("data") or {}
            if kind == "executed" and data.get("output") is not None:
                self._outputs[data.get("node")] = data["output"]
            if kind in FINAL and not self._result.done():
                self._result.set_result(Result(self.prompt_id, FINAL[kind], dict(self._outputs),
                                               data if kind == "execution_error" else None))
            if kind == "prompt_cancelled" and not self._result.done():
                self._result.set_result(Result(self.prompt_id, "cancelled", dict(self._outputs)))
            if kind == "error" and not self._result.done():
                self._result.set_result(Result(self.prompt_id, "rejected", {}, data))
        self._queue.put_nowait(item)
        if self._result.done():
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[Any]:
        """JSON messages (dicts) and binary preview frames (bytes) of this prompt, until it ends."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def result(self, timeout: float | None = None) -> Result:
        return await asyncio.wait_for(asyncio.shield(self._result), timeout)


class ProxyClient:
    def __init__(self, url: str, token: str, *, use_subprotocol: bool = False, reconnect: bool = True,
                 max_message_size: int = 64 * 1024 * 1024):
        self.url = url
        self.token = token
        self.use_subprotocol = use_subprotocol
        self.reconnect = reconnect
        self.max_message_size = max_message_size
        self.session_id: str | None = None
        self.last_seq = 0
        self.conn: WebSocketClientConnection | None = None
        self.handles: dict[str, PromptHandle] = {}
        self._running: PromptHandle | None = None  # where binary previews go
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._held: list | None = None  # messages received while a resume is replaying

    async def __aenter__(self) -> "ProxyClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the old socket (already closed by the peer): release it
        headers, subprotocols = {}, None
        if self.use_subprotocol:
            subprotocols = [SUBPROTOCOL, "bearer." + self.token]
        else:
            headers["Authorization"] = "Bearer " + self.token
        self.conn = await websocket_connect(HTTPRequest(self.url, headers=headers), subprotocols=subprotocols,
                                           max_message_size=self.max_message_size)
        first = json.loads(await self.conn.read_message())
        if first.get("type") == "error":
            raise ProxyError(first["data"])
        resumed_from = self.session_id
        self.session_id = first["data"]["session_id"]
        if resumed_from == self.session_id and self.last_seq:
            # Live messages may overtake the replay: hold everything until the replay ends
            # (prompts_state), then deliver in seq order, each once.
            self._held = []
            await self.conn.write_message(json.dumps({"type": "resume", "data": {
                "session_id": self.session_id, "last_seq": self.last_seq}}))
        self._connected.set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_forever())

    async def _read_forever(self) -> None:
        while not self._closing:
            message = await self.conn.read_message()
            if message is None:
                self._connected.clear()
                if self._closing or not self.reconnect:
                    break
                await self._reconnect()
                continue
            self._dispatch(message)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self.connect()
                return
            except Exception as e:  # the proxy restarting, a network blip
                log.info("reconnect failed (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def _dispatch(self, message: str | bytes) -> None:
        if self._held is not None:
            if isinstance(message, str) and json.loads(message).get("type") == "prompts_state":
                held, self._held = self._held, None
                texts = sorted((m for m in held if isinstance(m, str)), key=lambda m: json.loads(m).get("seq", 0))
                for m in texts:
                    self._dispatch(m)
                for m in held:
                    if isinstance(m, bytes):
                        self._dispatch(m)
                return
            self._held.append(message)
            return
        if isinstance(message, bytes):
            if self._running is not None:
                self._running._event(message)
            return
        msg = json.loads(message)
        seq = msg.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq and msg.get("type") not in ("session", "error", "pong"):
                return  # already seen (a resume replays from last_seq)
            self.last_seq = max(self.last_seq, seq)
        kind, data = msg.get("type"), msg.get("data") or {}
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if kind in ("prompt_accepted", "error") and prompt_id in self._waiting:
            future = self._waiting.pop(prompt_id)
            if not future.done():
                future.set_result(msg)
        handle = self.handles.get(prompt_id) if prompt_id else None
        if handle is None:
            return
        if kind == "execution_start":
            self._running = handle
        elif kind == "executing" and data.get("node") is None and self._running is handle:
            self._running = None
        handle._event(msg)

    async def submit(self, prompt: dict, *, extra_data: dict | None = None, timeout: float = 60) -> PromptHandle:
        prompt_id = str(uuid.uuid4())
        handle = PromptHandle(prompt_id)
        self.handles[prompt_id] = handle
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[prompt_id] = waiter
        data: dict[str, Any] = {"prompt": prompt, "prompt_id": prompt_id}
        if extra_data:
            data["extra_data"] = extra_data
        await self._connected.wait()
        await self.conn.write_message(json.dumps({"type": "submit_prompt", "data": data}))
        reply = await asyncio.wait_for(waiter, timeout)
        if reply["type"] == "error":
            raise ProxyError(reply["data"])
        handle.accepted = reply["data"]
        return handle

    async def cancel(self, prompt_id: str) -> None:
        await self.conn.write_message(json.dumps({"type": "cancel", "data": {"prompt_id": prompt_id}}))

    async def close(self) -> None:
        self._closing = True
        if self.conn is not None:
            self.conn.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                self._reader.cancel()

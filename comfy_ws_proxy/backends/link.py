"""ComfyLink: one upstream WebSocket for one (user, backend).

It connects (``ws://comfy/ws?clientId=<that pair's durable client id>``), reads without
ever stopping (a stalled reader would stall ComfyUI's single event bus for everyone),
reconnects with capped, jittered back-off under the same client id, and hands every frame
to ``routing.route`` (the isolation rule); what is attributed goes to the sink.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections import deque
from typing import Callable, Protocol

from . import wsclient
from .backend import Backend
from .routing import REGISTERED, Routed, next_running, route
from .wsclient import UpstreamSocket

log = logging.getLogger(__name__)

CLOSE_WAIT = 2.0  # seconds a closing link waits for ComfyUI's close frame
ENDED_KEPT = 16  # recent job ends remembered per socket (answers in flight are about recent jobs)


class LinkSink(Protocol):
    """Where a ComfyLink delivers (the LinkManager)."""

    def owns(self, owner: str, job_id: str) -> bool: ...
    def is_running(self, job_id: str) -> bool: ...
    def link_frame(self, link: "ComfyLink", routed: Routed, frame: str | bytes | bytearray) -> None: ...
    def link_status(self, link: "ComfyLink", text: str) -> None: ...
    def link_up(self, link: "ComfyLink", reconnected: bool) -> None: ...
    def link_failed(self, link: "ComfyLink") -> None: ...
    def link_down(self, link: "ComfyLink") -> None: ...


class Flag:
    """What ComfyLink needs of asyncio.Event (set, clear, is_set, wait) without the deque
    every Event allocates up front: 760 bytes, four per user, add up at 10,000 users."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


def backoff_delay(attempt: int, minimum: float, maximum: float, rng=random.random) -> float:
    """Capped exponential back-off with full jitter in the upper half: [d/2, d]."""
    delay = min(maximum, minimum * (2 ** min(attempt, 30)))
    return delay / 2 + rng() * delay / 2


class ComfyLink:
    """One upstream socket's life: connect, route, reconnect; ``ready`` while registered."""

    def __init__(self, owner: str, backend: Backend, client_id: str, sink: LinkSink, *, max_message_size: int,
                 ping_interval: float, reconnect_min: float, reconnect_max: float,
                 preview_metadata: bool = True,
                 deliver: Callable[[Routed, str | bytes | bytearray], None] | None = None):
        self.owner = owner
        self.backend = backend
        self.client_id = client_id
        self.sink = sink
        self._owns = functools.partial(sink.owns, owner)
        self._is_running = sink.is_running
        # What sink.link_frame(self, ...) does, if the sink can say it without the extra call
        # (the LinkManager binds the tracker's upstream_frame to this link's owner and backend).
        self._deliver = deliver if deliver is not None else functools.partial(sink.link_frame, self)
        self.max_message_size = max_message_size
        self.ping_interval = ping_interval or None
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.preview_metadata = preview_metadata
        # The owner's job this socket saw start and not end. Forgotten with the socket: after
        # a reconnect it is set again only by what the new socket sees (or by a reconcile).
        self.running: str | None = None
        # Jobs this socket saw end (their final event or ComfyUI's end marker): a late answer
        # that one of them runs must not make it "running" here again. The last few suffice.
        self.ended: deque[str] = deque(maxlen=ENDED_KEPT)
        self.ready = Flag()  # set once ComfyUI has registered the socket
        self.settled = Flag()  # set once the first attempt registered or failed
        self.connections = 0  # successful connects; > 1 means reconnects happened
        self._conn: UpstreamSocket | None = None
        self._task: asyncio.Task | None = None
        self._wake = Flag()
        self._closing = False
        self.stopped = Flag()  # set once close() has finished
        self.last_status_at = 0.0  # loop time of the last status broadcast received
        self._registered_now = False  # the current socket was registered (for link_down)
        self.registered_at = 0.0  # loop time the current socket was registered

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the socket is registered, or the first attempt failed, or timeout."""
        if self.ready.is_set():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.settled.wait()), timeout)
        except asyncio.TimeoutError:
            pass
        return self.ready.is_set()

    def wake(self) -> None:
        """Skip the rest of the back-off (e.g. the breaker just closed)."""
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        conn = self._conn
        if conn is not None:
            conn.close(1000, "proxy closing")
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if conn is not None:
            # Wait briefly for ComfyUI's close frame, then hang up regardless.
            try:
                await asyncio.wait_for(conn.wait_closed(), CLOSE_WAIT)
            except asyncio.TimeoutError:
                conn.abort()
        self._task = None
        self.ready.clear()
        self.stopped.set()

    def recycle(self) -> None:
        """Drop the current socket; the loop reconnects (and the session reconciles).
        Not ready from now on: nothing is submitted on a socket we no longer trust."""
        if self._conn is not None and self.ready.is_set():
            self.ready.clear()
            self._conn.close(1000, "recycling")

    @property
    def closed(self) -> bool:
        return self._closing

    # --- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                conn = await self._connect()
            except Exception as e:  # refused, timeout, HTTP error on upgrade
                log.info("upstream connect failed for client %s: %s", self.client_id[:8], e)
                self.sink.link_failed(self)
                self.settled.set()
                attempt += 1
                await self._pause(backoff_delay(attempt, self.reconnect_min, self.reconnect_max))
                continue
            attempt = 0
            try:
                await conn.wait_closed()  # frames arrive through route() meanwhile
            finally:
                self.ready.clear()
                self.running = None
                self.ended.clear()
                self._conn = None
                conn.close()  # make sure the old socket is gone before a reconnect reuses the id
                if self._registered_now:
                    self._registered_now = False
                    self.sink.link_down(self)
            if not self._closing:
                attempt += 1
                await self._pause(backoff_delay(attempt, self.reconnect_min, self.reconnect_max))

    async def _pause(self, delay: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _connect(self) -> UpstreamSocket:
        # A cancel or timeout mid-handshake aborts the socket (wsclient.connect), never leaks it.
        conn = await wsclient.connect(self.backend.ws_url(self.client_id), on_text=self._on_frame,
                                      on_binary=self._on_frame, max_message_size=self.max_message_size,
                                      ping_interval=self.ping_interval, timeout=self.backend.connect_timeout)
        self._conn = conn
        if self.preview_metadata:
            # Must be the socket's first message: type-4 previews then carry their prompt id.
            conn.send_text(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        return conn

    def _on_frame(self, message: str | bytes | bytearray) -> None:
        try:
            self.route(message)
        except Exception:  # a bug in routing one frame must not kill the link
            log.exception("failed to route an upstream frame")

    # --- routing ---------------------------------------------------------------------------
    def route(self, message: str | bytes | bytearray) -> None:
        # (the relay's hot path: the sink's bound methods are looked up once, in __init__)
        routed = route(message, owns=self._owns, running=self.running, is_running=self._is_running)
        if routed is None:
            return
        if routed is REGISTERED:
            self.last_status_at = asyncio.get_running_loop().time()
            self._registered()
            return
        kind = routed.kind
        if kind == "progress":  # the most frequent frame: it starts and ends nothing
            self._deliver(routed, message)
            return
        if kind == "status":
            self.last_status_at = asyncio.get_running_loop().time()
            self.sink.link_status(self, message)
            return
        running = next_running(self.running, routed)
        if routed.job_id == self.running and running is None:
            self.ended.append(routed.job_id)
        elif routed.kind == "executing" and routed.data.get("node", "") is None:
            self.ended.append(routed.job_id)
        self.running = running
        self._deliver(routed, message)

    def _registered(self) -> None:
        self._registered_now = True
        self.registered_at = asyncio.get_running_loop().time()
        self.connections += 1
        self.ready.set()
        self.settled.set()
        self.sink.link_up(self, reconnected=self.connections > 1)


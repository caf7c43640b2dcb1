"""GET /job/{id}/events: a job's events as Server-Sent Events, resumable with Last-Event-ID.

A job's events are logged from the moment someone first watches it until a while after it
ends (SSE_LOG_RETENTION_S), bounded (SSE_LOG_EVENTS). Every event has the id
``<epoch>-<offset>``: the epoch is this process's, the offset counts the job's events. A
client that comes back with a Last-Event-ID of this epoch whose successors are still in the
log gets exactly those; any other (another process, a gap too old, none) gets a ``snapshot``
(the whole job) and the events from there. So a watcher sees every event once, in order, or
is told plainly that it is starting over from a snapshot.

Events: ``snapshot`` and ``done`` (the whole job, as GET /job/{id}), ``status`` (status,
state, queue position), ``progress`` (the job's progress), ``output`` (the files of a node
that finished), ``preview`` (that a preview image exists: its node and size; the image itself
goes to the WebSocket, never megabytes of base64 here). Comments (``: keepalive``) keep
proxies from timing the stream out (SSE_HEARTBEAT_S).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import deque

from tornado.iostream import StreamClosedError

from ..jobs.service import JobService
from ..model import Job, RequestError
from .base import UserHandler


class JobLog:
    """One watched job's events: (offset, name, data) oldest first, bounded."""

    def __init__(self, job: Job, max_events: int):
        self.job = job
        self.events: deque[tuple[int, str, str]] = deque(maxlen=max_events)
        self.next_offset = 1  # events count from 1: a snapshot before any is at 0
        self.waiters: list[asyncio.Future] = []
        self.ended = False  # "done" is in the log
        self.expiry: asyncio.TimerHandle | None = None

    def add(self, name: str, data: dict) -> None:
        self.events.append((self.next_offset, name, json.dumps(data, separators=(",", ":"))))
        self.next_offset += 1
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def after(self, offset: int) -> list[tuple[int, str, str]] | None:
        """The events after ``offset``, or None when some of them are gone from the log."""
        if offset >= self.next_offset:
            return [] if offset == self.next_offset - 1 else None
        if not self.events or self.events[0][0] > offset + 1:
            return None
        # offsets in the log are consecutive: the first wanted one is found by arithmetic
        return list(itertools.islice(self.events, offset + 1 - self.events[0][0], None))


class JobEvents:
    """The logs of watched jobs, fed by the tracker (a subscriber of each watching owner, and
    a listener of state changes). Only watched jobs cost anything: the relay's other frames
    pass by with one dict lookup."""

    def __init__(self, service: JobService, views, settings):
        self.service = service
        self.views = views
        self.max_events = settings.sse_log_events
        self.retention = settings.sse_log_retention_s
        self.epoch = uuid.uuid4().hex[:8]
        self.logs: dict[str, JobLog] = {}
        self._owners: dict[str, int] = {}  # owner -> their logs (subscribed while > 0)
        self.streams: dict[str, int] = {}  # owner -> open event streams
        service.tracker.listeners.append(self._job_changed)

    def watch(self, job: Job) -> JobLog:
        log = self.logs.get(job.job_id)
        if log is None:
            log = self.logs[job.job_id] = JobLog(job, self.max_events)
            if not self._owners.get(job.owner):
                self.service.tracker.subscribe(job.owner, self)
            self._owners[job.owner] = self._owners.get(job.owner, 0) + 1
            if job.finished:
                self._end(log)
        return log

    def _forget(self, job_id: str) -> None:
        log = self.logs.pop(job_id, None)
        if log is None:
            return
        owner = log.job.owner
        self._owners[owner] -= 1
        if not self._owners[owner]:
            del self._owners[owner]
            self.service.tracker.unsubscribe(owner, self)

    def _end(self, log: JobLog) -> None:
        if not log.ended:
            log.ended = True
            log.add("done", self.views.view(log.job))
        log.expiry = asyncio.get_running_loop().call_later(self.retention, self._forget, log.job.job_id)

    def close(self) -> None:
        for job_id in list(self.logs):
            log = self.logs[job_id]
            if log.expiry is not None:
                log.expiry.cancel()
            self._forget(job_id)

    # --- what the tracker tells ------------------------------------------------------------------
    def _job_changed(self, job: Job, old: str) -> None:
        log = self.logs.get(job.job_id)
        if log is None or log.ended:
            return
        if job.finished:
            self._end(log)
        else:
            log.add("status", self.views.status(job))

    def job_notice(self, job: Job, kind: str, data: dict, on_sent=None) -> bool:
        return False  # the proxy's own messages: their substance comes as status events

    def job_frame(self, job: Job | None, kind: str, frame, on_sent=None) -> bool:
        log = self.logs.get(job.job_id) if job is not None else None
        if log is None or log.ended:
            return False  # never counts as telling the owner: the WebSocket's replay stays owed
        if kind in ("progress", "executing", "execution_cached"):
            log.add("progress", self.views.progress(job))
        elif kind == "executed":
            node = json.loads(frame).get("data", {}).get("node")
            log.add("output", {"node_id": node, "files": [o for o in self.views.outputs(job) if o["node_id"] == node]})
        elif kind == "preview":
            node = job.current[0] if job.current else None
            log.add("preview", {"node_id": node, "bytes": len(frame)})
        return False


class JobEventsHandler(UserHandler):
    """GET /job/{id}/events (Server-Sent Events)."""

    def initialize(self, verifier, metrics, service: JobService, events: JobEvents, settings):
        super().initialize(verifier, metrics)
        self._waiter: asyncio.Future | None = None
        self.service = service
        self.events = events
        self.heartbeat = settings.sse_heartbeat_s
        self.per_user = settings.max_event_streams_per_user
        self.stall_timeout = settings.download_stall_timeout_s

    async def get(self, job_id: str) -> None:
        owner = self.identity.user_id
        try:
            job = self.service.get(owner, job_id)
        except RequestError:
            return self.write_json_error(404, "not_found", "No such job")
        if self.events.streams.get(owner, 0) >= self.per_user:
            self.set_header("Retry-After", "1")
            return self.write_json_error(429, "too_many_streams",
                                         f"At most {self.per_user} event streams at once per user")
        self.events.streams[owner] = self.events.streams.get(owner, 0) + 1
        try:
            await self._stream(self.events.watch(job))
        finally:
            self.events.streams[owner] -= 1
            if not self.events.streams[owner]:
                del self.events.streams[owner]

    def _resume_offset(self) -> int | None:
        asked = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_event_id", "")
        epoch, _, offset = asked.strip().partition("-")
        if epoch != self.events.epoch or not offset.isdigit():
            return None
        return int(offset)

    async def _stream(self, log: JobLog) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
        offset = self._resume_offset()
        pending = log.after(offset) if offset is not None else None
        while True:
            if pending is None:  # starting over (a new watcher, another epoch, a gap): the whole job
                offset = log.next_offset - 1
                pending = [log.events[-1]] if log.ended else []  # an ended job: its "done" says it all
                if not log.ended:
                    self.write(self._event(offset, "snapshot", json.dumps(self.events.views.view(log.job),
                                                                          separators=(",", ":"))))
            for event in pending:
                self.write(self._event(*event))
                offset = event[0]
            if log.ended and offset >= log.next_offset - 1:  # "done" is out: the stream is complete
                if await self._send():
                    self.finish()
                return
            if not await self._send():
                return
            if log.next_offset - 1 == offset:  # (events that came during the flush are sent at once)
                self._waiter = asyncio.get_running_loop().create_future()
                log.waiters.append(self._waiter)
                try:
                    await asyncio.wait_for(asyncio.shield(self._waiter), self.heartbeat)
                except asyncio.TimeoutError:
                    if self._waiter in log.waiters:
                        log.waiters.remove(self._waiter)
                    self.write(": keepalive\n\n")
            if self.request.connection.stream is None or self.request.connection.stream.closed():
                return
            pending = log.after(offset)

    def _event(self, offset: int, name: str, data: str) -> str:
        return f"id: {self.events.epoch}-{offset}\nevent: {name}\ndata: {data}\n\n"

    async def _send(self) -> bool:
        """Flush; False once the client is gone or has read nothing for the stall timeout."""
        try:
            await asyncio.wait_for(self.flush(), self.stall_timeout)
            return True
        except (StreamClosedError, asyncio.TimeoutError):
            self.request.connection.close()
            return False

    def on_connection_close(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # wake the stream's loop: it sees the close and ends

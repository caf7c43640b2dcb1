"""Session (one per user) and SessionRegistry (connection limits, expiry).

A Session is the user's WebSocket presence: their open connections, the sequence numbers
of the messages sent to them and a bounded buffer of those for ``resume``. It subscribes
to the user's jobs (JobTracker) and turns what they publish into protocol messages. It
owns no job and no upstream socket: jobs live on without it, and an outcome it could not
deliver is owed by the tracker until a socket of the user opens. Time math is pure: it
takes ``now`` from the registry's injected monotonic clock.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter, deque
from typing import TYPE_CHECKING, Iterable, NamedTuple

from tornado.ioloop import PeriodicCallback

from ..metrics import Metrics, type_class
from ..model import ErrorCode, Job, RequestError
from . import protocol

if TYPE_CHECKING:  # pragma: no cover
    from ..jobs.service import JobService

log = logging.getLogger(__name__)


def session_expired(*, last_activity: float, now: float, timeout: float, connections: int) -> bool:
    """A session lives while it has a connection, and for ``timeout`` seconds of inactivity
    after that. (Its user's jobs do not keep it: their fate is kept by the tracker.)"""
    return connections == 0 and now - last_activity >= timeout


class Awaited(NamedTuple):
    """A client message a connection waits to have answered by a notice about one job
    (``kinds``: the notices that answer it): the answer carries ``ref``."""
    conn: object
    ref: object
    kinds: frozenset


class Session:
    def __init__(self, registry: "SessionRegistry", user_id: str, now: float):
        self.registry = registry
        self.user_id = user_id
        self.session_id = secrets.token_urlsafe(18)
        self.connections: set = set()
        # Those that had their ``session`` message: the only ones written to (see greet()).
        self.live: tuple = ()
        self.seq = 0
        # Sent messages kept for resume as (seq, text, job id), bounded in count and bytes;
        # created on first use (an empty deque costs 760 bytes; most idle sessions need none).
        self.buffer: deque[tuple[int, str, str | None]] | None = None
        self.buffer_bytes = 0
        self.last_activity = now
        # Job id -> the request a notice about that job answers (at most one per connection:
        # a connection's messages are handled one at a time); created on first use.
        self.awaited: dict[str, Awaited] | None = None

    # --- what the jobs publish (JobSubscriber) --------------------------------------------------
    def job_notice(self, job: Job, kind: str, data: dict, on_sent=None) -> bool:
        """A proxy message about a job, to every connection and into the resume buffer. If it
        answers a connection's request (see await_answer), that connection's copy carries
        the request's ref (the others' and the buffer's do not: a ref means something only
        to the connection that chose it). ``on_sent``: see JobSubscriber."""
        kind_class = "error" if kind == "error" else "control"
        awaited = self.awaited.get(job.job_id) if self.awaited else None
        if awaited is None or kind not in awaited.kinds:
            return self._fan_out(protocol.encode(kind, data, self.next_seq()), kind_class, job.job_id, on_sent)
        del self.awaited[job.job_id]
        if awaited.ref is None:
            return self._fan_out(protocol.encode(kind, data, self.next_seq()), kind_class, job.job_id, on_sent)
        seq = self.next_seq()
        text = protocol.encode(kind, data, seq)
        answer = protocol.encode(kind, data, seq, awaited.ref)
        self._keep(text, job.job_id)
        live = self.live
        for conn in live:
            conn.send_text(answer if conn is awaited.conn else text, kind_class, on_sent)
        return bool(live)

    # --- answers to a connection's requests -----------------------------------------------------
    def await_answer(self, conn, job_id: str, ref, kinds: frozenset) -> bool:
        """``conn`` sent a request with ``ref`` that a notice about ``job_id`` of one of
        ``kinds`` answers (the job service sends it while the request is being handled).
        False if another connection's request about that job waits already (this one is
        then answered by the connection itself)."""
        if self.awaited is None:
            self.awaited = {}
        elif job_id in self.awaited:
            return False
        self.awaited[job_id] = Awaited(conn, ref, kinds)
        return True

    def still_awaited(self, conn, job_id: str) -> bool:
        """Stop waiting for a notice about ``job_id`` for ``conn``: True if none answered it."""
        awaited = self.awaited.get(job_id) if self.awaited else None
        if awaited is None or awaited.conn is not conn:
            return False
        del self.awaited[job_id]
        return True

    def job_frame(self, job: Job | None, kind: str, frame, on_sent=None) -> bool:
        """A ComfyUI frame, unchanged (JSON text gets a seq; binary goes as it came)."""
        if isinstance(frame, str):
            text = protocol.with_seq(frame, self.next_seq())
            return self._fan_out(text, type_class(kind), job.job_id if job is not None else None, on_sent)
        kind_class = "text" if kind == "text" else "preview"
        live = self.live
        for conn in live:
            conn.send_binary(frame, kind_class)
        return bool(live)

    def greet(self, conn) -> None:
        """``conn`` had its ``session`` message: from now on it gets what the session sends."""
        if conn in self.connections:
            self.live = (*self.live, conn)

    # --- sending --------------------------------------------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def reply(self, conn, kind: str, data, ref=None) -> None:
        """A message to one connection only (session, pong, errors of its own requests);
        ``ref``: that of the client message it answers."""
        conn.send_text(protocol.encode(kind, data, self.next_seq(), ref), "error" if kind == "error" else "control")

    def _fan_out(self, text: str, kind_class: str, job_id: str | None, on_sent=None) -> bool:
        self._keep(text, job_id)
        live = self.live  # (a tuple: a write that closes a slow client may change it meanwhile)
        for conn in live:
            conn.send_text(text, kind_class, on_sent)
        return bool(live)

    def _keep(self, text: str, job_id: str | None) -> None:
        s = self.registry.settings
        if not s.resume_buffer_size or not s.resume_buffer_bytes:
            return
        if self.buffer is None:
            self.buffer = deque()
        self.buffer.append((self.seq, text, job_id))
        self.buffer_bytes += len(text)
        while len(self.buffer) > s.resume_buffer_size or self.buffer_bytes > s.resume_buffer_bytes:
            self.buffer_bytes -= len(self.buffer.popleft()[1])

    def since(self, last_seq: int, skip: Iterable[str] = ()) -> tuple[bool, list[str]]:
        """(complete, messages after last_seq), leaving out the jobs in ``skip`` (their
        outcome was just delivered whole on this connection). complete is False when the
        buffer no longer reaches back to last_seq + 1."""
        if last_seq >= self.seq:
            return True, []
        skip = set(skip)
        oldest = self.buffer[0][0] if self.buffer else self.seq + 1
        complete = oldest <= last_seq + 1
        return complete, [text for seq, text, job_id in self.buffer or ()
                          if seq > last_seq and (job_id is None or job_id not in skip)]

    def touch(self, now: float) -> None:
        self.last_activity = now

    def describe(self, now: float, jobs: dict) -> dict:
        return {"user_id": self.user_id, "session_id": self.session_id, "connections": len(self.connections),
                "idle_seconds": round(now - self.last_activity, 3), **jobs}


class SessionRegistry:
    """The sessions by user, the per-IP connection counts, the upgrade slots, expiry."""

    def __init__(self, settings, service: "JobService", metrics: Metrics, clock):
        self.settings = settings
        self.service = service
        self.tracker = service.tracker
        self.metrics = metrics
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.ip_connections: Counter[str] = Counter()
        self.upgrades = asyncio.Semaphore(settings.max_concurrent_upgrades)  # see ClientConnection.get
        self._cleanup_timer = PeriodicCallback(self.cleanup, settings.cleanup_interval_ms)
        self.accepting = True

    # --- sessions -------------------------------------------------------------------------------
    def session_for(self, user_id: str) -> Session:
        session = self.sessions.get(user_id)
        if session is None:
            session = Session(self, user_id, self.clock())
            self.sessions[user_id] = session
            self.tracker.subscribe(user_id, session)
            self.metrics.sessions.set(len(self.sessions))
        return session

    def connected(self, user_id: str) -> bool:
        session = self.sessions.get(user_id)
        return session is not None and bool(session.connections)

    def ip_allowed(self, ip: str) -> bool:
        cap = self.settings.max_connections_per_ip
        return cap == 0 or self.ip_connections[ip] < cap

    def attach(self, conn, user_id: str, ip: str) -> Session:
        """Register a new client connection; raises RequestError when over the per-user cap."""
        session = self.session_for(user_id)
        if len(session.connections) >= self.settings.max_connections_per_user:
            raise RequestError(ErrorCode.TOO_MANY_CONNECTIONS)
        session.connections.add(conn)
        self.ip_connections[ip] += 1
        session.touch(self.clock())
        self.metrics.connections.inc()
        return session

    def detach(self, conn, session: Session, ip: str) -> None:
        if conn not in session.connections:
            return
        session.connections.discard(conn)
        session.live = tuple(c for c in session.live if c is not conn)
        self.ip_connections[ip] -= 1
        if self.ip_connections[ip] <= 0:
            del self.ip_connections[ip]
        session.touch(self.clock())
        self.metrics.connections.dec()
        if not session.connections:
            self.service.owner_left(session.user_id)

    def connection_count(self) -> int:
        return sum(len(s.connections) for s in self.sessions.values())

    # --- expiry ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._cleanup_timer.start()

    def stop(self) -> None:
        self._cleanup_timer.stop()

    def expired_sessions(self, now: float) -> list[Session]:
        timeout = self.settings.session_timeout_ms / 1000
        return [s for s in self.sessions.values()
                if session_expired(last_activity=s.last_activity, now=now, timeout=timeout,
                                   connections=len(s.connections))]

    def cleanup(self, now: float | None = None) -> list[Session]:
        """Remove expired sessions (freeing their buffers)."""
        now = self.clock() if now is None else now
        gone = self.expired_sessions(now)
        for session in gone:
            self.remove(session)
        if gone:
            log.info("cleanup removed %d expired sessions", len(gone))
        return gone

    def remove(self, session: Session) -> None:
        self.sessions.pop(session.user_id, None)
        self.tracker.unsubscribe(session.user_id, session)
        session.buffer = None
        session.buffer_bytes = 0
        self.metrics.sessions.set(len(self.sessions))

    def all(self) -> list[Session]:
        return list(self.sessions.values())

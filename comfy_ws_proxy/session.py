"""Session (one per user) and SessionRegistry (connection limits, resume buffers, cleanup).

A Session owns the user's ComfyUI client id (private, never shown to the client), the
user's upstream ComfyLink, the sequence numbers of messages sent to the user and a
bounded buffer of them for ``resume``. Time math is pure: it takes ``now`` from the
registry's injected monotonic clock.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tornado.ioloop import PeriodicCallback

from . import protocol
from .metrics import Metrics, type_class
from .protocol import ErrorCode, ProtocolError
from .store import PromptState, Store
from .upstream import ComfyLink

if TYPE_CHECKING:  # pragma: no cover
    from .backend import BackendPool
    from .dispatch import PromptService

log = logging.getLogger(__name__)


def session_expired(*, last_activity: float, now: float, timeout: float, connections: int,
                    unfinished_prompts: int) -> bool:
    """A session lives while it has a connection or unfinished/queued prompts, and for
    ``timeout`` seconds of inactivity after that."""
    return connections == 0 and unfinished_prompts == 0 and now - last_activity >= timeout


class TokenBucket:
    """Per-user submit rate: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token; return 0 on success, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Session:
    def __init__(self, registry: "SessionRegistry", user_id: str, now: float):
        s = registry.settings
        self.registry = registry
        self.user_id = user_id
        self.session_id = secrets.token_urlsafe(18)
        self.client_id = str(uuid.uuid4())  # ComfyUI's clientId for this user: minted here, never shown
        self.backend = registry.pool.for_user(user_id)
        self.connections: set = set()
        self.seq = 0
        # Sent messages kept for resume, bounded in count and bytes; created on first use
        # (an empty deque costs 760 bytes, and most idle sessions never need one).
        self.buffer: deque[tuple[int, str]] | None = None
        self.buffer_bytes = 0
        self.created = now
        self.last_activity = now
        self.bucket = TokenBucket(s.submit_rate_per_s, s.submit_burst, now)
        self.link: ComfyLink | None = None
        # Events that arrive for a prompt whose POST has not answered yet (ComfyUI can be
        # faster than its own HTTP response): held so prompt_accepted goes first.
        self.held: dict[str, list[tuple[str, Any]]] = {}

    # --- what the link needs ------------------------------------------------------------------
    def owns(self, prompt_id: str) -> bool:
        return self.registry.store.owner(prompt_id) == self.user_id

    def upstream_event(self, kind: str, data: dict, text: str) -> None:
        prompt_id = data.get("prompt_id") or (self.link.running if self.link else None)
        self.registry.prompts.on_event(self, kind, data, prompt_id)
        if prompt_id in self.held:
            self.held[prompt_id].append(("json", (kind, text)))
            return
        self.forward_json(kind, text)

    def upstream_status(self, text: str) -> None:
        self.forward_json("status", text)

    def upstream_binary(self, frame: bytes, prompt_id: str) -> None:
        if prompt_id in self.held:
            self.held[prompt_id].append(("binary", frame))
            return
        self.send_binary(frame)

    def link_up(self, reconnected: bool) -> None:
        self.registry.metrics.upstream_connections.inc()
        if reconnected:
            self.registry.metrics.upstream_reconnects.inc()
        self.registry.prompts.on_link_up(self, reconnected)

    def link_down(self) -> None:
        self.registry.metrics.upstream_connections.dec()
        log.info("upstream socket lost user=%s session=%s", self.user_id, self.session_id[:8])

    # --- sending --------------------------------------------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, kind: str, data: Any, *, only=None) -> None:
        """A proxy message. To every connection of the user and into the resume buffer, or
        with ``only`` to one connection (replies such as pong or invalid_message)."""
        text = protocol.encode(kind, data, self.next_seq())
        if only is not None:
            only.send_text(text, "error" if kind == "error" else "control")
            return
        self._fan_out(text, "error" if kind == "error" else "control")

    def forward_json(self, kind: str, upstream_text: str) -> None:
        """A ComfyUI message, type and data unchanged, with a seq added."""
        self._fan_out(protocol.with_seq(upstream_text, self.next_seq()), type_class(kind))

    def _fan_out(self, text: str, kind_class: str) -> None:
        self._keep(text)
        for conn in list(self.connections):
            conn.send_text(text, kind_class)

    def _keep(self, text: str) -> None:
        s = self.registry.settings
        if not s.resume_buffer_size or not s.resume_buffer_bytes:
            return
        if self.buffer is None:
            self.buffer = deque()
        self.buffer.append((self.seq, text))
        self.buffer_bytes += len(text)
        while len(self.buffer) > s.resume_buffer_size or self.buffer_bytes > s.resume_buffer_bytes:
            self.buffer_bytes -= len(self.buffer.popleft()[1])

    def send_binary(self, frame: bytes | bytearray) -> None:
        kind_class = "text" if protocol.binary_event_type(frame) == protocol.BINARY_TEXT else "preview"
        for conn in list(self.connections):
            conn.send_binary(frame, kind_class)

    def hold(self, prompt_id: str) -> None:
        self.held[prompt_id] = []

    def release(self, prompt_id: str) -> None:
        for kind, item in self.held.pop(prompt_id, []):
            if kind == "json":
                self.forward_json(*item)
            else:
                self.send_binary(item)

    def since(self, last_seq: int) -> tuple[bool, list[str]]:
        """(complete, messages after last_seq). complete is False when the buffer no longer
        reaches back to last_seq + 1."""
        if last_seq >= self.seq:
            return True, []
        oldest = self.buffer[0][0] if self.buffer else self.seq + 1
        complete = oldest <= last_seq + 1
        return complete, [text for seq, text in self.buffer or () if seq > last_seq]

    def touch(self, now: float) -> None:
        self.last_activity = now

    def prompt_states(self) -> list[dict]:
        return [r.summary() for r in self.registry.store.for_user(self.user_id)]

    def unfinished_count(self) -> int:
        return len(self.registry.store.unfinished(self.user_id))

    def describe(self, now: float) -> dict:
        states = Counter(r.state for r in self.registry.store.unfinished(self.user_id))
        return {"user_id": self.user_id, "session_id": self.session_id, "connections": len(self.connections),
                "idle_seconds": round(now - self.last_activity, 3),
                "upstream_connected": bool(self.link and self.link.ready.is_set()),
                "prompts_queued": states.get(PromptState.QUEUED, 0),
                "prompts_pending": states.get(PromptState.PENDING, 0) + states.get(PromptState.SUBMITTING, 0),
                "prompts_running": states.get(PromptState.RUNNING, 0)}


class SessionRegistry:
    def __init__(self, settings, pool: "BackendPool", store: Store, metrics: Metrics,
                 clock: Callable[[], float]):
        self.settings = settings
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.prompts: "PromptService" = None  # type: ignore[assignment]  # set by app.make_app
        self.sessions: dict[str, Session] = {}
        self.by_id: dict[str, Session] = {}
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
            self.by_id[session.session_id] = session
            self.metrics.sessions.set(len(self.sessions))
        return session

    def ensure_link(self, session: Session) -> ComfyLink:
        if session.link is None or session.link.closed:
            s = self.settings
            session.link = ComfyLink(session.backend, session.client_id, session,
                                     max_message_size=s.upstream_max_message_bytes,
                                     ping_interval=s.upstream_ping_interval_s,
                                     reconnect_min=s.upstream_reconnect_min_ms / 1000,
                                     reconnect_max=s.upstream_reconnect_max_ms / 1000,
                                     preview_metadata=s.upstream_preview_metadata)
            session.link.start()
        return session.link

    def ip_allowed(self, ip: str) -> bool:
        cap = self.settings.max_connections_per_ip
        return cap == 0 or self.ip_connections[ip] < cap

    def attach(self, conn, user_id: str, ip: str) -> Session:
        """Register a new client connection; raises ProtocolError when over the per-user cap."""
        session = self.session_for(user_id)
        if len(session.connections) >= self.settings.max_connections_per_user:
            raise ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS)
        session.connections.add(conn)
        self.ip_connections[ip] += 1
        session.touch(self.clock())
        self.metrics.connections.inc()
        self.ensure_link(session)
        return session

    def detach(self, conn, session: Session, ip: str) -> None:
        if conn not in session.connections:
            return
        session.connections.discard(conn)
        self.ip_connections[ip] -= 1
        if self.ip_connections[ip] <= 0:
            del self.ip_connections[ip]
        session.touch(self.clock())
        self.metrics.connections.dec()
        self.maybe_release_link(session)

    def maybe_release_link(self, session: Session) -> None:
        """An idle user's upstream socket is not held: closed when the user has no
        connection and nothing pending, reopened on demand."""
        if session.connections or session.link is None or session.unfinished_count():
            return
        link, session.link = session.link, None
        asyncio.ensure_future(link.close())

    def connection_count(self) -> int:
        return sum(len(s.connections) for s in self.sessions.values())

    # --- cleanup --------------------------------------------------------------------------------
    def start(self) -> None:
        self._cleanup_timer.start()

    def stop(self) -> None:
        self._cleanup_timer.stop()

    def expired_sessions(self, now: float) -> list[Session]:
        timeout = self.settings.session_timeout_ms / 1000
        return [s for s in self.sessions.values()
                if session_expired(last_activity=s.last_activity, now=now, timeout=timeout,
                                   connections=len(s.connections), unfinished_prompts=s.unfinished_count())]

    def cleanup(self, now: float | None = None) -> list[Session]:
        """Remove expired sessions (closing their upstream sockets, freeing their buffers) and
        finished prompt records older than the retention (store rows are wall-clock stamped)."""
        now = self.clock() if now is None else now
        forgotten = self.store.forget_finished(time.time() - self.settings.finished_prompt_retention_s)
        if forgotten:
            log.info("cleanup forgot %d finished prompts", forgotten)
        gone = self.expired_sessions(now)
        for session in gone:
            self.remove(session)
        if gone:
            log.info("cleanup removed %d expired sessions", len(gone))
        return gone

    def remove(self, session: Session) -> None:
        self.sessions.pop(session.user_id, None)
        self.by_id.pop(session.session_id, None)
        session.buffer = None
        session.buffer_bytes = 0
        session.held.clear()
        if session.link is not None:
            link, session.link = session.link, None
            asyncio.ensure_future(link.close())
        self.metrics.sessions.set(len(self.sessions))

    def all(self) -> Iterable[Session]:
        return list(self.sessions.values())

    async def close_links(self) -> None:
        links = [s.link for s in self.sessions.values() if s.link is not None]
        for s in self.sessions.values():
            s.link = None
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)

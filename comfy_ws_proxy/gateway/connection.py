"""ClientConnection: one client WebSocket. Authenticates before the upgrade, then turns
client messages into job service calls and writes what the session sends, within a bounded
outbound budget (a client that stops reading is closed; it never makes the proxy buffer
without bound, nor slows the upstream read loop or other users). Its token may be replaced
in band (``refresh_token``); ClientPinger warns it ahead of the token's deadline
(``token_expiring``) and closes it at the deadline (4001).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import random
import time
import uuid
from typing import Callable
from urllib.parse import urlsplit

from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketHandler

from ..auth import AuthError, Identity, TokenVerifier, extract_token, requested_subprotocols
from ..jobs.queue import accepted_data
from ..jobs.service import JobService
from ..logs import log_uncaught
from ..metrics import Metrics
from ..model import ErrorCode, JobState, RequestError, SubmitRequest
from ..wsframes import OP_BINARY, OP_TEXT, frame_header
from .protocol import SUBPROTOCOL, Cancel, CloseCode, MessageError, Ping, RefreshToken, Resume, read_request
from .session import SessionRegistry

log = logging.getLogger(__name__)

INLINE_MAX = 2048  # payloads up to this size are copied into one write with their header
# The job notices that answer a client's request about a job (see Session.await_answer).
SUBMIT_ANSWERS = frozenset({"prompt_accepted", "error", "prompt_cancelled"})
CANCEL_ANSWERS = frozenset({"prompt_cancelled"})


def token_times(now: float, deadline: float | None, warning: float) -> tuple[float | None, float | None]:
    """(warn_at, deadline) of a token accepted at ``now`` (epoch seconds): the warning
    ``warning`` seconds before the deadline, but not before half the time left has passed
    (a token shorter-lived than the warning is not refreshed again at once, in a loop); no
    warning when ``warning`` is 0 or there is no deadline."""
    if deadline is None or not warning:
        return None, deadline
    return max(deadline - warning, now + (deadline - now) / 2), deadline


class ClientConnection(WebSocketHandler):
    def initialize(self, registry: SessionRegistry, service: JobService, verifier: TokenVerifier, settings,
                   metrics: Metrics):
        self.registry = registry
        self.service = service
        self.verifier = verifier
        self.settings_ = settings
        self.metrics = metrics
        self.identity: Identity | None = None
        self.session = None
        self.ip = "unknown"
        self.pending_bytes = 0  # written but not yet flushed to the socket
        self.large_bytes = 0  # of which: the one frame larger than the budget, if any
        self.closing = False
        # The token's times (epoch seconds, the verifier's clock): when the connection must
        # close, and when it is told so ahead (None once told); see token_times().
        self.token_deadline: float | None = None
        self.token_warn_at: float | None = None
        self.next_ping_at = 0.0
        self.ping_sent_at: float | None = None  # an unanswered ping
        self._upgrade_slot = False  # holds one of registry.upgrades until open() starts
        self.replayed: list[str] = []  # jobs whose owed outcome this connection got at open

    # --- the upgrade ------------------------------------------------------------------------------
    async def get(self, *args, **kwargs):
        s = self.settings_
        if not self.registry.accepting:
            return self._refuse(503, "shutting_down", "The proxy is shutting down")
        # The peer, or (TRUST_FORWARDED: HTTPServer xheaders) the address nginx forwarded.
        self.ip = self.request.remote_ip or "unknown"
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            self.metrics.auth_failures.labels("origin").inc()
            return self._refuse(403, "forbidden_origin", "Origin not allowed")
        if not self.registry.ip_allowed(self.ip):
            self.metrics.auth_failures.labels("too_many_connections_ip").inc()
            return self._refuse(429, ErrorCode.TOO_MANY_CONNECTIONS, "Too many connections from this address")
        token, source = extract_token(self.request.headers, self.request.query, allow_query=s.allow_query_token)
        # A slow JWKS endpoint is waited for outside the upgrade slots: a flood of unknown-kid
        # tokens must not hold every slot while legitimate upgrades wait.
        try:
            await asyncio.wait_for(self.verifier.fetch_key(token), s.handshake_timeout_ms / 1000)
        except asyncio.TimeoutError:
            pass  # verify() says unknown_kid
        # A burst of upgrades (every client reconnecting at once) is let through a few at a
        # time: each costs ~0.5 ms of CPU (signature check, handshake), and a few hundred run
        # back to back would stall every other socket's events for as long.
        await self.registry.upgrades.acquire()
        self._upgrade_slot = True
        try:
            return await self._upgrade(token, source, *args, **kwargs)
        finally:
            self._release_upgrade_slot()

    def _release_upgrade_slot(self) -> None:
        if self._upgrade_slot:
            self._upgrade_slot = False
            self.registry.upgrades.release()

    async def _upgrade(self, token, source, *args, **kwargs):
        s = self.settings_
        try:
            self.identity = await asyncio.wait_for(self.verifier.verify(token), s.handshake_timeout_ms / 1000)
        except AuthError as e:
            self.metrics.auth_failures.labels(e.reason).inc()
            log.info("auth refused ip=%s source=%s reason=%s", self.ip, source, e.reason)
            return self._refuse(401, ErrorCode.UNAUTHORIZED, e.message, reason=e.reason)
        except asyncio.TimeoutError:
            self.metrics.auth_failures.labels("timeout").inc()
            return self._refuse(401, ErrorCode.UNAUTHORIZED, "Token could not be verified in time",
                                reason="timeout")
        if not self.identity.verified:
            log.warning("NO_VERIFY is on: accepting an UNVERIFIED token for user=%s ip=%s",
                        self.identity.user_id, self.ip)
        await super().get(*args, **kwargs)

    def _refuse(self, status: int, code: str, message: str, **extra) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="comfy_ws_proxy"')
        self.finish(json.dumps({"error": {"code": code, "message": message, **extra}}))

    def check_origin(self, origin: str) -> bool:
        """Same host, or listed in ALLOWED_ORIGINS ('*': any). Written out here because
        Tornado 6.6 moved its same-host comparison out of this method."""
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # e.g. "http://[": not an origin anyone is allowed to be
            return False
        if netloc == (self.request.headers.get("Host") or "").lower():
            return True
        allowed = self.settings_.allowed_origins
        return "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}

    def log_exception(self, typ, value, tb):
        # Tornado's own line carries the full URI: with ALLOW_QUERY_TOKEN, the token.
        log_uncaught(self, typ, value, tb)

    def select_subprotocol(self, subprotocols):
        # Select ours; never echo the bearer.<token> item.
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def get_compression_options(self):
        return None  # previews are already compressed; deflate would cost CPU per user

    # --- the session ---------------------------------------------------------------------------
    async def open(self, *args, **kwargs):
        self._release_upgrade_slot()  # (get() only returns when the connection ends)
        identity = self.identity
        # The upgrade's headers and query are done with: don't keep them (nor the token in
        # them, nor ~1.5 KiB per connection) for the connection's lifetime. Emptied in place:
        # Tornado's HTTP/1 reader still holds the same headers object.
        request = self.request
        request.headers.clear()
        request.query, request.uri = "", request.path
        request.query_arguments.clear()
        request.arguments.clear()
        try:
            self.session = self.registry.attach(self, identity.user_id, self.ip)
        except RequestError as e:
            self.metrics.client_errors.labels(e.code).inc()
            self._write(json.dumps({"type": "error", "data": e.to_data(), "seq": 0}), "error")
            self.close(CloseCode.TOO_MANY_CONNECTIONS, e.message)
            return
        session = self.session
        interval = self.settings_.ws_ping_interval_s
        self.next_ping_at = self.registry.clock() + interval * (0.5 + random.random() / 2)  # spread
        log.info("connection open user=%s session=%s ip=%s", identity.user_id, session.session_id[:8], self.ip)
        self._token_accepted(identity)
        # Wait for the upstream socket (Tornado reads no client frame before open() returns),
        # but not for long: when ComfyUI is down the client is accepted and told so.
        ready = await self.service.wait_ready(identity.user_id, self.service.ready_timeout)
        if self.ws_connection is None or self.session is None:
            return  # the client left while we waited
        # ``session`` is the first message on a connection: until it went, nothing of the
        # user's jobs is sent here (an outcome published meanwhile is owed, and comes below).
        session.reply(self, "session", {"session_id": session.session_id, "user_id": identity.user_id,
                                        "resumed": False})
        session.greet(self)
        if not ready:
            session.reply(self, "error", {"code": ErrorCode.COMFY_UNAVAILABLE,
                                          "message": "ComfyUI is temporarily unavailable",
                                          "details": {"prompts": "will be queued"}})
        # Outcomes the user has not heard yet (they finished while no socket of theirs was
        # open, or before a restart): now, whether or not this client resumes.
        self.replayed = self.service.tracker.deliver_owed(identity.user_id, session)

    # --- keepalive (driven by ClientPinger) -----------------------------------------------------
    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        if self.ping_sent_at is not None:
            if timeout and now - self.ping_sent_at >= timeout:
                log.info("closing a client that did not answer a ping user=%s", self.session.user_id)
                self.close(CloseCode.GOING_AWAY, "ping timed out")
            return
        if now >= self.next_ping_at:
            self.next_ping_at = now + interval
            self.ping_sent_at = now
            try:
                self.ping()
            except Exception:  # closed meanwhile: on_close handles it
                pass

    def on_pong(self, data: bytes) -> None:
        self.ping_sent_at = None

    # --- the token's lifetime (checked by ClientPinger) ------------------------------------------
    def _token_accepted(self, identity: Identity) -> None:
        self.identity = identity
        self.token_warn_at, self.token_deadline = token_times(
            self.verifier.wall(), self.verifier.deadline(identity), self.settings_.token_expiry_warning_s)

    def check_token(self, now: float) -> None:
        """At the token's deadline: an error and close 4001. Before it: one token_expiring."""
        deadline = self.token_deadline
        if deadline is None or self.closing or self.session is None or self not in self.session.live:
            return  # (not yet greeted: the session message goes first)
        if now >= deadline:
            self.token_deadline = None
            log.info("token expired user=%s", self.session.user_id)
            self.session.reply(self, "error", {"code": ErrorCode.UNAUTHORIZED, "message": "Token expired",
                                               "details": {"reason": "expired"}})
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
        elif self.token_warn_at is not None and now >= self.token_warn_at:
            self.token_warn_at = None
            self.session.reply(self, "token_expiring", {"expires_at": self.identity.expires_at,
                                                        "deadline": deadline,
                                                        "seconds_left": round(deadline - now, 3)})

    async def _refresh(self, request: RefreshToken, ref) -> None:
        """A fresh token on the open connection, verified like at the upgrade and for the same
        user; refused, it changes nothing (the old token's deadline stands)."""
        timeout = self.settings_.handshake_timeout_ms / 1000
        try:
            await asyncio.wait_for(self.verifier.fetch_key(request.token), timeout)
        except asyncio.TimeoutError:
            pass  # verify() says unknown_kid
        try:
            identity = await asyncio.wait_for(self.verifier.verify(request.token), timeout)
        except AuthError as e:
            raise RequestError(ErrorCode.UNAUTHORIZED, e.message, details={"reason": e.reason}) from None
        except asyncio.TimeoutError:
            raise RequestError(ErrorCode.UNAUTHORIZED, "Token could not be verified in time",
                               details={"reason": "timeout"}) from None
        if identity.user_id != self.identity.user_id:
            raise RequestError(ErrorCode.UNAUTHORIZED, "The token is for another user; "
                               "a connection keeps its user", details={"reason": "other_user"})
        if self.session is None or self.ws_connection is None or self.ws_connection.is_closing():
            return  # closed (or expired) while the token was verified
        self._token_accepted(identity)
        log.info("token refreshed user=%s", identity.user_id)
        self.session.reply(self, "token_refreshed", {"expires_at": identity.expires_at,
                                                     "deadline": self.token_deadline}, ref)

    async def on_message(self, message):
        """One client message, answered once on this connection (protocol.py says by what),
        the answer carrying the message's ref."""
        session = self.session
        if session is None:
            return
        session.touch(self.registry.clock())
        s = self.settings_
        self.metrics.relayed("to_comfy", "control", len(message))
        ref = None
        try:
            request = read_request(message, max_message_bytes=s.max_message_bytes,
                                   max_prompt_nodes=s.max_prompt_nodes, node_allowlist=s.node_allowlist)
            ref, body = request.ref, request.body
            if isinstance(body, Ping):
                session.reply(self, "pong", body.data if isinstance(body.data, dict) else {}, ref)
            elif isinstance(body, SubmitRequest):
                await self._submit(body, ref)
            elif isinstance(body, Cancel):
                await self._cancel(body, ref)
            elif isinstance(body, Resume):
                self._resume(body, ref)
            elif isinstance(body, RefreshToken):
                await self._refresh(body, ref)
        except MessageError as e:
            self._refused(e, e.ref)
        except RequestError as e:
            self._refused(e, ref)
        except Exception:
            log.exception("internal error handling a client message user=%s", session.user_id)
            self.metrics.client_errors.labels(ErrorCode.INTERNAL_ERROR).inc()
            session.reply(self, "error", {"code": ErrorCode.INTERNAL_ERROR, "message": "Internal error"}, ref)

    def _refused(self, e: RequestError, ref) -> None:
        self.metrics.client_errors.labels(e.code).inc()
        log.info("client error user=%s code=%s", self.session.user_id, e.code)
        self.session.reply(self, "error", e.to_data(), ref)

    async def _submit(self, request: SubmitRequest, ref) -> None:
        """Answered by the job service's first notice about the job (prompt_accepted, or
        ComfyUI's rejection), or by the refusal it raises; that answer carries ``ref``."""
        session = self.session
        if request.prompt_id is None:
            # The proxy's id is chosen here rather than in the service, so that every answer
            # to this message, a refusal too, says which prompt it is about.
            request = dataclasses.replace(request, prompt_id=str(uuid.uuid4()))
        job_id = request.prompt_id
        waiting = session.await_answer(self, job_id, ref, SUBMIT_ANSWERS)
        error = job = None
        try:
            job = await self.service.submit(session.user_id, request)
        except RequestError as e:
            error = e
        finally:
            unanswered = waiting and session.still_awaited(self, job_id)
        if error is not None:
            if error.prompt_id is None:
                error.prompt_id = job_id
            self._refused(error, ref if unanswered or not waiting else None)
        elif unanswered:
            # No notice answered it (ComfyUI's events overtook the answer of a POST that
            # failed): the service took the job, so it was accepted.
            session.reply(self, "prompt_accepted", accepted_data(job, queued=job.state == JobState.QUEUED), ref)

    async def _cancel(self, request: Cancel, ref) -> None:
        """Answered by ``prompt_cancelled`` when the job ends at once, else by
        ``cancel_accepted`` with the job's state (an interrupt went to ComfyUI:
        ``execution_interrupted`` follows; or it had ended already), or by an error."""
        session = self.session
        job_id = request.prompt_id
        waiting = session.await_answer(self, job_id, ref, CANCEL_ANSWERS)
        error = None
        try:
            await self.service.cancel(session.user_id, job_id)
        except RequestError as e:
            error = e
        finally:
            unanswered = waiting and session.still_awaited(self, job_id)
        if error is not None:
            self._refused(error, ref if unanswered or not waiting else None)
        elif unanswered or not waiting:
            job = self.service.tracker.owned(session.user_id, job_id)
            session.reply(self, "cancel_accepted", {"prompt_id": job_id, "state": job.state if job else None}, ref)

    def _resume(self, msg: Resume, ref=None) -> None:
        session = self.session
        if msg.session_id != session.session_id:
            # Expired, unknown, or another user's: the same answer for all three.
            session.reply(self, "resume_gap", {"session_id": msg.session_id, "last_seq": msg.last_seq,
                                               "reason": "unknown_session"})
        else:
            # What this connection got whole at open is not repeated: each outcome once.
            complete, messages = session.since(msg.last_seq, skip=self.replayed)
            if not complete:
                session.reply(self, "resume_gap", {"session_id": msg.session_id, "last_seq": msg.last_seq,
                                                   "reason": "buffer_exceeded"})
            for text in messages:
                self._write(text, "control")
        session.reply(self, "prompts_state", {"prompts": self.service.tracker.summaries(
            session.user_id, self.settings_.prompts_state_max)}, ref)

    def on_close(self):
        if self.session is not None:
            log.info("connection closed user=%s session=%s code=%s", self.session.user_id,
                     self.session.session_id[:8], self.close_code)
            self.registry.detach(self, self.session, self.ip)

    # --- writing -----------------------------------------------------------------------------
    def send_text(self, text: str, kind_class: str, on_sent: Callable[[], None] | None = None) -> None:
        """``on_sent``: called once the frame is in the kernel's hands (then a crash of this
        process no longer loses it); never if the connection fails first."""
        self._write(text, kind_class, on_sent=on_sent)

    def send_binary(self, frame: bytes, kind_class: str) -> None:
        self._write(frame, kind_class, binary=True)

    def _write(self, payload, kind_class: str, binary: bool = False,
               on_sent: Callable[[], None] | None = None) -> None:
        ws = self.ws_connection
        if self.closing or ws is None or ws.is_closing():
            return
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        size = len(data)
        budget = self.settings_.max_outbound_buffer_bytes
        large = size > budget
        # A client owing more than its budget has stopped reading. One frame larger than the
        # budget (a full-size preview) may be in flight on top of it, but not two.
        if self.pending_bytes - self.large_bytes > budget or (large and self.large_bytes):
            self.metrics.slow_consumers.inc()
            log.warning("closing a client that stopped reading user=%s pending=%d",
                        self.identity.user_id if self.identity else "?", self.pending_bytes)
            self.closing = True
            if self.session is not None:
                # Out of the session now: the close handshake may take a while with a client
                # that does not read, and it must not receive (or cost) anything meanwhile.
                self.registry.detach(self, self.session, self.ip)
            self.close(CloseCode.SLOW_CONSUMER, "too slow: resume to catch up")
            return
        # The frame goes straight to the IOStream instead of through write_message(), which
        # wraps every write in a coroutine and a Task and copies the payload into the frame:
        # the relay's hot path. A payload over INLINE_MAX is written after its header, by
        # reference (IOStream keeps large buffers without copying them).
        header = frame_header(OP_BINARY if binary else OP_TEXT, size)
        stream = ws.stream
        self.metrics.relayed("to_client", kind_class, size)
        if size <= INLINE_MAX and type(stream) is IOStream and not stream.writing():
            # Nothing queued before it: hand the frame to the socket ourselves, which costs a
            # third of IOStream.write's bookkeeping; IOStream only gets what did not fit.
            frame = header + data
            try:
                sent = stream.socket.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # a broken socket: IOStream.write below notices and closes the stream
            if sent == len(frame):
                if on_sent is not None:
                    on_sent()
                return
            data = memoryview(frame)[sent:]
            header = b""
        try:
            if size > INLINE_MAX:
                stream.write(header)
                future = stream.write(data)
            else:
                future = stream.write(header + data if header else data)
        except StreamClosedError:
            return  # on_close follows
        if future.done():  # the socket took it all at once (the usual case): nothing owed
            if not future.cancelled() and future.exception() is None and on_sent is not None:
                on_sent()  # (an exception: a stream closed meanwhile; on_close handles it)
            return
        self.pending_bytes += size
        if large:
            self.large_bytes += size
        future.add_done_callback(functools.partial(self._written, size, large, on_sent))

    def _written(self, size: int, large: bool, on_sent, future) -> None:
        self.pending_bytes -= size
        if large:
            self.large_bytes -= size
        # (an exception: a closed stream; on_close handles it; reading it marks it as seen)
        if not future.cancelled() and future.exception() is None and on_sent is not None:
            on_sent()

    def close_for_shutdown(self) -> None:
        if self.session is not None:
            self.session.reply(self, "shutting_down", {"message": "The proxy is restarting; reconnect and resume"})
        self.close(CloseCode.GOING_AWAY, "proxy shutting down")


class ClientPinger:
    """Pings every client connection each WS_PING_INTERVAL_S and closes those that leave a
    ping unanswered for WS_PING_TIMEOUT_S (nginx and other idle-timeout hops see traffic;
    dead peers are noticed); warns each ahead of its token's deadline and closes it there
    (4001), to the second (a tick is at most 1 s). One timer for all connections: Tornado's
    own pinging runs a task per connection, about 1 KiB each at 10,000 users, and a timer per
    connection for its token would cost as much. Also works when the proxy is mounted in a
    host application, whatever that application's settings. ``wall``: the epoch clock of
    token times (the verifier's)."""

    def __init__(self, registry, settings, wall: Callable[[], float] = time.time):
        self.registry = registry
        self.wall = wall
        self.interval = settings.ws_ping_interval_s
        self.timeout = settings.ws_ping_timeout_s
        tick = min(1.0, self.interval / 4) if self.interval else 1.0
        self._timer = PeriodicCallback(self.tick, tick * 1000)

    def start(self) -> None:
        self._timer.start()  # (without pings too: tokens expire)

    def stop(self) -> None:
        self._timer.stop()

    def tick(self) -> None:
        now, wall = self.registry.clock(), self.wall()
        for session in self.registry.all():
            for conn in list(session.connections):
                if self.interval:
                    conn.keepalive(now, self.interval, self.timeout)
                conn.check_token(wall)


__all__ = ["ClientConnection", "ClientPinger", "requested_subprotocols"]

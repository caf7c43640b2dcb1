"""LimitedHTTPServer: Tornado's HTTPServer with limits on TCP connections, below HTTP and
before any upgrade; and the descriptor budget checked against RLIMIT_NOFILE at start.

Why (attack review, finding 6): a TCP connection that never sends a request costs the
attacker nothing and the proxy a descriptor for Tornado's 75 s header timeout, and nothing
counted such connections. At the descriptor limit Tornado's accept handler raised EMFILE on
every loop iteration (the listening socket stays readable): 100 % CPU, ~6 MB/s of log, and
``/health`` no longer answered. The server here:

* counts its TCP connections, in total (MAX_TCP_CONNECTIONS) and per peer address
  (MAX_TCP_CONNECTIONS_PER_ADDRESS). The per-address cap applies to the socket's peer, so it
  is off when TRUST_FORWARDED is on (every peer is then a reverse proxy: limit per client
  there, e.g. nginx's ``limit_conn``) and never applies to loopback peers or non-IP peers
  (Unix sockets), which cannot be told apart;
* at the total cap, makes room by closing the connection idle longest: one that has not sent
  a complete request header yet (an attacker's kind), or a keep-alive connection between two
  requests (clients reopen those as a matter of course). Oldest first, so a new connection
  (a monitor's ``/health``) has as many accepts of grace as there are idle connections: an
  attacker must open them faster than cap / round-trip time to close it before its request
  arrives (and the per-address cap keeps one address far below the total). When none is
  idle (every connection is a WebSocket or a request in progress) the new one is refused:
  the proxy is full of real work, and /health says so by not answering;
* closes a connection whose first request header has not arrived within
  FIRST_REQUEST_TIMEOUT_S (10 s), apart from the 75 s keep-alive idle timeout nginx needs
  between requests (IDLE_HTTP_CONNECTION_S, which Tornado also applies to every header, and
  from_settings to every request body: the proxy takes none);
* on accept errors (EMFILE, ENFILE: out of descriptors; anything else) neither spins nor
  floods the log: out of descriptors, it closes the longest idle connection and accepts in
  its place, as at the cap; when nothing is idle it stops accepting for ACCEPT_PAUSE_S and
  tries again (waiting connections stay in the listen backlog). One log line per
  CONNECTION_LOG_INTERVAL_S at most, counting what happened since the last.

Its accept loop replaces Tornado's ``netutil.add_accept_handler`` (15 lines, public IOLoop
and IOStream APIs only), because Tornado's lets the EMFILE escape to the event loop. It does
not terminate TLS (nginx does).

Embedding: the host application owns its HTTPServer. ``LimitedHTTPServer.from_settings(app,
settings)`` builds this server from the proxy's settings for any Tornado Application; its
limits then cover the host's own routes too (they are TCP-level). A host that keeps a plain
HTTPServer gets none of these limits (the proxy's per-user and per-IP caps at the upgrade
still apply).
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream

from .config import IDLE_HTTP_CONNECTION_S
from .metrics import Metrics

log = logging.getLogger(__name__)

# Connections accepted per readiness event of a listening socket: Tornado's own figure (its
# listen backlog), so one burst of connects does not starve every other socket's events.
ACCEPT_BATCH = 128

# Out of descriptors with nothing idle to close, accepting stops this long: about 10 tries a
# second cost nothing, and a descriptor freed meanwhile is used within 0.1 s. Connections
# arriving meanwhile wait in the kernel's listen backlog.
ACCEPT_PAUSE_S = 0.1

# Accept errors that closing a connection can cure: out of descriptors (the process's, the
# system's) or of socket memory. (Metric label values; any other error is "other".)
OUT_OF_RESOURCES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS",
                    errno.ENOMEM: "ENOMEM"}

# Descriptors of a connected user: the client's socket and the user's upstream socket to ComfyUI.
DESCRIPTORS_PER_USER = 2
# Descriptors kept aside from users: the proxy's HTTP client to ComfyUI (HTTP_CLIENT_MAX_CLIENTS
# in app.py, 100 calls at once: POSTs, /history, /outputs streams, probes), the store's files
# (database, WAL, shared memory, lock), a JWKS fetch, DNS, log files.
RESERVED_DESCRIPTORS = 128


# --- the descriptor budget ---------------------------------------------------------------------
@dataclass(frozen=True)
class DescriptorBudget:
    """What RLIMIT_NOFILE leaves for users: (limit - in use at start - reserved) / 2."""
    limit: int
    in_use: int
    reserved: int = RESERVED_DESCRIPTORS

    @property
    def users(self) -> int:
        return max(0, (self.limit - self.in_use - self.reserved) // DESCRIPTORS_PER_USER)

    def connection_cap(self, configured: int) -> int:
        """MAX_TCP_CONNECTIONS as configured, or (0) what the budget allows (at least 1)."""
        return configured or max(1, self.users)

    def report(self, configured: int, raised_from: int | None = None) -> list[tuple[int, str]]:
        """The start-up log lines about it, as (level, message)."""
        raised = f" (raised from {raised_from})" if raised_from is not None and raised_from != self.limit else ""
        lines = [(logging.INFO,
                  f"descriptors: limit {self.limit}{raised}, {self.in_use} in use, {self.reserved} kept for "
                  f"ComfyUI calls and files: room for {self.users} users ({DESCRIPTORS_PER_USER} descriptors "
                  f"each: the client's socket and its upstream socket); MAX_TCP_CONNECTIONS "
                  f"{self.connection_cap(configured)}{'' if configured else ' (from the limit)'}")]
        if configured > self.users:
            lines.append((logging.WARNING,
                          f"MAX_TCP_CONNECTIONS={configured} is more than the descriptor limit allows "
                          f"({self.users} users): at the limit accepts fail, and idle connections are closed "
                          f"or accepting pauses. Raise the limit (LimitNOFILE=, ulimit -n) or lower "
                          f"MAX_TCP_CONNECTIONS"))
        elif self.users == 0:
            lines.append((logging.WARNING,
                          f"the descriptor limit {self.limit} leaves room for no users: raise it "
                          f"(LimitNOFILE=, ulimit -n)"))
        return lines


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux /proc, BSD and macOS /dev/fd)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(path)) - 1)  # (the listing's own descriptor)
        except OSError:
            continue
    return 32  # unknown: what a freshly started proxy has open, about


def descriptor_budget(reserved: int = RESERVED_DESCRIPTORS) -> DescriptorBudget:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return DescriptorBudget(limit, open_descriptors(), reserved)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (common practice for servers: the soft
    default, often 1024, is a guard for interactive programs). Returns the soft limit before."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:  # e.g. macOS caps the soft limit below an infinite hard one
            log.info("descriptors: could not raise the soft limit %d to %d: %s", soft, target, e)
    return soft


# --- the server --------------------------------------------------------------------------------
def capped_peer(address: str) -> bool:
    """Whether the per-address cap applies to this peer: an IP address, not loopback."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a Unix socket's peer (""): every peer looks the same
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (mapped or ip).is_loopback


class LogThrottle:
    """At most one report per interval: ``note(now, *what)`` counts an event (under one or
    more names) and returns the counts since the previous report when one is due, else None."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last: float | None = None
        self.counts: collections.Counter[str] = collections.Counter()

    def note(self, now: float, *what: str) -> collections.Counter[str] | None:
        self.counts.update(what)
        if self.last is not None and now - self.last < self.interval:
            return None
        counts, self.counts, self.last = self.counts, collections.Counter(), now
        return counts


class TrackedSocket(socket.socket):
    """An accepted client socket, with what the limits know about its connection; tells its
    server when it is closed (IOStream closes it exactly once, whether the connection stayed
    HTTP or became a WebSocket, which Tornado's HTTPServer stops tracking at the upgrade)."""

    __slots__ = ("server", "peer", "capped", "stream", "idle_since", "requested", "seq")

    def close(self) -> None:
        server, self.server = self.server, None
        super().close()
        if server is not None:
            server._closed(self)


class _RequestWatch(httputil.HTTPMessageDelegate):
    """Passes one request through, telling the server when its header has arrived."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, server: "LimitedHTTPServer", sock: TrackedSocket):
        self.delegate = delegate
        self.server = server
        self.sock = sock

    def headers_received(self, start_line, headers):
        self.server._busy(self.sock)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk):
        return self.delegate.data_received(chunk)

    def finish(self):
        return self.delegate.finish()

    def on_connection_close(self):
        return self.delegate.on_connection_close()


class LimitedHTTPServer(HTTPServer):
    """An HTTPServer that caps its TCP connections (total, per address), times out a first
    request header that does not come, and survives running out of descriptors (see the
    module docstring). Construct it like HTTPServer, plus::

        max_connections               the total cap (required)
        max_connections_per_address   0: none
        first_request_timeout         seconds
        log_interval                  seconds between two warnings of one kind at most
        capped                        peer address -> whether the per-address cap applies
        metrics                       a Metrics to count into (optional)

    or from the proxy's settings with ``from_settings(app, settings)``.
    """

    def initialize(self, request_callback, *, max_connections: int, max_connections_per_address: int = 0,
                   first_request_timeout: float = 10.0, log_interval: float = 10.0,
                   capped: Callable[[str], bool] = capped_peer, metrics: Metrics | None = None,
                   clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        if kwargs.get("ssl_options") is not None:
            raise ValueError("LimitedHTTPServer does not terminate TLS: terminate it in front (nginx)")
        super().initialize(request_callback, **kwargs)
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.first_request_timeout = first_request_timeout
        self.capped = capped
        self.metrics = metrics
        self.clock = clock
        self.connection_count = 0
        self._accepted = 0  # connections accepted so far (a TrackedSocket's seq)
        self.per_address: collections.Counter[str] = collections.Counter()
        # Idle connections, longest idle first: not yet a complete first request header, and
        # keep-alive connections between requests. (dicts: ordered sets)
        self._fresh: dict[TrackedSocket, None] = {}
        self._between: dict[TrackedSocket, None] = {}
        self._listeners: list[socket.socket] = []
        # Called after every change of the counts above (a connection admitted, idle or
        # closed, an accept error): lets a caller wait for them without polling.
        self.changed: Callable[[], None] = lambda: None
        self._io_loop: IOLoop | None = None
        self._resume: object | None = None  # the call_later handle while accepting is paused
        self._accept_log = LogThrottle(log_interval)
        self._cap_log = LogThrottle(log_interval)
        self._sweeper = PeriodicCallback(self.sweep, 1000 * min(1.0, first_request_timeout / 4))
        if metrics is not None:
            metrics.tcp_connections.set_function(lambda: self.connection_count)

    @classmethod
    def from_settings(cls, request_callback, settings, *, metrics: Metrics | None = None,
                      budget: DescriptorBudget | None = None, **kwargs: Any) -> "LimitedHTTPServer":
        """The server the standalone proxy runs, for ``request_callback`` (an Application: the
        proxy's, or a host's with the proxy mounted). ``kwargs`` override HTTPServer's (and
        this class's) arguments. MAX_TCP_CONNECTIONS=0 takes the cap from ``budget``
        (default: RLIMIT_NOFILE now; raise it first, see raise_descriptor_limit)."""
        budget = budget or descriptor_budget()
        values = {"xheaders": settings.trust_forwarded, "idle_connection_timeout": IDLE_HTTP_CONNECTION_S,
                  # (a request body trickled in forever would hold its connection, never idle)
                  "body_timeout": IDLE_HTTP_CONNECTION_S,
                  "max_connections": budget.connection_cap(settings.max_tcp_connections),
                  "max_connections_per_address":
                      0 if settings.trust_forwarded else settings.max_tcp_connections_per_address,
                  "first_request_timeout": settings.first_request_timeout_s,
                  "log_interval": settings.connection_log_interval_s, "metrics": metrics}
        values.update(kwargs)
        return cls(request_callback, **values)

    @property
    def idle_count(self) -> int:
        return len(self._fresh) + len(self._between)

    # --- listening and accepting -----------------------------------------------------------------
    def add_sockets(self, sockets) -> None:
        """Accept on these listening sockets (``listen()`` and ``bind()``/``start()`` come here)."""
        self._io_loop = IOLoop.current()
        for sock in sockets:
            self._listeners.append(sock)
            if self._resume is None:
                self._io_loop.add_handler(sock, self._accept_ready, IOLoop.READ)
        if not self._sweeper.is_running():
            self._sweeper.start()

    def stop(self) -> None:
        """Stop listening (connections stay; see close_all_connections)."""
        self._sweeper.stop()
        if self._resume is not None:
            self._io_loop.remove_timeout(self._resume)
            self._resume = None
        else:
            for sock in self._listeners:
                self._io_loop.remove_handler(sock)
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        super().stop()  # (its own listening sockets: none)

    def _accept_ready(self, listener: socket.socket, events: int) -> None:
        retried = False
        # Out of descriptors, a connection accepted in this same round is not closed to make
        # room: an EMFILE does not mean that a connection waits (Linux looks for a free
        # descriptor first), and the one just accepted would be closed for nothing. (The next
        # round, after a pause, may.) At the cap a connection does wait: oldest idle first.
        round_start = self._accepted
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = listener.accept()
            except BlockingIOError:
                return  # all accepted
            except ConnectionAbortedError:
                continue  # gone while in the backlog
            except OSError as e:
                name = OUT_OF_RESOURCES.get(e.errno, "other")
                # Out of descriptors: the longest idle connection makes room, once per failure
                # in a row (with ENFILE, the whole system's table, that may not be enough).
                if name != "other" and not retried and self._shed_oldest_idle(accepted_before=round_start):
                    self._accept_error(e, name, "shed")
                    retried = True
                    continue
                self._accept_error(e, name, "paused")
                self._pause_accepting()
                return
            retried = False
            self._admit(conn, address)

    def _accept_error(self, error: OSError, name: str, outcome: str) -> None:
        """Count it; one warning per interval at most, with what happened since the last."""
        if self.metrics is not None:
            self.metrics.accept_errors.labels(name).inc()
        self.changed()
        counts = self._accept_log.note(self.clock(), error.strerror or name, outcome)
        if counts is not None:
            shed, paused = counts.pop("shed", 0), counts.pop("paused", 0)
            log.warning("cannot accept connections: %s; since the last report: %d idle connections closed to "
                        "make room, accepting paused %d times (%.1f s each); %d connections open, %d idle "
                        "(one line per %g s at most)", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
                        shed, paused, ACCEPT_PAUSE_S, self.connection_count, self.idle_count,
                        self._accept_log.interval)

    def _pause_accepting(self) -> None:
        if self._resume is None and self._listeners:
            for sock in self._listeners:
                self._io_loop.remove_handler(sock)
            self._resume = self._io_loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        for sock in self._listeners:
            self._io_loop.add_handler(sock, self._accept_ready, IOLoop.READ)

    def _admit(self, conn: socket.socket, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) and address else ""
        capped = bool(self.max_connections_per_address) and self.capped(peer)
        if capped and self.per_address[peer] >= self.max_connections_per_address:
            conn.close()
            return self._over_cap("over_address")
        if self.connection_count >= self.max_connections:
            if not self._shed_oldest_idle():
                conn.close()
                return self._over_cap("over_total")
            self._over_cap("shed_idle")
        sock = TrackedSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
        sock.server, sock.peer, sock.capped, sock.requested = self, peer, capped, False
        sock.idle_since, sock.seq = self.clock(), self._accepted
        self._accepted += 1
        self.connection_count += 1
        if capped:
            self.per_address[peer] += 1
        self._fresh[sock] = None
        sock.stream = IOStream(sock, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size)
        self.handle_stream(sock.stream, address)
        self.changed()

    # --- idle connections ------------------------------------------------------------------------
    def _oldest_idle(self) -> TrackedSocket | None:
        fresh = next(iter(self._fresh), None)
        between = next(iter(self._between), None)
        if fresh is None or between is None:
            return fresh or between
        return fresh if fresh.idle_since <= between.idle_since else between

    def _shed_oldest_idle(self, accepted_before: int | None = None) -> bool:
        """Close the connection idle longest to make room (of those accepted before the
        ``accepted_before``-th, if given); False if there is none."""
        victim = self._oldest_idle()
        if victim is None or accepted_before is not None and victim.seq >= accepted_before:
            return False
        self._drop(victim, "shed_idle")
        return True

    def _drop(self, sock: TrackedSocket, reason: str) -> None:
        self._fresh.pop(sock, None)
        self._between.pop(sock, None)
        if self.metrics is not None:
            self.metrics.tcp_dropped.labels(reason).inc()
        sock.stream.close()

    def _over_cap(self, what: str) -> None:
        if self.metrics is not None and what != "shed_idle":
            self.metrics.tcp_dropped.labels(what).inc()
        counts = self._cap_log.note(self.clock(), what)
        if counts is not None:
            log.warning("at the connection caps (total %d, per address %s): %d idle connections closed to make "
                        "room, %d refused over the total, %d over the per-address cap, since the last report "
                        "(one line per %g s at most)", self.max_connections,
                        self.max_connections_per_address or "none", counts["shed_idle"], counts["over_total"],
                        counts["over_address"], self._cap_log.interval)

    def sweep(self) -> None:
        """Close connections whose first request header is overdue (the timer's tick)."""
        deadline = self.clock() - self.first_request_timeout
        while self._fresh:
            sock = next(iter(self._fresh))
            if sock.idle_since > deadline:
                return
            self._drop(sock, "first_request_timeout")

    # --- the connection's life -------------------------------------------------------------------
    def start_request(self, server_conn, request_conn):
        delegate = super().start_request(server_conn, request_conn)
        sock = request_conn.stream.socket
        if not isinstance(sock, TrackedSocket) or sock.server is not self:
            return delegate
        if sock.requested:  # a keep-alive connection, waiting for its next request
            sock.idle_since = self.clock()
            self._between[sock] = None
            self.changed()
        return _RequestWatch(delegate, self, sock)

    def _busy(self, sock: TrackedSocket) -> None:
        sock.requested = True
        self._fresh.pop(sock, None)
        self._between.pop(sock, None)

    def on_close(self, server_conn) -> None:
        super().on_close(server_conn)
        # HTTP is done with the connection: closed, or a WebSocket now (never idle).
        sock = server_conn.stream.socket
        if isinstance(sock, TrackedSocket):
            self._fresh.pop(sock, None)
            self._between.pop(sock, None)

    def _closed(self, sock: TrackedSocket) -> None:
        self.connection_count -= 1
        self._fresh.pop(sock, None)
        self._between.pop(sock, None)
        if sock.capped:
            self.per_address[sock.peer] -= 1
            if self.per_address[sock.peer] <= 0:
                del self.per_address[sock.peer]
        self.changed()


__all__ = ["LimitedHTTPServer", "DescriptorBudget", "descriptor_budget", "raise_descriptor_limit", "capped_peer",
           "IDLE_HTTP_CONNECTION_S", "LogThrottle"]

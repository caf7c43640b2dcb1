"""Backend: one ComfyUI server. Its HTTP calls (AsyncHTTPClient), its circuit breaker and
the half-open probe timer.

Requests are built here from scratch: nothing of the client's request (Origin, cookies,
Authorization) ever reaches ComfyUI. A foreign Origin would get a 403 from a loopback
ComfyUI anyway (PROTOCOL.md 2.2).
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlencode, urlsplit

from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import (
    HTTPHeaders,
    HTTPInputError,
    HTTPMessageDelegate,
    RequestStartLine,
)
from tornado.ioloop import PeriodicCallback
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from .breaker import BreakerState, CircuitBreaker
from .capabilities import Capabilities

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


# A refresh of the capabilities after an upstream socket registers again happens at most this
# often (after a ComfyUI restart, every user's socket comes back at once).
REFRESH_MIN_S = 5.0
CAPABILITIES_TIMEOUT_S = 60.0  # a real /object_info: 0.5 MB with the shipped nodes, more with custom ones
MAX_MODEL_FOLDERS = 64

MAX_VIEW_BYTES = 1 << 40  # /view bodies are streamed, never held: no practical size limit


class _ViewReader(HTTPMessageDelegate):
    """Receives one /view response for stream_view."""

    def __init__(self, on_headers, on_chunk):
        self.on_headers = on_headers
        self.on_chunk = on_chunk
        self.code = 0
        self.complete = False
        self.stream = None

    def headers_received(self, start_line, headers) -> None:
        self.code = start_line.code
        self.on_headers(self.code, headers)

    def data_received(self, chunk: bytes):
        if self.code in (200, 206):
            return self._forward(chunk)
        return None

    def finish(self) -> None:
        self.complete = True

    async def _forward(self, chunk: bytes) -> None:
        if not await self.on_chunk(chunk):
            self.stream.close()  # the client is gone or stalled: stop reading from ComfyUI


class ComfyUnavailable(Exception):
    """The call did not reach ComfyUI, or ComfyUI failed (5xx): a countable failure,
    or the breaker is open. ``outcome_unknown`` is True when the request may have been
    processed (a timeout or a connection broken after the request was sent)."""

    def __init__(self, reason: str, *, outcome_unknown: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.outcome_unknown = outcome_unknown


class ComfyFailed(Exception):
    """ComfyUI answered 5xx to this request, but it is up (a probe right after answered): the
    request itself breaks ComfyUI (a poison prompt). Not a breaker failure."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class ComfyRejected(Exception):
    """ComfyUI answered 4xx: the request itself is wrong. Not a breaker failure."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Backend:
    def __init__(self, base_url: str, http_client: AsyncHTTPClient, *, name: str = "default",
                 connect_timeout: float = 5.0, request_timeout: float = 30.0, probe_timeout: float = 2.0,
                 breaker: CircuitBreaker | None = None, clock: Callable[[], float] = time.monotonic,
                 probe_interval_ms: float = 500,  # how often a due probe is looked for
                 weight: float = 1.0, labels: tuple[str, ...] = (), capabilities_refresh_s: float = 300.0):
        self.name = name
        self.weight = weight  # its speed relative to the others, until measured
        self.labels = frozenset(labels)
        # What it can run (None until first learned), refreshed off the request path: at start,
        # when its breaker closes, after an upstream socket registers again, and on a timer.
        self.capabilities: Capabilities | None = None
        self.capability_listeners: list[Callable[["Backend"], None]] = []
        self._refreshing = False
        self._refresh_again = False
        self._refreshed_at: float | None = None
        self._refresh_done = asyncio.Event()  # set whenever a refresh ends (learned or not)
        self._refresh_task: asyncio.Future | None = None
        self._stopped = False
        self._refresh_timer = PeriodicCallback(self.refresh_capabilities, capabilities_refresh_s * 1000)
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self.ws_base = f"{ws_scheme}://{parts.netloc}{parts.path}"
        self.http = http_client
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.probe_timeout = probe_timeout
        self.clock = clock
        self.breaker = breaker or CircuitBreaker()
        self.breaker.listeners.append(self._log_breaker_change)
        # Called with the loop time at which a request that ComfyUI refused was started.
        self.unreachable_listeners: list[Callable[[float], None]] = []
        self._probe_timer = PeriodicCallback(self._maybe_probe, probe_interval_ms)
        self._probe_running = False
        # Loop times of the last upstream WebSocket that failed to open and the last that
        # registered: HTTP can answer while the WebSocket is refused (a proxy in between that
        # does not pass upgrades), and then nobody hears anything.
        self.websocket_failed_at: float | None = None
        self.websocket_up_at: float | None = None
        self._answered: tuple[float, bool] | None = None  # (when, result) of the last readiness check
        self._answering: asyncio.Future | None = None  # the readiness check in flight
        self.inflight = 0  # calls in progress, for graceful shutdown
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._stopped = False
        self._probe_timer.start()
        self._refresh_timer.start()
        self.breaker.listeners.append(self._breaker_moved)
        self.refresh_capabilities()

    def stop(self) -> None:
        self._stopped = True
        self._probe_timer.stop()
        self._refresh_timer.stop()
        if self._refresh_task is not None:
            self._refresh_task.cancel()  # (a read of the capabilities in flight)

    # --- capabilities ----------------------------------------------------------------------
    def _breaker_moved(self, old: BreakerState, new: BreakerState) -> None:
        if new == BreakerState.CLOSED:
            self.refresh_capabilities()  # it was away: it may have come back with other nodes

    def refresh_soon(self) -> None:
        """Read the capabilities again, at most once per REFRESH_MIN_S: an upstream socket
        registered again (after a ComfyUI restart it may have other nodes or models, and every
        user's socket comes back at once), or a job named a file not in its lists."""
        if self._refreshed_at is None or self.clock() - self._refreshed_at >= REFRESH_MIN_S:
            self.refresh_capabilities()

    def refresh_capabilities(self) -> None:
        if self._stopped:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        self._refresh_task = asyncio.ensure_future(self._refresh())
        self._refresh_task.add_done_callback(self._refreshed)

    async def learn_capabilities(self, timeout: float) -> Capabilities | None:
        """The capabilities, read now if they are not known yet (waiting at most ``timeout``)."""
        if self.capabilities is None:
            self._refresh_done.clear()
            self.refresh_capabilities()
            try:
                await asyncio.wait_for(self._refresh_done.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.capabilities

    def _refreshed(self, future: asyncio.Future) -> None:
        self._refreshing = False
        self._refresh_task = None
        self._refresh_done.set()
        if future.cancelled():
            return
        if not future.cancelled() and future.exception() is not None:
            log.error("reading ComfyUI %s's capabilities failed", self.name, exc_info=future.exception())
        if self._refresh_again:
            self._refresh_again = False
            self.refresh_capabilities()

    async def _read(self, path: str, timeout: float | None = None) -> Any:
        """A background read: it tells the breaker nothing either way (like a readiness check)."""
        _, parsed = await self.call("GET", path, timeout=timeout, count_failures=False, observe=False)
        return parsed

    async def _refresh(self) -> None:
        started = self.clock()
        timeout = max(self.request_timeout, CAPABILITIES_TIMEOUT_S)  # (a big /object_info)
        try:
            info = await self._read("/object_info", timeout)
            system = await self._read("/system_stats")
        except (ComfyUnavailable, ComfyRejected) as e:
            log.info("ComfyUI %s's capabilities not read now (%s)", self.name, e)
            return
        models: dict[str, frozenset] = {}
        try:
            folders = await self._read("/models")
            for folder in (folders if isinstance(folders, list) else [])[:MAX_MODEL_FOLDERS]:
                if isinstance(folder, str) and folder:
                    files = await self._read("/models/" + quote(folder, safe=""))
                    models[folder] = frozenset(f for f in files if isinstance(f, str)) \
                        if isinstance(files, list) else frozenset()
        except (ComfyUnavailable, ComfyRejected):
            models = {}  # an older ComfyUI without /models: the list inputs still tell
        if not isinstance(info, dict):
            log.warning("ComfyUI %s answered /object_info with something that is not an object", self.name)
            return
        new = Capabilities(info, models, system if isinstance(system, dict) else {}, self.clock())
        old, self.capabilities = self.capabilities, new
        self._refreshed_at = started  # (a refresh that failed does not hold the next one back)
        if old is None or old.fingerprint != new.fingerprint:
            log.info("ComfyUI %s: %d node classes, %d model files, version %s", self.name, len(new.classes),
                     sum(len(v) for v in models.values()), new.comfyui_version or "?")
        for listener in list(self.capability_listeners):
            listener(self)

    def add_breaker_listener(self, listener: Callable[[BreakerState, BreakerState], None]) -> None:
        self.breaker.listeners.append(listener)

    def _log_breaker_change(self, old: BreakerState, new: BreakerState) -> None:
        log.warning("ComfyUI %s breaker: %s -> %s", self.name, old.value, new.value)

    @property
    def websocket_refused(self) -> bool:
        """The latest upstream WebSocket attempt to this backend failed (none has registered since)."""
        failed = self.websocket_failed_at
        return failed is not None and (self.websocket_up_at is None or self.websocket_up_at < failed)

    @property
    def available(self) -> bool:
        return self.breaker.allow(self.clock())

    def ws_url(self, client_id: str) -> str:
        return f"{self.ws_base}/ws?clientId={quote(client_id)}"

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # --- calls -----------------------------------------------------------------------------
    async def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                   count_failures: bool = True, bypass_breaker: bool = False, observe: bool = True,
                   confirm_5xx: bool = False, raw: tuple[bytes, str] | None = None) -> tuple[int, Any]:
        """One HTTP call to ComfyUI; returns (status, parsed JSON or None).

        Raises ComfyUnavailable (breaker open, connect error, timeout, 5xx) or ComfyRejected (4xx).
        ``observe=False``: the answer tells the breaker nothing (a readiness check).
        ``confirm_5xx``: a 5xx is first checked with a probe; if ComfyUI answers that, the
        request itself was the problem: ComfyFailed, not counted.
        """
        if not bypass_breaker and not self.breaker.allow(self.clock()):
            raise ComfyUnavailable("breaker_open")
        if raw is not None:  # (bytes, content type): a body that is not JSON (an upload)
            data, headers = raw[0], {"Content-Type": raw[1], "Accept": "application/json"}
        else:
            data = json.dumps(body) if body is not None else (b"" if method == "POST" else None)
            headers = JSON_HEADERS
        request = HTTPRequest(
            self.base_url + path, method=method, body=data, headers=headers, connect_timeout=self.connect_timeout,
            request_timeout=timeout or self.request_timeout, follow_redirects=False,
            decompress_response=True)
        self.inflight += 1
        self._idle.clear()
        started = asyncio.get_running_loop().time()
        try:
            response = await self.http.fetch(request, raise_error=False)
        except asyncio.CancelledError:
            raise  # a cancelled call is not a failure of ComfyUI
        except Exception as e:
            # Refused or a connect timeout: the request never reached ComfyUI. A timeout during
            # the request or a connection closed mid-way: it may have been processed.
            self._failed(count_failures)
            certain = isinstance(e, OSError) or "while connecting" in str(e)
            if certain:
                for listener in list(self.unreachable_listeners):
                    listener(started)
            raise ComfyUnavailable(f"{type(e).__name__}: {e}", outcome_unknown=not certain) from None
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        status = response.code
        if status >= 500:
            if confirm_5xx and await self.answers(self.probe_timeout):
                raise ComfyFailed(status)
            self._failed(count_failures and observe)
            raise ComfyUnavailable(f"HTTP {status}")
        parsed = _parse_json(response.body)
        if observe:
            self.breaker.record_success(self.clock())  # ComfyUI answered: it is up
        if status >= 400:
            raise ComfyRejected(status, parsed)
        return status, parsed

    def _failed(self, count: bool) -> None:
        if count:
            self.breaker.record_failure(self.clock())

    async def submit_prompt(self, body: dict) -> dict:
        _, parsed = await self.call("POST", "/prompt", body, confirm_5xx=True)
        return parsed if isinstance(parsed, dict) else {}

    async def upload_input(self, data: bytes, filename: str, subfolder: str, content_type: str) -> None:
        """Put a file in ComfyUI's input folder (POST /upload/image, overwriting a file of that
        name: names are content hashes, so it is the same file)."""
        boundary = "comfy-ws-proxy-" + uuid.uuid4().hex
        parts = []
        for name, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        await self.call("POST", "/upload/image", raw=(b"".join(parts), f"multipart/form-data; boundary={boundary}"))

    async def history(self, prompt_id: str) -> dict:
        _, parsed = await self.call("GET", "/history/" + quote(prompt_id, safe=""))
        return parsed if isinstance(parsed, dict) else {}

    async def queue(self) -> dict:
        _, parsed = await self.call("GET", "/queue")
        return parsed if isinstance(parsed, dict) else {}

    async def interrupt(self, prompt_id: str) -> None:
        # Always with a prompt_id: an empty body interrupts whoever is running (PROTOCOL.md 2.6).
        await self.call("POST", "/interrupt", {"prompt_id": prompt_id})

    async def delete_queued(self, prompt_id: str) -> None:
        await self.call("POST", "/queue", {"delete": [prompt_id]})

    async def stream_view(self, filename: str, subfolder: str, kind: str, request_headers: dict,
                          on_headers: Callable[[int, HTTPHeaders], None],
                          on_chunk: Callable[[bytes], Awaitable[bool]]) -> tuple[int, bool]:
        """GET /view of one output file; returns ComfyUI's status (0: not reached) and
        whether the whole body came. ``request_headers`` are the client's conditional and
        range headers (ComfyUI's aiohttp answers 206, 304 and 416 itself).

        ``on_headers`` gets the status and headers, ``on_chunk`` each piece of a 200 or 206
        body; the next piece is read only once the awaitable it returns is done, so a client
        that reads slowly slows the download instead of filling the proxy's memory. ``on_chunk``
        answering False ends the download: the connection to ComfyUI is closed quietly, which
        AsyncHTTPClient (whose streaming callback may be awaited too) cannot do without raising
        out of its read loop and logging a traceback per departed client.
        """
        parts = urlsplit(self.base_url)
        tls = parts.scheme == "https"
        path = (parts.path or "") + "/view?" + urlencode({"filename": filename, "subfolder": subfolder,
                                                          "type": kind})
        reader = _ViewReader(on_headers, on_chunk)
        try:
            stream = await TCPClient().connect(parts.hostname, parts.port or (443 if tls else 80),
                                               ssl_options=ssl.create_default_context() if tls else None,
                                               timeout=self.connect_timeout)
        except (OSError, TimeoutError, StreamClosedError):
            return 0, False
        reader.stream = stream
        connection = HTTP1Connection(stream, True, HTTP1ConnectionParameters(
            no_keep_alive=True, header_timeout=self.request_timeout, max_body_size=MAX_VIEW_BYTES))
        try:
            connection.write_headers(RequestStartLine("GET", path, "HTTP/1.1"),
                                     HTTPHeaders({**request_headers, "Host": parts.netloc, "Connection": "close"}))
            connection.finish()
            await connection.read_response(reader)
        except (OSError, TimeoutError, StreamClosedError, HTTPInputError):
            pass  # cut short: the caller sees how far it got
        finally:
            stream.close()
        return reader.code, reader.complete

    # --- probing ---------------------------------------------------------------------------
    def _maybe_probe(self) -> None:
        if self._probe_running or not self.breaker.try_begin_probe(self.clock()):
            return
        self._probe_running = True
        asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        try:
            await self.call("GET", "/system_stats", timeout=self.probe_timeout, count_failures=False,
                            bypass_breaker=True)
            ok = True
        except (ComfyUnavailable, ComfyRejected):
            ok = False
        finally:
            self._probe_running = False
        if ok:
            self.breaker.probe_succeeded(self.clock())
        else:
            self.breaker.probe_failed(self.clock())

    async def answers_recently(self, timeout: float, max_age: float) -> bool:
        """``answers()``, reusing an answer younger than ``max_age`` seconds and sharing one
        check among callers that arrive while it runs: /ready may be asked any number of
        times, ComfyUI is asked at most once per ``max_age``."""
        now = self.clock()
        if self._answered is not None and now - self._answered[0] < max_age:
            return self._answered[1]
        if self._answering is None:
            self._answering = asyncio.ensure_future(self.answers(timeout))

            def done(future: asyncio.Future, started=now) -> None:
                self._answering = None
                if not future.cancelled() and future.exception() is None:
                    self._answered = (started, future.result())
            self._answering.add_done_callback(done)
        return await asyncio.shield(self._answering)

    async def answers(self, timeout: float) -> bool:
        """Does ComfyUI answer a cheap GET /prompt? Tells the breaker nothing either way (a
        readiness check must not reset its count of failures)."""
        try:
            await self.call("GET", "/prompt", timeout=timeout, bypass_breaker=True, observe=False)
            return True
        except (ComfyUnavailable, ComfyRejected):
            return False


def _parse_json(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None

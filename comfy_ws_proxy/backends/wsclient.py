"""UpstreamSocket: a lean WebSocket client (RFC 6455) for the upstream sockets to ComfyUI.

Why not ``tornado.websocket.websocket_connect``: a profile of the relay benchmark (README,
"Benchmarks") put Tornado's client path at about half of the proxy's CPU per relayed event:
a coroutine step and a Queue round trip per frame, the IOStream re-registering its socket
with epoll between frames, and a whole HTTP client per connect. Here the socket is an
asyncio BufferedProtocol: each chunk the kernel delivers is parsed in place and every message is
handed to a callback synchronously. A big frame is received into one preallocated buffer
that is passed on as is (one copy of a large preview, not three).

It speaks what ComfyUI's server (aiohttp) speaks: no extensions, no subprotocols, unmasked
server frames. It answers pings, sends its own for liveness, enforces a message size cap,
and does the close handshake (ComfyUI must see the old socket gone before a reconnect
reuses its client id: PROTOCOL.md 3.2).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import struct
from typing import Callable
from urllib.parse import urlsplit

from ..wsframes import (FIN, MASKED, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                       client_frame, close_payload)

log = logging.getLogger(__name__)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_RESPONSE_HEAD = 64 * 1024
LARGE_FRAME = 16 * 1024  # an incomplete frame this big is received into its own buffer
CLOSE_TIMEOUT = 5.0  # wait this long for the server's close frame, then drop the TCP connection


class HandshakeError(Exception):
    """The server did not accept the upgrade (``status`` is its HTTP status, if any)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# One receive buffer shared by every socket: asyncio calls get_buffer(), recv_into() and
# buffer_updated() back to back on the loop's thread. (With a plain Protocol asyncio
# allocates 256 KiB for every recv, which costs more than the recv itself.)
_SCRATCH = memoryview(bytearray(64 * 1024))


class UpstreamSocket(asyncio.BufferedProtocol):
    def __init__(self, *, key: bytes, request: bytes, on_text: Callable[[str], None],
                 on_binary: Callable[[bytes | bytearray], None], max_message_size: int,
                 ping_interval: float | None):
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        self.on_text = on_text
        self.on_binary = on_binary
        self.max_message_size = max_message_size
        self.opened = self._loop.create_future()  # the 101 answer was checked
        self.opened.add_done_callback(_mark_retrieved)
        self.closed = self._loop.create_future()  # the TCP connection is gone; result: close code
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self._head = bytearray()  # the HTTP answer, until its end
        self._tail = b""  # an incomplete small frame
        self._desynced = False  # a protocol error: nothing more is read
        self._large: bytearray | None = None  # a big frame's payload, being filled
        self._large_filled = 0
        self._large_first = 0  # that frame's first header byte
        self._fragments: list | None = None
        self._fragment_first = 0
        self._fragment_size = 0
        self._closing = False  # we sent a close frame (or are about to drop the connection)
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_interval = ping_interval
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._received_at = self._loop.time()

    # --- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc) -> None:
        for timer in (self._ping_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._close_timer = None
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"connection closed during the handshake: {exc or 'EOF'}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:  # a big frame is received straight into its own buffer
            return memoryview(self._large)[self._large_filled:]
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._received_at = self._loop.time()
            self._fill_large(b"", nbytes)
            return
        self.data_received(bytes(_SCRATCH[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._desynced:
            return
        if not self.opened.done():
            data = self._handshake(data)
            if not data:
                return
        self._received_at = self._loop.time()
        if self._large is not None:
            data = self._fill_large(data)
        if self._tail:
            data, self._tail = self._tail + data, b""
        while data:
            used = self._parse(data)
            data = data[used:]
            if self._large is not None:
                data = self._fill_large(data)
            elif data:
                self._tail = data  # an incomplete frame: wait for the rest
                return

    # --- the handshake ---------------------------------------------------------------------------
    def _handshake(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_RESPONSE_HEAD:
                self._fail(HandshakeError("the upgrade answer is too large"))
            return b""
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
        self._head = bytearray()
        error = self._check_answer(head.decode("latin-1"))
        if error is not None:
            self._fail(error)
            return b""
        self.opened.set_result(None)
        if self._ping_interval:
            self._ping_timer = self._loop.call_later(self._ping_interval, self._ping)
        return rest

    def _check_answer(self, head: str) -> HandshakeError | None:
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return HandshakeError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        if status != 101:
            return HandshakeError(f"upgrade refused: HTTP {status}", status)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("upgrade", "").lower() != "websocket":
            return HandshakeError("upgrade answer without 'Upgrade: websocket'", status)
        if headers.get("sec-websocket-accept") != self._accept:
            return HandshakeError("wrong Sec-WebSocket-Accept", status)
        if headers.get("sec-websocket-extensions"):
            return HandshakeError("the server asked for an extension we did not offer", status)
        return None

    def _fail(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        self.abort()

    # --- frames in -------------------------------------------------------------------------------
    def _parse(self, data: bytes) -> int:
        """Handle the complete frames at the start of ``data``; return the bytes used. A big
        incomplete frame is moved into its own buffer (``self._large``) and counts as used."""
        pos, n = 0, len(data)
        while n - pos >= 2:
            first, second = data[pos], data[pos + 1]
            if second & MASKED or first & 0x70:  # masked by the server, or RSV bits without an extension
                self._protocol_error(1002, "invalid frame from the server")
                return n
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", data, pos + 2)
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", data, pos + 2)
                start = pos + 10
            if length > self.max_message_size:
                self._protocol_error(1009, "message too big")
                return n
            end = start + length
            if end > n:
                if length >= LARGE_FRAME:
                    self._large = bytearray(length)
                    self._large[:n - start] = memoryview(data)[start:]
                    self._large_filled = n - start
                    self._large_first = first
                    return n
                break
            self._frame(first, data[start:end])
            pos = end
        return pos

    def _fill_large(self, data: bytes, received: int = 0) -> bytes:
        """Add ``data`` (or ``received`` bytes recv'd in place) to the big frame; return the rest."""
        large = self._large
        take = min(len(large) - self._large_filled, len(data))
        large[self._large_filled:self._large_filled + take] = memoryview(data)[:take]
        self._large_filled += take + received
        if self._large_filled == len(large):
            self._large = None
            self._frame(self._large_first, large)
        return data[take:]

    def _frame(self, first: int, payload: bytes | bytearray) -> None:
        opcode = first & 0x0F
        if opcode >= 0x8:
            self._control(opcode, first & FIN, payload)
            return
        if self._closing:
            return  # we are leaving: nothing more is delivered from this socket
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                self._protocol_error(1002, "continuation without a first fragment")
                return
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if self._fragment_size > self.max_message_size:
                self._protocol_error(1009, "message too big")
                return
            if not first & FIN:
                return
            opcode = self._fragment_first & 0x0F
            payload, self._fragments = b"".join(self._fragments), None
        elif self._fragments is not None:
            self._protocol_error(1002, "a new message inside a fragmented one")
            return
        elif not first & FIN:
            self._fragments, self._fragment_first, self._fragment_size = [payload], first, len(payload)
            return
        if opcode == OP_TEXT:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                self._protocol_error(1007, "text that is not UTF-8")
                return
            self.on_text(text)
        elif opcode == OP_BINARY:
            self.on_binary(payload)
        else:
            self._protocol_error(1002, f"unknown opcode {opcode}")

    def _control(self, opcode: int, fin: int, payload: bytes) -> None:
        if not fin or len(payload) > 125:
            self._protocol_error(1002, "invalid control frame")
        elif opcode == OP_PING:
            self._send(OP_PONG, bytes(payload))
        elif opcode == OP_PONG:
            self._ping_sent_at = None
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
            if not self._closing:
                self._send(OP_CLOSE, bytes(payload[:2]))
                self._closing = True
            if self.transport is not None:
                self.transport.close()  # the handshake is complete: flush and hang up
        else:
            self._protocol_error(1002, f"unknown control opcode {opcode}")

    def _protocol_error(self, code: int, why: str) -> None:
        """The stream is out of step (what follows may be the rest of a refused frame, read as
        frames it would be garbage): say why, and hang up without reading any more."""
        log.warning("upstream WebSocket protocol error (%d): %s", code, why)
        self._fragments = self._large = None
        self._desynced = True
        self.close(code, why)
        if self.transport is not None:
            self.transport.close()  # (our close frame is flushed first)

    # --- frames out ------------------------------------------------------------------------------
    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload, os.urandom(4)))

    def send_text(self, text: str) -> None:
        if not self._closing:
            self._send(OP_TEXT, text.encode("utf-8"))

    def _ping(self) -> None:
        self._ping_timer = None
        if self._closing or self.transport is None:
            return
        if self._ping_sent_at is not None and self._received_at < self._ping_sent_at:
            log.info("upstream WebSocket silent for %.0f s after a ping: dropping it",
                     self._loop.time() - self._ping_sent_at)
            self.abort()
            return
        self._ping_sent_at = self._loop.time()
        self._send(OP_PING, b"")
        self._ping_timer = self._loop.call_later(self._ping_interval, self._ping)

    # --- closing ---------------------------------------------------------------------------------
    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; the connection is dropped if the server does not answer."""
        if self.transport is None or self.closed.done():
            return
        if not self.opened.done():
            self._fail(HandshakeError("closed during the handshake"))
            return
        if not self._closing:
            self._closing = True
            self._send(OP_CLOSE, close_payload(code, reason))
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> int | None:
        return await asyncio.shield(self.closed)


async def connect(url: str, *, on_text: Callable[[str], None], on_binary: Callable[[bytes | bytearray], None],
                  max_message_size: int, ping_interval: float | None, timeout: float) -> UpstreamSocket:
    """Open ``ws://`` or ``wss://`` ``url``; raises OSError, HandshakeError or TimeoutError."""
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" + (f":{parts.port}" if parts.port else "")
    key = base64.b64encode(os.urandom(16))
    # No Origin header: a loopback ComfyUI answers a foreign Origin with 403.
    request = (f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("latin-1")
    sock = UpstreamSocket(key=key, request=request, on_text=on_text, on_binary=on_binary,
                          max_message_size=max_message_size, ping_interval=ping_interval)
    loop = asyncio.get_running_loop()

    async def open_and_upgrade() -> None:
        await loop.create_connection(lambda: sock, host, port,
                                     ssl=ssl.create_default_context() if secure else None)
        await sock.opened

    try:
        await asyncio.wait_for(open_and_upgrade(), timeout)
    except BaseException:
        sock.abort()  # a timeout or a cancel mid-handshake must not leave the socket open
        raise
    return sock


def _mark_retrieved(future: asyncio.Future) -> None:
    # The handshake can fail after its waiter gave up (a timeout): not an unretrieved error.
    if not future.cancelled():
        future.exception()

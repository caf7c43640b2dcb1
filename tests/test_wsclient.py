"""The upstream WebSocket client (wsclient): against Tornado's server for the normal paths,
and against a raw TCP server that writes hand-made frames for the malformed ones."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler

from comfy_ws_proxy.backends import wsclient
from comfy_ws_proxy.wsframes import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT

TIMEOUT = 10


class Received:
    def __init__(self):
        self.items: list = []
        self.changed = asyncio.Event()

    def __call__(self, message) -> None:
        self.items.append(message)
        self.changed.set()

    async def count(self, n: int) -> list:
        async def wait():
            while len(self.items) < n:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), TIMEOUT)
        return self.items


async def open_client(url: str, received: Received, **kw) -> wsclient.UpstreamSocket:
    options = {"max_message_size": 64 * 1024 * 1024, "ping_interval": None, "timeout": TIMEOUT, **kw}
    return await wsclient.connect(url, on_text=received, on_binary=received, **options)


class Echo(WebSocketHandler):
    """Echoes text, answers 'big:N' with N binary bytes, 'close' with a close frame."""

    def open(self):
        self.write_message("hello " + self.get_query_argument("clientId", ""))

    def on_message(self, message):
        if message.startswith("big:"):
            n = int(message[4:])
            self.write_message(bytes(i % 251 for i in range(n)), binary=True)
        elif message == "close":
            self.close(4321, "bye")
        else:
            self.write_message("echo " + message)


async def tornado_server():
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([("/ws", Echo)], websocket_max_message_size=64 * 1024 * 1024))
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


async def test_text_binary_large_frames_and_the_close_handshake(io_loop):
    server, port = await tornado_server()
    got = Received()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws?clientId=abc", got)
    assert (await got.count(1))[0] == "hello abc"
    sock.send_text("héllo")
    assert (await got.count(2))[1] == "echo héllo"
    size = 3 * 1024 * 1024 + 17  # arrives in many chunks: received into one buffer
    sock.send_text(f"big:{size}")
    frame = (await got.count(3))[2]
    assert len(frame) == size and bytes(frame[:5]) == bytes([0, 1, 2, 3, 4]) and frame[-1] == (size - 1) % 251
    sock.send_text("after the big one")
    assert (await got.count(4))[3] == "echo after the big one"
    sock.send_text("close")  # the server closes: we answer and the connection ends
    assert await asyncio.wait_for(sock.wait_closed(), TIMEOUT) == 4321
    server.stop()


async def test_our_close_is_answered_and_a_refused_upgrade_raises(io_loop):
    server, port = await tornado_server()
    got = Received()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws", got)
    await got.count(1)
    sock.close(1000, "done")
    assert await asyncio.wait_for(sock.wait_closed(), TIMEOUT) == 1000  # the server echoed our code
    with pytest.raises(wsclient.HandshakeError) as refused:
        await open_client(f"ws://127.0.0.1:{port}/nope", got)
    assert refused.value.status == 404
    server.stop()
    with pytest.raises(OSError):
        await open_client(f"ws://127.0.0.1:{port}/ws", got)  # nobody listening


class RawServer:
    """Accepts one upgrade, then writes the given bytes; records what the client sent."""

    def __init__(self, frames: bytes, accept: str | None = None):
        self.frames = frames
        self.accept = accept
        self.from_client = bytearray()
        self.client_closed = asyncio.get_running_loop().create_future()
        self.got_data = asyncio.Event()

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")][0]
        accept = self.accept or base64.b64encode(hashlib.sha1(key + wsclient._GUID).digest()).decode()
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode() + self.frames)
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            self.from_client += chunk
            self.got_data.set()
        writer.close()
        self.client_closed.set_result(True)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def client_frames(self) -> list[tuple[int, bytes]]:
        """Unmask what the client sent: [(opcode, payload)]."""
        out, data, pos = [], bytes(self.from_client), 0
        while pos + 6 <= len(data):
            opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
            assert data[pos + 1] & 0x80, "client frames must be masked"
            pos += 2
            if length == 126:
                (length,) = struct.unpack_from("!H", data, pos)
                pos += 2
            mask = data[pos:pos + 4]
            pos += 4
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[pos:pos + length]))
            out.append((opcode, payload))
            pos += length
        return out


def server_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if masked:
        return bytes([first, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
    if len(payload) < 126:
        return bytes([first, len(payload)]) + payload
    if len(payload) < 65536:
        return bytes([first, 126]) + struct.pack("!H", len(payload)) + payload
    return bytes([first, 127]) + struct.pack("!Q", len(payload)) + payload


async def test_fragments_are_joined_and_pings_answered(io_loop):
    frames = (server_frame(OP_TEXT, b"frag", fin=False) + server_frame(OP_PING, b"p1")
              + server_frame(OP_CONTINUATION, b"men", fin=False) + server_frame(OP_CONTINUATION, b"ted")
              + server_frame(OP_BINARY, b"\x00\x00\x00\x01xy") + server_frame(OP_CLOSE, struct.pack("!H", 1000)))
    raw = RawServer(frames)
    port = await raw.start()
    got = Received()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws", got)
    assert await got.count(2) == ["fragmented", b"\x00\x00\x00\x01xy"]
    assert await asyncio.wait_for(sock.wait_closed(), TIMEOUT) == 1000
    await asyncio.wait_for(raw.client_closed, TIMEOUT)
    sent = raw.client_frames()
    assert (0xA, b"p1") in sent  # the pong, with the ping's payload
    assert sent[-1] == (OP_CLOSE, struct.pack("!H", 1000))  # the close was answered
    raw.server.close()


@pytest.mark.parametrize("frames, code", [
    (server_frame(OP_TEXT, b"masked", masked=True), 1002),
    (bytes([0x80 | 0x40 | OP_TEXT, 1]) + b"x", 1002),  # RSV1 without an extension
    (server_frame(OP_TEXT, b"\xff\xfe not utf-8"), 1007),
    (server_frame(OP_CONTINUATION, b"orphan"), 1002),
    (server_frame(OP_TEXT, b"x" * 200), 1009),  # over the size cap given below
    (server_frame(OP_PING, b"x" * 10, fin=False), 1002),
])
async def test_a_malformed_server_frame_closes_with_the_right_code(io_loop, frames, code):
    raw = RawServer(frames + server_frame(OP_TEXT, b"never delivered"))
    port = await raw.start()
    got = Received()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws", got, max_message_size=100)
    # Our close frame goes out; the raw server never answers it (the client would hang up
    # after CLOSE_TIMEOUT): abort here instead of waiting.
    await asyncio.wait_for(_sent_close(raw), TIMEOUT)
    sock.abort()
    await asyncio.wait_for(sock.wait_closed(), TIMEOUT)
    assert got.items == []
    assert raw.client_frames()[-1][0] == OP_CLOSE
    assert struct.unpack("!H", raw.client_frames()[-1][1][:2])[0] == code
    raw.server.close()


async def _sent_close(raw: RawServer) -> None:
    while not any(op == OP_CLOSE for op, _ in raw.client_frames()):
        raw.got_data.clear()
        await raw.got_data.wait()


async def test_a_wrong_accept_key_is_refused(io_loop):
    raw = RawServer(b"", accept=base64.b64encode(os.urandom(20)).decode())
    port = await raw.start()
    with pytest.raises(wsclient.HandshakeError, match="Accept"):
        await open_client(f"ws://127.0.0.1:{port}/ws", Received())
    await asyncio.wait_for(raw.client_closed, TIMEOUT)
    raw.server.close()


async def test_a_server_that_stops_answering_pings_is_dropped(io_loop):
    raw = RawServer(b"")  # upgrades, then never sends a byte
    port = await raw.start()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws", Received(), ping_interval=0.05)
    await asyncio.wait_for(sock.wait_closed(), TIMEOUT)  # ping, silence for an interval: gone
    assert raw.client_frames()[0] == (OP_PING, b"")
    raw.server.close()


async def test_after_an_oversized_frame_nothing_more_is_parsed(io_loop, caplog):
    """Issue 15 ('smaller'): after closing with 1009 the client went on parsing the rest of the
    refused frame as frames (422 warnings for one frame). One warning, one close, hang up."""
    refused = server_frame(OP_BINARY, bytes(range(256)) * 8192)  # 2 MiB over the cap, full of byte patterns
    raw = RawServer(refused + server_frame(OP_TEXT, b"after"))
    port = await raw.start()
    got = Received()
    sock = await open_client(f"ws://127.0.0.1:{port}/ws", got, max_message_size=1000)
    await asyncio.wait_for(sock.wait_closed(), TIMEOUT)  # (it hangs up by itself)
    assert got.items == []
    warnings = [r for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(warnings) == 1 and "(1009)" in warnings[0].getMessage()
    assert raw.client_frames()[-1] == (OP_CLOSE, struct.pack("!H", 1009) + b"message too big")
    raw.server.close()

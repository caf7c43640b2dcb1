"""RFC 6455 framing: the few lines both hot paths need.

The upstream client (``wsclient``) parses and writes frames itself, and ClientConnection
writes its frames straight to the client's IOStream (see ``connection.py`` for why).
"""
from __future__ import annotations

import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

FIN = 0x80
MASKED = 0x80


def frame_header(opcode: int, length: int, mask: bytes | None = None) -> bytes:
    """The header of a final (unfragmented) frame; with ``mask``, a client frame."""
    bit = MASKED if mask is not None else 0
    if length < 126:
        header = struct.pack("!BB", FIN | opcode, bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", FIN | opcode, bit | 126, length)
    else:
        header = struct.pack("!BBQ", FIN | opcode, bit | 127, length)
    return header + mask if mask is not None else header


def apply_mask(mask: bytes, data: bytes) -> bytes:
    """XOR ``data`` with the 4-byte mask (as one big integer: fast for the small frames a
    client sends; the proxy never sends large frames upstream)."""
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    return frame_header(opcode, len(payload), mask) + apply_mask(mask, payload)


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")[:120]

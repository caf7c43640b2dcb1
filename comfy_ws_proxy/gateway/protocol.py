"""The client protocol (v1): message parsing and validation, close codes, encoding.

Client -> proxy: JSON text frames ``{"type": ..., "data": {...}}``.
Proxy -> client: JSON text frames with a ``seq``, and ComfyUI's binary frames unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..jobs.submission import parse_submit
from ..model import ErrorCode, RequestError, SubmitRequest

SUBPROTOCOL = "comfy-ws-proxy.v1"


class CloseCode:
    """Close codes sent to clients. 1005/1006/1015 are never sent (illegal on the wire)."""
    NORMAL = 1000
    GOING_AWAY = 1001          # the proxy is shutting down
    UNSUPPORTED_DATA = 1003    # a binary frame from a client
    INVALID_PAYLOAD = 1007     # text that is not UTF-8 (Tornado closes with it)
    MESSAGE_TOO_BIG = 1009     # over the hard frame cap (Tornado closes with it)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    TOKEN_EXPIRED = 4001
    UNAUTHENTICATED = 4003
    TOO_MANY_CONNECTIONS = 4008
    SLOW_CONSUMER = 4009
    SESSION_EXPIRED = 4010


@dataclass(frozen=True)
class Cancel:
    prompt_id: str


@dataclass(frozen=True)
class Resume:
    session_id: str
    last_seq: int


@dataclass(frozen=True)
class Ping:
    data: Any


MAX_SEQ = 2 ** 53  # JSON-safe integer bound


def _reject_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_client_message(text: str | bytes, *, max_prompt_nodes: int,
                         node_allowlist: tuple[str, ...] = ()) -> SubmitRequest | Cancel | Resume | Ping:
    """Validate one client frame. Raises RequestError with a stable code."""
    if isinstance(text, bytes):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "Binary frames are not accepted; send JSON text")
    try:
        message = json.loads(text, parse_constant=_reject_constants)
    except RecursionError:
        raise RequestError(ErrorCode.INVALID_MESSAGE, "Message is nested too deeply") from None
    except ValueError as e:
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"Message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "Message must be a JSON object")
    kind = message.get("type")
    data = message.get("data", {})
    if not isinstance(kind, str):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "Message needs a string 'type'")
    if data is None:
        data = {}
    if kind == "ping":
        return Ping(data)
    if not isinstance(data, dict):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"'{kind}' needs an object 'data'")
    if kind == "submit_prompt":
        return parse_submit(data, max_prompt_nodes, node_allowlist)
    if kind == "cancel":
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "cancel needs a string 'prompt_id'")
        return Cancel(prompt_id)
    if kind == "resume":
        session_id = data.get("session_id")
        last_seq = data.get("last_seq")
        if not isinstance(session_id, str) or not session_id:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "resume needs a string 'session_id'")
        if isinstance(last_seq, bool) or not isinstance(last_seq, int) or not 0 <= last_seq <= MAX_SEQ:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "resume needs an integer 'last_seq' >= 0")
        return Resume(session_id, last_seq)
    raise RequestError(ErrorCode.INVALID_MESSAGE, f"Unknown message type {kind[:64]!r}")


# --- outgoing --------------------------------------------------------------------------------

def encode(kind: str, data: Any, seq: int) -> str:
    """A proxy message as sent to a client."""
    return json.dumps({"type": kind, "data": data, "seq": seq}, separators=(",", ":"))


def with_seq(upstream_text: str, seq: int) -> str:
    """Add ``seq`` to a ComfyUI JSON message without re-encoding it (type and data unchanged)."""
    return '{"seq":%d,%s' % (seq, upstream_text.lstrip()[1:])

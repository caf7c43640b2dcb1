"""The client protocol (v1): message parsing and validation, error codes, close codes,
and the few bytes of ComfyUI's binary frame headers the proxy reads to route them.

Client -> proxy: JSON text frames ``{"type": ..., "data": {...}}``.
Proxy -> client: JSON text frames with a ``seq``, and ComfyUI's binary frames unchanged.
"""
from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

SUBPROTOCOL = "comfy-ws-proxy.v1"
BEARER_PREFIX = "bearer."


class ErrorCode:
    UNAUTHORIZED = "unauthorized"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    COMFY_UNAVAILABLE = "comfy_unavailable"
    QUEUE_FULL = "queue_full"
    INVALID_MESSAGE = "invalid_message"
    INVALID_PROMPT = "invalid_prompt"
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    INTERNAL_ERROR = "internal_error"


# The wording operators already know from other proxies of this kind.
MESSAGES = {
    ErrorCode.TOO_MANY_CONNECTIONS: "Maximum connections per user exceeded",
    ErrorCode.COMFY_UNAVAILABLE: "ComfyUI is temporarily unavailable",
    ErrorCode.QUEUE_FULL: "Queue full",
    ErrorCode.RATE_LIMITED: "Too many prompts, slow down",
    ErrorCode.MESSAGE_TOO_LARGE: "Message too large",
    ErrorCode.NOT_FOUND: "No such prompt",
    ErrorCode.INTERNAL_ERROR: "Internal error",
}


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


class ProtocolError(Exception):
    """A client message that cannot be processed: becomes an ``error`` message."""

    def __init__(self, code: str, message: str | None = None, details: Any = None,
                 prompt_id: str | None = None):
        super().__init__(message or MESSAGES.get(code, code))
        self.code = code
        self.message = message or MESSAGES.get(code, code)
        self.details = details
        self.prompt_id = prompt_id

    def to_data(self) -> dict:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            data["details"] = self.details
        if self.prompt_id is not None:
            data["prompt_id"] = self.prompt_id
        return data


def error_data(code: str, message: str | None = None, **extra: Any) -> dict:
    data = {"code": code, "message": message or MESSAGES.get(code, code)}
    data.update({k: v for k, v in extra.items() if v is not None})
    return data


# --- client messages -------------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitPrompt:
    prompt: dict
    prompt_id: str | None
    extra_data: dict | None
    partial_execution_targets: list | None
    front: bool


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


def is_canonical_uuid(value: Any) -> bool:
    """A lowercase hyphenated UUID, the only prompt_id form newer ComfyUI accepts."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _reject_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_client_message(text: str | bytes, *, max_prompt_nodes: int,
                         node_allowlist: tuple[str, ...] = ()) -> SubmitPrompt | Cancel | Resume | Ping:
    """Validate one client frame. Raises ProtocolError with a stable code."""
    if isinstance(text, bytes):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Binary frames are not accepted; send JSON text")
    try:
        message = json.loads(text, parse_constant=_reject_constants)
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message is nested too deeply") from None
    except ValueError as e:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"Message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message must be a JSON object")
    kind = message.get("type")
    data = message.get("data", {})
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message needs a string 'type'")
    if data is None:
        data = {}
    if kind == "ping":
        return Ping(data)
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{kind}' needs an object 'data'")
    if kind == "submit_prompt":
        return _parse_submit(data, max_prompt_nodes, node_allowlist)
    if kind == "cancel":
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "cancel needs a string 'prompt_id'")
        return Cancel(prompt_id)
    if kind == "resume":
        session_id = data.get("session_id")
        last_seq = data.get("last_seq")
        if not isinstance(session_id, str) or not session_id:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "resume needs a string 'session_id'")
        if isinstance(last_seq, bool) or not isinstance(last_seq, int) or not 0 <= last_seq <= MAX_SEQ:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "resume needs an integer 'last_seq' >= 0")
        return Resume(session_id, last_seq)
    raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"Unknown message type {kind[:64]!r}")


def _parse_submit(data: dict, max_prompt_nodes: int, node_allowlist: tuple[str, ...]) -> SubmitPrompt:
    prompt = data.get("prompt")
    if not isinstance(prompt, dict) or not prompt:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "submit_prompt needs a non-empty object 'prompt'")
    if len(prompt) > max_prompt_nodes:
        raise ProtocolError(ErrorCode.INVALID_PROMPT,
                            f"Prompt has {len(prompt)} nodes; the limit is {max_prompt_nodes}",
                            details={"limit": max_prompt_nodes, "nodes": len(prompt)})
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise ProtocolError(ErrorCode.INVALID_PROMPT, f"Node {node_id[:64]!r} must be an object")
        if node_allowlist:
            class_type = node.get("class_type")
            if class_type not in node_allowlist:
                raise ProtocolError(ErrorCode.INVALID_PROMPT,
                                    f"Node type {str(class_type)[:64]!r} is not allowed here",
                                    details={"node_id": node_id[:64]})
    prompt_id = data.get("prompt_id")
    if prompt_id is not None and not is_canonical_uuid(prompt_id):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "prompt_id must be a lowercase hyphenated UUID")
    extra_data = data.get("extra_data")
    if extra_data is not None and not isinstance(extra_data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "extra_data must be an object")
    targets = data.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "partial_execution_targets must be a list of node ids")
    front = data.get("front", False)
    if not isinstance(front, bool):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "front must be true or false")
    return SubmitPrompt(prompt, prompt_id, extra_data, targets, front)


# --- outgoing --------------------------------------------------------------------------------

def encode(kind: str, data: Any, seq: int) -> str:
    """A proxy message as sent to a client."""
    return json.dumps({"type": kind, "data": data, "seq": seq}, separators=(",", ":"))


def with_seq(upstream_text: str, seq: int) -> str:
    """Add ``seq`` to a ComfyUI JSON message without re-encoding it (type and data unchanged)."""
    return '{"seq":%d,%s' % (seq, upstream_text.lstrip()[1:])


# --- ComfyUI binary frames -------------------------------------------------------------------

BINARY_PREVIEW_IMAGE = 1
BINARY_TEXT = 3
BINARY_PREVIEW_WITH_METADATA = 4


def binary_event_type(frame: bytes) -> int | None:
    if len(frame) < 4:
        return None
    return struct.unpack_from(">I", frame, 0)[0]


def preview_metadata(frame: bytes, max_len: int = 64 * 1024) -> dict | None:
    """The JSON metadata of a type-4 preview, read from its header only (not the image)."""
    if len(frame) < 8:
        return None
    (length,) = struct.unpack_from(">I", frame, 4)
    if length > max_len or 8 + length > len(frame):
        return None
    try:
        meta = json.loads(bytes(frame[8:8 + length]))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None

"""The client protocol (v1): message parsing and validation, close codes, encoding.

Client -> proxy: JSON text frames ``{"type": ..., "data": {...}}``.
Proxy -> client: JSON text frames with a ``seq``, and ComfyUI's binary frames unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..model import ErrorCode, RequestError, SubmitRequest, is_canonical_uuid

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
MAX_TIMEOUT_S = 7 * 24 * 3600  # a job's own time limit: a week at most


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
        return _parse_submit(data, max_prompt_nodes, node_allowlist)
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


def _parse_submit(data: dict, max_prompt_nodes: int, node_allowlist: tuple[str, ...]) -> SubmitRequest:
    prompt = data.get("prompt")
    if not isinstance(prompt, dict) or not prompt:
        raise RequestError(ErrorCode.INVALID_MESSAGE, "submit_prompt needs a non-empty object 'prompt'")
    if len(prompt) > max_prompt_nodes:
        raise RequestError(ErrorCode.INVALID_PROMPT,
                            f"Prompt has {len(prompt)} nodes; the limit is {max_prompt_nodes}",
                            details={"limit": max_prompt_nodes, "nodes": len(prompt)})
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise RequestError(ErrorCode.INVALID_PROMPT, f"Node {node_id[:64]!r} must be an object")
        if node_allowlist:
            class_type = node.get("class_type")
            if class_type not in node_allowlist:
                raise RequestError(ErrorCode.INVALID_PROMPT,
                                    f"Node type {str(class_type)[:64]!r} is not allowed here",
                                    details={"node_id": node_id[:64]})
    prompt_id = data.get("prompt_id")
    if prompt_id is not None and not is_canonical_uuid(prompt_id):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "prompt_id must be a lowercase hyphenated UUID")
    extra_data = data.get("extra_data")
    if extra_data is not None and not isinstance(extra_data, dict):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "extra_data must be an object")
    targets = data.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "partial_execution_targets must be a list of node ids")
    front = data.get("front", False)
    if not isinstance(front, bool):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "front must be true or false")
    timeout_s = data.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s <= MAX_TIMEOUT_S):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return SubmitRequest(prompt, prompt_id, extra_data, targets, front,
                         float(timeout_s) if timeout_s is not None else None)


# --- outgoing --------------------------------------------------------------------------------

def encode(kind: str, data: Any, seq: int) -> str:
    """A proxy message as sent to a client."""
    return json.dumps({"type": kind, "data": data, "seq": seq}, separators=(",", ":"))


def with_seq(upstream_text: str, seq: int) -> str:
    """Add ``seq`` to a ComfyUI JSON message without re-encoding it (type and data unchanged)."""
    return '{"seq":%d,%s' % (seq, upstream_text.lstrip()[1:])

"""The client protocol (v1): message parsing and validation, close codes, encoding.

Client -> proxy: JSON text frames ``{"type": ..., "ref"?: ..., "data": {...}}``.
Proxy -> client: JSON text frames with a ``seq``, and ComfyUI's binary frames unchanged.

Every client message is answered once, on the connection that sent it, and the answer
carries the message's ``ref`` (a short string or an integer the client chose) when it had
one: ``prompt_accepted`` / ``error`` / ``prompt_cancelled`` for a ``submit_prompt``,
``prompt_cancelled`` / ``cancel_accepted`` / ``error`` for a ``cancel``, ``pong`` for a
``ping``, ``prompts_state`` for a ``resume``, ``token_refreshed`` / ``error`` for a
``refresh_token``. A message that cannot be read whole (over MAX_MESSAGE_BYTES, or not
JSON) is answered with what its first SCAN_CHARS characters say (``scan_prefix``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from ..jobs.submission import parse_submit
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


@dataclass(frozen=True)
class RefreshToken:
    token: str


Body = Union[SubmitRequest, Cancel, Resume, Ping, RefreshToken]
Ref = Union[str, int]


@dataclass(frozen=True)
class Request:
    """One client message: what it asks, and the ref its answer echoes."""
    body: Body
    ref: Ref | None = None


class MessageError(RequestError):
    """A client message refused as it was read, with what its answer can echo (``ref``,
    ``prompt_id``: whatever could be read of it)."""

    def __init__(self, code: str, message: str | None = None, details: Any = None, prompt_id: str | None = None,
                 ref: Ref | None = None):
        super().__init__(code, message, details, prompt_id)
        self.ref = ref


MAX_SEQ = 2 ** 53  # JSON-safe integer bound
MAX_REF_LENGTH = 64  # characters of a string ref
MAX_TOKEN_CHARS = 8192  # a refresh_token's token (the verifier refuses longer ones too)
SCAN_CHARS = 1024  # of a message that cannot be parsed whole, what is read for its ref and prompt id


def valid_ref(value: Any) -> bool:
    """A ref is an integer of at most 2**53 in magnitude, or a string of 1 to 64 characters
    without control characters (it may be shown in a log or a page)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_SEQ <= value <= MAX_SEQ
    if isinstance(value, str):
        return 0 < len(value) <= MAX_REF_LENGTH and not any(ord(c) < 32 or ord(c) == 127 for c in value)
    return False


def _reject_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constants)
_WHITESPACE = " \t\n\r"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _scan_object(text: str, i: int, into: dict, nested: bool) -> None:
    """Read the scalar members of the object at ``i`` into ``into``, until its first member
    whose value is an object or a list (then, once, descend into ``data``). Raises
    ValueError or IndexError where the text stops making sense."""
    if text[i] != "{":
        return
    i = _skip(text, i + 1)
    while text[i] != "}":
        key, i = _decoder.raw_decode(text, i)
        i = _skip(text, i)
        if not isinstance(key, str) or text[i] != ":":
            return
        i = _skip(text, i + 1)
        if text[i] in "{[":
            if key == "data" and text[i] == "{" and not nested:
                into["data"] = {}
                _scan_object(text, i, into["data"], True)
            return
        value, i = _decoder.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] not in ",}":  # (a number cut off by the prefix's end is not taken)
            return
        into[key] = value
        if text[i] == ",":
            i = _skip(text, i + 1)


def scan_prefix(text: str | bytes) -> dict:
    """What can be read of a message that cannot be parsed whole (too large, or not valid
    JSON), from its first SCAN_CHARS characters only: the top-level members that come before
    the first nested value, and likewise those of its ``data``. Never raises.

    ``{"type": "submit_prompt", "ref": 7, "data": {"prompt_id": "...", "prompt": {...`` gives
    ``{"type": "submit_prompt", "ref": 7, "data": {"prompt_id": "..."}}``; a ``ref`` after
    ``data`` is not seen."""
    if not isinstance(text, str):
        return {}
    found: dict = {}
    head = text[:SCAN_CHARS]
    try:
        _scan_object(head, _skip(head, 0), found, False)
    except (ValueError, IndexError, RecursionError):
        pass
    return found


def _echo(fields: dict) -> tuple[Ref | None, str | None]:
    """(ref, prompt_id) of a message's fields, each only if it is well-formed."""
    ref = fields.get("ref")
    data = fields.get("data")
    prompt_id = data.get("prompt_id") if isinstance(data, dict) and fields.get("type") in (
        "submit_prompt", "cancel") else None
    return (ref if valid_ref(ref) else None), (prompt_id if is_canonical_uuid(prompt_id) else None)


def read_request(text: str | bytes, *, max_message_bytes: int, max_prompt_nodes: int,
                 node_allowlist: tuple[str, ...] = ()) -> Request:
    """Read and validate one client frame. Raises MessageError with a stable code and what
    the answer can echo of the message."""
    if isinstance(text, bytes):
        raise MessageError(ErrorCode.INVALID_MESSAGE, "Binary frames are not accepted; send JSON text")
    size = len(text)
    if size > max_message_bytes:
        ref, prompt_id = _echo(scan_prefix(text))
        raise MessageError(ErrorCode.MESSAGE_TOO_LARGE,
                           f"Message of {size} bytes is over the {max_message_bytes} byte limit",
                           prompt_id=prompt_id, ref=ref)
    try:
        message = json.loads(text, parse_constant=_reject_constants)
    except RecursionError:
        ref, prompt_id = _echo(scan_prefix(text))
        raise MessageError(ErrorCode.INVALID_MESSAGE, "Message is nested too deeply", prompt_id=prompt_id,
                           ref=ref) from None
    except ValueError as e:
        ref, prompt_id = _echo(scan_prefix(text))
        raise MessageError(ErrorCode.INVALID_MESSAGE, f"Message is not valid JSON: {e}", prompt_id=prompt_id,
                           ref=ref) from None
    if not isinstance(message, dict):
        raise MessageError(ErrorCode.INVALID_MESSAGE, "Message must be a JSON object")
    ref, prompt_id = _echo(message)
    if "ref" in message and ref is None:
        raise MessageError(ErrorCode.INVALID_MESSAGE,
                           f"'ref' must be an integer or a string of 1 to {MAX_REF_LENGTH} characters",
                           prompt_id=prompt_id)
    try:
        return Request(_parse_body(message, max_prompt_nodes, node_allowlist), ref)
    except RequestError as e:
        raise MessageError(e.code, e.message, e.details, e.prompt_id or prompt_id, ref) from None


def _parse_body(message: dict, max_prompt_nodes: int, node_allowlist: tuple[str, ...]) -> Body:
    kind = message.get("type")
    data = message.get("data", {})
    if not isinstance(kind, str):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "Message needs a string 'type'")
    if data is None:
        data = {}
    if kind == "ping":
        return Ping(data)
    if not isinstance(data, dict):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"'{kind[:64]}' needs an object 'data'")
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
    if kind == "refresh_token":
        token = data.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise RequestError(ErrorCode.INVALID_MESSAGE,
                               f"refresh_token needs a string 'token' of at most {MAX_TOKEN_CHARS} characters")
        return RefreshToken(token)
    raise RequestError(ErrorCode.INVALID_MESSAGE, f"Unknown message type {kind[:64]!r}")


def parse_client_message(text: str | bytes, *, max_prompt_nodes: int,
                         node_allowlist: tuple[str, ...] = ()) -> Body:
    """What one client frame asks (no size limit: see read_request). Raises MessageError."""
    return read_request(text, max_message_bytes=len(text), max_prompt_nodes=max_prompt_nodes,
                        node_allowlist=node_allowlist).body


# --- outgoing --------------------------------------------------------------------------------

def encode(kind: str, data: Any, seq: int, ref: Ref | None = None) -> str:
    """A proxy message as sent to a client; ``ref``: the client message it answers."""
    message = {"type": kind, "data": data, "seq": seq}
    if ref is not None:
        message["ref"] = ref
    return json.dumps(message, separators=(",", ":"))


def with_seq(upstream_text: str, seq: int) -> str:
    """Add ``seq`` to a ComfyUI JSON message without re-encoding it (type and data unchanged)."""
    return '{"seq":%d,%s' % (seq, upstream_text.lstrip()[1:])

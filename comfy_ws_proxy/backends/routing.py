"""Which user, if any, an upstream frame belongs to: the isolation rule as a pure function.

A user's upstream socket receives what ComfyUI addresses to the user's private client id,
and also what ComfyUI broadcasts to every socket (PROTOCOL.md 3.6): ``status``, type-3
text frames, type-1 previews of prompts without a client id, custom nodes' messages.
``route`` decides from the frame alone and two questions about jobs:

- JSON with a ``prompt_id``: the user's only if that job is the user's;
- ``executing`` without a prompt id (ComfyUI's reconnect replay): the job the socket saw
  start, if it is still running;
- binary type 4 (preview with metadata): by the prompt id in its header;
- binary type 1, type 3 and unknown types carry no prompt id: the user's only while the
  user's own job runs on this very socket's backend (ComfyUI runs one prompt at a time and
  its event bus is one FIFO, so what arrives between our ``execution_start`` and our
  end is our prompt's);
- everything else is dropped: never sent to a user who might not own it.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from ..model import FINAL_EVENTS
from .frames import BINARY_PREVIEW_WITH_METADATA, BINARY_TEXT, binary_event_type, preview_metadata


class Routed:
    """A frame to deliver: ComfyUI's message type (``preview`` or ``text`` for binary
    frames), the job it belongs to, and the parsed data (JSON only). One per relayed frame:
    a plain slotted class (a frozen dataclass costs three times as much to make)."""
    __slots__ = ("kind", "job_id", "data")

    def __init__(self, kind: str, job_id: str | None, data: dict):
        self.kind = kind
        self.job_id = job_id
        self.data = data

    def __repr__(self) -> str:
        return f"Routed({self.kind!r}, {self.job_id!r})"


REGISTERED = Routed("registered", None, {})  # the connect-time status: the socket is routable


def route(message: str | bytes | bytearray, *, owns: Callable[[str], bool], running: str | None,
          is_running: Callable[[str], bool]) -> Routed | None:
    """``owns(job_id)``: is it this socket's user's job; ``running``: the job this socket saw
    start and not end; ``is_running(job_id)``: is that job still running (by the tracker)."""
    if not isinstance(message, str):
        kind = binary_event_type(message)
        if kind == BINARY_PREVIEW_WITH_METADATA:
            meta = preview_metadata(message)
            job_id = meta.get("prompt_id") if meta else None
            if isinstance(job_id, str) and owns(job_id):
                return Routed("preview", job_id, {})
            return None
        if running is not None and owns(running) and is_running(running):
            return Routed("text" if kind == BINARY_TEXT else "preview", running, {})
        return None
    try:
        parsed = json.loads(message)
        kind = parsed["type"]
        data: Any = parsed.get("data")
    except (ValueError, KeyError, TypeError):
        return None  # not ComfyUI's JSON shape: cannot be attributed
    if not isinstance(kind, str):
        return None
    if not isinstance(data, dict):
        data = {}
    if kind == "status":
        return REGISTERED if "sid" in data else Routed("status", None, data)
    job_id = data.get("prompt_id")
    if job_id is None and kind == "executing" and running is not None and is_running(running):
        job_id = running  # the reconnect replay: executing {node} without prompt_id
    if not isinstance(job_id, str) or not owns(job_id):
        return None
    return Routed(kind, job_id, data)


def next_running(running: str | None, routed: Routed) -> str | None:
    """The job a socket sees running after this frame (starts and ends as the socket saw them)."""
    if routed.kind == "execution_start":
        return routed.job_id
    if routed.job_id == running and (routed.kind in FINAL_EVENTS or
                                     (routed.kind == "executing" and routed.data.get("node", "") is None)):
        return None
    return running

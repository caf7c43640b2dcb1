"""The few bytes of ComfyUI's binary frames the proxy reads to route them (PROTOCOL.md 3.8):
the event type, and a type-4 preview's JSON metadata. The image itself is never decoded."""
from __future__ import annotations

import json
import struct

BINARY_PREVIEW_IMAGE = 1
BINARY_TEXT = 3
BINARY_PREVIEW_WITH_METADATA = 4
MAX_METADATA_BYTES = 64 * 1024  # a type-4 header longer than this is not ComfyUI's


def binary_event_type(frame: bytes | bytearray) -> int | None:
    if len(frame) < 4:
        return None
    return struct.unpack_from(">I", frame, 0)[0]


def preview_metadata(frame: bytes | bytearray, max_len: int = MAX_METADATA_BYTES) -> dict | None:
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

"""ComfyUI's errors made fit for the internet (STRIP_COMFY_ERRORS): no tracebacks, no server
paths, no tensor dumps; the message (paths cut to their file name), the exception's type and
the node are kept. Pure functions; the tracker applies them and logs the full text."""
from __future__ import annotations

import re
from typing import Any

# An absolute path: POSIX (/home/x/ComfyUI/..., ~/ComfyUI/..., at least two components, not inside a URL or
# a ratio such as 1/2), a Windows drive (C:\... or C:/...) or a UNC share (\\server\share\...).
_PATH = re.compile(
    r"(?<![\w.:/\\~-])~?/(?:[^\s'\"`:/\\,;()\[\]{}<>|]+/)+[^\s'\"`:/\\,;()\[\]{}<>|]*"
    r"|\b[A-Za-z]:[\\/](?:[^\s'\"`:\\/,;()\[\]{}<>|]+[\\/])*[^\s'\"`:\\/,;()\[\]{}<>|]*"
    r"|\\\\[^\s'\"`\\]+(?:\\[^\s'\"`\\,;()\[\]{}<>|]+)+")
# A path's remains after a space in a Windows folder name ("C:\Program Files\x\y.py").
_BACKSLASH_TAIL = re.compile(r"(?:[^\s'\"`\\]+\\)+([^\s'\"`\\]*)")
# torch's repr of a tensor, nested brackets and all.
_TENSOR = re.compile(r"tensor\(\[[^()]*?\](?:,[^()]*)?\)", re.S)
CUT = "..."

WITHHELD_EXECUTION_KEYS = ("traceback", "current_inputs", "current_outputs")


def strip_paths(text: str) -> str:
    """``text`` with every absolute server path cut to ``.../file name`` and tensor reprs
    cut to ``tensor(...)``."""
    text = _TENSOR.sub("tensor(...)", text)
    text = _PATH.sub(_cut, text)
    return _BACKSLASH_TAIL.sub(lambda m: f"{CUT}/{m.group(1)}", text)


def _cut(match: re.Match) -> str:
    name = re.split(r"[\\/]", match.group(0).rstrip("\\/"))[-1]
    return f"{CUT}/{name}" if name else CUT


def public_execution_error(data: dict) -> dict:
    """An ``execution_error``'s data as clients may see it: ComfyUI's keys kept (so its shape
    holds), the traceback and the inputs' and outputs' dumps emptied, paths cut."""
    public = dict(data)
    for key in WITHHELD_EXECUTION_KEYS:
        if key in public:
            public[key] = {} if isinstance(public[key], dict) else []  # emptied, of the same type
    if isinstance(public.get("exception_message"), str):
        public["exception_message"] = strip_paths(public["exception_message"])
    return public


def public_rejection(value: Any) -> Any:
    """A refusal's data (ComfyUI's 400 ``error`` and ``node_errors``): tracebacks emptied,
    paths cut in every string."""
    if isinstance(value, dict):
        return {k: ([] if k == "traceback" else public_rejection(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [public_rejection(v) for v in value]
    if isinstance(value, str):
        return strip_paths(value)
    return value

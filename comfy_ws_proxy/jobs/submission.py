"""Checking a submission, whichever face it came through (WebSocket or HTTP)."""
from __future__ import annotations

from urllib.parse import urlsplit

from ..model import ErrorCode, RequestError, SubmitRequest, is_canonical_uuid

MAX_TIMEOUT_S = 7 * 24 * 3600  # a job's own time limit: a week at most
MAX_URL = 2048
MAX_LABELS = 16  # backend labels one job may require


def parse_submit(data: dict, max_prompt_nodes: int, node_allowlist: tuple[str, ...]) -> SubmitRequest:
    """A submission's fields (``{prompt, prompt_id?, extra_data?, ...}``, or ``{template,
    params?, ...}`` instead of the prompt), checked alike for every face. Raises RequestError
    with a stable code. A template is rendered (and its prompt checked) by the job service."""
    template = data.get("template")
    params = data.get("params")
    if template is not None:
        if "prompt" in data:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "Give either 'prompt' or 'template', not both")
        if not isinstance(template, str) or not template:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'template' must be a template's name (GET /templates)")
        if params is not None and not isinstance(params, dict):
            raise RequestError(ErrorCode.INVALID_PARAMS, "'params' must be an object (parameter name -> value)",
                               details={"template": template[:64], "errors": []})
        prompt = {}
    else:
        if params is not None:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'params' goes with 'template'")
        prompt = data.get("prompt")
        check_prompt(prompt, max_prompt_nodes, node_allowlist)
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
    webhook_url = data.get("webhook_url")
    if webhook_url is not None:
        try:
            parts = urlsplit(webhook_url) if isinstance(webhook_url, str) and len(webhook_url) <= MAX_URL else None
            parts and parts.port  # noqa: B018 - a bad port raises here
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            raise RequestError(ErrorCode.INVALID_MESSAGE,
                               f"webhook_url must be an http(s) URL of at most {MAX_URL} characters, without "
                               "credentials")
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) > MAX_LABELS
                               or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in labels)):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"labels must be a list of at most {MAX_LABELS} backend labels")
    return SubmitRequest(prompt, prompt_id, extra_data, targets, front,
                         float(timeout_s) if timeout_s is not None else None, webhook_url,
                         template if template is not None else None, params if template is not None else None,
                         tuple(labels or ()))


def check_prompt(prompt, max_prompt_nodes: int, node_allowlist: tuple[str, ...]) -> None:
    """A prompt's size and node types (a client's own, or a template's once rendered)."""
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

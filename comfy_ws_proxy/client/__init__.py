"""An importable async client for comfy_ws_proxy (and the core of scripts/comfy_client.py).

    async with ProxyClient("ws://127.0.0.1:8190/ws", token) as client:
        handle = await client.submit(workflow)
        async for event in handle.events():
            ...                       # ComfyUI's messages for this prompt, and binary previews
        result = await handle.result()  # {"status": "success", "outputs": {...}, ...}

Every request (submit, cancel, ping, refresh_token) carries a ``ref``; the proxy's answer
echoes it, so a refusal fails that request at once with a ProxyError (``code``,
``message``, ``details``, ``node_errors``). A dropped connection is re-established and
``resume``d from the last ``seq`` seen, so events are not lost across short disconnects.

Tokens: ``token_provider`` (a callable returning a token, or an awaitable of one) is asked
for a fresh token when the proxy says ``token_expiring`` (handed over in band with
``refresh_token``) and before every reconnect. Without one, a token that expired (close
4001) or is refused at a reconnect (HTTP 401) ends the client: pending requests and results
fail with AuthenticationError instead of reconnecting with a token that cannot work.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Union

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ..gateway.protocol import SUBPROTOCOL, CloseCode
from ..model import FINAL_EVENTS

log = logging.getLogger(__name__)

FINAL = FINAL_EVENTS  # ComfyUI's final event -> the Result's status
# An error with neither ref nor prompt_id and one of these codes answers the oldest request
# still unanswered (the proxy answers messages in order; it could read nothing of this one).
UNREADABLE = ("invalid_message", "message_too_large")
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 10.0

TokenProvider = Callable[[], Union[str, Awaitable[str]]]


class ProxyError(Exception):
    """The proxy (or ComfyUI, through it) refused a request: a stable ``code``, its
    ``message``, ``details``; for ComfyUI's own refusal of a prompt ``node_errors`` (node
    id -> ``{class_type, errors: [{message, details, extra_info: {input_name}}]}``) and
    ``error``. ``data`` is the whole error message."""

    def __init__(self, data: dict):
        self.data = data
        self.code: str | None = data.get("code")
        self.message: str = data.get("message") or ""
        self.details = data.get("details")
        self.node_errors: dict = data.get("node_errors") or {}
        self.prompt_id: str | None = data.get("prompt_id")
        super().__init__(f"{self.code}: {self.message}")


class AuthenticationError(ProxyError):
    """The token was refused: at the upgrade (HTTP 401, ``status``), at its deadline on the
    open connection (close 4001), or as a ``refresh_token``. ``reason`` says why
    (``expired``, ``malformed``, ``bad_signature``, ``other_user``, ...)."""

    @property
    def reason(self) -> str | None:
        details = self.details if isinstance(self.details, dict) else {}
        return self.data.get("reason") or details.get("reason")

    @property
    def status(self) -> int | None:
        return self.data.get("status")


def error_from(data: dict) -> ProxyError:
    return (AuthenticationError if data.get("code") == "unauthorized" else ProxyError)(data)


@dataclass
class Result:
    prompt_id: str
    status: str  # success | error | interrupted | cancelled | rejected
    outputs: dict = field(default_factory=dict)  # node id -> ComfyUI's output (images: filename/subfolder/type)
    error: dict | None = None


class PromptHandle:
    def __init__(self, prompt_id: str):
        self.prompt_id = prompt_id
        self.accepted: dict | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._outputs: dict = {}

    def _event(self, item: Any) -> None:
        if isinstance(item, dict):
            kind, data = item.get("type"), item.get("data") or {}
            if kind == "executed" and data.get("output") is not None:
                self._outputs[data.get("node")] = data["output"]
            if kind in FINAL and not self._result.done():
                self._result.set_result(Result(self.prompt_id, FINAL[kind], dict(self._outputs),
                                               data if kind == "execution_error" else None))
            if kind == "prompt_cancelled" and not self._result.done():
                self._result.set_result(Result(self.prompt_id, "cancelled", dict(self._outputs)))
            if kind == "error" and not self._result.done():
                self._result.set_result(Result(self.prompt_id, "rejected", {}, data))
        self._queue.put_nowait(item)
        if self._result.done():
            self._queue.put_nowait(None)

    def _fail(self, error: BaseException) -> None:
        """The client ended before this prompt did (its outcome cannot be heard)."""
        if not self._result.done():
            self._result.set_exception(error)
            self._result.exception()  # (retrieved: result() raises it; no "never retrieved" log)
            self._queue.put_nowait(None)

    @property
    def done(self) -> bool:
        return self._result.done()

    async def events(self) -> AsyncIterator[Any]:
        """JSON messages (dicts) and binary preview frames (bytes) of this prompt, until it ends."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def result(self, timeout: float | None = None) -> Result:
        return await asyncio.wait_for(asyncio.shield(self._result), timeout)


@dataclass
class _Pending:
    """A request waiting for its answer."""
    kind: str
    prompt_id: str | None
    future: asyncio.Future
    survives_reconnect: bool = False  # a submit: its answer may come in a resume's replay


class ProxyClient:
    """One connection to the proxy, re-established (and resumed) when it drops. ``token``: a
    JWT; ``token_provider``: where fresh ones come from (see the module docstring)."""

    def __init__(self, url: str, token: str | None = None, *, token_provider: TokenProvider | None = None,
                 use_subprotocol: bool = False, reconnect: bool = True, max_message_size: int = 64 * 1024 * 1024):
        if token is None and token_provider is None:
            raise ValueError("ProxyClient needs a token or a token_provider")
        self.url = url
        self.token = token
        self.token_provider = token_provider
        self.use_subprotocol = use_subprotocol
        self.reconnect = reconnect
        self.max_message_size = max_message_size
        self.session_id: str | None = None
        self.last_seq = 0
        self.conn: WebSocketClientConnection | None = None
        self.handles: dict[str, PromptHandle] = {}
        self.failure: BaseException | None = None  # why the client ended (no more reconnects)
        self._running: PromptHandle | None = None  # where binary previews go
        self._pending: dict[int, _Pending] = {}  # by ref, oldest first
        self._refs = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self._refresher: asyncio.Task | None = None
        self._connected = asyncio.Event()  # also set once the client has failed (see _ready)
        self._closing = False
        self._held: list | None = None  # messages received while a resume is replaying

    async def __aenter__(self) -> "ProxyClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- tokens ---------------------------------------------------------------------------------
    async def fresh_token(self) -> str:
        """A token from the provider (awaited if it returns an awaitable)."""
        token = self.token_provider()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError("token_provider must return a non-empty string")
        self.token = token
        return token

    async def refresh_token(self, token: str | None = None, timeout: float = 30) -> dict:
        """Hand the open connection a fresh token (``token``, or the provider's). Returns the
        proxy's ``token_refreshed`` data; raises AuthenticationError if it refused it (the
        connection then keeps its old token)."""
        if token is None:
            token = await self.fresh_token() if self.token_provider is not None else self.token
        reply = await self._request("refresh_token", {"token": token}, timeout=timeout)
        self.token = token
        return reply["data"]

    async def _refresh_soon(self) -> None:
        try:
            await self.refresh_token()
            log.info("token refreshed")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the deadline then closes the connection: a reconnect asks again
            log.warning("token refresh failed (%s)", e)

    # --- the connection -------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the old socket (already closed by the peer): release it
        if self.token is None:
            await self.fresh_token()
        headers, subprotocols = {}, None
        if self.use_subprotocol:
            subprotocols = [SUBPROTOCOL, "bearer." + self.token]
        else:
            headers["Authorization"] = "Bearer " + self.token
        try:
            self.conn = await websocket_connect(HTTPRequest(self.url, headers=headers), subprotocols=subprotocols,
                                               max_message_size=self.max_message_size)
        except HTTPClientError as e:
            raise refusal(e) from None
        first = await self.conn.read_message()
        if first is None:
            raise ConnectionError(f"the proxy closed the connection ({self.conn.close_code})")
        first = json.loads(first)
        if first.get("type") == "error":
            raise error_from(first["data"])
        resumed_from = self.session_id
        self.session_id = first["data"]["session_id"]
        if resumed_from == self.session_id and self.last_seq:
            # Live messages may overtake the replay: hold everything until the replay ends
            # (prompts_state), then deliver in seq order, each once.
            self._held = []
            await self.conn.write_message(json.dumps({"type": "resume", "data": {
                "session_id": self.session_id, "last_seq": self.last_seq}}))
        self._connected.set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_forever())

    async def _read_forever(self) -> None:
        while not self._closing:
            message = await self.conn.read_message()
            if message is not None:
                self._dispatch(message)
                continue
            code = self.conn.close_code
            self._connected.clear()
            self._connection_lost()
            if self._closing or not self.reconnect:
                break
            if code == CloseCode.TOKEN_EXPIRED and self.token_provider is None:
                self._fail(AuthenticationError({
                    "code": "unauthorized", "reason": "expired",
                    "message": "The token expired and the proxy closed the connection (4001); "
                               "give ProxyClient a token_provider to refresh it"}))
                break
            if not await self._reconnect():
                break
        self._fail(ConnectionError("connection closed"))

    async def _reconnect(self) -> bool:
        """Connect again (asking the provider for a token first). False when that cannot
        work: a token refused (HTTP 401) that the provider cannot replace by another."""
        delay = RECONNECT_MIN_S
        refused: str | None = None  # the token last refused, and how
        last_refusal: AuthenticationError | None = None
        while not self._closing:
            try:
                if self.token_provider is not None:
                    await self.fresh_token()
                    if self.token == refused and last_refusal is not None:
                        raise last_refusal
                await self.connect()
                return True
            except AuthenticationError as e:
                if self.token_provider is None or self.token == refused:
                    self._fail(e)
                    return False
                refused, last_refusal = self.token, e
                log.info("reconnect refused the token (%s); asking for another", e.reason)
            except Exception as e:  # the proxy restarting, a network blip, a provider failing
                log.info("reconnect failed (%s); retrying in %.1fs", e, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, RECONNECT_MAX_S)
        return False

    def _connection_lost(self) -> None:
        """Requests whose answer went with the socket fail; a submit's may come in the replay."""
        for ref, pending in list(self._pending.items()):
            if not pending.survives_reconnect:
                del self._pending[ref]
                _set_exception(pending.future, ConnectionError("connection lost before the answer"))

    def _fail(self, error: BaseException) -> None:
        """The client ends: every pending request and result fails with ``error``."""
        if self.failure is None:
            self.failure = error
        for pending in self._pending.values():
            _set_exception(pending.future, self.failure)
        self._pending.clear()
        for handle in self.handles.values():
            handle._fail(self.failure)
        self._connected.set()  # wake whoever waits to send: _ready() raises

    async def _ready(self) -> None:
        await self._connected.wait()
        if self.failure is not None:
            raise self.failure

    # --- what arrives ---------------------------------------------------------------------------
    def _dispatch(self, message: str | bytes) -> None:
        if self._held is not None:
            if isinstance(message, str) and json.loads(message).get("type") == "prompts_state":
                held, self._held = self._held, None
                texts = sorted((m for m in held if isinstance(m, str)), key=lambda m: json.loads(m).get("seq", 0))
                for m in texts:
                    self._dispatch(m)
                for m in held:
                    if isinstance(m, bytes):
                        self._dispatch(m)
                return
            self._held.append(message)
            return
        if isinstance(message, bytes):
            if self._running is not None:
                self._running._event(message)
            return
        msg = json.loads(message)
        seq = msg.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq and msg.get("type") not in ("session", "error", "pong"):
                return  # already seen (a resume replays from last_seq)
            self.last_seq = max(self.last_seq, seq)
        kind, data = msg.get("type"), msg.get("data") or {}
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        self._answer(msg, kind, data, prompt_id)
        if kind == "token_expiring" and self.token_provider is not None and (
                self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.ensure_future(self._refresh_soon())
        handle = self.handles.get(prompt_id) if prompt_id else None
        if handle is None:
            return
        if kind == "execution_start":
            self._running = handle
        elif kind == "executing" and data.get("node") is None and self._running is handle:
            self._running = None
        handle._event(msg)

    def _answer(self, msg: dict, kind: str, data: Any, prompt_id: str | None) -> None:
        """Resolve the request ``msg`` answers: by its ref; else (a resume's replay) a
        submit by its prompt id; else an unreadable message's error, the oldest."""
        ref = msg.get("ref")
        pending = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if pending is None and prompt_id and kind in ("prompt_accepted", "error", "prompt_cancelled"):
            ref = next((r for r, p in self._pending.items() if p.kind == "submit_prompt" and p.prompt_id == prompt_id),
                       None)
            pending = self._pending.pop(ref) if ref is not None else None
        if pending is None and kind == "error" and "ref" not in msg and not prompt_id and self._pending \
                and isinstance(data, dict) and data.get("code") in UNREADABLE:
            pending = self._pending.pop(next(iter(self._pending)))
        if pending is None or pending.future.done():
            return
        if kind == "error":
            _set_exception(pending.future, error_from(data if isinstance(data, dict) else {}))
        else:
            pending.future.set_result(msg)

    # --- requests -------------------------------------------------------------------------------
    async def _request(self, kind: str, data: dict, *, prompt_id: str | None = None, timeout: float = 60,
                       survives_reconnect: bool = False) -> dict:
        """Send one message with a fresh ref and wait for its answer; an ``error`` raises."""
        ref = next(self._refs)
        future = asyncio.get_running_loop().create_future()
        self._pending[ref] = _Pending(kind, prompt_id, future, survives_reconnect)
        try:
            await asyncio.wait_for(self._ready(), timeout)
            # type and ref first, and a prompt's id before the prompt: a message too large
            # for the proxy to read is still answered with them (it reads its beginning).
            await self.conn.write_message(json.dumps({"type": kind, "ref": ref, "data": data}))
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._pending.pop(ref, None)
            if future.done() and not future.cancelled():
                future.exception()  # (seen here or raised above)

    async def submit(self, prompt: dict, *, extra_data: dict | None = None, prompt_id: str | None = None,
                     timeout: float = 60, **fields) -> PromptHandle:
        """Submit a prompt (API format). Raises ProxyError at once if it is refused (by the
        proxy: ``rate_limited``, ``invalid_prompt``, ...; or by ComfyUI: ``invalid_prompt``
        with ``node_errors``). ``fields``: timeout_s, front, partial_execution_targets."""
        return await self._submit({"prompt": prompt}, extra_data, prompt_id, timeout, fields)

    async def submit_template(self, template: str, params: dict | None = None, *, extra_data: dict | None = None,
                              prompt_id: str | None = None, timeout: float = 60, **fields) -> PromptHandle:
        """Submit a workflow template by name with its parameters (docs/templates.rst); a
        bad parameter raises ProxyError ``invalid_params`` (``details`` lists every one). The
        parameters used, a drawn seed too, are in ``handle.accepted["template"]``."""
        return await self._submit({"template": template, "params": params or {}}, extra_data, prompt_id, timeout,
                                  fields)

    async def _submit(self, what: dict, extra_data: dict | None, prompt_id: str | None, timeout: float,
                      fields: dict) -> PromptHandle:
        prompt_id = prompt_id or str(uuid.uuid4())
        handle = PromptHandle(prompt_id)
        self.handles[prompt_id] = handle
        data: dict[str, Any] = {"prompt_id": prompt_id}
        if extra_data:
            data["extra_data"] = extra_data
        data.update(fields)
        data.update(what)
        try:
            reply = await self._request("submit_prompt", data, prompt_id=prompt_id, timeout=timeout,
                                        survives_reconnect=True)
        except BaseException:
            self.handles.pop(prompt_id, None)
            raise
        handle.accepted = reply["data"]
        return handle

    async def cancel(self, prompt_id: str, timeout: float = 30) -> dict:
        """Cancel a prompt: returns the answer (``prompt_cancelled``: it never ran, or
        ``cancel_accepted``: ComfyUI interrupts it, ``execution_interrupted`` follows);
        raises ProxyError (``not_found``, already finished, ``comfy_unavailable``)."""
        return await self._request("cancel", {"prompt_id": prompt_id}, timeout=timeout)

    async def ping(self, data: dict | None = None, timeout: float = 30) -> dict:
        return (await self._request("ping", data or {}, timeout=timeout))["data"]

    async def close(self) -> None:
        self._closing = True
        if self._refresher is not None:
            self._refresher.cancel()
        if self.conn is not None:
            self.conn.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                self._reader.cancel()


def refusal(e: HTTPClientError) -> ProxyError:
    """The proxy's refusal of an upgrade (its JSON error body) as a ProxyError."""
    data: dict = {}
    if e.response is not None and e.response.body:
        try:
            body = json.loads(e.response.body)
            data = dict(body.get("error") or {}) if isinstance(body, dict) else {}
        except ValueError:
            pass
    data.setdefault("code", "unauthorized" if e.code == 401 else "http_error")
    data.setdefault("message", f"HTTP {e.code}")
    data["status"] = e.code
    return AuthenticationError(data) if e.code == 401 else ProxyError(data)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # (retrieved: whoever awaits it still gets it)


__all__ = ["AuthenticationError", "PromptHandle", "ProxyClient", "ProxyError", "Result", "TokenProvider"]

"""Webhooks per the Standard Webhooks spec: a job's outcome POSTed to the URL it named.

Delivery is at least once from a durable outbox: the message is written in the same store
transaction as the job's final state (see JobTracker.move / the store's save), and stays
pending until the receiver answers 2xx. Every attempt carries the same ``webhook-id`` (the
receiver's idempotency key), its own ``webhook-timestamp``, and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` for each of WEBHOOK_SECRETS (several while
keys rotate). Retries follow the spec's schedule with +-10 % jitter (about 3 days in all);
3xx counts as a failure (redirects are never followed), 410 disables the endpoint, a
``Retry-After`` is honoured. The receiver's address is resolved, checked (no loopback,
private, link-local, multicast or reserved address unless WEBHOOK_ALLOW_PRIVATE_HOSTS names
the host) and connected to as checked: DNS cannot point it elsewhere between check and use.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import time
import uuid
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import PeriodicCallback
from tornado.netutil import DefaultExecutorResolver, Resolver

from ..model import API_STATUS, ErrorCode, Job, JobState, RequestError, WebhookMessage
from ..store import JobStore, StoreError

log = logging.getLogger(__name__)

# The spec's example schedule: the delay before each retry (after the first, immediate try).
RETRY_DELAYS_S = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600, 24 * 3600)
JITTER = 0.1
POLL_MS = 1000  # how often the outbox is looked at for due deliveries
MAX_RETRY_AFTER_S = 24 * 3600

EVENT_TYPES = {"completed": "job.completed", "cancelled": "job.cancelled"}  # the rest: job.failed


class ForbiddenAddress(OSError):
    """The webhook's host resolves only to addresses it may not be sent to."""


def forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


class CheckedResolver(Resolver):
    """Resolves, then keeps only the addresses a webhook may go to: the HTTP client connects
    to exactly those (the check and the connection use one answer)."""

    def initialize(self, allowed_hosts: frozenset[str] = frozenset()) -> None:
        self.allowed_hosts = allowed_hosts
        self.resolver = DefaultExecutorResolver()  # getaddrinfo off the IOLoop

    async def resolve(self, host: str, port: int, family=0):
        answers = await self.resolver.resolve(host, port, family)
        if host.lower() in self.allowed_hosts:
            return answers
        kept = [a for a in answers if not forbidden(a[1][0])]
        if not kept:
            raise ForbiddenAddress(f"{host} resolves only to addresses webhooks may not be sent to "
                                   f"({', '.join(sorted({a[1][0] for a in answers}))})")
        return kept


def parse_secret(secret: str) -> bytes:
    """``whsec_<base64>`` (the spec's form) to the key bytes; ValueError if malformed."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret looks like whsec_<base64 of 24 to 64 random bytes>")
    key = base64.b64decode(secret[len("whsec_"):], validate=True)
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret must hold 24 to 64 bytes, this one holds {len(key)}")
    return key


def signature(keys: list[bytes], message_id: str, timestamp: int, body: str) -> str:
    signed = f"{message_id}.{timestamp}.{body}".encode()
    return " ".join("v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in keys)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class WebhookSender:
    """Builds each finished job's message (for the tracker) and delivers the outbox."""

    def __init__(self, store: JobStore, settings, wall: Callable[[], float], public_url: str = ""):
        self.store = store
        self.keys = [parse_secret(s) for s in settings.webhook_secrets]
        self.default_url = settings.webhook_default_url
        self.allowlist = tuple(settings.webhook_url_allowlist)
        self.timeout = settings.webhook_timeout_s
        self.max_in_flight = settings.webhook_max_in_flight
        self.wall = wall  # the schedule's clock (injectable); signatures use the real time
        self.public_url = public_url.rstrip("/")
        allowed = frozenset(h.lower() for h in settings.webhook_allow_private_hosts)
        self.resolver = CheckedResolver(allowed_hosts=allowed)
        self._http: AsyncHTTPClient | None = None  # made on first use: a client of its own (its resolver)
        self.random = random.Random()
        self.in_flight: dict[str, asyncio.Task] = {}
        self._timer = PeriodicCallback(self.tick, POLL_MS)
        self.delivered_listeners: list[Callable[[WebhookMessage, int], None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def start(self) -> None:
        self._timer.start()
        self.tick()

    async def stop(self) -> None:
        self._timer.stop()
        for task in list(self.in_flight.values()):
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
        if self._http is not None:
            self._http.close()

    # --- at submission ----------------------------------------------------------------------------
    async def check(self, url: str | None, job_id: str) -> str:
        """The job's webhook URL (the request's, else the default), checked; "" for none.
        Raises RequestError (invalid_message) naming what is wrong."""
        url = url or self.default_url
        if not url:
            return ""

        def refuse(why: str) -> RequestError:
            return RequestError(ErrorCode.INVALID_MESSAGE, f"webhook_url {why}", prompt_id=job_id)

        if not self.enabled:
            raise refuse("cannot be used here: webhooks are not configured (WEBHOOK_SECRETS)")
        if self.allowlist and not any(url.startswith(prefix) for prefix in self.allowlist):
            raise refuse("is not one of the allowed webhook URLs (WEBHOOK_URL_ALLOWLIST)")
        parts = urlsplit(url)
        try:
            await self.resolver.resolve(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except ForbiddenAddress as e:
            raise refuse(f"is refused: {e}") from None
        except OSError:
            raise refuse(f"is refused: {parts.hostname} does not resolve") from None
        return url

    # --- the message (called by the tracker as the job ends) --------------------------------------
    def message(self, job: Job) -> WebhookMessage:
        status = API_STATUS.get(job.state, "failed")
        kind = EVENT_TYPES.get(status, "job.failed")
        me = f"{self.public_url}/job/{job.job_id}"
        outputs, per_node = [], {}
        for node_id, output in (job.outputs or {}).items():
            for items in (output or {}).values() if isinstance(output, dict) else ():
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        index = per_node[node_id] = per_node.get(node_id, -1) + 1
                        outputs.append({"node_id": node_id, "index": index, "url": f"{me}/image/{node_id}/{index}"})
        result = job.result if isinstance(job.result, dict) else {}
        error = None
        if status in ("failed", "timed_out"):
            error = {"code": "timed_out" if job.state == JobState.TIMED_OUT else
                     ("execution_error" if job.state == JobState.ERROR else result.get("code", "failed")),
                     "message": str(result.get("exception_message") or result.get("message") or status)[:500]}
        body = {"type": kind, "timestamp": iso(job.finished_at or self.wall()),
                "data": {"job_id": job.job_id, "status": status, "state": job.state, "url": me,
                         "outputs": outputs[:100], "error": error}}
        return WebhookMessage("msg_" + uuid.uuid4().hex, job.job_id, job.owner, job.webhook_url, kind,
                              json.dumps(body, separators=(",", ":")))

    # --- delivery -------------------------------------------------------------------------------
    def tick(self) -> None:
        """Start the due deliveries (at most WEBHOOK_MAX_IN_FLIGHT at once)."""
        room = self.max_in_flight - len(self.in_flight)
        if room <= 0:
            return
        try:
            due = self.store.due_webhooks(self.wall(), room + len(self.in_flight))
        except StoreError as e:
            log.warning("webhook outbox unreadable, will try again: %s", e)
            return
        for message, attempts in due:
            if message.message_id in self.in_flight or len(self.in_flight) >= self.max_in_flight:
                continue
            task = asyncio.ensure_future(self._deliver(message, attempts))
            self.in_flight[message.message_id] = task
            task.add_done_callback(lambda _t, m=message.message_id: self.in_flight.pop(m, None))

    async def _deliver(self, message: WebhookMessage, attempts: int) -> None:
        attempt = attempts + 1
        try:
            if self.store.endpoint_disabled(message.url):
                return self._record(message, "disabled", attempt, "the endpoint answered 410 Gone before")
        except StoreError:
            return  # asked again on a later tick
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": message.message_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(self.keys, message.message_id, timestamp, message.body),
                   "User-Agent": "comfy_ws_proxy-webhooks"}
        request = HTTPRequest(message.url, method="POST", body=message.body, headers=headers,
                              connect_timeout=self.timeout, request_timeout=self.timeout,
                              follow_redirects=False, decompress_response=False)
        code, retry_after, error = 0, None, None
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, resolver=self.resolver)
        try:
            response = await self._http.fetch(request, raise_error=False)
            code = response.code
            retry_after = response.headers.get("Retry-After") if response.headers else None
            error = None if 200 <= code < 300 else f"HTTP {code}"
            if code == 599:
                error = str(response.error) if response.error else "no answer"
        except ForbiddenAddress as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - any failure of one attempt is recorded, never raised
            error = f"{type(e).__name__}: {e}"
        if error is None:
            self._record(message, "delivered", attempt, None)
            for listener in list(self.delivered_listeners):
                listener(message, attempt)
            return
        if code == 410:
            try:
                self.store.disable_endpoint(message.url, self.wall())
            except StoreError:
                pass
            log.warning("webhook endpoint answered 410 Gone, disabled: user=%s job=%s", message.owner,
                        message.job_id)
            return self._record(message, "disabled", attempt, error)
        if attempt > len(RETRY_DELAYS_S):
            log.warning("webhook given up after %d attempts user=%s job=%s: %s", attempt, message.owner,
                        message.job_id, error)
            return self._record(message, "failed", attempt, error)
        delay = RETRY_DELAYS_S[attempt - 1] * (1 + self.random.uniform(-JITTER, JITTER))
        if code in (429, 502, 503, 504) and retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(int(retry_after), MAX_RETRY_AFTER_S))
        self._record(message, "pending", attempt, error, self.wall() + delay)

    def _record(self, message: WebhookMessage, state: str, attempts: int, error: str | None,
                next_at: float = 0.0) -> None:
        try:
            self.store.webhook_attempted(message.message_id, state, attempts, next_at, error)
        except StoreError as e:  # it stays pending as it was: sent again (same webhook-id), at least once
            log.warning("webhook attempt not recorded (%s): it will be sent again", e)

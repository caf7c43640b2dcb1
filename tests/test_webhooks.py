"""Webhooks (issue 13): Standard Webhooks signatures checked with the unmodified
``standardwebhooks`` library, a durable outbox, the spec's retry schedule on an injected clock,
410, no redirects, SSRF refusals, and a SIGKILL during a delivery."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import pytest
import tornado.web
from standardwebhooks.webhooks import Webhook
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from comfy_ws_proxy.jobs.webhooks import RETRY_DELAYS_S
from comfy_ws_proxy.testing.comfyui import ComfySimulator
from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, FakeClock, ProxyHarness, workflow
from .test_durability import ProxyProcess

pytestmark = pytest.mark.usefixtures("io_loop")

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()


class Receiver:
    """A webhook receiver on loopback: records every request; answers with ``codes`` in turn
    (the last one repeats), or holds a request until released."""

    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.requests: list[dict] = []
        self.arrived: asyncio.Event = asyncio.Event()
        self.hold: asyncio.Future | None = None
        receiver = self

        class Hook(tornado.web.RequestHandler):
            async def post(self, path):
                receiver.requests.append({"path": path, "headers": dict(self.request.headers),
                                          "body": self.request.body})
                receiver.arrived.set()
                if receiver.hold is not None:
                    await receiver.hold
                code = receiver.codes.pop(0) if len(receiver.codes) > 1 else receiver.codes[0]
                self.set_status(code)
                if 300 <= code < 400:
                    self.set_header("Location", "/elsewhere")
                self.finish()

        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = HTTPServer(tornado.web.Application([(r"/(.*)", Hook)]))
        self.server.add_sockets(sockets)

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def next_request(self, count: int) -> dict:
        async def wait():
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(wait(), TIMEOUT)
        return self.requests[count - 1]

    def close(self) -> None:
        self.server.stop()


def verified(request: dict, secret: str = SECRET) -> dict:
    """The payload, as a receiver using the standardwebhooks library gets it (raises if the
    signature does not verify)."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    return Webhook(secret).verify(request["body"], headers)


async def post_job(h, body: dict, user: str = "alice"):
    return await h.http.fetch(h.url + "/generate", method="POST", body=json.dumps(body), raise_error=False,
                              headers={"Authorization": "Bearer " + h.token(user)})


async def deliveries_done(sender) -> None:
    await asyncio.wait_for(asyncio.gather(*list(sender.in_flight.values())), TIMEOUT)


def webhook_settings(**more) -> dict:
    return {"webhook_secrets": (SECRET, OLD_SECRET), "webhook_allow_private_hosts": ("127.0.0.1",), **more}


async def test_an_outcome_is_delivered_signed_thin_and_verified_by_the_reference_library():
    receiver = Receiver()
    try:
        async with ProxyHarness(**webhook_settings(public_url="https://proxy.example")) as h:
            answer = await post_job(h, {"prompt": workflow("success"), "webhook_url": receiver.url()})
            assert answer.code == 202
            job_id = json.loads(answer.body)["job_id"]
            request = await receiver.next_request(1)
            for secret in (SECRET, OLD_SECRET):  # both keys sign during a rotation
                payload = verified(request, secret)
            assert payload["type"] == "job.completed"
            data = payload["data"]
            assert data["job_id"] == job_id and data["status"] == "completed" and data["error"] is None
            assert data["url"] == f"https://proxy.example/job/{job_id}"
            assert {o["node_id"] for o in data["outputs"]} == {"6", "7"}
            assert len(request["body"]) < 4096  # thin: ids and links, never images
            assert request["headers"]["Webhook-Id"].startswith("msg_")
            with pytest.raises(Exception):
                verified(request, "whsec_" + base64.b64encode(b"x" * 32).decode())  # a wrong key fails
            await deliveries_done(h.state.webhooks)
            [row] = h.state.store.webhooks(job_id)
            assert row["state"] == "delivered" and row["attempts"] == 1
            failed = await post_job(h, {"prompt": workflow("exec-fail"), "webhook_url": receiver.url()})
            payload = verified(await receiver.next_request(2))
            assert payload["type"] == "job.failed" and payload["data"]["job_id"] == json.loads(failed.body)["job_id"]
            assert payload["data"]["error"]["code"] == "execution_error"
    finally:
        receiver.close()


async def test_a_receiver_down_for_a_day_gets_every_event_once_it_returns():
    wall = FakeClock(1_800_000_000.0)
    receiver = Receiver(codes=[503])
    try:
        async with ProxyHarness(wall=wall, **webhook_settings()) as h:
            sender = h.state.webhooks
            jobs = []
            for _ in range(3):
                answer = await post_job(h, {"prompt": workflow("success"), "webhook_url": receiver.url()})
                jobs.append(json.loads(answer.body)["job_id"])
            await receiver.next_request(3)  # the first, immediate tries: 503
            await deliveries_done(sender)
            elapsed = 0.0
            for delay in RETRY_DELAYS_S:  # a day of retries, on the injected clock
                if elapsed > 24 * 3600:
                    break
                wall.advance(delay * 1.1 + 1)  # past the delay and its jitter
                elapsed += delay * 1.1 + 1
                sender.tick()
                await deliveries_done(sender)
            down_attempts = len(receiver.requests)
            assert down_attempts > 3 * 6  # each retried on the schedule, none dropped
            receiver.codes = [200]
            wall.advance(RETRY_DELAYS_S[-1] * 1.1 + 1)
            sender.tick()
            await deliveries_done(sender)
            delivered = receiver.requests[down_attempts:]
            assert sorted(verified(r)["data"]["job_id"] for r in delivered) == sorted(jobs)  # each once
            ids = {}
            for r in receiver.requests:  # every attempt of one event has the same webhook-id
                ids.setdefault(verified(r)["data"]["job_id"], set()).add(r["headers"]["Webhook-Id"])
            assert all(len(v) == 1 for v in ids.values())
            assert all(h.state.store.webhooks(j)[0]["state"] == "delivered" for j in jobs)
            wall.advance(7 * 24 * 3600)
            sender.tick()
            await deliveries_done(sender)
            assert len(receiver.requests) == down_attempts + 3  # nothing after a delivery
    finally:
        receiver.close()


async def test_a_redirect_is_a_failure_never_followed_and_410_disables_the_endpoint():
    wall = FakeClock(1_800_000_000.0)
    receiver = Receiver(codes=[302, 410])
    try:
        async with ProxyHarness(wall=wall, **webhook_settings()) as h:
            sender = h.state.webhooks
            first = json.loads((await post_job(h, {"prompt": workflow("success"),
                                                   "webhook_url": receiver.url()})).body)["job_id"]
            await receiver.next_request(1)
            await deliveries_done(sender)
            [row] = h.state.store.webhooks(first)
            assert row["state"] == "pending" and row["last_error"] == "HTTP 302"
            wall.advance(RETRY_DELAYS_S[0] * 1.1 + 1)
            sender.tick()
            await receiver.next_request(2)
            await deliveries_done(sender)
            assert [r["path"] for r in receiver.requests] == ["hook", "hook"]  # /elsewhere never asked
            assert h.state.store.webhooks(first)[0]["state"] == "disabled"
            second = json.loads((await post_job(h, {"prompt": workflow("success"),
                                                    "webhook_url": receiver.url()})).body)["job_id"]
            await h.http.fetch(h.url + f"/job/{second}", headers={"Authorization": "Bearer " + h.token("alice"),
                                                                  "Prefer": "wait=10"})
            sender.tick()
            await deliveries_done(sender)
            assert len(receiver.requests) == 2  # a disabled endpoint gets nothing more
            assert h.state.store.webhooks(second)[0]["state"] == "disabled"
    finally:
        receiver.close()


async def test_webhook_urls_to_internal_addresses_are_refused():
    receiver = Receiver()
    try:
        async with ProxyHarness(webhook_secrets=(SECRET,)) as h:  # no host allowed as private
            for url in (receiver.url(), f"http://localhost:{receiver.port}/hook", "http://169.254.169.254/latest",
                        "http://10.1.2.3/x", "http://[::1]:9/x", "http://0.0.0.0/x", "ftp://example.com/x",
                        "http://user:pw@example.com/x", "http://[/x"):
                answer = await post_job(h, {"prompt": workflow("success"), "webhook_url": url})
                error = json.loads(answer.body)["error"]
                assert answer.code == 400 and error["code"] == "invalid_message", (url, answer.body)
                assert "webhook_url" in error["message"]
            assert receiver.requests == []
        async with ProxyHarness(webhook_secrets=(SECRET,), webhook_url_allowlist=("https://hooks.example/",)) as h:
            answer = await post_job(h, {"prompt": workflow("success"), "webhook_url": "https://other.example/x"})
            assert answer.code == 400 and "WEBHOOK_URL_ALLOWLIST" in json.loads(answer.body)["error"]["message"]
        async with ProxyHarness() as h:  # webhooks not configured
            answer = await post_job(h, {"prompt": workflow("success"), "webhook_url": "https://hooks.example/x"})
            assert answer.code == 400
    finally:
        receiver.close()


async def test_a_proxy_killed_during_a_delivery_sends_it_again_with_the_same_id(tmp_path):
    sim = ComfySimulator()
    await sim.start()
    receiver = Receiver()
    receiver.hold = asyncio.get_running_loop().create_future()  # the first delivery hangs
    key = DevKey.generate()
    proxy = ProxyProcess(tmp_path, sim.url, key, webhook_secrets=SECRET, webhook_allow_private_hosts="127.0.0.1")
    try:
        await proxy.start()
        answer = await asyncio.wait_for(proxy_post(proxy, key, receiver.url()), TIMEOUT)
        job_id = json.loads(answer)["job_id"]
        first = await receiver.next_request(1)
        os.kill(proxy.proc.pid, signal.SIGKILL)  # while the receiver holds the request
        await proxy.proc.wait()
        receiver.hold.set_result(None)
        receiver.hold = None
        await proxy.start()
        again = await receiver.next_request(2)
        assert again["headers"]["Webhook-Id"] == first["headers"]["Webhook-Id"]
        assert verified(again)["data"]["job_id"] == job_id
    finally:
        if proxy.proc is not None and proxy.proc.returncode is None:
            proxy.proc.terminate()
            await proxy.proc.wait()
        receiver.close()
        await sim.stop()


async def proxy_post(proxy: ProxyProcess, key: DevKey, hook: str) -> bytes:
    from tornado.httpclient import AsyncHTTPClient

    http = AsyncHTTPClient(force_instance=True)
    try:
        response = await http.fetch(f"http://127.0.0.1:{proxy.port}/generate", method="POST",
                                    body=json.dumps({"prompt": workflow("success"), "webhook_url": hook}),
                                    headers={"Authorization": "Bearer " + key.token("alice")})
        return response.body
    finally:
        http.close()

"""comfy_ws_proxy.client: submit() returns a handle whose events can be iterated and whose
result can be awaited; a dropped connection is re-established and resumed."""
import asyncio
import json
import uuid

from comfy_ws_proxy.client import AuthenticationError, PromptHandle, ProxyClient, ProxyError
from comfy_ws_proxy.gateway.protocol import CloseCode

from .helpers import TIMEOUT, FakeClock, ProxyHarness, workflow


async def test_submit_iterate_events_and_await_the_result(io_loop):
    async with ProxyHarness() as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            handle = await client.submit(workflow("success-ws"))
            assert handle.accepted["queued"] is False
            kinds, previews = [], 0
            async def consume():
                nonlocal previews
                async for event in handle.events():
                    if isinstance(event, bytes):
                        previews += 1
                    else:
                        kinds.append(event["type"])
            await asyncio.wait_for(consume(), TIMEOUT)
            result = await handle.result(TIMEOUT)
            assert result.status == "success" and previews == 3
            assert "execution_start" in kinds and kinds[-1] == "execution_success"
            assert result.outputs["4"]["images"][0]["filename"].startswith("proxyprobe_ws")


async def test_rejected_prompt_and_subprotocol_auth(io_loop):
    async with ProxyHarness() as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice"), use_subprotocol=True) as client:
            try:
                await client.submit(workflow("validation-fail"))
            except ProxyError as e:
                assert e.code == "invalid_prompt" and e.data["node_errors"]
            else:
                raise AssertionError("a ComfyUI 400 must raise ProxyError")


async def test_resume_after_the_connection_drops(io_loop):
    async with ProxyHarness(sim_kwargs={"node_delay": 0.02}) as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            handle = await client.submit(workflow("long-running"))
            seen = []
            async def consume():
                async for event in handle.events():
                    if isinstance(event, dict):
                        seen.append(event)
                        if event["type"] == "executing" and event["data"].get("node") == "3":
                            # the proxy side drops the socket mid-prompt
                            for conn in list(h.state.registry.sessions["alice"].connections):
                                conn.close(1001, "test drop")
            await asyncio.wait_for(consume(), 30)
            result = await handle.result(TIMEOUT)
            assert result.status == "success"
            seqs = [e["seq"] for e in seen]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))  # in order, nothing twice
            nodes = [e["data"]["node"] for e in seen if e["type"] == "executing" and e["data"].get("node")]
            assert nodes == ["1", "2", "3", "4", "5", "6", "7", "8"]  # nothing lost across the drop


# --- refusals fail their request at once ------------------------------------------------------------

async def test_25_concurrent_submits_under_the_rate_limit_20_accepted_5_refused_at_once(io_loop):
    async with ProxyHarness(submit_burst=20, submit_rate_per_s=0.001, clock=FakeClock(), max_comfy_jobs_per_user=0,
                            sim_kwargs={"node_delay": 0}) as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            outcomes = await asyncio.wait_for(asyncio.gather(
                *(client.submit(workflow("success"), timeout=600) for _ in range(25)), return_exceptions=True),
                TIMEOUT)  # (a refusal nobody matched would wait the 600 s)
            accepted = [o for o in outcomes if isinstance(o, PromptHandle)]
            refused = [o for o in outcomes if not isinstance(o, PromptHandle)]
            assert len(accepted) == 20 and len(refused) == 5
            assert all(isinstance(e, ProxyError) and e.code == "rate_limited" and e.details["retry_after"] > 0
                       for e in refused), refused
            assert len({e.prompt_id for e in refused}) == 5 and not set(client.handles) & {e.prompt_id for e in refused}


async def test_the_proxys_own_refusals_and_comfyuis_raise_with_code_message_and_node_errors(io_loop):
    async with ProxyHarness(node_allowlist=["LoadImage"], max_prompt_nodes=3, max_message_bytes=4096) as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            async def refusal(prompt):
                try:
                    await asyncio.wait_for(client.submit(prompt, timeout=600), TIMEOUT)
                except ProxyError as e:
                    return e
                raise AssertionError("accepted")
            e = await refusal({"1": {"class_type": "Evil", "inputs": {}}})
            assert e.code == "invalid_prompt" and "not allowed" in e.message and e.details == {"node_id": "1"}
            e = await refusal({str(i): {"class_type": "LoadImage"} for i in range(4)})
            assert e.code == "invalid_prompt" and e.details == {"limit": 3, "nodes": 4}
            e = await refusal({"nodes": [], "links": []})  # a UI-format graph
            assert e.code == "invalid_prompt"
            e = await refusal({"1": {"class_type": "LoadImage", "inputs": {"image": "x" * 5000}}})
            assert e.code == "message_too_large" and e.prompt_id
            assert e.message.startswith("Message of")
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("bob")) as client:
            assert await client.ping({"n": 1}) == {"n": 1}
            try:
                await client.cancel(str(uuid.uuid4()))
            except ProxyError as e:
                assert e.code == "not_found"
            else:
                raise AssertionError("a cancel of nothing was answered")


async def test_comfyui_validation_errors_carry_node_errors(io_loop):
    async with ProxyHarness() as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            try:
                await asyncio.wait_for(client.submit(workflow("validation-fail"), timeout=600), TIMEOUT)
            except ProxyError as e:
                assert e.code == "invalid_prompt" and e.node_errors
                node = next(iter(e.node_errors.values()))
                assert node["class_type"] and node["errors"][0]["message"]
            else:
                raise AssertionError("accepted")


async def test_an_error_nobody_can_place_fails_the_oldest_request(io_loop):
    client = ProxyClient("ws://127.0.0.1:1/ws", "t")
    loop = asyncio.get_running_loop()
    from comfy_ws_proxy.client import _Pending
    older, newer = loop.create_future(), loop.create_future()
    client._pending[1] = _Pending("ping", None, older)
    client._pending[2] = _Pending("ping", None, newer)
    client._dispatch(json.dumps({"type": "error", "seq": 3, "data": {"code": "invalid_message", "message": "?"}}))
    assert isinstance(older.exception(), ProxyError) and not newer.done()
    # an error about something else (no code of an unreadable message) places nothing
    client._dispatch(json.dumps({"type": "error", "seq": 4, "data": {"code": "comfy_unavailable", "message": "?"}}))
    assert not newer.done()
    client._dispatch(json.dumps({"type": "pong", "seq": 5, "ref": 2, "data": {}}))
    assert newer.result()["type"] == "pong"


# --- tokens ----------------------------------------------------------------------------------------

LEEWAY = 30


def timed_harness(**overrides):
    wall = FakeClock(1_700_000_000.0)
    return ProxyHarness(wall=wall, jwt_leeway_s=LEEWAY, ws_ping_interval_s=0, **overrides), wall


async def test_a_refused_token_raises_authentication_error_with_the_reason(io_loop):
    async with ProxyHarness() as h:
        for token, reason in ((h.token("alice", ttl=-600), "expired"), ("not-a-jwt", "malformed")):
            try:
                await ProxyClient(f"ws://127.0.0.1:{h.port}/ws", token, reconnect=False).connect()
            except AuthenticationError as e:
                assert e.status == 401 and e.reason == reason and e.code == "unauthorized"
            else:
                raise AssertionError("connected")


async def test_token_expiring_makes_the_client_refresh_in_band(io_loop):
    h, wall = timed_harness(token_expiry_warning_s=60)
    async with h:
        calls = []

        async def provider():
            calls.append(wall.now)
            return h.token("alice", now=wall.now, ttl=600)
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", token_provider=provider) as client:
            first = client.conn
            wall.advance(570)
            h.state.pinger.tick()
            await client.ping()  # answered after token_expiring (in order): the refresh has begun
            await asyncio.wait_for(client._refresher, TIMEOUT)
            assert len(calls) == 2
            wall.advance(100)  # past the first token's deadline
            h.state.pinger.tick()
            await client.ping()
            assert client.conn is first and first.close_code is None


async def test_after_4001_without_a_provider_the_client_stops_and_fails_its_results(io_loop):
    h, wall = timed_harness(token_expiry_warning_s=0)
    async with h:
        hold = h.sim.hold_node("3")
        client = ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice", now=wall.now, ttl=100))
        await client.connect()
        try:
            handle = await client.submit(workflow("long-running"))
            await hold.reached
            wall.advance(130)
            h.state.pinger.tick()
            try:
                await handle.result(TIMEOUT)
            except AuthenticationError as e:
                assert e.reason == "expired" and "token_provider" in e.message
            else:
                raise AssertionError("a result after the token expired")
            await asyncio.wait_for(client._reader, TIMEOUT)  # it stopped: no reconnect loop
            assert h.state.metrics.auth_failures.labels("expired")._value.get() == 0  # never tried again
            try:
                await client.submit(workflow("success"))
            except AuthenticationError:
                pass
            else:
                raise AssertionError("a submit after the client ended")
        finally:
            hold.release()
            await client.close()


async def test_after_4001_with_a_provider_the_client_reconnects_and_resumes(io_loop):
    h, wall = timed_harness(token_expiry_warning_s=0)
    async with h:
        hold = h.sim.hold_node("3")
        calls = []

        def provider():  # a plain function works too
            calls.append(wall.now)
            return h.token("alice", now=wall.now, ttl=100)
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", token_provider=provider) as client:
            handle = await client.submit(workflow("long-running"))
            await hold.reached
            first = client.conn
            wall.advance(130)
            h.state.pinger.tick()  # closes the first connection (4001): nothing more is written to it
            hold.release()
            result = await handle.result(TIMEOUT)  # heard on the second one
            assert result.status == "success" and len(calls) == 2
            assert first.close_code == CloseCode.TOKEN_EXPIRED and client.conn is not first


async def test_a_reconnect_refused_with_the_same_token_twice_ends_the_client(io_loop):
    h, wall = timed_harness()
    async with h:
        tokens = [h.token("alice", now=wall.now, ttl=600)]

        def provider():
            return tokens[-1]
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", token_provider=provider) as client:
            hold = h.sim.hold_node("3")
            handle = await client.submit(workflow("long-running"))
            await hold.reached
            tokens.append(h.token("alice", now=wall.now - 1000, ttl=600))  # the provider only has a dead one
            for conn in list(h.state.registry.sessions["alice"].connections):
                conn.close(1001, "test drop")
            try:
                await handle.result(TIMEOUT)
            except AuthenticationError as e:
                assert e.reason == "expired" and e.status == 401
            else:
                raise AssertionError("a result without a token")
            assert h.state.metrics.auth_failures.labels("expired")._value.get() == 1  # tried once, not in a loop
            hold.release()

"""comfy_ws_proxy.client: submit() returns a handle whose events can be iterated and whose
result can be awaited; a dropped connection is re-established and resumed."""
import asyncio

from comfy_ws_proxy.client import ProxyClient, ProxyError

from .helpers import TIMEOUT, ProxyHarness, workflow


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

"""Reliability: queue while ComfyUI is down, drain fairly, reconcile unknown outcomes,
reconnect, cancel, and the chaos test (every prompt executed exactly once)."""
import asyncio
import collections
import random

import pytest

from comfy_ws_proxy.breaker import BreakerState

from .helpers import TIMEOUT, ProxyHarness, workflow

FINALS = ("execution_success", "execution_error", "execution_interrupted")


def finals_for(client, prompt_id):
    return [m for m in client.json_messages() if m["type"] in FINALS and m["data"].get("prompt_id") == prompt_id]


def breaker_reaches(backend, state: BreakerState) -> asyncio.Future:
    """A future resolved when the backend's breaker moves to ``state``."""
    future = asyncio.get_running_loop().create_future()

    def listener(old, new):
        if new is state and not future.done():
            future.set_result(True)
    backend.add_breaker_listener(listener)
    return future


async def accepted_by_comfy(client, prompt_ids):
    for prompt_id in prompt_ids:
        await client.next("prompt_accepted", lambda m, p=prompt_id: m["data"]["prompt_id"] == p
                          and not m["data"]["queued"])
        client._cursor = 0


async def test_prompts_queue_while_comfyui_is_down_and_drain_in_order(io_loop):
    async with ProxyHarness(max_queued_prompts_per_user=3) as h:
        alice = await h.connect("alice")
        await h.sim.go_down()
        ids = []
        for _ in range(3):
            reply = await alice.submit(workflow("success"))
            assert reply["type"] == "prompt_accepted" and reply["data"]["queued"] is True, reply
            ids.append(reply["data"]["prompt_id"])
        full = await alice.submit(workflow("success"))
        assert full["type"] == "error" and full["data"]["code"] == "queue_full"
        assert full["data"]["message"] == "Queue full"
        await h.sim.come_up()
        for prompt_id in ids:
            await alice.next("execution_success", lambda m, p=prompt_id: m["data"]["prompt_id"] == p)
        assert h.sim.started_order == ids  # per-user FIFO
        assert all(h.sim.execution_counts[p] == 1 for p in ids)
        # Each owner saw queued -> accepted by ComfyUI -> done.
        second = [m for m in alice.json_messages() if m["type"] == "prompt_accepted" and not m["data"]["queued"]]
        assert [m["data"]["prompt_id"] for m in second] == ids


async def test_breaker_opens_after_five_failures_and_queues_fail_fast(io_loop):
    async with ProxyHarness(breaker_open_ms=60_000, breaker_max_open_ms=60_000) as h:
        alice = await h.connect("alice")
        backend = h.state.pool.default
        opened = breaker_reaches(backend, BreakerState.OPEN)
        h.sim.http_error_status = 500
        reply = await alice.submit(workflow("success"))
        assert reply["data"]["queued"] is True
        await asyncio.wait_for(opened, TIMEOUT)  # the drain's retries count too: 5 failures open it
        assert backend.breaker.transitions[0] == (BreakerState.CLOSED, BreakerState.OPEN)
        requests_before = len(h.sim.requests)
        reply = await alice.submit(workflow("success"))
        assert reply["data"]["queued"] is True
        assert len(h.sim.requests) == requests_before  # fail fast: nothing sent while open


async def test_fair_round_robin_across_users_when_comfyui_returns(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        await h.sim.go_down()
        ids = {"alice": [], "bob": []}
        for client in (alice, bob):
            for i in range(3):
                prompt = workflow("success")
                prompt["1"]["inputs"]["color"] = i
                ids[client.user].append((await client.submit(prompt))["data"]["prompt_id"])
        h.sim.paused = True
        await h.sim.come_up()
        await accepted_by_comfy(alice, ids["alice"])
        await accepted_by_comfy(bob, ids["bob"])
        owners = [h.state.store.owner(item[1]) for item in sorted(
            (await _queue(h))["queue_pending"], key=lambda item: item[0])]
        h.sim.paused = False
        assert owners[:2] in (["alice", "bob"], ["bob", "alice"])
        assert owners in (["alice", "bob"] * 3, ["bob", "alice"] * 3)


async def _queue(h):
    import json
    response = await h.http.fetch(h.sim.url + "/queue")
    return json.loads(response.body)


async def test_a_stalled_post_is_reconciled_not_resubmitted(io_loop):
    async with ProxyHarness(comfy_request_timeout_ms=300) as h:
        alice = await h.connect("alice")
        h.sim.stall_post_prompt = "after_enqueue"
        h.sim.paused = True  # ComfyUI has it queued, but the POST's answer never comes
        reply = await alice.submit(workflow("success"))
        assert reply["data"]["queued"] is True  # outcome unknown: kept, not lost
        prompt_id = reply["data"]["prompt_id"]
        h.sim.stall_post_prompt = None
        h.sim.paused = False
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        await h.sim.wait_idle()
        assert h.sim.execution_counts[prompt_id] == 1
        h.sim.release_stalled()


async def test_a_stalled_post_that_never_arrived_is_resubmitted_once(io_loop):
    async with ProxyHarness(comfy_request_timeout_ms=300) as h:
        alice = await h.connect("alice")
        h.sim.stall_post_prompt = "before_enqueue"
        reply = await alice.submit(workflow("success"))
        prompt_id = reply["data"]["prompt_id"]
        assert reply["data"]["queued"] is True
        h.sim.stall_post_prompt = None
        accepted = await alice.next("prompt_accepted", lambda m: m["data"]["prompt_id"] == prompt_id
                                    and not m["data"]["queued"])
        assert accepted["data"].get("resubmitted") is True
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        h.sim.release_stalled()
        await h.sim.wait_idle()
        assert h.sim.execution_counts[prompt_id] == 1


async def test_comfyui_restart_loses_its_queue_and_the_proxy_resubmits(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        h.sim.paused = True
        reply = await alice.submit(workflow("success"))
        prompt_id = reply["data"]["prompt_id"]
        assert reply["data"]["queued"] is False
        await h.sim.restart()  # forgets the pending prompt
        h.sim.paused = False
        resubmitted = await alice.next("prompt_accepted", lambda m: m["data"]["prompt_id"] == prompt_id
                                       and m["data"].get("resubmitted"))
        assert resubmitted["data"]["queued"] is False
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert h.sim.execution_counts[prompt_id] == 1


async def test_outcome_missed_during_an_upstream_drop_is_delivered_from_history(io_loop):
    async with ProxyHarness(upstream_reconnect_min_ms=200, upstream_reconnect_max_ms=400) as h:
        alice = await h.connect("alice")
        h.sim.paused = True
        reply = await alice.submit(workflow("success"))
        prompt_id = reply["data"]["prompt_id"]
        h.sim.drop_websockets()
        h.sim.paused = False  # runs while the proxy's upstream socket is away
        final = await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        executed = [m for m in alice.json_messages() if m["type"] == "executed"
                    and m["data"]["prompt_id"] == prompt_id]
        assert executed and final["data"]["prompt_id"] == prompt_id
        assert len(finals_for(alice, prompt_id)) == 1
        assert h.sim.execution_counts[prompt_id] == 1


async def test_cancel_running_pending_and_queued_and_only_own(io_loop):
    async with ProxyHarness(sim_kwargs={"node_delay": 0.05}) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        running = (await alice.submit(workflow("long-running")))["data"]["prompt_id"]
        await alice.next("execution_start", lambda m: m["data"]["prompt_id"] == running)
        pending = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        # Bob cannot cancel Alice's prompt, and cannot tell it exists.
        bob.send("cancel", {"prompt_id": running})
        denied = await bob.next("error")
        assert denied["data"]["code"] == "not_found"
        alice.send("cancel", {"prompt_id": pending})
        await alice.next("prompt_cancelled", lambda m: m["data"]["prompt_id"] == pending)
        alice.send("cancel", {"prompt_id": running})
        await alice.next("execution_interrupted", lambda m: m["data"]["prompt_id"] == running)
        await h.sim.wait_idle()
        assert h.sim.execution_counts[pending] == 0
        # A prompt still in the proxy's own queue.
        await h.sim.go_down()
        queued = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        alice.send("cancel", {"prompt_id": queued})
        await alice.next("prompt_cancelled", lambda m: m["data"]["prompt_id"] == queued)
        await h.sim.come_up()
        assert h.state.store.get(queued).state == "cancelled"


@pytest.mark.chaos
async def test_chaos_every_prompt_runs_exactly_once_and_every_owner_hears(io_loop):
    """50 rounds of faults while 10 users submit 200 prompts."""
    rng = random.Random(7)
    async with ProxyHarness(max_connections_per_user=1, comfy_request_timeout_ms=400,
                            breaker_open_ms=30, breaker_max_open_ms=200) as h:
        users = [await h.connect(f"user{i}") for i in range(10)]
        ids = collections.defaultdict(list)
        faults = ["go_down", "drop", "restart", "http_500", "stall"]
        submitted = 0
        for round_no in range(50):
            fault = faults[round_no % len(faults)]
            if fault == "go_down":
                await h.sim.go_down()
            elif fault == "drop":
                h.sim.drop_websockets()
            elif fault == "restart":
                await h.sim.restart()
            elif fault == "http_500":
                h.sim.http_error_status = 500
            elif fault == "stall":
                h.sim.stall_post_prompt = rng.choice(["before_enqueue", "after_enqueue"])
            for _ in range(4):
                client = users[submitted % 10]
                reply = await client.submit(workflow("success"))
                assert reply["type"] == "prompt_accepted", reply
                ids[client.user].append(reply["data"]["prompt_id"])
                submitted += 1
            # heal
            h.sim.http_error_status = None
            h.sim.stall_post_prompt = None
            h.sim.release_stalled()
            if fault == "go_down":
                await h.sim.come_up()
        assert submitted == 200
        for client in users:
            for prompt_id in ids[client.user]:
                client._cursor = 0  # prompts finish out of submission order across faults: scan all
                try:
                    await client.next(where=lambda m, p=prompt_id: m.get("type") in FINALS
                                      and m["data"].get("prompt_id") == p, timeout=20)
                except asyncio.TimeoutError:
                    record = h.state.store.get(prompt_id)
                    raise AssertionError(f"{client.user} never heard of {prompt_id}: proxy state "
                                         f"{record.state if record else None}, executions "
                                         f"{h.sim.execution_counts[prompt_id]}, completions "
                                         f"{h.sim.completed_counts[prompt_id]}, in history "
                                         f"{prompt_id in h.sim.history}") from None
        await h.sim.wait_idle()
        all_ids = [p for user_ids in ids.values() for p in user_ids]
        executed = {p: h.sim.execution_counts[p] for p in all_ids}
        completed_once = sum(1 for p in all_ids if h.sim.completed_counts[p] == 1)
        duplicated = sum(1 for p in all_ids if h.sim.completed_counts[p] > 1)
        lost = sum(1 for p in all_ids if executed[p] == 0)
        for p in all_ids:
            if h.sim.completed_counts[p] > 1:
                print("DUP", p, "completed in ComfyUI generations",
                      [g for q, g in h.sim.completions if q == p])
        print(f"chaos: submitted={submitted} completed_once={completed_once} duplicated={duplicated} lost={lost}")
        assert duplicated == 0 and lost == 0 and completed_once == 200
        for client in users:
            for prompt_id in ids[client.user]:
                assert finals_for(client, prompt_id), prompt_id

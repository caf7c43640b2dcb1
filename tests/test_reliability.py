"""Reliability: queue while ComfyUI is down, drain fairly, reconcile unknown outcomes,
reconnect, cancel, and the chaos test (every prompt executed exactly once)."""
import asyncio
import collections
import random
import uuid

import pytest

from comfy_ws_proxy.backends.breaker import BreakerState

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
    async with ProxyHarness(max_comfy_jobs_per_user=0) as h:  # (all six go to ComfyUI's queue)
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
        owners = [h.state.tracker.get(item[1]).owner for item in sorted(
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
        assert h.state.tracker.get(queued).state == "cancelled"


async def test_the_proxy_settles_once_nothing_is_left_to_send_or_find_out(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        service = h.state.service
        assert service.settled()
        h.sim.http_error_status = 500  # the POST fails; the upstream socket stays up
        reply = await alice.submit(workflow("success"))
        assert reply["data"]["queued"] is True
        assert h.state.links.ready("alice", "default")
        assert h.state.pool.default.breaker.state is BreakerState.CLOSED
        assert not service.settled()  # only the prompt waiting in the proxy's queue holds it
        with pytest.raises(asyncio.TimeoutError):
            await service.wait_settled(0.05)
        assert not service._settled_waiters  # a waiter that timed out is not kept
        settled = asyncio.ensure_future(service.wait_settled(TIMEOUT))
        h.sim.http_error_status = None
        await settled
        record = h.state.tracker.get(reply["data"]["prompt_id"])
        assert record.state in ("pending", "running", "success")  # ComfyUI took it
        assert not record.outcome_unknown and h.state.links.ready("alice", "default")


async def first_message(client, where, timeout=TIMEOUT) -> dict:
    """The first message ever received that matches ``where`` (waits for it if need be).
    By prompt id, not by order: a queued prompt's second prompt_accepted comes at any time."""
    client._cursor = 0
    return await client.next(where=where, timeout=timeout)


async def submit_as(client, prompt: dict) -> dict:
    """Submit with our own prompt_id and return the proxy's reply to exactly this submission."""
    prompt_id = str(uuid.uuid4())
    client.send("submit_prompt", {"prompt": prompt, "prompt_id": prompt_id})
    return await first_message(client, lambda m: m.get("type") in ("prompt_accepted", "error")
                               and m["data"].get("prompt_id") == prompt_id)


def finals_everywhere(clients, prompt_id) -> list[dict]:
    """The final outcomes of ``prompt_id`` that any of these sockets (one user's, over time) got."""
    return [m for client in clients for m in finals_for(client, prompt_id)]


async def hear_outcome(h, clients, prompt_id, timeout=TIMEOUT) -> None:
    """Wait until one of the user's sockets (the latest, if none had it) has the final outcome
    of ``prompt_id``; say why not if it never comes."""
    if finals_everywhere(clients, prompt_id):
        return
    client = clients[-1]
    try:
        await first_message(client, lambda m: m.get("type") in FINALS and m["data"].get("prompt_id") == prompt_id,
                            timeout)
    except asyncio.TimeoutError:
        record = h.state.tracker.get(prompt_id)
        raise AssertionError(f"{client.user} never heard of {prompt_id}: proxy state "
                             f"{record.state if record else None}, executions "
                             f"{h.sim.execution_counts[prompt_id]}, completions "
                             f"{h.sim.completed_counts[prompt_id]}, in history "
                             f"{prompt_id in h.sim.history}") from None


@pytest.mark.chaos
@pytest.mark.timeout(seconds=180)  # ~10 s here; room for a slow CI machine
async def test_chaos_every_prompt_runs_exactly_once_and_every_owner_hears(io_loop):
    """50 rounds of faults while 10 users submit 200 prompts.

    Each round is what happens in production: a fault, submissions during it, the heal, and
    then time for the proxy to settle (JobService.settled: reconciled, drained, reconnected)
    before the next fault. Faults milliseconds apart are not realistic: a restart that wipes
    ComfyUI's history before the proxy could read it forces a legitimate resubmission.
    One fault in six restarts the proxy itself (as if SIGKILLed, or by a SIGTERM's graceful
    stop, in turn) with that round's prompts waiting in ComfyUI; its users reconnect."""
    rng = random.Random(7)
    async with ProxyHarness(max_connections_per_user=1, comfy_request_timeout_ms=400,
                            breaker_open_ms=30, breaker_max_open_ms=200, store_path="file") as h:
        users = [await h.connect(f"user{i}") for i in range(10)]
        everyone = {client.user: [client] for client in users}  # every socket a user ever had
        ids = collections.defaultdict(list)
        forgotten = []  # accepted by ComfyUI, then wiped by its restart before they ran
        faults = ["go_down", "drop", "restart", "http_500", "stall", "proxy_restart"]
        submitted = proxy_restarts = 0
        for round_no in range(50):
            fault = faults[round_no % len(faults)]
            if fault == "go_down":
                await h.sim.go_down()
            elif fault == "drop":
                h.sim.drop_websockets()
            elif fault == "restart":
                # ComfyUI dies with this round's prompts accepted and waiting in its queue. Not
                # in the moment between finishing a prompt and telling anyone: nobody can know
                # that one ran, so it runs again (the rule). On a real ComfyUI that moment
                # is milliseconds of a prompt's seconds; on the simulator prompts take a
                # millisecond, so first let ComfyUI finish and every outcome reach its owner.
                await h.sim.wait_idle()
                for job in h.state.tracker.unfinished():
                    await hear_outcome(h, everyone[job.owner], job.job_id)
                h.sim.paused = True
            elif fault == "proxy_restart":
                h.sim.paused = True  # the round's prompts wait in ComfyUI while the proxy goes
            elif fault == "http_500":
                h.sim.http_error_status = 500
            elif fault == "stall":
                h.sim.stall_post_prompt = rng.choice(["before_enqueue", "after_enqueue"])
            # four users submit at once (each waits for its own reply, e.g. a stalled POST's)
            clients = [users[(submitted + i) % 10] for i in range(4)]
            replies = await asyncio.gather(*(submit_as(client, workflow("success")) for client in clients))
            for client, reply in zip(clients, replies):
                assert reply["type"] == "prompt_accepted", reply
                ids[client.user].append(reply["data"]["prompt_id"])
                if fault == "restart" and not reply["data"]["queued"]:
                    forgotten.append((client.user, reply["data"]["prompt_id"]))
            submitted += 4
            if fault == "restart":
                await h.sim.restart()  # forgets the prompts it had accepted
                h.sim.paused = False
            elif fault == "proxy_restart":
                await h.restart_proxy("kill" if proxy_restarts % 2 == 0 else "term")
                proxy_restarts += 1
                h.sim.paused = False
                for client in users:
                    await asyncio.wait_for(asyncio.shield(client.closed), TIMEOUT)
                users = [await h.connect(client.user) for client in users]
                for client in users:
                    everyone[client.user].append(client)
            # heal
            h.sim.http_error_status = None
            h.sim.stall_post_prompt = None
            h.sim.release_stalled()
            if fault == "go_down":
                await h.sim.come_up()
            try:
                await h.state.service.wait_settled(TIMEOUT)
            except asyncio.TimeoutError:
                raise AssertionError(f"round {round_no} ({fault}): the proxy did not settle") from None
        assert submitted == 200 and proxy_restarts == 8
        for user, user_ids in ids.items():
            for prompt_id in user_ids:
                await hear_outcome(h, everyone[user], prompt_id, timeout=20)
        await h.sim.wait_idle()
        for client in users:  # everything sent before the pong has arrived
            client.send("ping")
            await client.next("pong")
        all_ids = [p for user_ids in ids.values() for p in user_ids]
        executed = {p: h.sim.execution_counts[p] for p in all_ids}
        completed_once = sum(1 for p in all_ids if h.sim.completed_counts[p] == 1)
        duplicated = sum(1 for p in all_ids if h.sim.completed_counts[p] > 1)
        lost = sum(1 for p in all_ids if executed[p] == 0)
        told = {p: len(finals_everywhere(everyone[user], p)) for user, user_ids in ids.items() for p in user_ids}
        for p in all_ids:
            if h.sim.completed_counts[p] > 1:
                print("DUP", p, "completed in ComfyUI generations",
                      [g for q, g in h.sim.completions if q == p])
        told_resubmitted = sum(1 for clients in everyone.values() for client in clients for m in client.json_messages()
                               if m["type"] == "prompt_accepted" and m["data"].get("resubmitted"))
        print(f"chaos: submitted={len(set(all_ids))} executed={sum(1 for p in all_ids if executed[p])} "
              f"completed_once={completed_once} duplicated={duplicated} lost={lost} "
              f"forgotten_by_restarts={len(forgotten)} told_resubmitted={told_resubmitted} "
              f"proxy_restarts={proxy_restarts} outcomes_told_once={sum(1 for n in told.values() if n == 1)} "
              f"told_twice={sum(1 for n in told.values() if n > 1)}")
        assert len(set(all_ids)) == 200
        assert duplicated == 0 and lost == 0 and completed_once == 200
        assert set(told.values()) == {1}  # every owner heard every outcome, exactly once
        assert not h.state.tracker.unfinished()
        # The restarts did wipe accepted prompts, and their owners were told they went again.
        assert len(forgotten) >= 20
        for user, prompt_id in forgotten:
            assert any(m["type"] == "prompt_accepted" and m["data"]["prompt_id"] == prompt_id
                       and m["data"].get("resubmitted") for client in everyone[user]
                       for m in client.json_messages()), prompt_id


async def test_a_prompt_cancelled_while_its_post_hangs_never_runs(io_loop):
    async with ProxyHarness(max_connections_per_user=2) as h:
        alice = await h.connect("alice")
        other_tab = await h.connect("alice")
        h.sim.stall_post_prompt = "before_enqueue"
        h.sim.paused = True  # a busy ComfyUI: what it takes waits in its queue
        prompt_id = str(uuid.uuid4())
        alice.send("submit_prompt", {"prompt": workflow("success"), "prompt_id": prompt_id})
        await h.sim.wait_stalled(1)
        assert h.state.tracker.get(prompt_id).state == "submitting"
        other_tab.send("cancel", {"prompt_id": prompt_id})
        await other_tab.next("prompt_cancelled", lambda m: m["data"]["prompt_id"] == prompt_id)
        h.sim.stall_post_prompt = None
        h.sim.release_stalled()  # ComfyUI takes it after all: the proxy takes it back out
        await alice.next("prompt_cancelled", lambda m: m["data"]["prompt_id"] == prompt_id)
        alice.send("ping")  # answered once the submit's handling (the POST, the withdrawal) is over
        await alice.next("pong")
        assert h.sim.queue_remaining() == 0
        h.sim.paused = False
        await h.sim.wait_idle()
        await h.state.service.wait_settled(TIMEOUT)
        assert ("POST", "/queue") in h.sim.requests
        assert h.sim.execution_counts[prompt_id] == 0
        assert h.state.tracker.get(prompt_id).state == "cancelled"
        assert not [m for m in alice.json_messages() if m["type"] == "prompt_accepted"]

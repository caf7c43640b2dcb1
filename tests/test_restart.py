"""The proxy restarted (as if SIGKILLed, and by a graceful SIGTERM stop) while one of a user's
jobs runs in ComfyUI, another waits in ComfyUI's queue and a third waits in the proxy's:
every job runs exactly once, and its owner hears each outcome exactly once, whether they
reconnect at once (with or without ``resume``) or come back after everything finished.
(The same with the proxy as a real process: test_durability.py.)"""
import asyncio
import random
import uuid

import pytest

from .helpers import TIMEOUT, ProxyHarness, job_finished, workflow

FINALS = ("execution_success", "execution_error", "execution_interrupted")


def fresh(name: str) -> dict:
    """A workflow ComfyUI's cache cannot answer: a new colour for every EmptyImage."""
    prompt = workflow(name)
    for node in prompt.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = random.randrange(1 << 24)
    return prompt


async def submit(client, prompt: dict, prompt_id: str) -> dict:
    client.send("submit_prompt", {"prompt": prompt, "prompt_id": prompt_id})
    return await client.next(where=lambda m: m.get("type") in ("prompt_accepted", "error")
                             and m["data"].get("prompt_id") == prompt_id)


async def three_jobs(h, client):
    """One running (held inside node 3), one pending in ComfyUI, one in the proxy's queue."""
    running, pending, queued = (str(uuid.uuid4()) for _ in range(3))
    hold = h.sim.hold_node("3", running)
    assert (await submit(client, fresh("long-running"), running))["data"]["queued"] is False
    await asyncio.wait_for(hold.reached, TIMEOUT)
    await client.next("executing", lambda m: m["data"].get("node") == "3" and m["data"]["prompt_id"] == running)
    assert (await submit(client, fresh("success"), pending))["data"]["queued"] is False
    assert (await submit(client, fresh("success"), queued))["data"]["queued"] is True  # backend_queue_depth=2
    assert [h.state.tracker.get(i).state for i in (running, pending, queued)] == ["running", "pending", "queued"]
    return [running, pending, queued], hold


async def reconciler_quiet(h) -> None:
    """Until no question to ComfyUI is in flight (each answer may raise the next)."""
    reconciler = h.state.reconciler
    while reconciler.asking:
        await asyncio.wait_for(asyncio.gather(*reconciler.asking.values(), return_exceptions=True), TIMEOUT)


def finals(client, prompt_id: str) -> list[dict]:
    return [m for m in client.json_messages() if m["type"] in FINALS and m["data"].get("prompt_id") == prompt_id]


@pytest.mark.parametrize("owner", ["reconnects", "resumes", "stays_away", "away_while_proxy_down"])
@pytest.mark.parametrize("how", ["kill", "term"])
async def test_a_restart_loses_no_outcome_and_tells_each_once(io_loop, how, owner):
    async with ProxyHarness(store_path="file", backend_queue_depth=2) as h:
        alice = await h.connect("alice")
        session_id = alice.received[0]["data"]["session_id"]
        ids, hold = await three_jobs(h, alice)
        last_seq = max(m["seq"] for m in alice.json_messages())

        async def finish_in_comfy():
            hold.release()
            await h.sim.wait_idle()  # the running and the pending one ran while no proxy listened

        await h.restart_proxy(how, while_down=finish_in_comfy if owner == "away_while_proxy_down" else None)
        await asyncio.wait_for(alice.closed, TIMEOUT)
        assert not any(finals(alice, i) for i in ids)  # nothing was finished before the restart
        if owner in ("stays_away", "away_while_proxy_down"):
            done = [job_finished(h.state, i) for i in ids]
            hold.release()
            jobs = await asyncio.wait_for(asyncio.gather(*done), TIMEOUT)
            assert all(job.state == "success" and not job.told for job in jobs)  # nobody heard yet
        back = await h.connect("alice")
        if owner == "resumes":
            back.send("resume", {"session_id": session_id, "last_seq": last_seq})
            gap = await back.next("resume_gap")
            assert gap["data"]["reason"] == "unknown_session"  # a new process: the old buffer is gone
        if owner in ("reconnects", "resumes"):
            # Every question the restart raised is answered before the held job goes on: the
            # pending one is then known to be heard whole by the new socket.
            await reconciler_quiet(h)
            assert not h.state.tracker.get(ids[1]).gap
        hold.release()
        for prompt_id in ids:
            back._cursor = 0  # each from the start: they come in any order (and before a resume's answer)
            await back.next(where=lambda m, p=prompt_id: m.get("type") in FINALS and m["data"]["prompt_id"] == p)
        await h.sim.wait_idle()
        await h.state.service.wait_settled(TIMEOUT)
        back.send("ping")
        await back.next("pong")  # everything sent before the pong has arrived
        for prompt_id in ids:
            told = finals(back, prompt_id)
            assert [m["type"] for m in told] == ["execution_success"], (prompt_id, told)
            assert h.sim.execution_counts[prompt_id] == 1
            assert h.state.tracker.get(prompt_id).told
        assert h.state.tracker.unfinished() == []
        # The running job's outputs from before the restart were not lost either.
        running_outputs = [m for m in back.json_messages() if m["type"] == "executed"
                           and m["data"]["prompt_id"] == ids[0]]
        assert [m["data"]["node"] for m in running_outputs] == list(h.sim.history[ids[0]]["outputs"])
        if owner in ("stays_away", "away_while_proxy_down"):
            assert all(m.get("replayed") for m in finals(back, ids[0]) + finals(back, ids[1]))
        else:  # heard live: it was pending, and the new socket registered before it started
            assert not any(m.get("replayed") for m in finals(back, ids[1]))
        # Another socket later: nothing is told twice.
        await back.close()
        later = await h.connect("alice")
        later.send("ping")
        await later.next("pong")
        assert not any(finals(later, i) for i in ids)


async def test_an_outcome_still_in_the_proxys_buffers_when_it_dies_is_still_owed(io_loop):
    """An outcome counts as told only once a socket's kernel has its bytes: one queued in the
    proxy behind a client's unread 8 MB preview dies with the process, so it stays owed, and
    the owner hears it when they come back."""
    import json as json_module

    from .test_security import masked_frame, raw_upgrade
    async with ProxyHarness(store_path="file", max_outbound_buffer_bytes=64 << 20) as h:
        _, writer = await raw_upgrade(h.port, h.token("alice"))  # completes the upgrade, never reads
        prompt_id = str(uuid.uuid4())
        finished = job_finished(h.state, prompt_id)
        message = {"type": "submit_prompt", "data": {"prompt": fresh("success-ws-large"), "prompt_id": prompt_id}}
        writer.write(masked_frame(0x1, json_module.dumps(message).encode()))
        await writer.drain()
        job = await asyncio.wait_for(finished, TIMEOUT)
        assert job.state == "success"
        conn = next(iter(h.state.registry.sessions["alice"].connections))
        assert conn.pending_bytes > 0  # the preview and the outcome behind it are still ours
        assert not job.told
        await h.restart_proxy("kill")
        writer.close()
        alice = await h.connect("alice")
        final = await alice.next("execution_success", where=lambda m: m["data"].get("prompt_id") == prompt_id)
        assert final.get("replayed") is True
        assert h.state.tracker.get(prompt_id).told

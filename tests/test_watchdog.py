"""The watchdog: a job ComfyUI holds that is not heard from is asked about until it ends, and
a job past its execution time limit is interrupted and ends timed_out. Clocks are injected:
the tests move them and run the watchdog's tick themselves."""
import asyncio
import json

from tornado.websocket import websocket_connect

from .helpers import TIMEOUT, FakeClock, ProxyHarness, job_finished, workflow

FINALS = ("execution_success", "execution_error", "execution_interrupted")


async def test_a_job_whose_events_go_astray_is_asked_about_and_its_outcome_delivered(io_loop):
    clock = FakeClock()
    async with ProxyHarness(clock=clock, job_watchdog_s=30, upstream_deaf_after_s=3600) as h:
        alice = await h.connect("alice")
        h.sim.paused = True
        prompt_id = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        # Another socket registers under alice's client id: ComfyUI now routes her events there
        # and her own socket stays open, deaf, with no error (PROTOCOL.md 3.2).
        link = h.state.links.get("alice", "default")
        thief = await websocket_connect(f"{h.sim.ws_url}?clientId={link.client_id}")
        assert json.loads(await thief.read_message())["data"]["sid"] == link.client_id
        finished = job_finished(h.state, prompt_id)
        h.sim.paused = False
        await h.sim.wait_idle()
        assert not finished.done() and h.state.tracker.get(prompt_id).state == "pending"  # heard nothing
        h.state.reconciler.tick()
        assert not finished.done() and not h.state.reconciler.asking  # not yet: heard from 0 s ago
        clock.advance(30)
        h.state.reconciler.tick()  # not heard from for job_watchdog_s: ask ComfyUI
        job = await asyncio.wait_for(finished, TIMEOUT)
        assert job.state == "success"
        final = await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert final["replayed"] is True
        executed = [m for m in alice.json_messages() if m["type"] == "executed"]
        assert executed and all(m["replayed"] for m in executed)
        assert h.sim.execution_counts[prompt_id] == 1
        thief.close()


async def test_a_job_past_its_time_limit_is_interrupted_and_ends_timed_out(io_loop):
    wall = FakeClock(1_700_000_000.0)
    async with ProxyHarness(wall=wall, job_execution_timeout_s=600) as h:
        alice = await h.connect("alice")
        hold = h.sim.hold_node("3")
        reply = await alice.submit(workflow("long-running"), timeout_s=60)  # its own, lower limit
        prompt_id = reply["data"]["prompt_id"]
        await asyncio.wait_for(hold.reached, TIMEOUT)
        await alice.next("execution_start", lambda m: m["data"]["prompt_id"] == prompt_id)
        job = h.state.tracker.get(prompt_id)
        assert job.timeout_s == 60 and job.state == "running"
        wall.advance(59)
        h.state.reconciler.tick()
        assert not h.state.reconciler._interrupts  # within its limit
        wall.advance(1)
        h.state.reconciler.tick()
        await asyncio.wait_for(asyncio.gather(*h.state.reconciler._interrupts), TIMEOUT)  # the interrupt went out
        assert ("POST", "/interrupt") in h.sim.requests
        hold.release()
        notice = await alice.next("prompt_timed_out")
        assert notice["data"] == {"prompt_id": prompt_id, "timeout_s": 60}
        await alice.next("execution_interrupted", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert h.state.tracker.get(prompt_id).state == "timed_out"
        alice.send("resume", {"session_id": "x", "last_seq": 0})
        states = await alice.next("prompts_state")
        assert states["data"]["prompts"][0]["state"] == "timed_out"
        # A request may only lower the limit, never raise it or turn it off.
        other = await alice.submit(workflow("success"), timeout_s=10_000)
        assert h.state.tracker.get(other["data"]["prompt_id"]).timeout_s == 600
        bad = await alice.submit(workflow("success"), timeout_s=-1)
        assert bad["type"] == "error" and bad["data"]["code"] == "invalid_message"


async def test_a_socket_comfyui_stopped_routing_to_is_noticed_after_a_post_and_replaced(io_loop):
    """UPSTREAM_DEAF_AFTER_S: ComfyUI broadcasts a status when its queue changes; a socket that
    saw none after an accepted POST is no longer routed to (PROTOCOL.md 3.2). It is replaced
    (same client id) and the job reconciled, long before the watchdog would ask."""
    async with ProxyHarness(upstream_deaf_after_s=0.2, job_watchdog_s=3600) as h:
        alice = await h.connect("alice")
        link = h.state.links.get("alice", "default")
        thief = await websocket_connect(f"{h.sim.ws_url}?clientId={link.client_id}")
        assert json.loads(await thief.read_message())["data"]["sid"] == link.client_id
        replaced = asyncio.get_running_loop().create_future()

        class Watch:
            def link_up(self, up, reconnected):
                if up is link and reconnected and not replaced.done():
                    replaced.set_result(None)

            def link_down(self, down):
                pass
        h.state.links.listeners.append(Watch())
        h.sim.paused = True
        prompt_id = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        await asyncio.wait_for(replaced, TIMEOUT)  # no status came: the socket was replaced
        assert link.connections == 2 and h.state.links.get("alice", "default") is link
        h.sim.paused = False
        final = await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert final["data"]["prompt_id"] == prompt_id
        assert h.sim.execution_counts[prompt_id] == 1
        thief.close()

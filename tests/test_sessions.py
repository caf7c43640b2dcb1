"""Session lifecycle: expiry as a pure function, cleanup with a fake clock, resume buffers."""
import asyncio

from comfy_ws_proxy.gateway.session import session_expired
from comfy_ws_proxy.jobs.service import TokenBucket

from .helpers import TIMEOUT, FakeClock, ProxyHarness, job_finished, workflow


def test_expiry_is_a_pure_function_of_now():
    base = dict(last_activity=100.0, timeout=1800.0, connections=0)
    assert not session_expired(now=1899.9, **base)
    assert session_expired(now=1900.0, **base)
    assert not session_expired(now=10_000, **dict(base, connections=1))


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == 0.5        # retry after half a second
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) > 0


async def test_cleanup_removes_expired_sessions_and_their_upstream_sockets(io_loop):
    clock = FakeClock()
    async with ProxyHarness(clock=clock, session_timeout_ms=60_000) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        await alice.run(workflow("success"))
        assert set(h.state.registry.sessions) == {"alice", "bob"}
        await alice.close()
        clock.advance(59)
        assert h.state.registry.cleanup() == []          # not yet
        clock.advance(2)
        gone = h.state.registry.cleanup()
        assert [s.user_id for s in gone] == ["alice"]    # bob is still connected
        assert set(h.state.registry.sessions) == {"bob"}
        assert bob.received[0]["type"] == "session"


async def test_resume_replays_missed_messages_and_reports_gaps(io_loop):
    async with ProxyHarness(max_connections_per_user=2, resume_buffer_size=500) as h:
        alice = await h.connect("alice")
        session_id = alice.received[0]["data"]["session_id"]
        prompt_id, _ = await alice.run(workflow("success"))
        await alice.next("executing", lambda m: m["data"] == {"node": None, "prompt_id": prompt_id})
        first_seq = alice.received[1]["seq"]
        seen = [m["seq"] for m in alice.json_messages()]
        await alice.close()
        again = await h.connect("alice")
        assert again.received[0]["data"]["session_id"] == session_id
        again.send("resume", {"session_id": session_id, "last_seq": first_seq})
        state = await again.next("prompts_state")
        replayed = [m for m in again.json_messages() if m["seq"] > first_seq and m["type"] != "prompts_state"
                    and m["type"] != "session"]
        assert [m["seq"] for m in replayed] == [s for s in seen if s > first_seq]
        assert any(p["prompt_id"] == prompt_id and p["state"] == "success" for p in state["data"]["prompts"])
        # Someone else's or an unknown session id: a gap notice, nothing replayed.
        again.send("resume", {"session_id": "not-mine", "last_seq": 0})
        gap = await again.next("resume_gap")
        assert gap["data"]["reason"] == "unknown_session"


async def test_resume_gap_when_the_buffer_no_longer_reaches_back(io_loop):
    async with ProxyHarness(resume_buffer_size=5) as h:
        alice = await h.connect("alice")
        session_id = alice.received[0]["data"]["session_id"]
        await alice.run(workflow("success"))
        alice.send("resume", {"session_id": session_id, "last_seq": 1})
        gap = await alice.next("resume_gap")
        assert gap["data"]["reason"] == "buffer_exceeded"
        await alice.next("prompts_state")


async def test_the_resume_buffer_is_bounded_in_bytes_too(io_loop):
    async with ProxyHarness(resume_buffer_size=500, resume_buffer_bytes=2000) as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))  # more than 2000 bytes of events
        session = h.state.registry.sessions["alice"]
        assert 0 < session.buffer_bytes <= 2000
        assert session.buffer_bytes == sum(len(text) for _, text, _ in session.buffer)
        assert session.buffer[-1][0] == session.seq  # the newest are kept
        complete, missed = session.since(1)
        assert not complete and missed == [text for _, text, _ in session.buffer]


async def test_idle_upstream_socket_is_closed_and_reopened_on_demand(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))
        session = h.state.registry.sessions["alice"]
        link = h.state.links.get("alice", "default")
        client_id = link.client_id
        assert h.sim.ws_clients.get(client_id) == 1
        await alice.close()
        await asyncio.wait_for(link.stopped.wait(), 10)
        assert h.state.links.get("alice", "default") is None  # nothing pending, nobody connected
        assert "alice" in h.state.registry.sessions        # the session itself lives on (resume)
        again = await h.connect("alice")
        assert again.received[0]["data"]["session_id"] == session.session_id
        link = h.state.links.get("alice", "default")
        assert link is not None and link.ready.is_set()
        assert link.client_id == client_id  # the pair's client id is durable
        _, outcome = await again.run(workflow("success-ws"))
        assert outcome == "execution_success"


async def test_a_session_expires_but_its_users_jobs_live_on_and_their_outcome_is_owed(io_loop):
    """Jobs are not the session's: it expires on its own clock, the link stays while a job
    of its user is unfinished, and the outcome reaches the user when they come back."""
    clock = FakeClock()
    async with ProxyHarness(clock=clock, session_timeout_ms=1000) as h:
        alice = await h.connect("alice")
        h.sim.paused = True
        prompt_id = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        await alice.close()
        clock.advance(3600)
        assert [s.user_id for s in h.state.registry.cleanup()] == ["alice"]
        link = h.state.links.get("alice", "default")
        assert link is not None and link.ready.is_set()  # kept for the pending prompt
        finished = job_finished(h.state, prompt_id)
        h.sim.paused = False
        job = await asyncio.wait_for(finished, TIMEOUT)
        assert job.state == "success" and not job.told  # nobody was there to hear it
        await asyncio.wait_for(link.stopped.wait(), TIMEOUT)  # not wanted any more
        back = await h.connect("alice")
        final = await back.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert final["replayed"] is True
        assert h.state.tracker.get(prompt_id).told
        executed = [m for m in back.json_messages() if m["type"] == "executed"]
        assert [m["data"]["node"] for m in executed] == list(job.outputs)  # the outputs, before it
        await back.close()
        third = await h.connect("alice")
        third.send("ping")
        await third.next("pong")
        assert not [m for m in third.json_messages() if m["type"] == "execution_success"]  # told once


async def test_cleanup_forgets_finished_prompts_after_the_retention(io_loop):
    async with ProxyHarness(finished_prompt_retention_s=3600) as h:
        alice = await h.connect("alice")
        old, _ = await alice.run(workflow("success"))
        new, _ = await alice.run(workflow("success-ws"))
        h.sim.paused = True
        pending = (await alice.submit(workflow("long-running")))["data"]["prompt_id"]
        tracker = h.state.tracker
        tracker.get(old).updated_at -= 7200               # finished two hours ago
        tracker.get(pending).updated_at -= 7200           # unfinished: kept whatever its age
        assert h.state.service.cleanup() == 1
        assert tracker.get(old) is None and tracker.get(new) is not None and tracker.get(pending) is not None
        rows = {r[0] for r in h.state.store.db.execute("SELECT prompt_id FROM prompts")}
        assert old not in rows and {new, pending} <= rows
        h.sim.paused = False


async def test_clients_are_pinged_and_one_that_stops_answering_is_closed(io_loop):
    clock = FakeClock()
    async with ProxyHarness(clock=clock, ws_ping_interval_s=10, ws_ping_timeout_s=5) as h:
        alice = await h.connect("alice")
        conn = next(iter(h.state.registry.sessions["alice"].connections))
        answered = asyncio.get_running_loop().create_future()
        on_pong = conn.on_pong

        def watched_on_pong(data):
            on_pong(data)
            if not answered.done():
                answered.set_result(True)
        conn.on_pong = watched_on_pong
        h.state.pinger.tick()
        assert conn.ping_sent_at is None  # not due yet
        clock.advance(10)
        h.state.pinger.tick()
        assert conn.ping_sent_at is not None
        await asyncio.wait_for(answered, TIMEOUT)  # Tornado's client answers pings by itself
        assert conn.ping_sent_at is None and alice.closed.done() is False
        conn.on_pong = lambda data: None  # from now on, a peer that never answers
        clock.advance(10)
        h.state.pinger.tick()
        clock.advance(4.9)
        h.state.pinger.tick()
        assert not alice.closed.done()
        clock.advance(0.1)
        h.state.pinger.tick()
        assert await asyncio.wait_for(alice.closed, TIMEOUT) == (1001, "ping timed out")



async def test_resume_before_anything_was_buffered_is_a_gap_not_an_error(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        session_id = alice.received[0]["data"]["session_id"]  # seq 1, sent to this socket only
        assert h.state.registry.sessions["alice"].buffer is None
        alice.send("resume", {"session_id": session_id, "last_seq": 0})
        gap = await alice.next("resume_gap")
        assert gap["data"]["reason"] == "buffer_exceeded"
        await alice.next("prompts_state")
        assert not [m for m in alice.received if isinstance(m, dict) and m.get("type") == "error"]

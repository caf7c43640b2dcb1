"""Findings of the attack review (issue 15), each reproduced first."""
import asyncio
import json
import struct

import pytest

from .helpers import TIMEOUT, FakeClock, ProxyHarness, job_finished, workflow


def text_frames(client) -> list[bytes]:
    return [f for f in client.binary_frames() if struct.unpack(">I", f[:4])[0] == 3]


async def test_after_a_dropped_socket_another_users_text_frames_never_arrive(io_loop):
    """Finding 1: alice's upstream socket drops while her prompt runs and it finishes meanwhile;
    bob's prompt then broadcasts a type-3 text frame to every socket. Not to alice."""
    async with ProxyHarness(upstream_reconnect_min_ms=2000, upstream_reconnect_max_ms=2000) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        hold = h.sim.hold_node("4")  # GetImageSize: its text frame comes after the hold
        mine = workflow("success")
        mine["1"]["inputs"]["color"] = 1
        reply = await alice.submit(mine)
        prompt_id = reply["data"]["prompt_id"]
        await asyncio.wait_for(hold.reached, TIMEOUT)
        await alice.next("executing", lambda m: m["data"].get("node") == "4")
        finished = job_finished(h.state, prompt_id)
        h.sim.drop_websockets()  # both users' upstream sockets go; they come back in 2 s
        hold.release()           # alice's prompt finishes while nobody hears it
        await h.sim.wait_idle()
        h.state.reconciler.tick()  # (the watchdog would ask; ask now)
        await asyncio.wait_for(finished, TIMEOUT)
        await h.sim.wait_ws_clients(lambda clients: len(clients) == 2, TIMEOUT)  # both back
        await h.state.service.wait_settled(TIMEOUT)
        before = len(text_frames(alice))
        theirs = workflow("success")
        theirs["1"]["inputs"]["color"] = 2
        _, outcome = await bob.run(theirs)
        assert outcome == "execution_success"
        assert len(text_frames(bob)) == 1  # bob got his own text frame
        alice.send("ping")
        await alice.next("pong")
        assert len(text_frames(alice)) == before  # and alice none of bob's


async def test_an_id_is_never_reused_even_after_its_job_was_forgotten(io_loop):
    """Finding 4: a new job with the id of a forgotten one would be served the old owner's
    files (ComfyUI's history of the id outlives our record)."""
    async with ProxyHarness(store_path="file") as h:
        alice = await h.connect("alice")
        mallory = await h.connect("mallory")
        prompt_id, _ = await alice.run(workflow("success"))
        h.state.tracker.get(prompt_id).updated_at -= 10 * 86400
        assert h.state.service.cleanup() == 1 and h.state.tracker.get(prompt_id) is None
        for client in (mallory, alice):
            reply = await client.submit(workflow("success"), prompt_id=prompt_id)
            assert reply["type"] == "error" and reply["data"]["code"] == "invalid_message", reply
            assert reply["data"]["message"] == "prompt_id is already in use"
        await h.restart_proxy("term")  # the store remembers
        mallory = await h.connect("mallory")
        reply = await mallory.submit(workflow("success"), prompt_id=prompt_id)
        assert reply["type"] == "error" and reply["data"]["message"] == "prompt_id is already in use"
        response = await h.get(f"/outputs/{prompt_id}", headers={"Authorization": "Bearer " + h.token("mallory")})
        assert response.code == 404


async def test_a_poison_prompt_gets_a_bounded_number_of_tries_and_holds_nobody_up(io_loop):
    """Finding 5: a prompt ComfyUI answers with a 500 (it is up: /prompt answers) is not
    'ComfyUI down': the breaker stays closed, others' prompts go on, and after
    MAX_SUBMIT_ATTEMPTS the prompt fails and its owner is told."""
    # (With VALIDATE_PROMPTS on, this prompt never reaches ComfyUI: the next test. Off here, as
    # any prompt ComfyUI breaks on that the validator would let through.)
    async with ProxyHarness(max_submit_attempts=3, breaker_failure_threshold=2, validate_prompts=False) as h:
        mallory = await h.connect("mallory")
        alice = await h.connect("alice")
        poison = {"1": {"class_type": ["SaveImage"], "inputs": {}}}
        reply = await mallory.submit(poison)
        assert reply["type"] == "prompt_accepted" and reply["data"]["queued"] is True  # 500 #1: try again
        prompt_id = reply["data"]["prompt_id"]
        failed = await mallory.next("error", lambda m: m["data"].get("prompt_id") == prompt_id)
        assert failed["data"]["code"] == "comfy_error" and "3 times" in failed["data"]["message"]
        assert h.state.tracker.get(prompt_id).state == "rejected"
        posts = [r for r in h.sim.requests if r == ("POST", "/prompt")]
        assert len(posts) == 3
        breaker = h.state.pool.default.breaker
        assert breaker.transitions == [] and breaker.consecutive_failures == 0
        _, outcome = await alice.run(workflow("success"))  # nobody else was held up
        assert outcome == "execution_success"
        assert len([r for r in h.sim.requests if r == ("POST", "/prompt")]) == 4  # and it was not sent again


async def test_a_prompt_comfyui_would_break_on_is_refused_before_it_when_its_classes_are_known(io_loop):
    async with ProxyHarness() as h:
        await h.state.pool.default.learn_capabilities(TIMEOUT)
        mallory = await h.connect("mallory")
        reply = await mallory.submit({"1": {"class_type": ["SaveImage"], "inputs": {}}})
        assert reply["type"] == "error" and reply["data"]["code"] == "invalid_prompt"
        assert ("POST", "/prompt") not in h.sim.requests


async def test_ready_never_resets_the_breakers_count_of_failures(io_loop):
    async with ProxyHarness() as h:
        breaker = h.state.pool.default.breaker
        breaker.record_failure(h.state.clock())
        breaker.record_failure(h.state.clock())
        response = await h.get("/ready")
        assert response.code == 200
        assert breaker.consecutive_failures == 2


@pytest.mark.parametrize("claims, reason", [
    ({"exp": 10 ** 400}, "malformed"),          # once a 500 with an HTML body
    ({"exp": str(10 ** 12)}, "malformed"),      # once accepted, and never enforced
    ({"sub": "mallory\nINFO forged line"}, "malformed"),  # once a forged log line
])
async def test_malformed_claims_are_a_401_with_the_json_shape(io_loop, claims, reason, caplog):
    """Finding 9 (and the log forgery of 'Smaller')."""
    async with ProxyHarness(allow_query_token=True) as h:
        sub = claims.pop("sub", "mallory")
        token = h.key.token(sub, **claims)
        status, body = await h.refused(token, via="query")
        assert status == 401 and body["error"]["code"] == "unauthorized" and body["error"]["reason"] == reason
        response = await h.get("/outputs/" + "0" * 8 + "-0000-4000-8000-" + "0" * 12,
                               headers={"Authorization": "Bearer " + token})
        assert response.code == 401 and json.loads(response.body)["error"]["code"] == "unauthorized"
        assert token not in caplog.text and "forged line" not in caplog.text


async def test_a_malformed_origin_is_a_403_not_a_500(io_loop, caplog):
    async with ProxyHarness(allow_query_token=True) as h:
        token = h.token("mallory")
        status, body = await h.refused(token, via="query", headers={"Origin": "http://["})
        assert status == 403 and body["error"]["code"] == "forbidden_origin"
        assert token not in caplog.text and "Traceback" not in caplog.text


async def test_a_prompt_cancelled_while_its_post_is_unanswered_is_stopped_when_it_surfaces(io_loop):
    """Finding 12: cancel while a POST's outcome is unknown answers prompt_cancelled; when the
    POST lands in ComfyUI after all, the prompt is taken back out and its owner sees none of it."""
    async with ProxyHarness(comfy_request_timeout_ms=300, sim_kwargs={"node_delay": 0.02}) as h:
        alice = await h.connect("alice")
        h.sim.stall_post_prompt = "before_enqueue"
        reply = await alice.submit(workflow("long-running"))
        prompt_id = reply["data"]["prompt_id"]
        assert reply["data"]["queued"] is True  # the POST timed out: ComfyUI may or may not have it
        # ComfyUI could not be asked for sure (the POST may still land), so it went again: wait
        # for that second POST to hang too, then cancel.
        resent = asyncio.get_running_loop().create_future()

        def watch(job, old):
            if job.job_id == prompt_id and job.attempts == 2 and job.state == "submitting" and not resent.done():
                resent.set_result(None)
        h.state.tracker.listeners.append(watch)
        await asyncio.wait_for(resent, TIMEOUT)
        await h.sim.wait_stalled(1)
        alice.send("cancel", {"prompt_id": prompt_id})
        await alice.next("prompt_cancelled", lambda m: m["data"]["prompt_id"] == prompt_id)
        cancelled_at = len(alice.received)
        h.sim.stall_post_prompt = None
        h.sim.release_stalled()  # the stalled POSTs land now: ComfyUI starts it
        await h.sim.wait_idle()
        assert h.sim.execution_counts[prompt_id] >= 1
        entry = h.sim.history[prompt_id]
        assert entry["status"]["status_str"] == "error"  # interrupted, not run to the end
        assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
        alice.send("ping")
        await alice.next("pong")
        after = [m for m in alice.received[cancelled_at:]
                 if isinstance(m, bytes) or m["data"].get("prompt_id") == prompt_id]
        assert after == []
        assert h.state.tracker.get(prompt_id).state == "cancelled"


async def test_one_user_cannot_fill_comfyuis_queue_nor_jump_ahead(io_loop):
    """Finding 7: MAX_QUEUED_PROMPTS_PER_USER counted only the proxy's queue, and front: true
    put a user ahead of everyone."""
    async with ProxyHarness(max_comfy_jobs_per_user=2) as h:
        mallory = await h.connect("mallory")
        alice = await h.connect("alice")
        h.sim.paused = True
        replies = []
        for i in range(5):
            prompt = workflow("success")
            prompt["1"]["inputs"]["color"] = i
            replies.append(await mallory.submit(prompt))
        assert [r["data"]["queued"] for r in replies] == [False, False, True, True, True]
        assert h.sim.queue_remaining() == 2
        theirs = await alice.submit(workflow("success"))
        assert theirs["data"]["queued"] is False  # alice is not behind mallory's other three
        front = await mallory.submit(workflow("success-ws"), front=True)
        assert front["type"] == "error" and front["data"]["code"] == "invalid_message"
        assert "ALLOW_FRONT" in front["data"]["message"]
        h.sim.paused = False
        ids = [r["data"]["prompt_id"] for r in replies]
        for prompt_id in ids:
            await mallory.next("execution_success", lambda m, p=prompt_id: m["data"]["prompt_id"] == p)
        order = [p for p in h.sim.started_order if p in ids]
        assert order == ids  # FIFO for the user, all of them run
        assert h.sim.started_order.index(theirs["data"]["prompt_id"]) < h.sim.started_order.index(ids[2])


async def test_front_is_for_operators_who_allow_it(io_loop):
    async with ProxyHarness(allow_front=True) as h:
        alice = await h.connect("alice")
        await alice.run(workflow("success"))  # (ComfyUI's first number is 0, and -0 is 0)
        reply = await alice.submit(workflow("success-ws"), front=True)
        assert reply["type"] == "prompt_accepted" and reply["data"]["number"] < 0


async def test_a_flood_of_ready_checks_costs_comfyui_one_request_per_interval(io_loop):
    """Finding 8: each unauthenticated /ready cost one ComfyUI request."""
    clock = FakeClock()
    async with ProxyHarness(clock=clock, ready_cache_ms=1000) as h:
        before = len(h.sim.requests)
        answers = await asyncio.gather(*(h.get("/ready") for _ in range(50)))
        assert {a.code for a in answers} == {200}
        asked = [r for r in h.sim.requests[before:] if r == ("GET", "/prompt")]
        assert len(asked) == 1
        clock.advance(1.0)
        assert (await h.get("/ready")).code == 200
        assert len([r for r in h.sim.requests[before:] if r == ("GET", "/prompt")]) == 2
        await h.sim.go_down()
        clock.advance(1.0)
        down = await h.get("/ready")
        assert down.code == 503 and json.loads(down.body)["reason"] == "comfy_unreachable"


async def test_a_resume_answer_is_bounded_whatever_the_retention_holds(io_loop):
    """Finding 8: resume sent every finished record of the retention window."""
    async with ProxyHarness(prompts_state_max=3) as h:
        alice = await h.connect("alice")
        done = [(await alice.run(workflow("success")))[0] for _ in range(4)]
        h.sim.paused = True
        pending = (await alice.submit(workflow("success-ws")))["data"]["prompt_id"]
        alice.send("resume", {"session_id": "x", "last_seq": 0})
        state = await alice.next("prompts_state")
        assert [p["prompt_id"] for p in state["data"]["prompts"]] == done[-2:] + [pending]
        h.sim.paused = False


async def test_a_full_disk_refuses_new_prompts_clearly_and_loses_nothing_running(io_loop):
    """Finding 10: with the store full, submissions got a bare internal_error, /ready said 200,
    a running prompt's final event was dropped, and failed submissions left ghost records that
    locked the user out. The fault is real: SQLite's max_page_count makes the database full."""
    async with ProxyHarness(store_path="file", max_queued_prompts_per_user=2, ready_cache_ms=0) as h:
        alice = await h.connect("alice")
        hold = h.sim.hold_node("5")
        running = (await alice.submit(workflow("long-running")))["data"]["prompt_id"]
        await asyncio.wait_for(hold.reached, TIMEOUT)
        db = h.state.store.db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
        for _ in range(3):  # more than the queue allows: failures must not count against it
            refused = await alice.submit({"1": {"class_type": "EmptyImage", "inputs": {"pad": "x" * 50_000}},
                                          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
            assert refused["type"] == "error" and refused["data"]["code"] == "store_unavailable", refused
            assert refused["data"]["prompt_id"] and "try again" in refused["data"]["message"]
        assert h.state.tracker.waiting_count("alice") == 0  # no ghost records
        ready = await h.get("/ready")
        assert ready.code == 503 and json.loads(ready.body)["reason"] == "store_unavailable"
        hold.release()  # the running prompt ends while the store cannot take it
        final = await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == running)
        assert "replayed" not in final  # heard live: nothing dropped
        db.execute("PRAGMA max_page_count=1073741823")  # space again
        h.state.reconciler.tick()  # (the watchdog's tick writes what was kept in memory)
        assert h.state.tracker.store_healthy and (await h.get("/ready")).code == 200
        row = db.execute("SELECT state, told FROM prompts WHERE prompt_id = ?", (running,)).fetchone()
        assert row == ("success", 1)
        _, outcome = await alice.run(workflow("success"))  # and alice is not locked out
        assert outcome == "execution_success"


async def test_ready_is_503_while_comfyuis_websocket_is_refused(io_loop):
    """Finding 14: /ready said 200 while every user got comfy_unavailable."""
    async with ProxyHarness(ready_cache_ms=0) as h:
        await h.connect("alice")
        assert (await h.get("/ready")).code == 200
        links = h.state.links
        refused = asyncio.get_running_loop().create_future()
        record_failure = links.link_failed

        def spy(link):  # (observes the real handler)
            record_failure(link)
            if not refused.done():
                refused.set_result(link)
        links.link_failed = spy
        h.sim.websocket_status = 400  # HTTP works, upgrades are refused
        h.sim.drop_websockets()
        link = await asyncio.wait_for(refused, TIMEOUT)  # a reconnect was refused
        ready = await h.get("/ready")
        assert ready.code == 503 and json.loads(ready.body)["reason"] == "comfy_websocket_refused"
        h.sim.websocket_status = None
        await asyncio.wait_for(link.ready.wait(), TIMEOUT)
        assert (await h.get("/ready")).code == 200


@pytest.mark.parametrize("resubmit_unknown", [True, False])
async def test_a_job_lost_after_it_may_have_run_follows_the_policy(io_loop, resubmit_unknown):
    """Finding 13: once ComfyUI restarted while the proxy was not hearing it (its sockets were
    down: a ComfyUI crash, or a proxy crash as well), nobody can tell whether a job it had
    accepted ran. RESUBMIT_UNKNOWN=true (the default) sends it again: at least once; false
    ends it lost and tells its owner: at most once. A POST that provably never arrived (its
    answer was lost while the socket kept listening) always goes again."""
    async with ProxyHarness(resubmit_unknown=resubmit_unknown, comfy_request_timeout_ms=300) as h:
        alice = await h.connect("alice")
        h.sim.paused = True
        accepted = (await alice.submit(workflow("success")))["data"]["prompt_id"]
        await h.sim.restart()  # ComfyUI forgets it; its sockets dropped: did it run? Nobody knows
        h.sim.paused = False
        if resubmit_unknown:
            again = await alice.next("prompt_accepted", lambda m: m["data"]["prompt_id"] == accepted
                                     and m["data"].get("resubmitted"))
            assert again["data"]["queued"] is False
            await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == accepted)
        else:
            lost = await alice.next("error", lambda m: m["data"].get("prompt_id") == accepted)
            assert lost["data"]["code"] == "outcome_unknown"
            assert h.state.tracker.get(accepted).state == "lost"
            await h.sim.wait_idle()
            assert h.sim.execution_counts[accepted] == 0
        await h.state.service.wait_settled(TIMEOUT)
        h.sim.stall_post_prompt = "before_enqueue"  # the POST never lands; its answer never comes
        unanswered = workflow("success")
        unanswered["1"]["inputs"]["color"] = 5
        reply = await alice.submit(unanswered)
        assert reply["data"]["queued"] is True
        h.sim.stall_post_prompt = None
        h.sim.release_stalled()
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == reply["data"]["prompt_id"])
        assert h.sim.execution_counts[reply["data"]["prompt_id"]] == 1  # sent again, safely, by either policy


async def test_a_stalled_jwks_endpoint_holds_no_upgrade_slot(io_loop):
    """Finding 8: a slow JWKS endpoint plus unknown-kid tokens held every upgrade slot (a
    legitimate upgrade waited 3.8 s)."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from comfy_ws_proxy.testing.tokens import DevKey

    key = DevKey.generate("good")
    loop = asyncio.get_running_loop()
    stall = {"on": False, "released": loop.create_future(), "arrived": loop.create_future()}

    class Jwks(RequestHandler):
        async def get(self):
            if stall["on"]:
                if not stall["arrived"].done():
                    stall["arrived"].set_result(True)
                await stall["released"]
            self.finish(key.jwks())

    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([(r"/jwks.json", Jwks)]))
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/jwks.json"
    try:
        async with ProxyHarness(jwt_key_file="", jwt_jwks_url=url, jwks_min_refetch_interval_s=0,
                                max_concurrent_upgrades=1, handshake_timeout_ms=30_000) as h:
            await h.connect("alice", token=key.token("alice"))  # the cache has the good key
            stall["on"] = True
            stranger = DevKey.generate("unknown")
            refused = asyncio.ensure_future(h.refused(stranger.token("mallory")))
            await asyncio.wait_for(stall["arrived"], TIMEOUT)  # its fetch reached the JWKS endpoint: it hangs
            bob = await asyncio.wait_for(h.connect("bob", token=key.token("bob")), TIMEOUT)
            assert bob.received[0]["type"] == "session"  # in while the other one waits for the JWKS
            assert not refused.done()
            stall["released"].set_result(True)
            status, body = await asyncio.wait_for(refused, TIMEOUT)
            assert status == 401 and body["error"]["reason"] == "unknown_kid"
    finally:
        if not stall["released"].done():
            stall["released"].set_result(True)
        server.stop()

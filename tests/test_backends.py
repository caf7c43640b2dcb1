"""Several ComfyUI backends behind one proxy (issue 12): capabilities decide where a job may
go, late binding keeps every backend busy, and failover loses nothing and duplicates nothing
that is delivered."""
import asyncio
import json
import random
import uuid

from comfy_ws_proxy.testing.comfyui import txt2img_workflow

from .helpers import TIMEOUT, ProxyHarness, job_finished, until, workflow

FINALS = ("execution_success", "execution_error", "execution_interrupted")


def fresh(name: str = "success") -> dict:
    prompt = workflow(name)
    for node in prompt.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = random.randrange(1 << 24)
    return prompt


def ran_on(h: ProxyHarness, prompt_id: str) -> list[str]:
    """The backends whose simulator completed ``prompt_id`` (once per completion)."""
    return [name for name, sim in h.sims.items() for _ in range(sim.completed_counts[prompt_id])]


async def capabilities_known(h: ProxyHarness) -> None:
    await until(lambda: all(b.capabilities is not None for b in h.state.pool),
                [b.capability_listeners for b in h.state.pool])


def finals(client, prompt_id: str) -> list[dict]:
    return [m for m in client.json_messages() if m.get("type") in FINALS and m["data"].get("prompt_id") == prompt_id]


async def finals_of(client, prompt_ids) -> dict[str, list[dict]]:
    """Every final event the client got for each prompt id, once all of them have one."""
    await client.until(lambda: all(finals(client, p) for p in prompt_ids), timeout=TIMEOUT * 2)
    return {p: finals(client, p) for p in prompt_ids}


async def unfenced(h: ProxyHarness, prompt_id: str) -> None:
    await until(lambda: not h.state.tracker.get(prompt_id).fenced, [h.state.tracker.listeners])


async def test_a_job_needing_a_node_or_a_model_only_one_backend_has_always_runs_there(io_loop):
    fleet = {"plain": {"models": ["base.safetensors"]},
             "custom": {"models": ["base.safetensors"], "extra_node_classes": ["FancyGlow"]},
             "xl": {"models": ["base.safetensors", "xl.safetensors"]}}
    async with ProxyHarness(fleet=fleet) as h:
        await capabilities_known(h)
        alice = await h.connect("alice")
        runs = []
        for i in range(4):
            glowing = txt2img_workflow("base.safetensors", seed=i, filters=("FancyGlow",))
            runs.append(("custom", await alice.run(glowing)))
            runs.append(("xl", await alice.run(txt2img_workflow("xl.safetensors", seed=i))))
        for backend, (prompt_id, outcome) in runs:
            assert outcome == "execution_success"
            assert ran_on(h, prompt_id) == [backend]
            assert h.state.tracker.get(prompt_id).backend == backend
        # Work any backend can do is spread when it comes together: never "the first in the
        # list" only (SwarmUI #374).
        ids = [str(uuid.uuid4()) for _ in range(6)]
        for p in ids:
            alice.send("submit_prompt", {"prompt": fresh(), "prompt_id": p})
        await finals_of(alice, ids)
        assert len({ran_on(h, p)[0] for p in ids}) >= 2


async def test_a_job_no_backend_can_run_is_refused_at_once_in_comfyuis_shape(io_loop):
    fleet = {"a": {"models": ["base.safetensors"]}, "b": {"models": ["other.safetensors"]}}
    async with ProxyHarness(fleet=fleet) as h:
        await capabilities_known(h)
        alice = await h.connect("alice")
        for prompt, what in ((txt2img_workflow("missing.safetensors"), "missing.safetensors"),
                             (txt2img_workflow("base.safetensors", filters=("NoSuchNode",)), "NoSuchNode")):
            reply = await alice.submit(prompt)
            assert reply["type"] == "error", reply
            data = reply["data"]
            assert data["code"] == "invalid_prompt" and data["prompt_id"] and what in data["message"]
            assert set(data["error"]) == {"type", "message", "details", "extra_info"}
            if what == "NoSuchNode":  # the same on both: ComfyUI's own answer, a top-level invalid_prompt
                assert data["error"]["type"] == "invalid_prompt" and data["node_errors"] == {}
                assert data["message"] == data["error"]["message"] and "backends" not in data
            else:  # a value not in either list of files: per node, in ComfyUI's shape
                assert set(data["backends"]) == {"a", "b"}  # what each one lacks
                assert data["message"].startswith("No backend can run this prompt")
                entry = data["node_errors"]["4"]
                assert entry["class_type"] == "CheckpointLoaderSimple"
                assert entry["errors"][0]["type"] == "value_not_in_list" and entry["dependent_outputs"]
            assert h.state.tracker.get(data["prompt_id"]).state == "rejected"
        for sim in h.sims.values():
            assert not any(method == "POST" and path == "/prompt" for method, path in sim.requests)
        # The HTTP face says the same.
        response = await h.http.fetch(h.url + "/generate", method="POST", raise_error=False,
                                      headers={"Authorization": "Bearer " + h.token("alice")},
                                      body=json.dumps({"prompt": txt2img_workflow("missing.safetensors")}))
        body = json.loads(response.body)
        assert response.code in (400, 422) and body["error"]["code"] == "invalid_prompt"


async def test_a_job_asking_for_a_label_goes_only_where_it_is(io_loop):
    async with ProxyHarness(fleet={"a": {}, "b": {}}) as h:
        h.state.pool.get("b").labels = frozenset({"big-vram"})
        alice = await h.connect("alice")
        for _ in range(3):
            prompt_id, outcome = await alice.run(fresh(), labels=["big-vram"])
            assert outcome == "execution_success" and ran_on(h, prompt_id) == ["b"]
        reply = await alice.submit(fresh(), labels=["tpu"])
        assert reply["type"] == "error" and "tpu" in reply["data"]["message"]


async def test_work_waits_in_the_proxy_and_goes_to_whichever_backend_frees_first(io_loop):
    """Late binding: a backend holds one job of ours at a time; while one is stuck, every
    other job runs on the other backend (a backend that stalls without dying gets no new work)."""
    async with ProxyHarness(fleet={"a": {}, "b": {}}, max_comfy_jobs_per_user=0) as h:
        await capabilities_known(h)
        hold_a = h.sims["a"].hold_node("3")
        alice = await h.connect("alice")
        ids = [str(uuid.uuid4()) for _ in range(6)]
        finished = {p: job_finished(h.state, p) for p in ids}
        for p in ids:
            alice.send("submit_prompt", {"prompt": fresh(), "prompt_id": p})
        stuck = await asyncio.wait_for(hold_a.reached, TIMEOUT)
        others = [p for p in ids if p != stuck]
        await asyncio.wait_for(asyncio.gather(*(finished[p] for p in others)), TIMEOUT)
        assert all(ran_on(h, p) == ["b"] for p in others)
        assert h.sims["a"].execution_counts[stuck] == 1 and len(h.sims["a"].execution_counts) == 1
        hold_a.release()
        await asyncio.wait_for(finished[stuck], TIMEOUT)
        assert ran_on(h, stuck) == ["a"]


async def test_one_backend_killed_mid_run_every_job_ends_once_and_every_owner_hears_once(io_loop):
    """Three backends; one is killed while it runs a job and holds others (connections refused),
    and comes back later as a new, empty process. Jobs not placed go elsewhere at once; the
    ones it held move once the failover time passes, and are fenced there."""
    fleet = {"a": {"node_delay": 0.01}, "b": {"node_delay": 0.01}, "c": {"node_delay": 0.01}}
    async with ProxyHarness(fleet=fleet, failover_after_s=0.3, backend_queue_depth=2,
                            max_comfy_jobs_per_user=0) as h:
        await capabilities_known(h)
        hold = h.sims["b"].hold_node("3")
        users = {name: await h.connect(name) for name in ("alice", "bob")}
        ids = {name: [str(uuid.uuid4()) for _ in range(6)] for name in users}
        for name, client in users.items():
            for p in ids[name]:
                client.send("submit_prompt", {"prompt": fresh(), "prompt_id": p})
        victim = await asyncio.wait_for(hold.reached, TIMEOUT)
        await h.sims["b"].crash()  # killed: connections refused, its queue and running job gone
        hold.release()
        heard = {name: await finals_of(client, ids[name]) for name, client in users.items()}
        for name in users:
            for p in ids[name]:
                assert len(heard[name][p]) == 1, (p, heard[name][p])  # one outcome, once
                assert heard[name][p][0]["type"] == "execution_success"
                assert len(ran_on(h, p)) == 1 and ran_on(h, p)[0] in ("a", "c")
        victim_owner = next(name for name in users if victim in ids[name])
        accepted = [m for m in users[victim_owner].json_messages() if m.get("type") == "prompt_accepted"
                    and m["data"].get("prompt_id") == victim]
        assert any(m["data"].get("moved") for m in accepted)  # its owner was told it moved
        assert h.state.tracker.get(victim).fenced == ("b",)
        # b comes back as a new process: the fence is lifted once b is known not to hold it.
        await h.sims["b"].come_up()
        await unfenced(h, victim)
        assert h.sims["b"].completed_counts[victim] == 0


async def test_a_backend_back_with_a_moved_job_never_delivers_it_twice(io_loop):
    """A partition: the old backend keeps running the job it had while the proxy cannot
    reach it; the job moves and finishes elsewhere; when the old one is reachable again, the
    job is taken out of it, and nothing it says about the job reaches the owner."""
    async with ProxyHarness(fleet={"a": {}, "b": {}}, failover_after_s=0.3) as h:
        await capabilities_known(h)
        alice = await h.connect("alice")
        hold_a = h.sims["a"].hold_node("3")
        hold_b = h.sims["b"].hold_node("3")
        prompt_id = str(uuid.uuid4())
        alice.send("submit_prompt", {"prompt": fresh(), "prompt_id": prompt_id})
        first, second = asyncio.ensure_future(hold_a.reached), asyncio.ensure_future(hold_b.reached)
        done, _ = await asyncio.wait([first, second], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        old, new = ("a", "b") if first in done else ("b", "a")
        (hold_b if old == "a" else hold_a).release()  # the new one runs freely
        await h.sims[old].go_down()  # partitioned: it keeps running the job
        final = await finals_of(alice, [prompt_id])
        assert ran_on(h, prompt_id) == [new]
        (hold_a if old == "a" else hold_b).release()  # the old one finishes it, unheard
        await h.sims[old].wait_idle()
        await h.sims[old].come_up()
        await unfenced(h, prompt_id)
        await alice.run(fresh())  # anything more it might have said would have arrived by now
        assert finals(alice, prompt_id) == final[prompt_id] and len(final[prompt_id]) == 1


async def test_two_users_on_two_backends_never_see_each_others_frames(io_loop):
    async with ProxyHarness(fleet={"a": {}, "b": {}}, max_comfy_jobs_per_user=0) as h:
        await capabilities_known(h)
        alice, bob = await h.connect("alice"), await h.connect("bob")
        mine = {"alice": [], "bob": []}
        for _ in range(4):
            for name, client in (("alice", alice), ("bob", bob)):
                prompt_id = str(uuid.uuid4())
                mine[name].append(prompt_id)
                client.send("submit_prompt", {"prompt": fresh("success-ws"), "prompt_id": prompt_id})
        await finals_of(alice, mine["alice"])
        await finals_of(bob, mine["bob"])
        assert {b for p in mine["alice"] + mine["bob"] for b in ran_on(h, p)} == {"a", "b"}
        for name, client, other in (("alice", alice, "bob"), ("bob", bob, "alice")):
            for message in client.json_messages():
                assert message.get("data", {}).get("prompt_id") not in mine[other], message
            # type-4 previews carry the prompt id in their metadata; type-1/3 frames are ComfyUI's
            # broadcasts: only those of the user's own jobs may arrive.
            for frame in client.binary_frames():
                assert not any(p.encode() in frame for p in mine[other])


async def test_ready_and_metrics_detail_every_backend(io_loop):
    async with ProxyHarness(fleet={"a": {}, "b": {}}) as h:
        await capabilities_known(h)
        ready = json.loads((await h.get("/ready")).body)
        assert ready["status"] == "ready" and set(ready["backends"]) == {"a", "b"}
        await h.sims["a"].go_down()
        h.state.pool.get("a").breaker.record_failure(h.state.clock())  # (the next call would)
        for _ in range(h.settings.breaker_failure_threshold):
            h.state.pool.get("a").breaker.record_failure(h.state.clock())
        ready = json.loads((await h.get("/ready")).body)
        assert ready["status"] == "ready"  # b can take work
        assert ready["backends"]["a"]["status"] == "breaker_open" and ready["backends"]["b"]["status"] == "ready"
        await h.sims["b"].go_down()
        for _ in range(h.settings.breaker_failure_threshold):
            h.state.pool.get("b").breaker.record_failure(h.state.clock())
        response = await h.get("/ready")
        assert response.code == 503 and json.loads(response.body)["reason"] == "no_backend_ready"
        metrics = json.loads((await h.get("/metrics", headers={
            "Authorization": "Bearer " + h.settings.metrics_secret})).body)
        assert set(metrics["backends"]) == {"a", "b"}
        assert metrics["backends"]["b"]["capabilities"]["node_classes"] > 0
        text = (await h.get("/metrics/prometheus", headers={
            "Authorization": "Bearer " + h.settings.metrics_secret})).body.decode()
        assert 'comfy_ws_proxy_backend_jobs{backend="a"}' in text and 'breaker_state{backend="b"' in text


async def test_a_job_on_a_backend_no_longer_configured_goes_to_one_that_is(io_loop):
    """COMFY_URL (a backend named default) becomes BACKENDS across a restart, with a job in
    ComfyUI: nobody can ask "default" any more, so the job is sent again (at least once, as
    RESUBMIT_UNKNOWN says) and its owner hears one outcome."""
    async with ProxyHarness(store_path="file", sim_kwargs={"node_delay": 0.01}) as h:
        alice = await h.connect("alice")
        hold = h.sim.hold_node("3")
        prompt_id = str(uuid.uuid4())
        alice.send("submit_prompt", {"prompt": fresh(), "prompt_id": prompt_id})
        await asyncio.wait_for(hold.reached, TIMEOUT)
        other = await _start_sim()
        h.settings = h.settings.replace(backends=({"name": "gpu0", "url": other.url},))
        try:
            await h.restart_proxy("kill")
            hold.release()
            alice = await h.connect("alice")
            await alice.until(lambda: finals(alice, prompt_id))
            assert [m["type"] for m in finals(alice, prompt_id)] == ["execution_success"]
            assert other.completed_counts[prompt_id] == 1
            job = h.state.tracker.get(prompt_id)
            assert job.backend == "gpu0" and job.fenced == ()
        finally:
            await other.stop()


async def _start_sim():
    from comfy_ws_proxy.testing.comfyui import ComfySimulator
    sim = ComfySimulator()
    await sim.start()
    return sim


async def test_capabilities_are_remembered_across_a_restart_for_a_backend_that_is_down(io_loop):
    """A backend down when the proxy starts is known as it was last seen: a job only it can run
    waits for it (and runs when it is back), one no backend can run is refused at once."""
    fleet = {"a": {}, "b": {"extra_node_classes": ["FancyGlow"]}}
    async with ProxyHarness(fleet=fleet, store_path="file") as h:
        await capabilities_known(h)
        await h.sims["b"].go_down()
        await h.restart_proxy("kill")
        b = h.state.pool.get("b")
        assert b.capabilities is not None and b.capabilities.remembered
        assert "FancyGlow" in b.capabilities.classes
        alice = await h.connect("alice")
        glowing = fresh()
        glowing["3"] = {"class_type": "FancyGlow", "inputs": {"image": ["2", 0], "strength": 1.0}}
        waiting = await alice.submit(glowing)
        assert waiting["type"] == "prompt_accepted" and waiting["data"]["queued"] is True
        refused = await alice.submit(txt2img_workflow("base.safetensors", filters=("NoSuchNode",)))
        assert refused["type"] == "error" and refused["data"]["code"] == "invalid_prompt"
        await h.sims["b"].come_up()
        prompt_id = waiting["data"]["prompt_id"]
        await alice.until(lambda: finals(alice, prompt_id))
        assert ran_on(h, prompt_id) == ["b"]
        b = h.state.pool.get("b")  # read again once it is back (its socket registered)
        await until(lambda: not b.capabilities.remembered, [b.capability_listeners])

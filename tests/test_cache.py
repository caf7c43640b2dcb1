"""The result cache (issue 14): the key's properties (hypothesis), and the cache end to end
with the simulator: hits never reach ComfyUI, identical requests in flight share one
execution, scopes, opt-out, expiry, bounds, restarts, and downloads that outlive entries."""
from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_ws_proxy.jobs.cache import (
    BUILTIN_FILE_INPUTS,
    NotCacheable,
    entry_key,
    file_refs,
    prompt_plan,
)
from comfy_ws_proxy.testing.comfyui import f32, uniform_png

from .helpers import TIMEOUT, FakeClock, ProxyHarness, job_finished, workflow

pytestmark = pytest.mark.usefixtures("io_loop")


# --- the key, as a pure function ----------------------------------------------------------------
def key_of(prompt: dict, files: dict[str, str] | None = None, targets=None, scope: str = "u:alice") -> str:
    """The key of ``prompt`` whose loaded files have the content hashes ``files`` (name -> sha)."""
    hashes = {}
    for ref in file_refs(prompt, prompt, BUILTIN_FILE_INPUTS):
        hashes[(ref.node_id, ref.input_name)] = (files or {})[ref.written]
    return prompt_plan(prompt, scope=scope, file_hashes=hashes, targets=targets).key


SHA_A, SHA_B = "a" * 64, "b" * 64
literals = st.recursive(
    st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, width=32), st.text(max_size=4), st.booleans(),
              st.none()),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=4).filter(lambda v: not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                        and isinstance(v[1], (int, float)) and not isinstance(v[1], bool)))


@st.composite
def prompts(draw):
    """A random API prompt (a DAG: links only to earlier nodes), with UI metadata."""
    size = draw(st.integers(1, 7))
    prompt = {}
    for i in range(size):
        class_type = draw(st.sampled_from(["KSampler", "CheckpointLoaderSimple", "LoadImage", "SaveImage", "Blur"]))
        inputs = {}
        if class_type == "LoadImage":
            inputs["image"] = draw(st.sampled_from(["cat.png", "dog.png"]))
        for name in draw(st.lists(st.sampled_from(["seed", "steps", "ckpt_name", "text", "cfg"]), unique=True,
                                  max_size=3)):
            inputs[name] = draw(literals)
        if i and draw(st.booleans()):
            for name in draw(st.lists(st.sampled_from(["model", "images", "latent"]), unique=True, min_size=1,
                                      max_size=2)):
                inputs[name] = [str(draw(st.integers(0, i - 1))), draw(st.integers(0, 2))]
        node = {"class_type": class_type, "inputs": inputs}
        if draw(st.booleans()):
            node["_meta"] = {"title": draw(st.text(max_size=5))}
        prompt[str(i)] = node
    return prompt


def renumbered(prompt: dict, new_ids: list[str], order: list[int], title: str) -> dict:
    """The same graph under other ids, keys in another order, other UI titles."""
    ids = list(prompt)
    mapping = {old: new_ids[i] for i, old in enumerate(ids)}
    out = {}
    for i in order:
        old = ids[i]
        node = prompt[old]
        inputs = {}
        for name in reversed(list(node["inputs"])):
            value = node["inputs"][name]
            inputs[name] = [mapping[value[0]], value[1]] if isinstance(value, list) and len(value) == 2 \
                and isinstance(value[0], str) and value[0] in mapping and isinstance(value[1], int) \
                and not isinstance(value[1], bool) else value
        out[mapping[old]] = {"_meta": {"title": title}, "inputs": inputs, "class_type": node["class_type"]}
    return out


def mutations(prompt: dict) -> list[dict]:
    """Every single change that alters what runs: each literal, class and link slot."""
    changed = []
    for node_id, node in prompt.items():
        c = copy.deepcopy(prompt)
        c[node_id]["class_type"] += "X"
        changed.append(c)
        for name, value in node["inputs"].items():
            c = copy.deepcopy(prompt)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt \
                    and isinstance(value[1], int) and not isinstance(value[1], bool):
                c[node_id]["inputs"][name] = [value[0], value[1] + 1]
            else:
                c[node_id]["inputs"][name] = {"not": value}  # (never equal to the value)
            changed.append(c)
        c = copy.deepcopy(prompt)
        c[node_id]["inputs"]["seed_added"] = 1
        changed.append(c)
    return changed


FILES = {"cat.png": SHA_A, "dog.png": SHA_B}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts(), st.data())
def test_renumbering_reordering_and_ui_metadata_never_change_the_key(prompt, data):
    new_ids = data.draw(st.lists(st.text("0123456789abcdef:", min_size=1, max_size=6), min_size=len(prompt),
                                 max_size=len(prompt), unique=True))
    order = data.draw(st.permutations(range(len(prompt))))
    title = data.draw(st.text(max_size=8))
    other = renumbered(prompt, new_ids, list(order), title)
    assert key_of(other, FILES) == key_of(prompt, FILES)  # 0 false misses
    # the output selection, renumbered alike, too
    target = data.draw(st.sampled_from(list(prompt)))
    assert key_of(other, FILES, [new_ids[list(prompt).index(target)]]) == key_of(prompt, FILES, [target])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts())
def test_any_change_of_a_value_seed_model_link_or_input_byte_changes_the_key(prompt):
    base = key_of(prompt, FILES)
    keys = [key_of(m, FILES) for m in mutations(prompt)]
    assert base not in keys  # 0 false hits
    if any(n["class_type"] == "LoadImage" for n in prompt.values()):
        assert key_of(prompt, {"cat.png": SHA_A[:-1] + "c", "dog.png": SHA_B[:-1] + "c"}) != base  # a byte
    assert key_of(prompt, FILES, scope="u:bob") != base and key_of(prompt, FILES, scope="shared") != base
    assert entry_key(base, "env1") != entry_key(base, "env2")
    if len(prompt) > 1:
        ids = list(prompt)
        assert key_of(prompt, FILES, [ids[0]]) != key_of(prompt, FILES, [ids[1]]) or \
            prompt[ids[0]] == prompt[ids[1]] or key_of(prompt, FILES, [ids[0]]) != base


def test_the_key_by_hand_seed_model_and_the_proxys_own_inputs():
    base = workflow("success")
    assert key_of(base) == key_of(json.loads(json.dumps(base)))
    seeded = copy.deepcopy(base)
    seeded["1"]["inputs"]["color"] += 1
    assert key_of(seeded) != key_of(base)
    scoped = copy.deepcopy(base)
    scoped["3"]["inputs"]["_proxy_cache_scope"] = "u_somebody"  # isolation.py's input: never in the key
    assert key_of(scoped) == key_of(base)
    model = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    other = copy.deepcopy(model)
    other["1"]["inputs"]["ckpt_name"] = "b.safetensors"
    assert key_of(model) != key_of(other)
    # a graph ComfyUI refuses is not cached: a dangling link, a cycle
    for bad in ({"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}},
                {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}}):
        with pytest.raises(NotCacheable):
            key_of(bad)
    # a 2,000-node chain (deeper than Python's recursion)
    chain = {"0": {"class_type": "A", "inputs": {}}}
    for i in range(1, 2000):
        chain[str(i)] = {"class_type": "B", "inputs": {"x": [str(i - 1), 0]}}
    assert len(key_of(chain)) == 64


# --- end to end -----------------------------------------------------------------------------------
def bearer(h, user: str = "alice") -> dict:
    return {"Authorization": "Bearer " + h.token(user)}


async def generate(h, prompt: dict, user: str = "alice", headers: dict | None = None, wait: bool = True) -> dict:
    answer = await h.http.fetch(h.url + "/generate", method="POST", body=json.dumps(prompt), raise_error=False,
                                headers={**bearer(h, user), **({"Prefer": "wait=10"} if wait else {}),
                                         **(headers or {})}, request_timeout=TIMEOUT)
    assert answer.code in (200, 202), answer.body
    return json.loads(answer.body)


async def get(h, path: str, user: str = "alice", headers: dict | None = None):
    return await h.http.fetch(h.url + path, headers={**bearer(h, user), **(headers or {})}, raise_error=False,
                              request_timeout=TIMEOUT)


async def view(h, job_id: str, user: str = "alice") -> dict:
    return json.loads((await get(h, f"/job/{job_id}", user, {"Prefer": "wait=10"})).body)


async def ws_submit(client, prompt: dict, **data) -> dict:
    """Submit over the WebSocket under an id of ours: the answer to this request, not another's."""
    prompt_id = str(uuid.uuid4())
    client.send("submit_prompt", {"prompt": prompt, "prompt_id": prompt_id, **data})
    return await client.next(where=lambda m: m.get("type") in ("prompt_accepted", "error")
                             and m["data"].get("prompt_id") == prompt_id)


async def ws_run(client, prompt: dict, **data) -> tuple[str, dict]:
    accepted = await ws_submit(client, prompt, **data)
    assert accepted["type"] == "prompt_accepted", accepted
    prompt_id = accepted["data"]["prompt_id"]
    final = await client.next(where=lambda m: m.get("type") in ("execution_success", "execution_error")
                              and m["data"].get("prompt_id") == prompt_id)
    return prompt_id, final


def executions(h) -> int:
    return sum(h.sim.execution_counts.values())


def posts(h) -> int:
    return sum(1 for method, path in h.sim.requests if method == "POST" and path.endswith("/prompt"))


def asked(h) -> int:
    """Requests to ComfyUI other than the background reads of its capabilities."""
    return sum(1 for _, path in h.sim.requests
               if not path.startswith(("/object_info", "/system_stats", "/models")))


def cache_harness(**overrides) -> ProxyHarness:
    return ProxyHarness(result_cache=True, **overrides)


async def test_a_hit_never_reaches_comfyui_and_downloads_its_own_copy_with_comfyuis_headers():
    async with cache_harness() as h:
        alice = await h.connect("alice")
        first_id, final = await ws_run(alice, workflow("success"))
        assert final["type"] == "execution_success" and "cached" not in final["data"]
        await h.state.cache.idle()
        first = await view(h, first_id)
        assert first["cached"] is False
        before = (executions(h), posts(h), asked(h))
        accepted = await ws_submit(alice, workflow("success"))
        assert accepted["type"] == "prompt_accepted" and accepted["data"]["cached"] is True
        job_id = accepted["data"]["prompt_id"]
        done = await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == job_id)
        assert done["data"]["cached"] is True
        assert (executions(h), posts(h), asked(h)) == before  # ComfyUI never asked anything
        assert job_id not in h.sim.execution_counts
        hit = await view(h, job_id)
        assert hit["status"] == "completed" and hit["cached"] is True and hit["progress"]["value"] == 1.0
        assert sorted((o["node_id"], o["filename"]) for o in hit["outputs"]) == \
            sorted((o["node_id"], o["filename"]) for o in first["outputs"])
        for output in hit["outputs"]:
            mine = await get(h, output["url"])
            original = await get(h, next(o["url"] for o in first["outputs"] if o["node_id"] == output["node_id"]))
            assert mine.code == 200 and mine.body == original.body
            assert mine.headers["Content-Type"] == "image/png" and mine.headers["Etag"]
            assert mine.headers["X-Content-Type-Options"] == "nosniff"
            part = await get(h, output["url"], headers={"Range": "bytes=10-"})
            assert part.code == 206 and part.body == mine.body[10:]
            assert part.headers["Content-Range"] == f"bytes 10-{len(mine.body) - 1}/{len(mine.body)}"
            assert (await get(h, output["url"], headers={"If-None-Match": mine.headers["Etag"]})).code == 304
            assert (await get(h, output["url"], headers={"Range": "bytes=999999-"})).code == 416
            listed = json.loads((await get(h, f"/outputs/{job_id}")).body)["files"]
            one = next(f for f in listed if f["node"] == output["node_id"])
            by_name = await get(h, f"/outputs/{job_id}/view?filename={one['filename']}&subfolder={one['subfolder']}"
                                   f"&type={one['type']}")
            assert by_name.code == 200 and by_name.body == mine.body
        # another user's id answers like an unknown one
        assert (await get(h, hit["outputs"][0]["url"], user="bob")).code == 404
        assert executions(h) == before[0]


async def test_renumbered_retitled_prompt_is_a_hit_on_its_own_node_ids():
    async with cache_harness() as h:
        first = await generate(h, workflow("success"))
        await h.state.cache.idle()
        mapping = {str(i): f"n{10 - i}" for i in range(1, 8)}
        other = {}
        for old, node in reversed(list(workflow("success").items())):
            inputs = {k: [mapping[v[0]], v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            other[mapping[old]] = {"inputs": inputs, "class_type": node["class_type"], "_meta": {"title": "mine"}}
        hit = await generate(h, other, headers={"Idempotency-Key": "renumbered"})
        assert hit["status"] == "completed" and hit["cached"] is True
        assert {o["node_id"] for o in hit["outputs"]} == {mapping["6"], mapping["7"]}
        assert executions(h) == 1
        image = await get(h, f"/job/{hit['job_id']}/image/{mapping['6']}/0")
        saved = await get(h, f"/job/{first['job_id']}/image/6/0")
        assert image.code == 200 and image.body == saved.body
        # a changed value is another prompt: it runs
        changed = workflow("success")
        changed["1"]["inputs"]["color"] = 1
        assert (await generate(h, changed))["cached"] is False and executions(h) == 2


async def test_100_identical_concurrent_requests_run_once():
    async with cache_harness(max_queued_prompts_per_user=200) as h:
        h.sim.paused = True  # the leader cannot finish before every request is in
        alice = await h.connect("alice")
        answers = await asyncio.gather(*(generate(h, workflow("success"), wait=False) for _ in range(90)),
                                       *(ws_submit(alice, workflow("success")) for _ in range(10)))
        http_ids = [a["job_id"] for a in answers[:90]]
        ws_ids = [a["data"]["prompt_id"] for a in answers[90:]]
        assert all(a["type"] == "prompt_accepted" for a in answers[90:])
        states = {h.state.tracker.get(i).state for i in http_ids + ws_ids}
        assert "waiting" in states
        h.sim.paused = False
        jobs = await asyncio.wait_for(asyncio.gather(*(job_finished(h.state, i) for i in http_ids + ws_ids)),
                                      TIMEOUT)
        assert all(j.state == "success" for j in jobs)
        assert executions(h) == 1 and posts(h) == 1
        assert sum(j.cached for j in jobs) == 99
        for job_id in ws_ids:
            await alice.next("execution_success", lambda m, i=job_id: m["data"]["prompt_id"] == i)
        views = [await view(h, i) for i in http_ids[:5]]
        assert all(v["status"] == "completed" and len(v["outputs"]) == 2 for v in views)


async def test_a_cancelled_leader_hands_on_to_the_first_follower_and_failures_are_not_cached():
    async with cache_harness() as h:
        h.sim.paused = True
        leader = await generate(h, workflow("success"), wait=False)
        followers = [await generate(h, workflow("success"), wait=False) for _ in range(2)]
        assert [h.state.tracker.get(f["job_id"]).state for f in followers] == ["waiting", "waiting"]
        cancel = await h.http.fetch(h.url + f"/job/{leader['job_id']}/cancel", method="POST", body=b"",
                                    headers=bearer(h), raise_error=False)
        assert cancel.code in (200, 202)
        h.sim.paused = False
        assert (await view(h, leader["job_id"]))["status"] == "cancelled"
        first, second = [await view(h, f["job_id"]) for f in followers]
        assert first["status"] == "completed" and first["cached"] is False  # it ran in the leader's place
        assert second["status"] == "completed" and second["cached"] is True
        assert h.sim.execution_counts[followers[0]["job_id"]] == 1 and followers[1]["job_id"] not in \
            h.sim.execution_counts
        # a failure is never cached: the identical follower runs (and fails) too
        h.sim.paused = True
        failing = [await generate(h, workflow("exec-fail"), wait=False) for _ in range(2)]
        h.sim.paused = False
        assert [(await view(h, f["job_id"]))["status"] for f in failing] == ["failed", "failed"]
        assert all(h.sim.execution_counts[f["job_id"]] == 1 for f in failing)


async def test_a_cancelled_follower_is_cancelled_alone():
    async with cache_harness() as h:
        h.sim.paused = True
        leader = await generate(h, workflow("success"), wait=False)
        follower = await generate(h, workflow("success"), wait=False)
        cancel = await h.http.fetch(h.url + f"/job/{follower['job_id']}/cancel", method="POST", body=b"",
                                    headers=bearer(h), raise_error=False)
        assert cancel.code == 200 and json.loads(cancel.body)["status"] == "cancelled"
        h.sim.paused = False
        assert (await view(h, leader["job_id"]))["status"] == "completed"
        assert (await view(h, follower["job_id"]))["status"] == "cancelled"


async def test_a_per_user_cache_never_answers_another_user_and_a_shared_one_only_with_the_option():
    async with cache_harness() as h:
        alice = await generate(h, workflow("success"), "alice")
        await h.state.cache.idle()
        bob = await generate(h, workflow("success"), "bob")
        assert bob["cached"] is False and h.sim.execution_counts[bob["job_id"]] == 1
        saved = [o["subfolder"] for o in alice["outputs"] + bob["outputs"] if o["type"] == "output"]
        assert len(set(saved)) == 2  # each in their own folder
        await h.state.cache.idle()
        assert (await generate(h, workflow("success"), "bob"))["cached"] is True  # bob's own entry
    async with cache_harness(cache_shared=True) as h:
        alice = await generate(h, workflow("success"), "alice")
        await h.state.cache.idle()
        bob = await generate(h, workflow("success"), "bob")
        assert bob["cached"] is True and executions(h) == 1
        alice_folder = next(o["subfolder"] for o in alice["outputs"] if o["type"] == "output")
        assert alice_folder not in json.dumps(bob)  # bob's outputs are in bob's folder
        for output in bob["outputs"]:
            image = await get(h, output["url"], "bob")
            theirs = next(o["url"] for o in alice["outputs"] if o["node_id"] == output["node_id"])
            assert image.code == 200 and image.body == (await get(h, theirs, "alice")).body


async def test_opting_out_on_both_faces_and_nodes_that_are_not_pure():
    async with cache_harness() as h:
        alice = await h.connect("alice")
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        entries = len(h.state.cache.entries)
        fresh = await generate(h, workflow("success"), headers={"Cache-Control": "no-cache"})
        assert fresh["cached"] is False and h.sim.execution_counts[fresh["job_id"]] == 1
        prompt_id, final = await ws_run(alice, workflow("success"), no_cache=True)
        assert final["type"] == "execution_success" and h.sim.execution_counts[prompt_id] == 1
        await h.state.cache.idle()
        assert len(h.state.cache.entries) == entries  # an opted-out result is not stored either
        bad = await ws_submit(alice, workflow("success"), no_cache="yes")
        assert bad["type"] == "error" and bad["data"]["code"] == "invalid_message"
        # SaveImageWebsocket's images exist only as frames: never cached
        for _ in range(2):
            await ws_run(alice, workflow("success-ws"))
        await h.state.cache.idle()
        assert len(h.state.cache.entries) == entries
        assert h.state.metrics.cache_requests.labels("bypass")._value.get() >= 4


async def test_inputs_are_hashed_uploads_by_name_and_backend_files_by_their_bytes():
    async with cache_harness() as h:
        png = uniform_png(24, 16, (0.25, 0.5, 0.75), 1)
        upload = await h.http.fetch(h.url + "/upload", method="POST", body=png, raise_error=False,
                                    headers={**bearer(h), "Content-Type": "image/png"})
        name = json.loads(upload.body)["name"]

        def loading(image: str) -> dict:
            return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
                    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}}}
        assert (await generate(h, loading(name)))["status"] == "completed"
        await h.state.cache.idle()
        assert (await generate(h, loading(name)))["cached"] is True
        # a file only the backend has: hashed through /view; other bytes under the same name run again
        folder = h.state.isolation.folder("alice")
        h.sim.add_file("input", folder, "cat.png", 8, 8, (f32(0.5), f32(0.5), f32(0.5)))
        assert (await generate(h, loading("cat.png")))["cached"] is False
        await h.state.cache.idle()
        assert (await generate(h, loading("cat.png")))["cached"] is True
        h.sim.add_file("input", folder, "cat.png", 8, 8, (f32(0.5), f32(0.5), f32(0.25)))
        assert (await generate(h, loading("cat.png")))["cached"] is False
        assert executions(h) == 3
        # a file that is not there cannot be hashed: not cached (ComfyUI says what is wrong)
        bypassed = h.state.metrics.cache_requests.labels("bypass")._value.get()
        missing = await h.http.fetch(h.url + "/generate", method="POST", body=json.dumps(loading("nowhere.png")),
                                     headers={**bearer(h), "Prefer": "wait=10"}, raise_error=False)
        assert missing.code == 422  # ComfyUI's answer
        assert h.state.metrics.cache_requests.labels("bypass")._value.get() == bypassed + 1


async def test_expiry_on_an_injected_clock_and_the_files_purged_with_their_entry():
    wall = FakeClock(time.time())
    async with cache_harness(wall=wall, cache_ttl_s=60) as h:
        first = await generate(h, workflow("success"))
        await h.state.cache.idle()
        (entry,) = h.state.cache.entries.values()
        shas = [i["sha256"] for o in entry.outputs.values() for i in o["images"]]
        wall.advance(59)
        assert (await generate(h, workflow("success")))["cached"] is True
        wall.advance(2)
        again = await generate(h, workflow("success"))
        assert again["cached"] is False and h.sim.execution_counts[again["job_id"]] == 1
        await h.state.cache.idle()
        wall.advance(61)
        h.state.tracker.forget_finished(wall())  # (the jobs that named the files are forgotten too)
        assert await h.state.cache.expire() == 1 and not h.state.cache.entries
        assert not any(h.state.cache.blobs.exists(s) for s in shas)
        assert h.state.store.cache_entries() == [] and first["job_id"]


async def test_bounds_in_entries_and_bytes():
    async with cache_harness(cache_max_entries=1) as h:
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        other = workflow("success")
        other["1"]["inputs"]["color"] = 7
        await generate(h, other)
        await h.state.cache.idle()
        assert len(h.state.cache.entries) == 1 and len(h.state.store.cache_entries()) == 1
        assert (await generate(h, other))["cached"] is True
        assert (await generate(h, workflow("success")))["cached"] is False  # evicted
        assert h.state.metrics.cache_evictions.labels("bounds")._value.get() >= 1
    async with cache_harness(cache_max_entry_bytes=100) as h:
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        assert not h.state.cache.entries  # larger than one entry may be
        assert (await generate(h, workflow("success")))["cached"] is False
    async with cache_harness(cache_max_bytes=100) as h:
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        assert not h.state.cache.entries and h.state.cache.total_bytes == 0


async def test_the_cache_outlives_a_restart():
    async with cache_harness(store_path="file") as h:
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        await h.restart_proxy("term")
        hit = await generate(h, workflow("success"))
        assert hit["cached"] is True and executions(h) == 1
        image = await get(h, hit["outputs"][0]["url"])
        assert image.code == 200 and image.body.startswith(b"\x89PNG")
        await h.restart_proxy("kill")
        assert (await view(h, hit["job_id"]))["cached"] is True  # the job's flag is durable too
        assert (await get(h, hit["outputs"][0]["url"])).body == image.body


async def test_followers_waiting_at_a_restart_are_answered_or_run():
    async with cache_harness(store_path="file") as h:
        h.sim.paused = True
        leader = await generate(h, workflow("success"), wait=False)
        follower = await generate(h, workflow("success"), wait=False)
        assert h.state.tracker.get(follower["job_id"]).state == "waiting"
        await h.restart_proxy("kill")
        h.sim.paused = False
        assert (await view(h, leader["job_id"]))["status"] == "completed"
        done = await view(h, follower["job_id"])
        assert done["status"] == "completed" and done["cached"] is True  # the leader's, heard after the restart
        assert executions(h) == 1 and follower["job_id"] not in h.sim.execution_counts


async def test_evicting_an_entry_or_deleting_comfyuis_files_never_breaks_an_older_jobs_download():
    async with cache_harness(cache_max_entries=1) as h:
        first = await generate(h, workflow("success"))
        await h.state.cache.idle()
        hit = await generate(h, workflow("success"))
        before = (await get(h, hit["outputs"][0]["url"])).body
        other = workflow("success")
        other["1"]["inputs"]["color"] = 7
        await generate(h, other)  # evicts the entry the hit came from
        await h.state.cache.idle()
        output = next(o for o in first["outputs"] if o["type"] == "output")
        del h.sim._files[("output", output["subfolder"], output["filename"])]  # ComfyUI's file, gone
        assert (await get(h, hit["outputs"][0]["url"])).body == before
        await h.state.cache.collect_garbage()
        assert (await get(h, hit["outputs"][0]["url"])).body == before
        assert (await get(h, output["url"])).code == 404  # the job that ran: ComfyUI's file is gone


async def test_metrics_and_openapi_name_the_cache():
    async with cache_harness() as h:
        await generate(h, workflow("success"))
        await h.state.cache.idle()
        await generate(h, workflow("success"))
        metrics = h.state.metrics
        assert metrics.cache_requests.labels("hit")._value.get() == 1
        assert metrics.cache_requests.labels("miss")._value.get() == 1
        assert metrics.cache_entries._value.get() == 1 and metrics.cache_bytes._value.get() > 0
        spec = json.loads((await h.get("/openapi.json")).body)
        text = json.dumps(spec)
        assert '"cached"' in text and "no-cache" in text and "no_cache" in text

"""The jobs REST API (issue 13): the same users and jobs as /ws, over HTTP."""
from __future__ import annotations

import asyncio
import json

import pytest

from .helpers import TIMEOUT, FakeClock, ProxyHarness, workflow

pytestmark = pytest.mark.usefixtures("io_loop")


def bearer(h, user: str) -> dict:
    return {"Authorization": "Bearer " + h.token(user)}


async def call(h, method: str, path: str, user: str | None = "alice", body=None, headers: dict | None = None):
    all_headers = {**(bearer(h, user) if user else {}), **(headers or {})}
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if method == "POST" and body is None:
        body = b""
    response = await h.http.fetch(h.url + path, method=method, body=body, headers=all_headers, raise_error=False,
                                  request_timeout=TIMEOUT)
    return response


def parsed(response) -> dict:
    return json.loads(response.body)


async def test_an_http_job_is_the_owners_everywhere_and_nobody_elses():
    async with ProxyHarness() as h:
        alice_ws, bob_ws = await h.connect("alice"), await h.connect("bob")
        answer = await call(h, "POST", "/generate", body=workflow("success"))
        assert answer.code == 202, answer.body
        job = parsed(answer)
        job_id = job["job_id"]
        assert job["status"] == "pending" and answer.headers["Location"] == f"/job/{job_id}"
        assert job["urls"]["self"] == f"/job/{job_id}" and job["created_at"].endswith("Z")
        # Alice's socket sees the HTTP job's events, Bob's sees nothing of it.
        await alice_ws.next("execution_success", lambda m: m["data"]["prompt_id"] == job_id)
        done = parsed(await call(h, "GET", f"/job/{job_id}", headers={"Prefer": "wait=10"}))
        assert done["status"] == "completed" and done["progress"]["value"] == 1.0
        assert done["completed_at"] and done["expires_at"] and done["error"] is None
        assert {o["node_id"] for o in done["outputs"]} == {"6", "7"}
        assert all(o["content_type"] == "image/png" and o["url"].startswith(f"/job/{job_id}/image/")
                   for o in done["outputs"])
        bob_ws.send("ping")
        await bob_ws.next("pong")
        assert not any(job_id in json.dumps(m) for m in bob_ws.json_messages())
        # Another user's id answers exactly like an unknown one, on every endpoint.
        unknown = "00000000-0000-4000-8000-000000000000"
        output = done["outputs"][0]
        for path, method in (("/job/{}", "GET"), ("/jobs/{}", "GET"), ("/job/{}/cancel", "POST"),
                             (f"/job/{{}}/image/{output['node_id']}/0", "GET"), ("/outputs/{}", "GET")):
            theirs = await call(h, method, path.format(job_id), user="bob")
            nobodys = await call(h, method, path.format(unknown), user="bob")
            assert theirs.code == nobodys.code == 404, path
            assert theirs.body.replace(job_id.encode(), b"") == nobodys.body.replace(unknown.encode(), b""), path
        # The same job is Alice's on the WebSocket too, and its file downloads whole.
        image = await call(h, "GET", output["url"])
        key = ("output", output["subfolder"], output["filename"])
        if output["type"] == "output":
            assert image.code == 200 and image.body == h.sim._files[key]
            assert image.headers["X-Content-Type-Options"] == "nosniff" and image.headers["Etag"]
        assert (await call(h, "GET", f"/job/{job_id}", user=None)).code == 401


async def test_a_websocket_job_is_listed_and_polled_over_http_and_ranges_resume_a_download():
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        prompt_id, final = await alice.run(workflow("success"))
        job = parsed(await call(h, "GET", f"/job/{prompt_id}"))
        assert job["status"] == "completed"
        output = next(o for o in job["outputs"] if o["type"] == "output")
        whole = await call(h, "GET", output["url"])
        part = await call(h, "GET", output["url"], headers={"Range": "bytes=10-"})
        assert part.code == 206 and part.body == whole.body[10:]
        assert part.headers["Content-Range"] == f"bytes 10-{len(whole.body) - 1}/{len(whole.body)}"
        again = await call(h, "GET", output["url"], headers={"If-None-Match": whole.headers["Etag"]})
        assert again.code == 304 and again.body == b""
        beyond = await call(h, "GET", output["url"], headers={"Range": f"bytes={len(whole.body) + 5}-"})
        assert beyond.code == 416
        missing = await call(h, "GET", f"/job/{prompt_id}/image/{output['node_id']}/9")
        assert missing.code == 404 and parsed(missing)["error"]["code"] == "not_found"


async def test_listing_filters_by_status_newest_first_and_pages():
    async with ProxyHarness() as h:
        ids = []
        for _ in range(5):
            answer = await call(h, "POST", "/jobs", body={"prompt": workflow("success")})
            assert answer.code == 202
            ids.append(parsed(answer)["job_id"])
        failed = parsed(await call(h, "POST", "/generate", body=workflow("exec-fail"),
                                   headers={"Prefer": "wait=10"}))
        assert failed["status"] == "failed" and failed["error"]["code"] == "execution_error"
        assert failed["error"]["node_id"] and failed["error"]["class_type"]
        for job_id in ids:
            await call(h, "GET", f"/job/{job_id}", headers={"Prefer": "wait=10"})
        first = parsed(await call(h, "GET", "/jobs?limit=2&status=completed"))
        assert [j["job_id"] for j in first["jobs"]] == ids[::-1][:2] and first["next_cursor"]
        rest = parsed(await call(h, "GET", f"/jobs?limit=10&status=completed&cursor={first['next_cursor']}"))
        assert [j["job_id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["next_cursor"] is None
        assert [j["job_id"] for j in parsed(await call(h, "GET", "/jobs?status=failed"))["jobs"]] == [failed["job_id"]]
        assert parsed(await call(h, "GET", "/jobs", user="bob"))["jobs"] == []
        for bad in ("status=done", "limit=0", "limit=x", "limit=101"):
            answer = await call(h, "GET", f"/jobs?{bad}")
            assert answer.code == 400 and parsed(answer)["error"]["code"] == "invalid_message", bad


async def test_bad_submissions_get_a_clear_error_and_comfyuis_node_errors_unchanged():
    async with ProxyHarness() as h:
        for body, status, code in ((b"{", 400, "invalid_message"), (b"[]", 400, "invalid_message"),
                                   (json.dumps({"last_node_id": 3, "nodes": [], "links": []}), 422, "invalid_prompt"),
                                   (json.dumps({"prompt": {"1": 5}}), 422, "invalid_prompt")):
            answer = await call(h, "POST", "/generate", body=body)
            assert answer.code == status and parsed(answer)["error"]["code"] == code, (body, answer.body)
            assert parsed(answer)["error"]["message"]
        assert "Export (API)" in parsed(await call(h, "POST", "/generate",
                                                   body={"nodes": [], "links": []}))["error"]["message"]
        later = await call(h, "POST", "/generate", body=workflow("validation-fail"))
        assert later.code == 202  # recorded; ComfyUI's verdict comes when it is asked
        polled = parsed(await call(h, "GET", f"/job/{parsed(later)['job_id']}", headers={"Prefer": "wait=10"}))
        assert polled["status"] == "failed" and polled["error"]["node_errors"]
        rejected = await call(h, "POST", "/generate", body=workflow("validation-fail"), headers={"Prefer": "wait=10"})
        assert rejected.code == 422
        error = parsed(rejected)["error"]
        assert error["code"] == "invalid_prompt" and error["prompt_id"] and error["node_errors"]
        assert parsed(await call(h, "GET", f"/job/{error['prompt_id']}"))["status"] == "failed"
    async with ProxyHarness(max_message_bytes=1024) as h:
        answer = await call(h, "POST", "/generate", body={"prompt": workflow("success"), "pad": "x" * 2000})
        assert answer.code == 413 and parsed(answer)["error"]["code"] == "message_too_large"


async def test_cancel_is_idempotent_and_a_finished_job_says_so():
    async with ProxyHarness(backend_queue_depth=1) as h:
        h.sim.paused = True
        first = parsed(await call(h, "POST", "/generate", body=workflow("success")))
        queued = parsed(await call(h, "POST", "/generate", body=workflow("success")))
        assert queued["state"] == "queued" and queued["queue_position"] == 1
        for _ in range(2):
            answer = await call(h, "POST", f"/job/{queued['job_id']}/cancel")
            assert answer.code == 200 and parsed(answer)["status"] == "cancelled"
        h.sim.paused = False
        done = parsed(await call(h, "GET", f"/job/{first['job_id']}", headers={"Prefer": "wait=10"}))
        assert done["status"] == "completed"
        answer = await call(h, "POST", f"/job/{first['job_id']}/cancel")
        assert answer.code == 409 and parsed(answer)["error"]["code"] == "already_finished"


async def test_prefer_wait_is_bounded_and_answers_the_state_at_the_end_of_the_wait():
    async with ProxyHarness(max_wait_s=0.05) as h:
        h.sim.paused = True
        answer = await call(h, "POST", "/generate", body=workflow("success"), headers={"Prefer": "wait=3600"})
        assert answer.code == 202 and answer.headers["Preference-Applied"] == "wait=0.05"
        assert parsed(answer)["status"] == "pending"
        h.sim.paused = False


async def test_one_idempotency_key_makes_exactly_one_job_whatever_the_concurrency():
    wall = FakeClock(1_800_000_000.0)
    async with ProxyHarness(wall=wall, store_path="file") as h:
        headers = {"Idempotency-Key": '"order-42"'}
        body = {"prompt": workflow("success")}
        answers = await asyncio.gather(*(call(h, "POST", "/generate", body=body, headers=headers)
                                         for _ in range(100)))
        codes = sorted(a.code for a in answers)
        assert set(codes) <= {202, 409} and codes.count(202) >= 1
        job_ids = {parsed(a)["job_id"] for a in answers if a.code == 202}
        assert len(job_ids) == 1
        assert all(a.headers.get("Retry-After") == "1" for a in answers if a.code == 409)
        assert len(h.state.tracker.jobs_of("alice")) == 1
        replay = await call(h, "POST", "/generate", body=body, headers=headers)
        assert replay.code == 202 and replay.headers["Idempotency-Replayed"] == "true"
        assert parsed(replay)["job_id"] in job_ids
        # the same key with another request: 422; another user's same key is another key
        other = await call(h, "POST", "/generate", body={"prompt": workflow("success"), "front": False},
                           headers=headers)
        assert other.code == 422 and parsed(other)["error"]["code"] == "idempotency_key_reuse"
        bobs = await call(h, "POST", "/generate", user="bob", body=body, headers=headers)
        assert bobs.code == 202 and parsed(bobs)["job_id"] not in job_ids
        # kept through a restart, forgotten after IDEMPOTENCY_KEY_TTL_S
        await h.restart_proxy("kill")
        again = await call(h, "POST", "/generate", body=body, headers=headers)
        assert again.headers.get("Idempotency-Replayed") == "true" and parsed(again)["job_id"] in job_ids
        wall.advance(h.settings.idempotency_key_ttl_s + 1)
        fresh = await call(h, "POST", "/generate", body=body, headers=headers)
        assert fresh.code == 202 and "Idempotency-Replayed" not in fresh.headers
        assert parsed(fresh)["job_id"] not in job_ids
        for bad in ('""', "x" * 300, "caf\u00e9"):
            answer = await call(h, "POST", "/generate", body=body, headers={"Idempotency-Key": bad.encode("utf-8")
                                                                           .decode("latin-1")})
            assert answer.code == 400, bad


async def test_a_final_refusal_is_replayed_but_a_retryable_one_is_not():
    async with ProxyHarness(submit_burst=2, submit_rate_per_s=0.001) as h:
        headers = {"Idempotency-Key": "k1"}
        escaping = workflow("success")
        escaping["6"]["inputs"]["filename_prefix"] = "../elsewhere"  # refused by ISOLATE_USERS
        bad = await call(h, "POST", "/generate", body=escaping, headers=headers)
        assert bad.code == 422 and parsed(bad)["error"]["details"]["input_name"] == "filename_prefix"
        replay = await call(h, "POST", "/generate", body=escaping, headers=headers)
        assert replay.code == 422 and replay.headers["Idempotency-Replayed"] == "true"
        assert replay.body == bad.body
        ok = await call(h, "POST", "/generate", body=workflow("success"), headers={"Idempotency-Key": "k2"})
        assert ok.code == 202
        limited = await call(h, "POST", "/generate", body=workflow("success"), headers={"Idempotency-Key": "k3"})
        assert limited.code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert parsed(limited)["error"]["code"] == "rate_limited"
        assert h.state.tracker.store.recall("alice", "k3", h.state.tracker.wall()) is None




async def test_a_running_job_shows_its_node_and_progress():
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        hold = h.sim.hold_node("5")  # ImageScale, after Invert, Blur and GetImageSize
        job_id = parsed(await call(h, "POST", "/generate", body=workflow("success")))["job_id"]
        await alice.next("executing", lambda m: m["data"].get("node") == "5" and m["data"]["prompt_id"] == job_id)
        running = parsed(await call(h, "GET", f"/job/{job_id}"))
        assert running["status"] == "processing" and running["started_at"] and running["queue_position"] is None
        progress = running["progress"]
        assert progress["current_node"] == "5" and progress["current_node_class"] == "ImageScale"
        assert progress["nodes_total"] == 7 and 1 <= progress["nodes_done"] < 7 and 0 < progress["value"] < 1
        hold.release()
        done = parsed(await call(h, "GET", f"/job/{job_id}", headers={"Prefer": "wait=10"}))
        assert done["progress"]["value"] == 1.0 and done["progress"]["nodes_done"] == 7
        assert done["progress"]["current_node"] is None


async def test_the_openapi_document_is_valid_and_every_path_in_it_answers():
    from openapi_spec_validator import validate

    async with ProxyHarness() as h:
        answer = await call(h, "GET", "/openapi.json", user=None)
        assert answer.code == 200
        doc = parsed(answer)
        validate(doc)  # raises on an invalid OpenAPI 3.1 document
        assert "86400 s" in json.dumps(doc)  # the Idempotency-Key expiry is published
        unknown = "00000000-0000-4000-8000-000000000000"
        for path, operations in doc["paths"].items():
            concrete = path.replace("{job_id}", unknown).replace("{node_id}", "1").replace("{index}", "0")
            for method in operations:
                body = {} if method == "post" else None
                response = await call(h, method.upper(), concrete, body=body)
                # routed to our handler (our JSON errors), never Tornado's 404 page or a 405
                assert response.code != 405 and response.headers["Content-Type"].startswith("application/json"), \
                    (method, path, response.code)
        page = await call(h, "GET", "/docs", user=None)
        assert page.code == 200 and b"openapi.json" in page.body
        assert b"http://" not in page.body and b"https://" not in page.body  # nothing from the internet


async def test_an_expired_job_answers_410_to_its_owner_only():
    wall = FakeClock(1_800_000_000.0)
    async with ProxyHarness(wall=wall, store_path="file", finished_prompt_retention_s=60) as h:
        job = parsed(await call(h, "POST", "/generate", body=workflow("success"), headers={"Prefer": "wait=10"}))
        assert job["status"] == "completed" and job["expires_at"]
        image = job["outputs"][0]["url"]
        wall.advance(61)
        assert h.state.service.cleanup() == 1
        for _ in range(2):  # and the same after a restart
            for path in (f"/job/{job['job_id']}", image):
                gone = await call(h, "GET", path)
                assert gone.code == 410 and parsed(gone)["error"]["code"] == "expired", path
                theirs = await call(h, "GET", path, user="bob")
                assert theirs.code == 404  # nobody else learns the id was ever used
            await h.restart_proxy("term")


async def test_an_8_mb_output_downloads_whole_and_resumes_from_a_range():
    async with ProxyHarness(jobs_show_backend=True) as h:
        job = parsed(await call(h, "POST", "/generate", body=workflow("success"), headers={"Prefer": "wait=10"}))
        assert job["backend"] == h.state.pool.default.name
        output = next(o for o in job["outputs"] if o["type"] == "output")
        big = bytes(range(256)) * (8 * 1024 * 1024 // 256)
        h.sim._files[("output", output["subfolder"], output["filename"])] = big
        whole = await call(h, "GET", output["url"])
        assert whole.code == 200 and whole.body == big
        cut = 5_000_003  # a download broken there goes on from there
        rest = await call(h, "GET", output["url"], headers={"Range": f"bytes={cut}-",
                                                            "If-Range": whole.headers["Etag"]})
        assert rest.code == 206 and whole.body[:cut] + rest.body == big
    async with ProxyHarness() as h:
        job = parsed(await call(h, "POST", "/generate", body=workflow("success"), headers={"Prefer": "wait=10"}))
        assert "backend" not in job  # not unless the operator allows it

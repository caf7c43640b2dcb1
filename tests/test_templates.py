"""Workflow templates (issue 14): typed parameters, every bad one reported at once, broken
files reported while the others serve, reload on change, JSON Schema and OpenAPI, and the
shipped text2img end to end through both faces."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile

import pytest
from jsonschema import Draft202012Validator

from comfy_ws_proxy.config import ConfigError, load_settings, settings_for_tests
from comfy_ws_proxy.jobs.templates import SEED_MAX, TemplateRegistry, parse_template, substitute
from comfy_ws_proxy.model import ErrorCode, Job, RequestError
from comfy_ws_proxy.store.sqlite import SqliteJobStore
from comfy_ws_proxy.testing.comfyui import uniform_png

from .helpers import TIMEOUT, ProxyHarness

pytestmark = pytest.mark.usefixtures("io_loop")

ROOT = os.path.join(os.path.dirname(__file__), "..")
SHIPPED = os.path.join(ROOT, "conf", "templates")
PNG = uniform_png(24, 16, (0.25, 0.5, 0.75), 1)
UPLOAD_LIKE = "ab" * 32 + ".png"  # the form of an upload's name, uploaded by nobody


def save(directory: str, name: str, data, stamp: int | None = None) -> str:
    """Write a template file; ``stamp``: its mtime in ns (a change the registry must see even
    within the file system's timestamp granularity)."""
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    if stamp is not None:
        os.utime(path, ns=(stamp, stamp))
    return path


def template(**parameters) -> dict:
    """A template using each parameter once, in a SaveImage input of its own name."""
    inputs = {"images": ["1", 0], "filename_prefix": "t"}
    inputs.update({name: "${%s}" % name for name in parameters})
    return {"description": "test", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": inputs}}, "parameters": parameters}


EVERY_TYPE = {
    "i": {"type": "integer", "default": 4, "min": 2, "max": 12, "step": 2},
    "n": {"type": "number", "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.25},
    "s": {"type": "string", "default": "abc", "min_length": 2, "max_length": 5},
    "b": {"type": "boolean", "default": False},
    "e": {"type": "enum", "choices": ["a", "b", 3], "default": "a"},
    "seed": {"type": "seed"},
    "img": {"type": "image", "required": True},
    "m": {"type": "model", "folder": "checkpoints", "default": "ok.safetensors"},
}


def registry(directory: str, **kwargs) -> TemplateRegistry:
    kwargs.setdefault("interval_s", 0)
    r = TemplateRegistry(directory, **kwargs)
    r.load()
    return r


async def refused(r: TemplateRegistry, name: str, params, owner: str = "alice") -> RequestError:
    with pytest.raises(RequestError) as caught:
        await r.render(owner, name, params)
    return caught.value


# --- rendering ------------------------------------------------------------------------------------
async def test_rendering_keeps_types_and_interpolates_embedded_placeholders():
    with tempfile.TemporaryDirectory() as d:
        spec = template(count={"type": "integer", "default": 2}, scale={"type": "number", "default": 1},
                        flag={"type": "boolean", "default": True},
                        pick={"type": "enum", "choices": [1, 2.5, "x"], "default": 1},
                        subject={"type": "string", "default": "a cat"})
        spec["workflow"]["2"]["inputs"]["text"] = "a photo of ${subject}, ${count} times, ${flag}, $${literal}"
        save(d, "typed.json", spec)
        r = registry(d)
        assert r.status() == {"loaded": 1, "broken": []}
        rendered = await r.render("alice", "typed", {"count": 7, "scale": 2, "pick": 2.5})
        inputs = rendered.prompt["2"]["inputs"]
        assert inputs["count"] == 7 and type(inputs["count"]) is int  # a whole value keeps its type
        assert inputs["scale"] == 2.0 and type(inputs["scale"]) is float  # a number is a float for FLOAT
        assert inputs["flag"] is True and inputs["pick"] == 2.5
        assert inputs["text"] == "a photo of a cat, 7 times, true, ${literal}"  # embedded: text; $${: literal
        assert inputs["images"] == ["1", 0] and rendered.prompt["1"] == spec["workflow"]["1"]  # untouched
        assert rendered.params == {"count": 7, "scale": 2.0, "flag": True, "pick": 2.5, "subject": "a cat"}
        assert spec["workflow"]["2"]["inputs"]["count"] == "${count}"  # the template itself unchanged
        # 7.0 is an integer in JSON Schema: taken, as an int
        assert (await r.render("alice", "typed", {"count": 7.0})).prompt["2"]["inputs"]["count"] == 7


def test_substitute_only_replaces_whole_or_embedded_placeholders():
    values = {"a": 5, "b": "x"}
    assert substitute({"k": ["${a}", "${b}${b}", "$${a}", "no", 3]}, values) == {"k": [5, "xx", "${a}", "no", 3]}
    assert substitute("$${a}${a}", values) == "${a}5"


# --- every rule of every type, every bad parameter at once ------------------------------------
async def test_every_type_rule_gets_its_error_and_every_bad_parameter_is_listed_at_once():
    uploads = {("alice", UPLOAD_LIKE): "u_alice/" + UPLOAD_LIKE}

    async def reference(owner, name):
        return uploads.get((owner, name))

    with tempfile.TemporaryDirectory() as d:
        save(d, "all.json", template(**EVERY_TYPE))
        r = registry(d, model_exists=lambda folder, name: name == "ok.safetensors" if folder == "checkpoints"
                     else None, upload_reference=reference, draw_seed=lambda: 99)
        good = await r.render("alice", "all", {"img": UPLOAD_LIKE})
        assert good.params == {"i": 4, "n": 0.5, "s": "abc", "b": False, "e": "a", "seed": 99,
                               "img": UPLOAD_LIKE, "m": "ok.safetensors"}
        assert good.prompt["2"]["inputs"]["img"] == "u_alice/" + UPLOAD_LIKE  # the owner's file, by reference
        rounds = [
            ({"i": "5", "n": 2, "s": "x", "b": 1, "e": "c", "seed": -1, "img": "cat.png", "m": "nope.safetensors",
              "typo": 1},
             {("i", "type"), ("n", "max"), ("s", "min_length"), ("b", "type"), ("e", "choices"), ("seed", "min"),
              ("img", "format"), ("m", "not_found"), ("typo", "unknown")}),
            ({"i": 0, "n": -0.5, "s": "toolong", "e": True, "seed": SEED_MAX + 1, "b": "true"},
             {("i", "min"), ("n", "min"), ("s", "max_length"), ("e", "choices"), ("seed", "max"), ("b", "type"),
              ("img", "required")}),
            ({"i": 14, "n": 0.3, "s": 5, "seed": 1.5, "img": UPLOAD_LIKE, "m": ""},
             {("i", "max"), ("n", "step"), ("s", "type"), ("seed", "type")} | {("m", "format")}),
            ({"i": 5, "n": float("nan"), "s": "a\x00b", "seed": True, "img": "cd" * 32 + ".png", "m": 5},
             {("i", "step"), ("n", "type"), ("s", "type"), ("seed", "type"), ("img", "not_found"), ("m", "type")}),
        ]
        for params, expected in rounds:
            e = await refused(r, "all", params)
            assert e.code == ErrorCode.INVALID_PARAMS == "invalid_params"
            found = {(p["parameter"], p["rule"]) for p in e.details["errors"]}
            assert found == expected, params
            assert e.details["template"] == "all"
            for problem in e.details["errors"]:  # the message names the parameter; the value is echoed
                assert problem["message"].startswith(problem["parameter"] + ":") and problem["message"] in e.message
        e = await refused(r, "all", {"i": 14, "img": UPLOAD_LIKE})
        (problem,) = e.details["errors"]
        assert problem == {"parameter": "i", "rule": "max", "value": 14, "limit": 12,
                           "message": "i: 14 is above the maximum 12"}
        assert e.message == "Template 'all': i: 14 is above the maximum 12"
        # another user's upload answers exactly like one that never was
        theirs = (await refused(r, "all", {"img": UPLOAD_LIKE}, owner="bob")).details["errors"]
        nobodys = (await refused(r, "all", {"img": "cd" * 32 + ".png"}, owner="bob")).details["errors"]
        assert [p["rule"] for p in theirs] == [p["rule"] for p in nobodys] == ["not_found"]
        assert theirs[0]["message"].replace("abababababab", "cdcdcdcdcdcd") == nobodys[0]["message"]
        # a long value is echoed cut short
        e = await refused(r, "all", {"s": "z" * 5000, "img": UPLOAD_LIKE})
        assert len(e.details["errors"][0]["value"]) < 120 and len(e.message) < 300
        # unknown template, params that are not an object
        e = await refused(r, "nope", {})
        assert e.code == ErrorCode.UNKNOWN_TEMPLATE and "nope" in e.message
        assert (await refused(r, "all", [1])).code == ErrorCode.INVALID_PARAMS


async def test_a_model_unknown_to_the_proxy_is_left_to_comfyui():
    with tempfile.TemporaryDirectory() as d:
        save(d, "m.json", template(m={"type": "model", "folder": "loras", "default": "x.safetensors"}))
        for answer in (None, True):
            r = registry(d, model_exists=lambda folder, name, a=answer: a)
            assert (await r.render("alice", "m", {"m": "anything.pt"})).params == {"m": "anything.pt"}
        r = registry(d, model_exists=lambda folder, name: False)
        (problem,) = (await refused(r, "m", {"m": "anything.pt"})).details["errors"]
        assert problem["rule"] == "not_found" and problem["folder"] == "loras" and "'loras'" in problem["message"]


# --- broken files -------------------------------------------------------------------------------
BROKEN = [
    ({"nodes": [], "links": [], "version": 0.4}, "UI-format workflow"),
    ({"description": "x", "workflow": {"nodes": [{"id": 1}], "links": []}}, "UI format"),
    ("{not json", "not valid JSON"),
    ({**template(), "workflow": {"1": {"class_type": "X", "inputs": {"v": "${ghost}"}}}}, "${ghost}"),
    (template(unused={"type": "integer", "default": 1}) | {"workflow": {"1": {"class_type": "X", "inputs": {}}}},
     "'unused' is never used"),
    (template(steps={"type": "integer", "default": 0, "min": 1}), "default breaks its own rules: steps: 0 is below"),
    (template(e={"type": "enum", "choices": ["a"], "default": "b"}), "default breaks its own rules"),
    (template(s={"type": "string", "default": "x", "max_len": 3}), "unknown key 'max_len'"),
    (template(i={"type": "integer", "default": 1, "min": 5, "max": 1}), "min 5 is above max 1"),
    (template(i={"type": "integer", "default": 2, "step": 0}), "step must be above 0"),
    (template(i={"type": "integer", "default": 2, "min": 0.5}), "must be an integer"),
    (template(i={"type": "float", "default": 2}), "type must be one of"),
    (template(e={"type": "enum", "choices": [], "default": "a"}), "non-empty list"),
    (template(e={"type": "enum", "choices": ["a", "a"], "default": "a"}), "duplicates"),
    (template(r={"type": "integer", "default": 1, "required": True}), "a required parameter has no default"),
    (template(r={"type": "integer"}), "needs a default or \"required\": true"),
    (template(p={"type": "image", "default": UPLOAD_LIKE}), "an image parameter has no default"),
    (template(m={"type": "model", "default": "a.pt"}), "names its folder"),
    ({**template(), "workflow": {"1": {"class_type": "X", "inputs": {"v": "${"}}}}, "malformed placeholder"),
    ({**template(), "workflow": {"1": {"class_type": "X", "inputs": {"v": "${bad name}"}}}}, "malformed"),
    ({**template(), "workflow": {"1": {"class_type": "X", "inputs": {"${k}": 1}}}}, "placeholder in a key"),
    ({**template(), "workflow": {"1": {"inputs": {}}}}, "string class_type"),
    ({**template(), "workflow": {}}, "non-empty object"),
    ({**template(), "name": "other"}, "differs from the file's name"),
    ({**template(), "outputs": ["9"]}, "outputs must be a list of the workflow's node ids"),
    ({**template(), "extra": 1}, "unknown key 'extra'"),
    ([1, 2], "must be a JSON object"),
]


async def test_broken_files_are_reported_with_their_reason_and_the_others_serve(caplog):
    with tempfile.TemporaryDirectory() as d:
        save(d, "good.json", template(x={"type": "integer", "default": 1}))
        for i, (data, _) in enumerate(BROKEN):
            save(d, f"broken{i:02d}.json", data)
        save(d, "Bad Name.json", template())
        save(d, "huge.json", " " * 5000 + json.dumps(template()))
        save(d, "notes.txt", "not a template: ignored")
        with caplog.at_level(logging.ERROR, logger="comfy_ws_proxy.jobs.templates"):
            r = registry(d, max_file_bytes=4096)
        status = r.status()
        assert status["loaded"] == 1 and [t.name for t in r.all()] == ["good"]
        reasons = {b["file"]: b["reason"] for b in status["broken"]}
        for i, (_, reason) in enumerate(BROKEN):
            assert reason in reasons[f"broken{i:02d}.json"], (i, reasons[f"broken{i:02d}.json"])
        assert "<name>.json" in reasons["Bad Name.json"] and "TEMPLATES_MAX_FILE_BYTES=4096" in reasons["huge.json"]
        assert len(reasons) == len(BROKEN) + 2 and not any(b["stale"] for b in status["broken"])
        # one log line per broken file, naming it and the reason
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == len(reasons)
        assert any("broken00.json" in line and "UI-format" in line for line in lines)
        assert (await r.render("alice", "good", {"x": 2})).params == {"x": 2}


# --- reload ---------------------------------------------------------------------------------------
async def test_changed_added_and_removed_files_are_reloaded_and_a_broken_edit_keeps_the_last_good(caplog):
    with tempfile.TemporaryDirectory() as d:
        r = registry(d)
        assert r.status() == {"loaded": 0, "broken": []}
        save(d, "a.json", template(x={"type": "integer", "default": 1}), stamp=10**18)
        await r.refresh()
        assert (await r.render("alice", "a", {})).params == {"x": 1}
        # changed (the same size and a new mtime): reloaded
        save(d, "a.json", template(x={"type": "integer", "default": 2}), stamp=10**18 + 1)
        await r.refresh()
        assert (await r.render("alice", "a", {})).params == {"x": 2}
        # broken by an edit: the last good version keeps serving, reported as stale, logged once
        with caplog.at_level(logging.ERROR, logger="comfy_ws_proxy.jobs.templates"):
            save(d, "a.json", '{"workflow": ', stamp=10**18 + 2)
            await r.refresh()
            await r.refresh()  # nothing changed: not read again, not logged again
        assert (await r.render("alice", "a", {})).params == {"x": 2}
        (broken,) = r.status()["broken"]
        assert broken["file"] == "a.json" and broken["stale"] and "not valid JSON" in broken["reason"]
        assert len([rec for rec in caplog.records if "a.json" in rec.getMessage()]) == 1
        assert "last good version keeps serving" in caplog.records[0].getMessage()
        # fixed: serves the new version, no longer reported
        save(d, "a.json", template(x={"type": "integer", "default": 3}), stamp=10**18 + 3)
        await r.refresh()
        assert (await r.render("alice", "a", {})).params == {"x": 3} and r.status()["broken"] == []
        # removed: gone
        os.remove(os.path.join(d, "a.json"))
        await r.refresh()
        assert r.get("a") is None and r.status() == {"loaded": 0, "broken": []}
        assert (await refused(r, "a", {})).code == ErrorCode.UNKNOWN_TEMPLATE


async def test_the_timer_reloads_one_refresh_at_a_time():
    with tempfile.TemporaryDirectory() as d:
        r = registry(d, interval_s=3600)  # a timer that never fires by itself here: ticked by hand
        save(d, "a.json", template(), stamp=10**18)
        r._tick()
        first = r._refreshing
        r._tick()  # while one runs, no second one
        assert r._refreshing is first
        await asyncio.wait_for(first, TIMEOUT)
        assert [t.name for t in r.all()] == ["a"]
        r.start()
        r.stop()
        assert r._refreshing is None


async def test_the_template_count_is_bounded_and_a_lost_directory_keeps_what_serves():
    with tempfile.TemporaryDirectory() as parent:
        d = os.path.join(parent, "templates")
        os.mkdir(d)
        for name in ("a", "b", "c"):
            save(d, f"{name}.json", template())
        r = registry(d, max_templates=2)
        assert [t.name for t in r.all()] == ["a", "b"] and r.get("c") is None
        assert r.status()["broken"] == [{"file": "c.json", "reason": "over TEMPLATES_MAX_COUNT=2", "stale": False}]
        os.remove(os.path.join(d, "a.json"))
        await r.refresh()
        assert [t.name for t in r.all()] == ["b", "c"] and r.status()["broken"] == []
        shutil.rmtree(d)
        await r.refresh()
        assert [t.name for t in r.all()] == ["b", "c"]  # the running set stays
        assert "cannot read the directory" in r.status()["directory_error"]


# --- JSON Schema and OpenAPI ----------------------------------------------------------------------
async def test_each_template_is_a_valid_json_schema_that_agrees_with_the_checks():
    uploads = {UPLOAD_LIKE}

    async def reference(owner, name):
        return "u/" + name if name in uploads else None

    with tempfile.TemporaryDirectory() as d:
        save(d, "all.json", template(**EVERY_TYPE))
        r = registry(d, upload_reference=reference)
        shipped = registry(SHIPPED)
        for t in (r.get("all"), shipped.get("text2img")):
            Draft202012Validator.check_schema(t.schema())
        validator = Draft202012Validator(r.get("all").schema())
        cases = [{"img": UPLOAD_LIKE}, {"img": UPLOAD_LIKE, "seed": "random"}, {"img": UPLOAD_LIKE, "seed": SEED_MAX},
                 {"img": UPLOAD_LIKE, "i": 6, "n": 0.75, "e": 3, "b": True, "s": "abcde"},
                 {"img": UPLOAD_LIKE, "i": 5}, {"img": UPLOAD_LIKE, "i": 14}, {"img": UPLOAD_LIKE, "n": 0.3},
                 {"img": UPLOAD_LIKE, "n": 1.5},
                 {"img": UPLOAD_LIKE, "e": "z"}, {"img": UPLOAD_LIKE, "s": "x"}, {"img": UPLOAD_LIKE, "b": 0},
                 {"img": UPLOAD_LIKE, "seed": -1}, {"img": "cat.png"}, {}, {"img": UPLOAD_LIKE, "typo": 1}]
        for params in cases:
            schema_ok = validator.is_valid(params)
            try:
                await r.render("alice", "all", params)
                render_ok = True
            except RequestError:
                render_ok = False
            assert schema_ok == render_ok, params


async def test_the_openapi_document_publishes_the_templates_and_stays_valid():
    from openapi_spec_validator import validate

    async with ProxyHarness(templates_dir=SHIPPED) as h:
        answer = await h.get("/openapi.json")
        doc = json.loads(answer.body)
        validate(doc)
        schemas = doc["components"]["schemas"]
        params = schemas["TemplateParams_text2img"]
        assert params["properties"]["steps"] == {"type": "integer", "minimum": 1, "maximum": 31, "default": 20,
                                                 "description": params["properties"]["steps"]["description"]}
        assert "$schema" not in params
        body = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"$ref": "#/components/schemas/TemplateSubmission"} in body["oneOf"]
        assert schemas["TemplateSubmission"]["oneOf"][0]["properties"]["template"] == {"const": "text2img"}
        assert "/templates" in doc["paths"] and "/templates/{name}" in doc["paths"]
        assert "template" in schemas["Job"]["properties"]


# --- through the proxy ----------------------------------------------------------------------------
async def http(h, method: str, path: str, body=None, user: str | None = "alice", headers: dict | None = None):
    all_headers = {**({"Authorization": "Bearer " + h.token(user)} if user else {}), **(headers or {})}
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return await h.http.fetch(h.url + path, method=method, body=body, headers=all_headers, raise_error=False,
                              request_timeout=TIMEOUT)


def sent_prompt(h, job_id: str) -> dict:
    """The prompt ComfyUI (the simulator) ran for this job."""
    return h.sim.history[job_id]["prompt"][2]


async def test_text2img_runs_end_to_end_over_the_websocket_and_http_with_typed_parameters():
    async with ProxyHarness(templates_dir=SHIPPED) as h:
        listed = json.loads((await http(h, "GET", "/templates")).body)["templates"]
        assert [t["name"] for t in listed] == ["text2img"]
        assert set(listed[0]["schema"]["properties"]) == {"seed", "steps", "cfg", "model", "width", "height",
                                                          "positive", "negative", "filename_prefix"}
        assert "recorded only" in listed[0]["description"] or "recorded" in listed[0]["description"]
        one = json.loads((await http(h, "GET", "/templates/text2img")).body)
        assert one == listed[0]
        missing = await http(h, "GET", "/templates/nope")
        assert missing.code == 404 and json.loads(missing.body)["error"]["code"] == "unknown_template"
        assert (await http(h, "GET", "/templates", user=None)).code == 401
        assert (await http(h, "GET", "/templates/text2img", user=None)).code == 401

        # the WebSocket
        alice = await h.connect("alice")
        params = {"seed": 42, "steps": 3, "width": 128, "height": 64, "cfg": 6.5, "positive": "a red fox"}
        alice.send("submit_prompt", {"template": "text2img", "params": params})
        accepted = await alice.next(where=lambda m: m.get("type") in ("prompt_accepted", "error"))
        assert accepted["type"] == "prompt_accepted", accepted
        job_id = accepted["data"]["prompt_id"]
        resolved = accepted["data"]["template"]["params"]
        assert accepted["data"]["template"]["name"] == "text2img"
        assert resolved == {**params, "negative": "blurry, low quality", "model": "v1-5-pruned-emaonly.safetensors",
                            "filename_prefix": "text2img"}
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == job_id)
        ran = sent_prompt(h, job_id)
        assert ran["1"]["inputs"]["width"] == 128 and type(ran["1"]["inputs"]["width"]) is int
        assert ran["2"]["inputs"]["seed"] == 42 and ran["3"]["inputs"]["blur_radius"] == 3
        assert ran["4"]["inputs"]["cfg"] == 6.5 and ran["4"]["inputs"]["positive_prompt"] == "a red fox"
        assert ran["4"]["inputs"]["filename_prefix"].endswith("/text2img")  # in alice's own folder
        # a bad submission: every bad parameter in one error, on the same socket
        alice.send("submit_prompt", {"template": "text2img", "params": {"steps": 0, "width": 100, "cfg": "high"}})
        error = await alice.next("error")
        assert error["data"]["code"] == "invalid_params" and error["data"]["prompt_id"]
        assert {(p["parameter"], p["rule"]) for p in error["data"]["details"]["errors"]} == {
            ("steps", "min"), ("width", "step"), ("cfg", "type")}
        alice.send("submit_prompt", {"template": "nope"})
        assert (await alice.next("error"))["data"]["code"] == "unknown_template"
        alice.send("submit_prompt", {"template": "text2img", "prompt": {"1": {}}})
        assert (await alice.next("error"))["data"]["code"] == "invalid_message"

        # HTTP
        answer = await http(h, "POST", "/generate", {"template": "text2img", "params": {"seed": 7, "width": 64}},
                            headers={"Prefer": "wait=10"})
        assert answer.code == 200, answer.body
        job = json.loads(answer.body)
        assert job["status"] == "completed" and job["template"]["name"] == "text2img"
        assert job["template"]["params"]["seed"] == 7 and job["template"]["params"]["width"] == 64
        assert [o["node_id"] for o in job["outputs"]] == ["4"]
        polled = json.loads((await http(h, "GET", f"/job/{job['job_id']}")).body)
        assert polled["template"] == job["template"]
        bad = await http(h, "POST", "/jobs", {"template": "text2img", "params": {"height": 4096, "steps": "3",
                                                                                  "colour": 1}})
        assert bad.code == 422
        error = json.loads(bad.body)["error"]
        assert error["code"] == "invalid_params"
        assert {(p["parameter"], p["rule"]) for p in error["details"]["errors"]} == {
            ("height", "max"), ("steps", "type"), ("colour", "unknown")}
        assert "height: 4096 is above the maximum 2048" in error["message"]
        unknown = await http(h, "POST", "/generate", {"template": "nope", "params": {}})
        assert unknown.code == 422 and json.loads(unknown.body)["error"]["code"] == "unknown_template"
        # a prompt job has no template
        plain = await http(h, "POST", "/generate", {"1": {"class_type": "EmptyImage", "inputs": {
            "width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "PreviewImage", "inputs": {
                "images": ["1", 0]}}})
        assert plain.code == 202 and json.loads(plain.body)["template"] is None


async def test_the_seed_random_is_drawn_reported_and_reproducible():
    async with ProxyHarness(templates_dir=SHIPPED) as h:
        jobs = []
        for params in ({"seed": "random"}, {}):
            answer = await http(h, "POST", "/generate", {"template": "text2img", "params": params},
                                headers={"Prefer": "wait=10"})
            job = json.loads(answer.body)
            seed = job["template"]["params"]["seed"]
            assert isinstance(seed, int) and 0 <= seed <= SEED_MAX
            assert sent_prompt(h, job["job_id"])["2"]["inputs"]["seed"] == seed  # what ran is what was reported
            jobs.append(job)
        assert jobs[0]["template"]["params"]["seed"] != jobs[1]["template"]["params"]["seed"]
        # the reported parameters make the same prompt again
        again = json.loads((await http(h, "POST", "/generate", {"template": "text2img",
                                                                 "params": jobs[0]["template"]["params"]},
                                       headers={"Prefer": "wait=10"})).body)
        assert again["template"] == jobs[0]["template"]
        assert sent_prompt(h, again["job_id"]) == sent_prompt(h, jobs[0]["job_id"])


def loading_template() -> dict:
    return {"description": "Invert an uploaded image", "workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "${picture}"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}}},
        "parameters": {"picture": {"type": "image", "required": True, "description": "Your image"}}}


async def test_an_image_parameter_takes_the_owners_upload_only():
    with tempfile.TemporaryDirectory() as d:
        save(d, "invert.json", loading_template())
        for isolate in (True, False):
            async with ProxyHarness(templates_dir=d, isolate_users=isolate) as h:
                stored = json.loads((await http(h, "POST", "/upload", PNG, headers={"Content-Type": "image/png"})).body)
                mine = await http(h, "POST", "/generate", {"template": "invert", "params": {"picture": stored["name"]}},
                                  headers={"Prefer": "wait=10"})
                job = json.loads(mine.body)
                assert mine.code == 200 and job["status"] == "completed", job
                assert job["template"]["params"] == {"picture": stored["name"]}
                ran = sent_prompt(h, job["job_id"])["1"]["inputs"]["image"]
                assert ran.endswith("/" + stored["name"]) and ran.startswith("u_")  # the owner's own file
                for user, picture in (("bob", stored["name"]), ("alice", UPLOAD_LIKE)):
                    refused_ = await http(h, "POST", "/generate", {"template": "invert",
                                                                   "params": {"picture": picture}}, user=user)
                    error = json.loads(refused_.body)["error"]
                    assert refused_.code == 422 and error["code"] == "invalid_params"
                    (problem,) = error["details"]["errors"]
                    assert problem["parameter"] == "picture" and problem["rule"] == "not_found"
                    assert "not one of your uploads" in problem["message"]
                missing = json.loads((await http(h, "POST", "/generate", {"template": "invert"})).body)["error"]
                assert [(p["parameter"], p["rule"]) for p in missing["details"]["errors"]] == [("picture", "required")]


async def test_a_rendered_prompt_obeys_the_node_allowlist_and_size_limit():
    with tempfile.TemporaryDirectory() as d:
        save(d, "invert.json", loading_template())
        async with ProxyHarness(templates_dir=d, node_allowlist=["EmptyImage", "SaveImage"]) as h:
            stored = json.loads((await http(h, "POST", "/upload", PNG, headers={"Content-Type": "image/png"})).body)
            answer = await http(h, "POST", "/generate", {"template": "invert", "params": {"picture": stored["name"]}})
            error = json.loads(answer.body)["error"]
            assert answer.code == 422 and error["code"] == "invalid_prompt" and "LoadImage" in error["message"]


# --- operations ---------------------------------------------------------------------------------
async def test_ready_and_metrics_list_broken_templates_without_being_unready():
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(SHIPPED, "text2img.json"), d)
        save(d, "ui.json", {"nodes": [], "links": []})
        async with ProxyHarness(templates_dir=d) as h:
            ready = await h.get("/ready")
            body = json.loads(ready.body)
            assert ready.code == 200 and body["status"] == "ready"
            assert body["templates"]["loaded"] == 1
            assert [b["file"] for b in body["templates"]["broken"]] == ["ui.json"]
            metrics = json.loads((await h.get("/metrics", headers={"Authorization": "Bearer dev-metrics-secret"})).body)
            assert metrics["templates"] == body["templates"]
        async with ProxyHarness() as h:  # without templates: nothing said about them
            assert "templates" not in json.loads((await h.get("/ready")).body)
            answer = await http(h, "POST", "/generate", {"template": "text2img"})
            assert answer.code == 422 and json.loads(answer.body)["error"]["code"] == "unknown_template"
            assert json.loads((await http(h, "GET", "/templates")).body) == {"templates": []}


def test_the_options_defaults_limits_and_documentation():
    env = {"COMFY_URL": "http://127.0.0.1:8188", "JWT_KEY_FILE": "k.json", "METRICS_SECRET": "s" * 16}
    s = load_settings([], env)
    assert (s.templates_dir, s.templates_reload_interval_s, s.templates_max_count, s.templates_max_file_bytes) == \
        ("", 5.0, 200, 1024 * 1024)
    for flag, pattern in (("--templates-max-count=0", "TEMPLATES_MAX_COUNT"),
                          ("--templates-max-file-bytes=10", "TEMPLATES_MAX_FILE_BYTES"),
                          ("--templates-reload-interval-s=-1", "TEMPLATES_RELOAD_INTERVAL_S")):
        with pytest.raises(ConfigError, match=pattern):
            load_settings([flag], env)
    with open(os.path.join(ROOT, "docs", "configuration.rst"), encoding="utf-8") as f:
        documented = f.read()
    for name in ("TEMPLATES_DIR", "TEMPLATES_RELOAD_INTERVAL_S", "TEMPLATES_MAX_COUNT", "TEMPLATES_MAX_FILE_BYTES"):
        assert f"``{name}``" in documented, name
    from comfy_ws_proxy.app import make_app

    with pytest.raises(ConfigError, match="TEMPLATES_DIR: /nonexistent/templates is not a directory"):
        make_app(settings_for_tests(templates_dir="/nonexistent/templates"))
    # the dev configuration serves the shipped templates
    with open(os.path.join(ROOT, "conf", "dev.py"), encoding="utf-8") as f:
        assert 'templates_dir = "conf/templates"' in f.read()


def test_a_jobs_template_is_stored_with_it():
    store = SqliteJobStore(":memory:")
    job = Job("00000000-0000-4000-8000-000000000001", "alice", "queued", {"prompt": {}},
              template={"name": "text2img", "params": {"seed": SEED_MAX, "cfg": 7.0}})
    store.insert(job)
    (loaded,) = store.load_jobs()
    assert loaded.template == job.template
    store.close()


def test_the_shipped_text2img_parses_and_every_parameter_is_used():
    with open(os.path.join(SHIPPED, "text2img.json"), encoding="utf-8") as f:
        t = parse_template("text2img", json.load(f))
    assert t.outputs == ("4",)
    assert {p.type for p in t.parameters.values()} == {"seed", "integer", "number", "string"}
    # recorded only: a model the backend lacks must not refuse the checkpoint-free variant
    assert t.parameters["model"].type == "string" and "recorded only" in t.parameters["model"].description


async def test_the_python_clients_submit_templates():
    from comfy_ws_proxy.client import ProxyClient, ProxyError
    from comfy_ws_proxy.client.http import JobsClient

    async with ProxyHarness(templates_dir=SHIPPED) as h:
        async with ProxyClient(f"ws://127.0.0.1:{h.port}/ws", h.token("alice")) as client:
            handle = await client.submit_template("text2img", {"seed": 3, "steps": 2})
            assert handle.accepted["template"]["params"]["seed"] == 3
            assert (await asyncio.wait_for(handle.result(), TIMEOUT)).status == "success"
            with pytest.raises(ProxyError) as caught:
                await client.submit_template("text2img", {"steps": 99, "seed": "x"})
            assert caught.value.code == "invalid_params"
            assert {p["parameter"] for p in caught.value.details["errors"]} == {"steps", "seed"}
        async with JobsClient(h.url, h.token("alice")) as jobs:
            job = await jobs.submit_template("text2img", {"width": 64}, wait=10)
            assert job["status"] == "completed" and job["template"]["params"]["width"] == 64
            with pytest.raises(ProxyError) as caught:
                await jobs.submit_template("text2img", {"width": 63})
            assert caught.value.code == "invalid_params"

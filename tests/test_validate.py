"""The validator (jobs/validate.py) against a real ComfyUI 0.3.64's answers, and the UI-format hint.

Judges, in this order: the shared recordings (tests/transcripts/validation_fail.jsonl: the shipped
failing workflows), then tests/validation/real_0.3.64.jsonl (the answers of a real 0.3.64, started
with PYTHONHASHSEED=0, to the prompts of tests/validation/cases.json: scripts/record_validation.py),
then the simulator (which the recordings taught; a property test over mutated workflows)."""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_ws_proxy.jobs.validate import (COMFY_MAX_DEPTH, check_prompt, is_ui_workflow, types_match,
                                          validate_prompt)
from comfy_ws_proxy.testing import comfyui as sim
from comfy_ws_proxy.testing.prompts import fan_in, long_chain

from .helpers import ProxyHarness, workflow
from .test_jobs_api import call, parsed

HERE = os.path.dirname(os.path.abspath(__file__))
VALIDATION = os.path.join(HERE, "validation")
with open(os.path.join(VALIDATION, "cases.json")) as _f:
    CASES = json.load(_f)
with open(os.path.join(VALIDATION, "real_0.3.64.jsonl")) as _f:
    REAL = {r["case"]: r for r in map(json.loads, _f)}
with open(os.path.join(VALIDATION, "object_info_0.3.64.json")) as _f:
    REAL_INFO = json.load(_f)  # the real /object_info, for the classes the cases and workflows use
SIM_INFO = {name: node.object_info(name) for name, node in sim.NODE_CLASSES.items()}

# Where the validator knowingly differs from the real answer (docs/validation.rst).
NODE_CODE = {"load_image_missing_file", "load_image_custom_and_other"}  # LoadImage's VALIDATE_INPUTS
DEEP = {"chain:2000"}  # refused by both; ComfyUI's recursion fails some 20 nodes earlier than COMFY_MAX_DEPTH


def case_prompt(name: str) -> dict:
    return long_chain(int(name.split(":")[1])) if name.startswith("chain:") else CASES[name]["prompt"]


def answer(verdict) -> dict:
    """What ComfyUI's HTTP answer carries, without prompt_id and number."""
    return verdict.body if verdict.error is not None else {"node_errors": verdict.node_errors}


@functools.lru_cache(maxsize=1)
def seed0_key():
    """A str wrapper hashing like a PYTHONHASHSEED=0 process (the recorded ComfyUI's), so the
    validator's sets iterate as that process' sets did."""
    strings = set()
    for info in REAL_INFO.values():
        for group in info["input"].values():
            strings.update(group)
    for name in CASES:
        strings.update(case_prompt(name))
    out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps({s: hash(s) for s in "
                          "json.load(sys.stdin)}))"], input=json.dumps(sorted(strings)), capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=60)
    hashes = json.loads(out.stdout)

    class Seed0Str(str):
        __slots__ = ()

        def __hash__(self) -> int:
            return hashes[str(self)]

        __eq__ = str.__eq__

    return Seed0Str


def recorded_validation_failures() -> dict:
    """The shared recording's 400 bodies, by workflow name."""
    bodies, note = {}, ""
    with open(os.path.join(HERE, "transcripts", "validation_fail.jsonl")) as f:
        for record in map(json.loads, f):
            if record["ev"] == "note":
                note = record["text"]
            elif record["ev"] == "http" and record["status"] == 400 and "with workflow" in note:
                bodies[note.split()[-1]] = record["body"]
    return bodies


async def test_the_shipped_failing_workflows_get_exactly_the_recorded_answer():
    recorded = recorded_validation_failures()
    assert sorted(recorded) == ["validation-fail", "validation-fail-no-outputs", "validation-fail-unknown-node"]
    for name, body in recorded.items():
        for object_info in (SIM_INFO, REAL_INFO):
            # the recorded process' set orders: the hashes the simulator was taught
            mine = validate_prompt(workflow(name), object_info, set_key=sim._FixedHashStr)
            assert json.dumps(mine) == json.dumps(body), name
        assert REAL[f"workflow:{name}"]["body"]["error"] == body["error"]


async def test_every_recorded_case_gets_the_real_comfyuis_answer_byte_for_byte():
    key = seed0_key()
    checked = 0
    for name, case in CASES.items():
        if name in NODE_CODE | DEEP:
            continue
        verdict = check_prompt(case_prompt(name), REAL_INFO, case.get("partial_execution_targets"), set_key=key)
        real = REAL[name]
        assert (verdict.error is None) == (real["status"] == 200), name
        assert json.dumps(answer(verdict)) == json.dumps(real["body"]), name
        checked += 1
    assert checked == len(CASES) - 3
    assert {r["status"] for r in REAL.values()} == {200, 400}


async def test_node_code_is_left_to_comfyui_and_only_that():
    key = seed0_key()
    assert validate_prompt(case_prompt("load_image_missing_file"), REAL_INFO, set_key=key) is None
    real = REAL["load_image_missing_file"]["body"]
    assert [e["type"] for e in real["node_errors"]["1"]["errors"]] == ["custom_validation_failed"]
    # beside the errors of the node's own code, the same answer
    real = copy.deepcopy(REAL["load_image_custom_and_other"]["body"])
    assert real["node_errors"].pop("1")["errors"][0]["type"] == "custom_validation_failed"
    mine = validate_prompt(case_prompt("load_image_custom_and_other"), REAL_INFO, set_key=key)
    assert json.dumps(mine) == json.dumps(real)


async def test_a_chain_too_deep_for_comfyuis_recursion_is_refused_as_comfyui_refuses_it():
    real = REAL["chain:2000"]["body"]
    mine = validate_prompt(long_chain(2000), REAL_INFO)
    assert mine["error"] == real["error"]
    [(mine_node, mine_error)], [(real_node, real_error)] = mine["node_errors"].items(), real["node_errors"].items()
    assert mine_error["dependent_outputs"] == real_error["dependent_outputs"] == ["2002"]
    for error in (mine_error, real_error):
        assert error["errors"][0]["extra_info"]["exception_type"] == "RecursionError"
    # ComfyUI's frames run out some 20 nodes before COMFY_MAX_DEPTH (depth 981 here, 974 for a 1,000 chain)
    assert 2002 - int(real_node) + 1 < 2002 - int(mine_node) + 1 == COMFY_MAX_DEPTH + 1
    assert validate_prompt(long_chain(900), REAL_INFO) is None and REAL["chain:900"]["status"] == 200
    assert validate_prompt(long_chain(5000), REAL_INFO, max_depth=None) is None


async def test_the_validator_needs_no_recursion_of_its_own():
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 80)
    try:
        assert validate_prompt(long_chain(3000), SIM_INFO, max_depth=None) is None
        cyclic = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
                  "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                  "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        assert validate_prompt(cyclic, SIM_INFO)["error"]["type"] == "prompt_outputs_failed_validation"
    finally:
        sys.setrecursionlimit(limit)


async def test_a_wide_fan_in_is_accepted_and_a_bad_leaf_is_named_once():
    prompt = fan_in(1000)
    assert validate_prompt(prompt, SIM_INFO) is None
    prompt["17"]["inputs"]["width"] = 0
    body = validate_prompt(prompt, SIM_INFO)
    assert list(body["node_errors"]) == ["17"] and body["node_errors"]["17"]["dependent_outputs"] == [str(2 * 1000)]


def normalised(body):
    """An answer without what ComfyUI takes from its process' hash seed: orders, and
    dependent_outputs (every refused output is added to every node with errors so far)."""
    if isinstance(body, dict):
        out = {k: normalised(v) for k, v in sorted(body.items())}
        if "dependent_outputs" in out:
            out["dependent_outputs"] = bool(out["dependent_outputs"])
        if "errors" in out:
            out["errors"] = sorted(out["errors"], key=json.dumps)
        if isinstance(out.get("details"), str) and "\n" in out["details"]:
            out["details"] = "\n".join(sorted(out["details"].split("\n")))
        return out
    if isinstance(body, list):
        return [normalised(v) for v in body]
    return body


async def test_the_default_orders_are_the_prompts_and_the_verdicts_comfyuis():
    for name, case in CASES.items():
        if name in NODE_CODE | DEEP:
            continue
        prompt = case_prompt(name)
        before = copy.deepcopy(prompt)
        verdict = check_prompt(prompt, REAL_INFO, case.get("partial_execution_targets"))
        assert prompt == before, name  # never changed (ComfyUI converts values in place)
        assert normalised(answer(verdict)) == normalised(REAL[name]["body"]), name
        if verdict.node_errors:
            ids = list(verdict.node_errors)
            assert ids == [n for n in prompt if n in ids] or name.startswith("cycle"), name  # prompt order


async def test_inputs_a_nodes_own_code_validates_are_left_to_it():
    info = {"MyLoader": {"input": {"required": {"name": [["a.safetensors"], {}], "scale": ["INT", {"max": 4}]}},
                         "output": ["MODEL"], "output_node": True}}
    prompt = {"1": {"class_type": "MyLoader", "inputs": {"name": "b.safetensors", "scale": 9}}}
    body = validate_prompt(prompt, info)
    assert [e["type"] for e in body["node_errors"]["1"]["errors"]] == ["value_not_in_list", "value_bigger_than_max"]
    assert body["node_errors"]["1"]["errors"][0]["details"] == "name: 'b.safetensors' not in ['a.safetensors']"
    partly = validate_prompt(prompt, info, custom_validated={"MyLoader": {"name"}})
    assert [e["type"] for e in partly["node_errors"]["1"]["errors"]] == ["value_bigger_than_max"]
    assert validate_prompt(prompt, info, custom_validated={"MyLoader": {"**"}}) is None
    prompt["1"]["inputs"]["scale"] = "x"  # a conversion is ComfyUI's own, even there
    assert validate_prompt(prompt, info, custom_validated={"MyLoader": {"**"}}) is not None


async def test_a_long_model_list_is_looked_up_and_reported_as_comfyui_does():
    files = [f"model_{i}.safetensors" for i in range(5000)]
    info = {"Loader": {"input": {"required": {"ckpt_name": [files, {}]}}, "output": [], "output_node": True}}
    prompt = {str(i): {"class_type": "Loader", "inputs": {"ckpt_name": files[-1]}} for i in range(2000)}
    assert validate_prompt(prompt, info) is None
    prompt["7"]["inputs"]["ckpt_name"] = "missing.safetensors"
    verdict = check_prompt(prompt, info)  # accepted: ComfyUI runs the 1,999 others, and says why not this one
    assert verdict.error is None and "7" not in verdict.outputs and len(verdict.outputs) == 1999
    error = verdict.node_errors["7"]["errors"][0]
    assert error["details"] == "ckpt_name: 'missing.safetensors' not in (list of length 5000)"
    assert error["extra_info"]["input_config"] is None


async def test_types_match_as_comfyuis_node_types_make_it():
    for received, expected, match in (("IMAGE", "IMAGE", True), ("MASK", "IMAGE", False), ("*", "IMAGE", True),
                                      ("IMAGE", "*", True), ("INT,FLOAT", "FLOAT", True), ("INT, FLOAT", "FLOAT", True),
                                      ("STRING", "INT,FLOAT", False), (["a"], ["a"], True), (["a"], "COMBO", False),
                                      ("*", ["a"], True), ("*,IMAGE", "MASK", False)):
        assert types_match(received, expected) is match, (received, expected)


async def test_odd_prompts_get_an_answer_not_an_exception():
    for prompt in ({"1": "EmptyImage"}, {"1": {"class_type": ["SaveImage"]}}, {"1": {"class_type": None}},
                   {"1": {"class_type": "PreviewImage", "inputs": {"images": [["1"], 0]}}}):
        body = validate_prompt(prompt, SIM_INFO)
        assert body is not None and body["error"]["message"], prompt


# --- the simulator, which mimics ComfyUI, agrees on mutated workflows ------------------------------

VALID = [workflow(n) for n in ("success", "success-ws", "exec-fail", "long-running", "success-ws-large")]
CLASSES = sorted(n for n, c in sim.NODE_CLASSES.items() if c.file_input is None) + ["NoSuchNode"]
VALUES = st.one_of(st.integers(-2, 20000), st.floats(allow_nan=False, allow_infinity=False, width=32),
                   st.sampled_from(["", "64", "abc", "1.5", "disabled", "area", "x"]), st.none(), st.booleans(),
                   st.dictionaries(st.just("__value__"), st.integers(0, 99), max_size=1),
                   st.lists(st.one_of(st.sampled_from(["1", "2", "3", "9"]), st.integers(-1, 3)), max_size=3))


@st.composite
def mutated(draw):
    prompt = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        node_id = draw(st.sampled_from(sorted(prompt)))
        node = prompt[node_id]
        kind = draw(st.sampled_from(["value", "drop_input", "class", "drop_node", "link"]))
        if kind == "value" and node["inputs"]:
            node["inputs"][draw(st.sampled_from(sorted(node["inputs"])))] = draw(VALUES)
        elif kind == "drop_input" and node["inputs"]:
            del node["inputs"][draw(st.sampled_from(sorted(node["inputs"])))]
        elif kind == "class":
            node["class_type"] = draw(st.sampled_from(CLASSES))
        elif kind == "drop_node" and len(prompt) > 1:
            del prompt[node_id]
        elif kind == "link" and node["inputs"]:
            node["inputs"][draw(st.sampled_from(sorted(node["inputs"])))] = [
                draw(st.sampled_from(sorted(prompt) + ["99"])), draw(st.integers(-1, 3))]
    return prompt


def has_cycle(prompt: dict) -> bool:
    state: dict = {}
    for start in prompt:
        stack = [(start, iter(prompt[start].get("inputs", {}).values()))]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node_id, values = stack[-1]
            for value in values:
                if sim.is_link(value) and value[0] in prompt:
                    if state.get(value[0]) == 1:
                        return True
                    if not state.get(value[0]):
                        state[value[0]] = 1
                        stack.append((value[0], iter(prompt[value[0]].get("inputs", {}).values())))
                        break
            else:
                state[node_id] = 2
                stack.pop()
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_the_simulator_and_the_validator_agree_on_mutated_workflows(prompt):
    mine = check_prompt(prompt, SIM_INFO, set_key=sim._FixedHashStr)
    try:
        outputs, node_errors = sim.validate_prompt(copy.deepcopy(prompt), None)
        theirs = {"node_errors": node_errors}
    except sim.PromptError as e:
        theirs = e.body
    except TypeError:  # ComfyUI's 500 (an unhashable class_type): the validator refuses it as unknown
        assert mine.error["type"] == "invalid_prompt"
        return
    if has_cycle(prompt):
        # Both give up deep in a cycle the outputs reach, where depends on the stack: which
        # error comes first, and with several outputs whether one still validates. Both must
        # find something wrong, or both nothing (a cycle no output reaches is not validated).
        found = bool(mine.error or mine.node_errors)
        assert found == bool(theirs.get("error") or theirs.get("node_errors"))
        return
    assert json.dumps(answer(mine)) == json.dumps(theirs)


# --- the UI-format hint, through both faces ----------------------------------------------------------

UI_WORKFLOW = {"last_node_id": 2, "last_link_id": 1, "nodes": [{"id": 1, "type": "EmptyImage", "widgets_values": [
    64, 64, 1, 0]}, {"id": 2, "type": "PreviewImage"}], "links": [[1, 1, 0, 2, 0, "IMAGE"]], "groups": [],
    "config": {}, "extra": {}, "version": 0.4}


async def test_is_ui_workflow_knows_both_formats():
    assert is_ui_workflow(UI_WORKFLOW)
    assert is_ui_workflow({"version": 1, "state": {}, "nodes": [], "links": []})  # the newer schema
    for prompt in (workflow("success"), {"nodes": {"class_type": "X", "inputs": {}}}, {"nodes": [1]}, [], None):
        assert not is_ui_workflow(prompt), prompt


async def test_a_ui_workflow_gets_the_export_hint_by_websocket_and_http():
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        refused = await alice.submit(UI_WORKFLOW)
        assert refused["type"] == "error" and refused["data"]["code"] == "invalid_prompt", refused
        assert "Export (API)" in refused["data"]["message"] and refused["data"]["details"] == {"hint": "ui_workflow"}
        assert "last_node_id" not in refused["data"]["message"]
        for body in (UI_WORKFLOW, {"prompt": UI_WORKFLOW, "front": False}):
            answer = await call(h, "POST", "/generate", body=body)
            assert answer.code == 422, answer.body
            error = parsed(answer)["error"]
            assert error["code"] == "invalid_prompt" and "Export (API)" in error["message"]
            assert error["details"] == {"hint": "ui_workflow"}
        assert not [r for r in h.sim.requests if r[1].endswith("/prompt")]  # ComfyUI never saw them
        prompt_id, final = await alice.run(workflow("success"))  # the connection is still good
        assert final == "execution_success"


async def test_a_node_without_object_inputs_never_reaches_comfyui():
    # A real 0.3.64 accepts this prompt (node 3 is not needed by the output, so not validated),
    # then its prompt worker dies on KeyError: 'inputs' building node 3's cache key.
    prompt = {**workflow("success"), "90": {"class_type": "EmptyImage"}}
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        for bad in (prompt, {**workflow("success"), "90": {"class_type": "EmptyImage", "inputs": []}}):
            refused = await alice.submit(bad)
            assert refused["type"] == "error" and refused["data"]["code"] == "invalid_prompt", refused
            assert refused["data"]["details"] == {"node_id": "90"} and "'inputs'" in refused["data"]["message"]
            answer = await call(h, "POST", "/generate", body=bad)
            assert answer.code == 422 and parsed(answer)["error"]["details"] == {"node_id": "90"}
        assert not [r for r in h.sim.requests if r[1].endswith("/prompt")]

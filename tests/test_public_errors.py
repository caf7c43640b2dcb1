"""STRIP_COMFY_ERRORS: ComfyUI's tracebacks, server paths and tensor dumps never reach a client
(WebSocket, replay, /job, SSE, webhooks, the stored job), the log keeps the full text."""
from __future__ import annotations

import json
import logging
import os

from comfy_ws_proxy.jobs.public_errors import public_execution_error, public_rejection, strip_paths
from comfy_ws_proxy.testing.comfyui import NodeFailed

from .helpers import TIMEOUT, ProxyHarness, workflow
from .test_job_events import open_stream, parse, read_until_closed
from .test_jobs_api import call, parsed
from .test_webhooks import Receiver, verified, webhook_settings

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_PATHS = ("/opt/ComfyUI", "/home/", "C:\\", "execution.py\", line")
MISSING_MODEL = "[Errno 2] No such file or directory: '/home/comfy/ComfyUI/models/checkpoints/secret_v2.safetensors'"


def recorded_execution_error() -> dict:
    with open(os.path.join(HERE, "transcripts", "exec_fail.jsonl")) as f:
        return next(r["data"] for r in map(json.loads, f) if r.get("type") == "execution_error")


def assert_public(data: dict) -> None:
    text = json.dumps(data)
    assert not any(p in text for p in SERVER_PATHS) and "tensor(" not in text, text[:500]


async def test_strip_paths_cuts_server_paths_and_tensor_dumps_and_nothing_else():
    for text, expected in (
            (MISSING_MODEL, "[Errno 2] No such file or directory: '.../secret_v2.safetensors'"),
            ('File "/opt/ComfyUI/execution.py", line 496', 'File ".../execution.py", line 496'),
            ("C:\\ComfyUI\\models\\x.ckpt is missing", ".../x.ckpt is missing"),
            ("C:/Users/bob/ComfyUI/nodes.py:12", ".../nodes.py:12"),
            ("\\\\nas\\models\\m.pt gone", ".../m.pt gone"),
            ("~/ComfyUI/models/a.pt", ".../a.pt"),
            ("x = tensor([[0.1, 0.2],\n [0.3, 0.4]]) bad", "x = tensor(...) bad"),
            ("see https://example.com/a/b, 1/2 and and/or; /tmp", "see https://example.com/a/b, 1/2 and and/or; /tmp"),
            ("Expected size 4 but got size 3 for tensor number 1", "Expected size 4 but got size 3 for tensor number 1")):
        assert strip_paths(text) == expected, text


async def test_the_recorded_execution_error_keeps_its_message_node_and_shape():
    data = recorded_execution_error()
    public = public_execution_error(data)
    assert_public(public)
    assert set(public) == set(data)  # ComfyUI's keys, so clients that index them still work
    for key in ("prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type"):
        assert public[key] == data[key], key
    assert public["traceback"] == [] and public["current_inputs"] == {} and public["current_outputs"] == []
    assert data["traceback"] and data["current_inputs"]  # the original is not touched
    rejection = {"code": "invalid_prompt", "error": {"details": "x"}, "node_errors": {"3": {"errors": [{
        "type": "exception_during_validation", "details": "'/opt/ComfyUI/x.py'",
        "extra_info": {"traceback": ['  File "/opt/ComfyUI/execution.py", line 1\n'], "exception_type": "KeyError"}}]}}}
    public = public_rejection(rejection)
    assert_public(public)
    assert public["node_errors"]["3"]["errors"][0]["details"] == "'.../x.py'"


async def test_a_failed_prompt_is_told_without_server_details_everywhere_and_logged_whole(caplog):
    receiver = Receiver()
    caplog.set_level(logging.WARNING, logger="comfy_ws_proxy")
    try:
        async with ProxyHarness(strip_comfy_errors=True, **webhook_settings()) as h:
            alice = await h.connect("alice")
            prompt_id, final = await alice.run(workflow("exec-fail"))
            assert final == "execution_error"
            [frame] = [m for m in alice.json_messages() if m["type"] == "execution_error"]
            assert_public(frame["data"])
            assert frame["data"]["node_id"] == "5" and frame["data"]["node_type"] == "ImageBatch"
            assert frame["data"]["exception_type"] == "RuntimeError"
            assert frame["data"]["exception_message"].startswith("Sizes of tensors must match")
            assert_public(h.state.tracker.get(prompt_id).result)  # the stored result
            # the log has it all, with user and prompt id, and no token
            [line] = [r.getMessage() for r in caplog.records if prompt_id in r.getMessage()
                      and r.levelno == logging.WARNING]
            assert "user=alice" in line and "/opt/ComfyUI/nodes.py" in line and "tensor(" in line
            assert h.token("alice").split(".")[0] not in caplog.text
            # a socket that opens later is owed the outcome: replayed, stripped too
            await alice.close()
            h.state.tracker.get(prompt_id).told = False
            again = await h.connect("alice")
            replay = await again.next("execution_error")
            assert replay["replayed"] is True and replay["data"]["node_id"] == "5"
            assert_public(replay["data"])

            # HTTP: /job, its event stream, the webhook
            answer = await call(h, "POST", "/generate", body={"prompt": workflow("exec-fail"),
                                                               "webhook_url": receiver.url()},
                                headers={"Prefer": "wait=10"})
            job = parsed(answer)
            assert job["status"] == "failed" and job["error"]["code"] == "execution_error"
            assert job["error"]["class_type"] == "ImageBatch" and job["error"]["exception_type"] == "RuntimeError"
            assert_public(job)
            reader, writer = await open_stream(h, job["job_id"])
            events, _ = parse((await read_until_closed(reader)).partition(b"\r\n\r\n")[2])
            writer.close()
            assert events and events[-1]["event"] == "done"
            assert_public([e["data"] for e in events])
            payload = verified(await receiver.next_request(1))
            assert payload["data"]["error"]["code"] == "execution_error"
            assert_public(payload)
    finally:
        receiver.close()


async def test_paths_in_a_message_are_cut_to_the_file_name():
    async with ProxyHarness(strip_comfy_errors=True) as h:
        original = h.sim._run_node

        async def missing_model(item, node_id, class_type, inputs, progress):
            if class_type == "ImageBatch":
                raise NodeFailed("FileNotFoundError", MISSING_MODEL,
                                 ['  File "/home/comfy/ComfyUI/nodes.py", line 1, in load\n'])
            return await original(item, node_id, class_type, inputs, progress)

        h.sim._run_node = missing_model
        alice = await h.connect("alice")
        prompt_id, final = await alice.run(workflow("exec-fail"), timeout=TIMEOUT)
        [frame] = [m for m in alice.json_messages() if m["type"] == "execution_error"]
        assert frame["data"]["exception_message"] == "[Errno 2] No such file or directory: '.../secret_v2.safetensors'"
        assert_public(frame["data"])
        answer = parsed(await call(h, "GET", f"/job/{prompt_id}"))
        assert answer["error"]["message"] == frame["data"]["exception_message"]


async def test_without_the_option_clients_get_comfyuis_error_unchanged():
    async with ProxyHarness() as h:
        assert h.settings.strip_comfy_errors is False
        alice = await h.connect("alice")
        prompt_id, final = await alice.run(workflow("exec-fail"))
        [frame] = [m for m in alice.json_messages() if m["type"] == "execution_error"]
        assert any("/opt/ComfyUI" in line for line in frame["data"]["traceback"])
        assert frame["data"]["current_inputs"]


async def test_a_refusal_keeps_comfyuis_node_errors_with_the_option():
    async with ProxyHarness(strip_comfy_errors=True) as h:
        alice = await h.connect("alice")
        refused = await alice.submit(workflow("validation-fail"))  # ComfyUI's 400 answers the submission
        assert refused["type"] == "error", refused
        assert refused["data"]["code"] == "invalid_prompt"
        assert set(refused["data"]["node_errors"]) == {"2", "3", "5"}
        assert refused["data"]["error"]["type"] == "prompt_outputs_failed_validation"

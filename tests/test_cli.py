"""scripts/comfy_client.py as a real process against the in-process proxy: one line for a
refused token, the per-node validation errors, --json and --download, Ctrl-C cancels."""
import asyncio
import json
import os
import signal
import sys
import tempfile

from .helpers import TIMEOUT, WORKFLOWS, ProxyHarness, job_finished

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CLI = os.path.join(ROOT, "scripts", "comfy_client.py")


async def start_cli(h, token, workflow_name, *args):
    return await asyncio.create_subprocess_exec(
        sys.executable, CLI, "--url", f"ws://127.0.0.1:{h.port}/ws", "--token", token, *args,
        os.path.join(WORKFLOWS, workflow_name + ".json"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))


async def run_cli(h, token, workflow_name, *args):
    process = await start_cli(h, token, workflow_name, *args)
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    return process.returncode, out.decode(), err.decode()


async def test_a_refused_token_is_one_line_with_the_reason_and_exit_2(io_loop):
    async with ProxyHarness() as h:
        for token, reason in ((h.token("alice", ttl=-600), "expired"), ("not-a-jwt", "malformed")):
            code, out, err = await run_cli(h, token, "success")
            assert code == 2, (code, err)
            assert err.strip().splitlines() == [f"error: the proxy refused the token ({reason}): "
                                                + {"expired": "Token has expired",
                                                   "malformed": "Token is not a well-formed JWT"}[reason]], err
            assert out == ""
        code, out, err = await run_cli(h, "not-a-jwt", "success", "--json")
        assert code == 2 and json.loads(out)["status"] == "unauthorized"
        assert json.loads(out)["error"]["reason"] == "malformed"


async def test_validation_errors_are_printed_per_node(io_loop):
    async with ProxyHarness() as h:
        code, out, err = await run_cli(h, h.token("alice"), "validation-fail")
        assert code == 1
        lines = err.strip().splitlines()
        assert lines[0] == "error: invalid_prompt: Prompt outputs failed validation", err
        assert ("  node 5 (PreviewImage) input images: Return type mismatch between linked nodes "
                "(images, received_type(MASK) mismatch input_type(IMAGE))") in lines, err
        assert "  node 2 (ImageScale) input width: Value 99999 bigger than max of 16384 (width)" in lines, err
        assert "Traceback" not in err


async def test_json_prints_one_result_and_download_saves_the_images(io_loop):
    async with ProxyHarness() as h:
        with tempfile.TemporaryDirectory() as folder:
            code, out, err = await run_cli(h, h.token("alice"), "success", "--json", "--download", folder)
            assert code == 0, err
            result = json.loads(out)  # the whole of stdout: one JSON object
            assert result["status"] == "success" and result["error"] is None
            assert h.state.tracker.get(result["prompt_id"]).state == "success"
            images = [image for output in result["outputs"].values() for image in output.get("images", [])]
            assert images and len(result["downloaded"]) == len(images)
            for path in result["downloaded"]:
                assert os.path.dirname(path) == folder
                with open(path, "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        code, out, err = await run_cli(h, h.token("alice"), "validation-fail", "--json")
        assert code == 1 and json.loads(out)["status"] == "rejected"
        assert json.loads(out)["error"]["node_errors"]
        code, out, err = await run_cli(h, h.token("alice"), "exec-fail", "--json")
        assert code == 1 and json.loads(out)["status"] == "error"
        code, out, err = await run_cli(h, h.token("alice"), "exec-fail")
        assert code == 1 and "error: node " in err and "Traceback" not in err


async def test_ctrl_c_cancels_the_running_prompt_and_exits_130(io_loop):
    async with ProxyHarness() as h:
        hold = h.sim.hold_node("3")
        service = h.state.service
        cancelled = asyncio.get_running_loop().create_future()
        cancel = service.cancel

        async def observed_cancel(owner, job_id):
            await cancel(owner, job_id)
            if not cancelled.done():
                cancelled.set_result(job_id)
        service.cancel = observed_cancel
        process = await start_cli(h, h.token("alice"), "long-running")
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), TIMEOUT)).decode()
            assert line.startswith("prompt ") and line.strip().endswith("accepted"), line
            prompt_id = line.split()[1]
            await asyncio.wait_for(hold.reached, TIMEOUT)  # it runs
            finished = job_finished(h.state, prompt_id)
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(cancelled, TIMEOUT) == prompt_id  # the interrupt went to ComfyUI
            hold.release()
            out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        finally:
            hold.release()
            if process.returncode is None:
                process.kill()
                await process.wait()
        err = err.decode()
        assert process.returncode == 130, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert f"interrupted: cancelling prompt {prompt_id}" in err
        assert f"prompt {prompt_id}: interrupted" in err
        assert (await asyncio.wait_for(finished, TIMEOUT)).state == "interrupted"


async def test_the_http_path_submits_waits_downloads_and_cancels(io_loop):
    """--http: the same run through the jobs REST API; Ctrl-C cancels by POST /job/<id>/cancel."""
    async with ProxyHarness() as h:
        url = f"http://127.0.0.1:{h.port}"
        with tempfile.TemporaryDirectory() as folder:
            process = await asyncio.create_subprocess_exec(
                sys.executable, CLI, "--http", "--url", url, "--token", h.token("alice"), "--json",
                "--download", folder, os.path.join(WORKFLOWS, "success.json"), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
            out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
            assert process.returncode == 0, err
            result = json.loads(out)
            assert result["status"] == "completed" and h.state.tracker.get(result["prompt_id"]).state == "success"
            assert len(result["downloaded"]) == len(result["job"]["outputs"]) == 2
            for path in result["downloaded"]:
                with open(path, "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        hold = h.sim.hold_node("3")
        cancelled = asyncio.get_running_loop().create_future()
        cancel = h.state.service.cancel

        async def observed_cancel(owner, job_id):
            await cancel(owner, job_id)
            if not cancelled.done():
                cancelled.set_result(job_id)
        h.state.service.cancel = observed_cancel
        process = await asyncio.create_subprocess_exec(
            sys.executable, CLI, "--http", "--url", url, "--token", h.token("alice"),
            os.path.join(WORKFLOWS, "long-running.json"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), TIMEOUT)).decode()
            assert line.startswith("prompt ") and "accepted" in line, line
            prompt_id = line.split()[1]
            await asyncio.wait_for(hold.reached, TIMEOUT)
            finished = job_finished(h.state, prompt_id)
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(cancelled, TIMEOUT) == prompt_id  # POST /job/<id>/cancel
            hold.release()
            await asyncio.wait_for(finished, TIMEOUT)  # interrupted in ComfyUI
            out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
            assert process.returncode == 130, err
            assert h.state.tracker.get(prompt_id).state == "interrupted"
            assert "Traceback" not in err.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        code, out, err = await run_cli_http(h, "not-a-jwt", "success")
        assert code == 2 and "refused the token (malformed)" in err


async def run_cli_http(h, token, workflow_name):
    process = await asyncio.create_subprocess_exec(
        sys.executable, CLI, "--http", "--url", f"http://127.0.0.1:{h.port}", "--token", token,
        os.path.join(WORKFLOWS, workflow_name + ".json"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    return process.returncode, out.decode(), err.decode()

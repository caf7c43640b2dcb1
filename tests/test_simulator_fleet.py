"""The simulator as one member of a fleet: per-instance node classes, model files, speed,
model loads, /system_stats, job records, and fault injection per instance (issue 12).

The standard behaviour is held against the recordings in tests/test_simulator.py; here the
profiles are held against ComfyUI 0.3.64's own answers (server.py's /models routes,
folder_paths' folders, the invalid_prompt body of an unknown class as recorded).
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import sys

import pytest
from tornado.httpclient import AsyncHTTPClient

from comfy_ws_proxy.testing.comfyui import MODEL_FOLDERS, ComfySimulator, txt2img_workflow

from .test_simulator import HERE, TIMEOUT, Env, done, http_records, load, workflow

FOLDERS_0_3_64 = ["checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                  "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                  "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders"]


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def run_to_end(env: Env, prompt: dict, prompt_id: str) -> None:
    await env.post_prompt(prompt, prompt_id=prompt_id)
    await env.sim.wait_idle()


# --- node classes ---------------------------------------------------------------------------

async def test_an_instance_has_its_own_node_classes(io_loop):
    async with Env(without_node_classes=["SaveImageWebsocket"], extra_node_classes=["FilmGrain"]) as env, \
            Env() as standard:
        _, _, info = await env.fetch("GET", "/object_info")
        assert "FilmGrain" in info and "SaveImageWebsocket" not in info and "EmptyImage" in info
        grain = info["FilmGrain"]
        assert (grain["python_module"], grain["input_order"], grain["output"], grain["output_node"]) == (
            "custom_nodes.FilmGrain", {"required": ["image", "strength"]}, ["IMAGE"], False)
        assert (await env.fetch("GET", "/object_info/SaveImageWebsocket"))[2] == {}
        assert list((await env.fetch("GET", "/object_info/FilmGrain"))[2]) == ["FilmGrain"]
        assert "FilmGrain" not in (await standard.fetch("GET", "/object_info"))[2]

        # a class the instance lacks is refused exactly as the recorded unknown class is
        recorded = http_records("validation_fail", "POST", "/prompt")[1]
        code, content_type, answer = await env.fetch("POST", "/prompt", {"prompt": workflow("success-ws")})
        expected = json.loads(json.dumps(recorded["body"]).replace("NoSuchNodeAnywhere", "SaveImageWebsocket"))
        node = next(k for k, v in workflow("success-ws").items() if v["class_type"] == "SaveImageWebsocket")
        expected["error"]["details"] = f"Node ID '#{node}'"
        assert (code, content_type, answer) == (400, recorded["content_type"], expected)

        # the custom class runs here, and is an unknown class to a standard instance
        grainy = txt2img_workflow("a.safetensors", filters=("FilmGrain",))
        env.sim.set_models({"checkpoints": ["a.safetensors"]})
        standard.sim.set_models({"checkpoints": ["a.safetensors"]})
        await run_to_end(env, grainy, "grainy")
        assert env.sim.history["grainy"]["status"]["status_str"] == "success"
        assert "9" in env.sim.history["grainy"]["outputs"]
        code, _, answer = await standard.fetch("POST", "/prompt", {"prompt": grainy})
        assert (code, answer["error"]["type"]) == (400, "invalid_prompt")
        assert answer["error"]["message"] == "Cannot execute because node FilmGrain does not exist."


def test_a_profile_that_names_no_standard_class_is_refused():
    with pytest.raises(ValueError, match="NoSuchClass"):
        ComfySimulator(without_node_classes=["NoSuchClass"])
    with pytest.raises(ValueError, match="speed"):
        ComfySimulator(speed=0)


# --- model files -------------------------------------------------------------------------------

async def test_models_routes_answer_as_comfyui_does(io_loop):
    assert list(MODEL_FOLDERS) == FOLDERS_0_3_64
    models = {"checkpoints": ["sdxl_base.safetensors", "sd15.ckpt", "notes.txt"], "loras": ["detail.safetensors"],
              "ipadapter": ["ip.bin"]}
    async with Env(models=models) as env:
        for prefix in ("", "/api"):
            code, content_type, folders = await env.fetch("GET", prefix + "/models")
            assert (code, content_type) == (200, "application/json; charset=utf-8")
            assert folders == FOLDERS_0_3_64 + ["ipadapter"]  # a custom node's folder comes last
            assert (await env.fetch("GET", prefix + "/models/checkpoints"))[2] == ["sd15.ckpt",
                                                                                   "sdxl_base.safetensors"]
        assert (await env.fetch("GET", "/models/loras"))[2] == ["detail.safetensors"]
        assert (await env.fetch("GET", "/models/vae"))[2] == []
        assert (await env.fetch("GET", "/models/nope"))[:3] == (404, "", b"")  # web.Response(status=404)
        # CheckpointLoaderSimple's combo is this instance's checkpoints, and validation holds to it
        info = (await env.fetch("GET", "/object_info/CheckpointLoaderSimple"))[2]["CheckpointLoaderSimple"]
        assert info["input"]["required"]["ckpt_name"][0] == ["sd15.ckpt", "sdxl_base.safetensors"]
        assert info["output"] == ["MODEL", "CLIP", "VAE"] and len(info["output_tooltips"]) == 3
        code, _, answer = await env.fetch("POST", "/prompt", {"prompt": txt2img_workflow("flux.safetensors")})
        assert code == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
        assert answer["node_errors"]["4"] == {
            "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                        "details": "ckpt_name: 'flux.safetensors' not in ['sd15.ckpt', 'sdxl_base.safetensors']",
                        "extra_info": {"input_name": "ckpt_name",
                                       "input_config": [["sd15.ckpt", "sdxl_base.safetensors"],
                                                        {"tooltip": "The name of the checkpoint (model) to load."}],
                                       "received_value": "flux.safetensors"}}],
            "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}
        # a file placed later is seen at once (ComfyUI rescans the folder)
        env.sim.add_model("checkpoints", "flux.safetensors")
        assert "flux.safetensors" in (await env.fetch("GET", "/models/checkpoints"))[2]
        assert (await env.fetch("POST", "/prompt", {"prompt": txt2img_workflow("flux.safetensors")}))[0] == 200
        env.sim.remove_model("checkpoints", "flux.safetensors")
        assert "flux.safetensors" not in (await env.fetch("GET", "/object_info/CheckpointLoaderSimple"))[2][
            "CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


async def test_a_standard_instance_has_no_checkpoints(io_loop):
    async with Env() as env:
        assert (await env.fetch("GET", "/models/checkpoints"))[2] == []
        info = (await env.fetch("GET", "/object_info/CheckpointLoaderSimple"))[2]["CheckpointLoaderSimple"]
        assert info["input"]["required"]["ckpt_name"][0] == []


# --- checkpoints: the default graph, model loads, speed ------------------------------------------

async def test_a_checkpoint_workflow_runs_like_comfyui_and_loads_only_on_a_change(io_loop):
    async with Env(models=["a.safetensors", "b.safetensors"]) as env:
        sock = await env.connect("A", "a")
        for prompt_id, ckpt, seed in (("p1", "a.safetensors", 1), ("p2", "a.safetensors", 2),
                                      ("p3", "b.safetensors", 3), ("p4", "a.safetensors", 4)):
            await env.post_prompt(txt2img_workflow(ckpt, steps=3, seed=seed), "a", prompt_id=prompt_id)
            await sock.wait_for(done, sum(1 for t in sock.tokens if done(t)) + 1)
        assert [r.model_load for r in env.sim.jobs] == [True, False, True, True]
        assert [r.checkpoints for r in env.sim.jobs] == [["a.safetensors"]] * 2 + [["b.safetensors"], ["a.safetensors"]]
        assert env.sim.model_loads == 3 and env.sim.loaded_checkpoint == "a.safetensors"
        # p2 reused the loader's and the prompts' outputs: ComfyUI's execution_cached says so
        cached = [m for m in sock.described if m["type"] == "execution_cached"]
        assert cached[0]["data"]["nodes"] == [] and set(cached[1]["data"]["nodes"]) == {"4", "5", "6", "7"}
        # KSampler: one progress message per step, values 1..steps
        steps = [(m["data"]["value"], m["data"]["max"]) for m in sock.described
                 if m["type"] == "progress" and m["data"]["prompt_id"] == "p1"]
        assert steps == [(1, 3), (2, 3), (3, 3)]
        image = env.sim.history["p1"]["outputs"]["9"]["images"][0]
        code, content_type, png = await env.fetch("GET", f"/view?filename={image['filename']}&type=output")
        assert (code, content_type, png[:4]) == (200, "image/png", b"\x89PNG")
        # the picture follows the checkpoint and the seed
        first, second = (env.sim.history[p]["outputs"]["9"]["images"][0]["filename"] for p in ("p1", "p2"))
        assert env.sim._pixels[("output", "", first)] != env.sim._pixels[("output", "", second)]


async def test_speed_divides_node_and_step_delays_not_loads(io_loop):
    async with Env(models=["a.safetensors"], node_delay=0.2, step_delay=0.1, speed=4.0, load_seconds=0.5) as env:
        asked: list[float] = []
        real_sleep = asyncio.sleep

        async def sleep(seconds: float) -> None:
            asked.append(round(seconds, 6))
            await real_sleep(0)
        env.sim.sleep = sleep
        await run_to_end(env, txt2img_workflow("a.safetensors", steps=2), "p")
        # 7 nodes at 0.2 / 4; the load at 0.5; KSampler's two steps at 0.1 / 4
        assert sorted(asked) == [0.025, 0.025] + [0.05] * 7 + [0.5]
        asked.clear()
        await run_to_end(env, workflow("success-ws"), "ws")  # SaveImageWebsocket's steps are divided too
        assert set(asked) == {0.05, 0.025}


async def test_an_interrupt_stops_ksampler_between_steps(io_loop):
    async with Env(models=["a.safetensors"]) as env:
        sock = await env.connect("A", "a")
        hold = env.sim.hold_node("3")
        await env.post_prompt(txt2img_workflow("a.safetensors", steps=5), "a", prompt_id="p")
        await asyncio.wait_for(hold.reached, TIMEOUT)
        await env.fetch("POST", "/interrupt", {"prompt_id": "p"})
        hold.release()
        await sock.wait_for(done)
        interrupted = next(m for m in sock.described if m["type"] == "execution_interrupted")
        assert (interrupted["data"]["node_id"], interrupted["data"]["node_type"]) == ("3", "KSampler")
        assert [r.outcome for r in env.sim.jobs] == ["interrupted"]


# --- /system_stats --------------------------------------------------------------------------

async def test_system_stats_per_instance_keep_comfyuis_shape(io_loop):
    recorded = next(r for r in load("http_basics") if r["ev"] == "http" and r["path"] == "/system_stats")["body"]
    async with Env(device_name="cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", vram_total=25_386_352_640,
                   vram_free=20_000_000_000, comfyui_version="0.3.65", pytorch_version="2.8.0+cu128") as gpu, \
            Env() as cpu:
        stats = (await gpu.fetch("GET", "/system_stats"))[2]
        assert stats.keys() == recorded.keys() and stats["system"].keys() == recorded["system"].keys()
        assert stats["devices"][0].keys() == recorded["devices"][0].keys()
        assert stats["devices"][0] | {"torch_vram_total": 0, "torch_vram_free": 0} == {
            "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0,
            "vram_total": 25_386_352_640, "vram_free": 20_000_000_000, "torch_vram_total": 0, "torch_vram_free": 0}
        assert (stats["system"]["comfyui_version"], stats["system"]["pytorch_version"]) == ("0.3.65", "2.8.0+cu128")
        plain = (await cpu.fetch("GET", "/system_stats"))[2]
        assert plain["devices"] == recorded["devices"] and plain["system"]["comfyui_version"] == "0.3.64"


# --- records and counters -------------------------------------------------------------------

async def test_job_records_on_the_simulators_clock(io_loop):
    clock = FakeClock()
    async with Env(models=["a.safetensors"], clock=clock) as env:
        events: list[tuple[str, str]] = []
        env.sim.on_record = lambda event, record: events.append((event, record.prompt_id))
        env.sim.paused = True
        await env.post_prompt(txt2img_workflow("a.safetensors", steps=1), prompt_id="first")
        clock.now = 101.0
        await env.post_prompt(workflow("success"), prompt_id="deleted")
        await env.post_prompt(workflow("success"), prompt_id="second")
        await env.fetch("POST", "/queue", {"delete": ["deleted"]})
        hold = env.sim.hold_node("4", "first")
        env.sim.paused = False
        await asyncio.wait_for(hold.reached, TIMEOUT)
        clock.now = 105.0
        hold.release()
        await env.sim.wait_idle()
        first, deleted, second = env.sim.jobs
        assert (first.prompt_id, first.queued_at, first.started_at, first.finished_at, first.outcome) == (
            "first", 100.0, 101.0, 105.0, "success")
        assert (first.checkpoints, first.model_load, first.generation) == (["a.safetensors"], True, 1)
        assert (deleted.started_at, deleted.outcome) == (None, "deleted")
        assert (second.queued_at, second.started_at, second.outcome, second.checkpoints) == (
            101.0, 105.0, "success", [])
        assert env.sim.records("second") == [second]
        # a restart loses what was queued or running; the counters and records say so
        env.sim.paused = True
        await env.post_prompt(workflow("success"), prompt_id="queued")
        await env.sim.restart()
        assert env.sim.records("queued")[0].outcome == "lost" and env.sim.loaded_checkpoint is None
        assert env.sim.execution_counts["queued"] == 0
        snapshot = env.sim.snapshot()
        assert snapshot["completed_counts"] == {"first": 1, "second": 1} and snapshot["model_loads"] == 1
        assert [j["outcome"] for j in snapshot["jobs"]] == ["success", "deleted", "success", "lost"]
        json.dumps(snapshot)
        assert events == [("deleted", "deleted"), ("started", "first"), ("success", "first"), ("started", "second"),
                          ("success", "second"), ("lost", "queued")]


async def test_a_fleet_of_instances_each_with_its_own_faults(io_loop):
    fast = Env(models=["a.safetensors"], speed=2.0)
    slow = Env(models=["a.safetensors", "b.safetensors"], extra_node_classes=["Upscale4x"])
    async with fast, slow:
        assert fast.sim.port != slow.sim.port
        ids = [f"job{i}" for i in range(6)]
        for i, prompt_id in enumerate(ids):
            env = fast if i % 2 else slow
            await env.post_prompt(txt2img_workflow("a.safetensors", steps=1, seed=i), prompt_id=prompt_id)
        await fast.sim.go_down()  # one partitioned: the other serves on
        with pytest.raises(ConnectionRefusedError):
            await fast.http.fetch(fast.sim.url + "/queue")
        await slow.sim.wait_idle()
        assert (await slow.fetch("GET", "/queue"))[0] == 200
        await fast.sim.come_up()
        await fast.sim.wait_idle()
        await slow.sim.restart()  # one restarted: its loaded checkpoint is gone, the other's stays
        assert slow.sim.loaded_checkpoint is None and fast.sim.loaded_checkpoint == "a.safetensors"
        fast.sim.drop_websockets()
        completed = sum((env.sim.completed_counts for env in (fast, slow)), collections.Counter())
        assert completed == {prompt_id: 1 for prompt_id in ids}  # every job ran exactly once, fleet-wide
        assert {r.prompt_id for r in fast.sim.jobs} == set(ids[1::2])


# --- the standalone form --------------------------------------------------------------------

async def test_standalone_profile_flags(io_loop, tmp_path):
    records_file = tmp_path / "records.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(port), "--control",
        "--models", "a.safetensors,b.safetensors", "--model-files", "loras=detail.safetensors",
        "--without-node-classes", "SaveImageWebsocket", "--extra-node-classes", "FilmGrain", "--speed", "3",
        "--load-seconds", "0", "--device-name", "cuda:0 NVIDIA L4", "--vram-total", "24000000000",
        "--records-file", str(records_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=os.path.join(HERE, ".."))
    http = AsyncHTTPClient(force_instance=True)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        assert b"SIMULATOR" in line, line

        async def get(path: str):
            return json.loads((await http.fetch(f"http://127.0.0.1:{port}{path}")).body)
        assert await get("/models/checkpoints") == ["a.safetensors", "b.safetensors"]
        assert await get("/models/loras") == ["detail.safetensors"]
        info = await get("/object_info")
        assert "FilmGrain" in info and "SaveImageWebsocket" not in info
        assert (await get("/system_stats"))["devices"][0]["name"] == "cuda:0 NVIDIA L4"
        body = json.dumps({"prompt": txt2img_workflow("b.safetensors", steps=1, filters=("FilmGrain",)),
                           "prompt_id": "remote"})
        await http.fetch(f"http://127.0.0.1:{port}/prompt", method="POST", body=body)

        async def finished() -> dict:
            while True:
                records = await get("/__sim/records")
                if records["completed_counts"].get("remote"):
                    return records
                await get("/history/remote")  # one round trip to the server between looks
        records = await asyncio.wait_for(finished(), TIMEOUT)
        assert records["execution_counts"] == {"remote": 1} and records["model_loads"] == 1
        assert records["jobs"][0]["outcome"] == "success" and records["jobs"][0]["checkpoints"] == ["b.safetensors"]
        process.kill()  # the records file outlives the process, SIGKILL included
        await process.wait()
        lines = [json.loads(line) for line in records_file.read_text().splitlines()]
        assert [(line["event"], line["prompt_id"], line["port"]) for line in lines] == [
            ("started", "remote", port), ("success", "remote", port)]
    finally:
        http.close()
        if process.returncode is None:
            process.terminate()
        await process.stdout.read()
        await process.wait()


async def test_standalone_refuses_a_bad_profile(io_loop):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", "0", "--without-node-classes", "Nope",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=os.path.join(HERE, ".."))
    output = await asyncio.wait_for(process.stdout.read(), TIMEOUT)
    assert await process.wait() == 2 and b"Nope" in output

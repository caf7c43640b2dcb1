"""End to end with real processes: two ComfyUI simulators (standalone, each its own process)
behind the proxy (a process too); one simulator is SIGKILLed mid-run. Every job ends once,
its owner hears it once, and the jobs the dead backend held run on the other one."""
import asyncio
import json
import signal
import sys
import uuid

from tornado.httpclient import AsyncHTTPClient

from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, free_port
from .test_backends import FINALS, finals, fresh
from .test_durability import ROOT, ProxyProcess


class SimulatorProcess:
    def __init__(self, port: int | None = None, *args: str):
        self.port = port or free_port()
        self.args = args
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfy_ws_proxy.testing.comfyui", "--port", str(self.port), "--control",
            *self.args, cwd=ROOT, stderr=asyncio.subprocess.PIPE)

        async def listening():
            while b"listening on" not in await self.proc.stderr.readline():
                if self.proc.returncode is not None:
                    raise AssertionError("the simulator exited")
        await asyncio.wait_for(listening(), TIMEOUT)

    async def records(self) -> dict:
        response = await AsyncHTTPClient().fetch(self.url + "/__sim/records")
        return json.loads(response.body)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def test_two_simulator_processes_one_killed_mid_run_nothing_lost_nothing_twice(io_loop, tmp_path):
    sims = {"a": SimulatorProcess(None, "--node-delay", "0.05"), "b": SimulatorProcess(None, "--node-delay", "0.05")}
    for sim in sims.values():
        await sim.start()
    key = DevKey.generate()
    backends = json.dumps([{"name": name, "url": sim.url} for name, sim in sims.items()])
    proxy = ProxyProcess(tmp_path, "", key, backends=backends, failover_after_s=0.5, max_comfy_jobs_per_user=0)
    try:
        await proxy.start()
        alice = await proxy.connect(key.token("alice"))
        ids = [str(uuid.uuid4()) for _ in range(6)]
        for prompt_id in ids:
            alice.send("submit_prompt", {"prompt": fresh("long-running"), "prompt_id": prompt_id})
        # One job at a time per backend: the first two to start run one on each.
        await alice.until(lambda: sum(m.get("type") == "execution_start" for m in alice.json_messages()) >= 2)
        await sims["b"].kill()
        await alice.until(lambda: all(finals(alice, p) for p in ids), timeout=60)
        assert [len(finals(alice, p)) for p in ids] == [1] * 6
        assert all(finals(alice, p)[0]["type"] == "execution_success" for p in ids)
        survivor = await sims["a"].records()
        moved = {m["data"]["prompt_id"] for m in alice.json_messages()
                 if m.get("type") == "prompt_accepted" and m["data"].get("moved")}
        assert moved  # b's running job went to a, and its owner was told
        for prompt_id in ids:
            assert survivor["completed_counts"].get(prompt_id, 0) <= 1
        for prompt_id in moved:
            assert survivor["completed_counts"][prompt_id] == 1
        # b comes back as a new, empty process on its port: it takes work again.
        sims["b"] = SimulatorProcess(sims["b"].port, "--node-delay", "0.05")
        await sims["b"].start()
        await proxy.wait_for_line("ComfyUI b breaker: half_open -> closed")
        more = [str(uuid.uuid4()) for _ in range(4)]
        for prompt_id in more:
            alice.send("submit_prompt", {"prompt": fresh("success"), "prompt_id": prompt_id})
        await alice.until(lambda: all(finals(alice, p) for p in more), timeout=60)
        revived = await sims["b"].records()
        assert any(revived["completed_counts"].get(p) for p in more)
        assert not any(m.get("type") in FINALS and m["data"].get("prompt_id") not in ids + more
                       for m in alice.json_messages())
        await alice.close()
    finally:
        if proxy.proc and proxy.proc.returncode is None:
            proxy.proc.kill()
            await proxy.proc.wait()
        for sim in sims.values():
            await sim.kill()

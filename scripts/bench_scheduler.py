#!/usr/bin/env python3
"""Scheduler benchmark (issue 12): M jobs over K simulated ComfyUI backends, four policies.

    python scripts/bench_scheduler.py              # full run (~1-2 min)
    python scripts/bench_scheduler.py --smoke      # a few jobs per fleet, seconds
    python scripts/bench_scheduler.py --json sched.json

Everything runs in this process, on one IOLoop: one ComfySimulator per backend (each with its
speed, checkpoints, custom node classes and model-load time), and for each policy a dispatcher.
Every policy gets the same job list and a fresh copy of the same fleet (nothing loaded,
nothing cached), and every job is submitted at t=0 (a burst), by USERS users in turn:

* ``ours``: the proxy itself (``make_app`` with settings built as tests/helpers.py builds them,
  and the ``BACKENDS`` option); each user submits over its own WebSocket (``submit_prompt``).
  On a proxy without the ``BACKENDS`` option (before issue 12 lands) it fronts the first
  backend alone (``COMFY_URL``), and the table says so.
* ``round-robin``: the seed guide's pool. Each job is POSTed at once to the next backend.
* ``least-queue``: ComfyUI-Distributed's ``select_least_busy_worker``: at submit, ``GET
  /prompt`` on every backend and POST to the least ``queue_remaining`` (round-robin among
  the idle ones, as it does).
* ``swarm``: SwarmUI's ``TryFind``: backends filtered by the job's checkpoint (not by custom
  nodes: Swarm does not see them in a raw workflow), ordered by current use (ties in list
  order), first the one whose current model is the job's, else a model load after the
  pressure hysteresis on an idle backend (least recently released), at most 1 + OverQueue = 2
  jobs bound per backend; the rest wait in the dispatcher.

Baselines talk to the simulators over HTTP and WebSocket, as the peers talk to ComfyUI. A job
refused by a backend (400: a node class or checkpoint it lacks) counts as **failed**, not
retried: none of the peers reroutes.

Figures, from the simulators' own records (``ComfySimulator.jobs``, on time.monotonic):
makespan (t=0 to the last finish) over the lower bound (of the jobs that ran, when some
failed); the share of GPU time idle while a job
that GPU could run was waiting; model loads; p50/p99 queue wait (t=0 to start); failed jobs;
jobs run twice. The lower bound is ``load + max(W_S / speed_S over every backend subset S
(the work of the jobs only S can run over S's summed speed), the longest job on its fastest
capable backend)``: every backend that works loads one checkpoint first, so one load is in it,
and further loads are not; or, if more, a backend's own work (the jobs only it can run) over its
speed plus one load of each checkpoint among them (it must load each). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

from comfy_ws_proxy.testing.comfyui import ComfySimulator, txt2img_workflow  # noqa: E402

POLICIES = ("ours", "round-robin", "least-queue", "swarm")
USERS = 4
SWARM_OVERQUEUE = 1  # SwarmUI's default: one prompt queued in ComfyUI beside the running one
# Real time limits are scaled to the bench's time: a real 20-step SDXL job takes ~5 s (0.25 s
# a step), here 20 steps take 20 x step_s. So SwarmUI's 1.5 s load hysteresis and 1 s loop,
# and our AFFINITY_MAX_WAIT_S (10 s by default), become these many real seconds x scale.
REAL_STEP_S = 0.25
SWARM_HYSTERESIS_S = 1.5
SWARM_TICK_S = 1.0
AFFINITY_MAX_WAIT_S = 10.0


@dataclass(frozen=True)
class Kind:
    """A kind of job: its checkpoint, KSampler steps (the cost), custom filter nodes."""

    name: str
    ckpt: str
    steps: int
    filters: tuple = ()


KINDS = {k.name: k for k in (
    Kind("sd15", "sd15.safetensors", 8),
    Kind("sdxl", "sdxl.safetensors", 20),
    Kind("sdxl+grain", "sdxl.safetensors", 16, ("FilmGrain",)),
    Kind("flux", "flux.safetensors", 28),
)}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    speed: float
    models: tuple
    nodes: tuple = ()  # custom node classes

    def can_run(self, kind: Kind) -> bool:
        return kind.ckpt in self.models and set(kind.filters) <= set(self.nodes)


@dataclass(frozen=True)
class Fleet:
    name: str
    backends: tuple
    mix: dict  # kind name -> weight


FLEETS = (
    Fleet("2 equal GPUs", (
        BackendSpec("gpu0", 1.0, ("sd15.safetensors", "sdxl.safetensors"), ("FilmGrain",)),
        BackendSpec("gpu1", 1.0, ("sd15.safetensors", "sdxl.safetensors"), ("FilmGrain",))),
        {"sd15": 2, "sdxl": 2, "sdxl+grain": 1}),
    Fleet("1 fast + 2 slow", (
        BackendSpec("fast", 3.0, ("sd15.safetensors", "sdxl.safetensors")),
        BackendSpec("slow0", 1.0, ("sd15.safetensors", "sdxl.safetensors")),
        BackendSpec("slow1", 1.0, ("sd15.safetensors", "sdxl.safetensors", "flux.safetensors"), ("FilmGrain",))),
        {"sd15": 3, "sdxl": 3, "sdxl+grain": 1, "flux": 1}),
    Fleet("4 mixed", (
        BackendSpec("gpu0", 2.0, ("sdxl.safetensors", "flux.safetensors")),
        BackendSpec("gpu1", 1.0, ("sd15.safetensors", "sdxl.safetensors"), ("FilmGrain",)),
        BackendSpec("gpu2", 1.0, ("sd15.safetensors", "flux.safetensors")),
        BackendSpec("gpu3", 0.5, ("sd15.safetensors", "sdxl.safetensors"), ("FilmGrain",))),
        {"sd15": 3, "sdxl": 3, "sdxl+grain": 2, "flux": 2}),
)


@dataclass
class Job:
    job_id: str
    user: str
    kind: Kind
    prompt: dict


def make_jobs(fleet: Fleet, count: int, seed: int) -> list[Job]:
    rng = random.Random(f"{seed}/{fleet.name}")
    names = list(fleet.mix)
    jobs = []
    for i in range(count):
        kind = KINDS[rng.choices(names, weights=[fleet.mix[n] for n in names])[0]]
        prompt = txt2img_workflow(kind.ckpt, steps=kind.steps, seed=rng.randrange(1 << 32), filters=kind.filters)
        jobs.append(Job(str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"user{i % USERS}", kind, prompt))
    return jobs


def lower_bound(fleet: Fleet, jobs: list[Job], step_s: float, load_s: float) -> float:
    """See the module docstring: one load plus the tightest of the subset and longest-job
    bounds, or a backend's own jobs (those only it can run) with a load of each of their
    checkpoints, if that is more."""
    specs = fleet.backends
    bound = 0.0
    for size in range(1, len(specs) + 1):
        for subset in itertools.combinations(specs, size):
            confined = [j for j in jobs if all(b in subset for b in specs if b.can_run(j.kind))]
            work = sum(j.kind.steps * step_s for j in confined)
            bound = max(bound, work / sum(b.speed for b in subset))
    for j in jobs:
        bound = max(bound, j.kind.steps * step_s / max(b.speed for b in specs if b.can_run(j.kind)))
    bound += load_s
    # A backend that alone can run jobs of several checkpoints must load each of them at least
    # once: its own work plus that many loads.
    for b in specs:
        alone = [j for j in jobs if [x for x in specs if x.can_run(j.kind)] == [b]]
        checkpoints = {j.kind.ckpt for j in alone}
        if alone:
            bound = max(bound, sum(j.kind.steps * step_s for j in alone) / b.speed + len(checkpoints) * load_s)
    return bound


# --- the fleet ---------------------------------------------------------------------------------

async def start_fleet(fleet: Fleet, step_s: float, load_s: float) -> list[ComfySimulator]:
    sims = []
    for spec in fleet.backends:
        sim = ComfySimulator(step_delay=step_s, speed=spec.speed, load_seconds=load_s, models=list(spec.models),
                             extra_node_classes=list(spec.nodes))
        await sim.start()
        sims.append(sim)
    return sims


class BackendWatch:
    """A baseline's WebSocket to one backend: which of its prompts finished (``executing``
    with ``node: null``, ComfyUI's done marker)."""

    def __init__(self, sim: ComfySimulator, client_id: str):
        self.sim, self.client_id = sim, client_id
        self.finished: dict[str, asyncio.Future] = {}
        self.on_finish = None  # called with the prompt id
        self._task = None

    def future(self, prompt_id: str) -> asyncio.Future:
        if prompt_id not in self.finished:
            self.finished[prompt_id] = asyncio.get_running_loop().create_future()
        return self.finished[prompt_id]

    async def open(self) -> None:
        self.conn = await websocket_connect(f"{self.sim.ws_url}?clientId={self.client_id}")
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while (message := await self.conn.read_message()) is not None:
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id"):
                future = self.future(data["prompt_id"])
                if not future.done():
                    future.set_result(None)
                if self.on_finish is not None:
                    self.on_finish(data["prompt_id"])

    async def close(self) -> None:
        self.conn.close()
        if self._task is not None:
            self._task.cancel()


async def post_prompt(http: AsyncHTTPClient, sim: ComfySimulator, job: Job, client_id: str) -> bool:
    """POST /prompt: True if queued, False if refused (the job failed)."""
    body = json.dumps({"prompt": job.prompt, "prompt_id": job.job_id, "client_id": client_id})
    response = await http.fetch(sim.url + "/prompt", method="POST", body=body, raise_error=False)
    return response.code == 200


# --- the baselines -----------------------------------------------------------------------------

async def run_early_binding(sims: list[ComfySimulator], jobs: list[Job], choose, timeout: float) -> dict:
    """Round-robin and least-queue: each job is bound to a backend at submit time."""
    http = AsyncHTTPClient(force_instance=True)
    watches = [BackendWatch(sim, "bench-" + uuid.uuid4().hex[:8]) for sim in sims]
    for watch in watches:
        await watch.open()
    failed, waits = {}, []
    try:
        for index, job in enumerate(jobs):
            chosen = await choose(http, index)
            if await post_prompt(http, sims[chosen], job, watches[chosen].client_id):
                waits.append(watches[chosen].future(job.job_id))
            else:
                failed[job.job_id] = f"refused by backend {chosen}"
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
    finally:
        for watch in watches:
            await watch.close()
        http.close()
    return failed


async def run_round_robin(sims, jobs, timeout: float, note: list) -> dict:
    async def choose(http, index):
        return index % len(sims)
    return await run_early_binding(sims, jobs, choose, timeout)


async def run_least_queue(sims, jobs, timeout: float, note: list) -> dict:
    turn = itertools.count()

    async def choose(http, index):
        answers = await asyncio.gather(*(http.fetch(sim.url + "/prompt") for sim in sims))
        remaining = [json.loads(a.body)["exec_info"]["queue_remaining"] for a in answers]
        idle = [i for i, r in enumerate(remaining) if r == 0]
        if idle:  # ComfyUI-Distributed round-robins among the idle workers
            return idle[next(turn) % len(idle)]
        return min(range(len(sims)), key=lambda i: remaining[i])
    return await run_early_binding(sims, jobs, choose, timeout)


@dataclass
class SwarmBackend:
    index: int
    spec: BackendSpec
    usages: int = 0
    current_model: str | None = None
    last_release: float = 0.0
    reserved_for: Job | None = None  # a model load waiting for the backend to drain


async def run_swarm(sims, jobs, timeout: float, note: list, fleet: Fleet, step_s: float) -> dict:
    http = AsyncHTTPClient(force_instance=True)
    backends = [SwarmBackend(i, spec) for i, spec in enumerate(fleet.backends)]
    watches = [BackendWatch(sim, "bench-" + uuid.uuid4().hex[:8]) for sim in sims]
    pending = list(jobs)
    first_wait: dict[str, float] = {}  # model -> when its pressure began
    failed: dict[str, str] = {}
    placed_on: dict[str, SwarmBackend] = {}
    all_done = asyncio.get_running_loop().create_future()
    signal = asyncio.Event()
    hysteresis = SWARM_HYSTERESIS_S * step_s / REAL_STEP_S
    in_flight: set = set()

    def finished(prompt_id: str) -> None:
        backend = placed_on.pop(prompt_id, None)
        if backend is not None:
            backend.usages -= 1
            backend.last_release = time.monotonic()
        signal.set()

    def check_done() -> None:
        if not pending and not placed_on and not in_flight and not all_done.done():
            all_done.set_result(None)

    async def send(job: Job, backend: SwarmBackend) -> None:
        ok = await post_prompt(http, sims[backend.index], job, watches[backend.index].client_id)
        in_flight.discard(job.job_id)
        if not ok:
            failed[job.job_id] = f"refused by {backend.spec.name}"
            finished(job.job_id)
        check_done()

    def place(job: Job, backend: SwarmBackend) -> None:
        backend.usages += 1
        placed_on[job.job_id] = backend
        in_flight.add(job.job_id)
        asyncio.ensure_future(send(job, backend))

    def try_find() -> None:
        now = time.monotonic()
        for backend in backends:  # a reserved backend loads once it has drained
            if backend.reserved_for is not None and backend.usages == 0:
                job, backend.reserved_for = backend.reserved_for, None
                backend.current_model = job.kind.ckpt
                place(job, backend)
        for job in list(pending):
            possible = [b for b in backends if job.kind.ckpt in b.spec.models]
            if not possible:
                pending.remove(job)
                failed[job.job_id] = "no backend has the model"
                continue
            available = sorted((b for b in possible if b.usages < 1 + SWARM_OVERQUEUE and b.reserved_for is None),
                               key=lambda b: b.usages)  # stable: ties keep list order
            if not available:
                continue
            warm = next((b for b in available if b.current_model == job.kind.ckpt), None)
            if warm is not None:
                pending.remove(job)
                place(job, warm)
                continue
            started = first_wait.setdefault(job.kind.ckpt, now)
            if len(available) > 1 and now - started < hysteresis:
                continue  # wait: a backend with the model may free up first
            loaders = [b for b in available if b.current_model != job.kind.ckpt]
            target = min(loaders, key=lambda b: (b.usages != 0, b.last_release))
            first_wait.pop(job.kind.ckpt, None)
            pending.remove(job)
            if target.usages == 0:
                target.current_model = job.kind.ckpt
                place(job, target)
            else:
                target.reserved_for = job
        check_done()

    async def loop() -> None:
        while not all_done.done():
            try_find()
            signal.clear()
            try:
                await asyncio.wait_for(signal.wait(), SWARM_TICK_S * step_s / REAL_STEP_S)
            except asyncio.TimeoutError:
                pass

    for watch in watches:
        watch.on_finish = finished
        await watch.open()
    task = asyncio.ensure_future(loop())
    try:
        await asyncio.wait_for(asyncio.shield(all_done), timeout)
    finally:
        task.cancel()
        for watch in watches:
            await watch.close()
        http.close()
    return failed


# --- ours: the proxy ---------------------------------------------------------------------------

class ProxyUser:
    """One user's WebSocket to the proxy: submits, and notes each job's final event."""

    def __init__(self, conn):
        self.conn = conn
        self.outcomes: dict[str, asyncio.Future] = {}
        self._task = asyncio.ensure_future(self._read())

    def outcome(self, job_id: str) -> asyncio.Future:
        if job_id not in self.outcomes:
            self.outcomes[job_id] = asyncio.get_running_loop().create_future()
        return self.outcomes[job_id]

    async def _read(self) -> None:
        while (message := await self.conn.read_message()) is not None:
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            kind = event.get("type")
            if kind in ("execution_success", "execution_error", "execution_interrupted", "error"):
                job_id = data.get("prompt_id")
                if job_id and not self.outcome(job_id).done():
                    self.outcome(job_id).set_result(kind if kind != "error" else f"error:{data.get('code')}")

    def submit(self, job: Job) -> None:
        self.conn.write_message(json.dumps({"type": "submit_prompt", "data": {"prompt_id": job.job_id,
                                                                              "prompt": job.prompt}}))

    async def close(self) -> None:
        self.conn.close()
        self._task.cancel()


def proxy_has_backends_option() -> bool:
    from comfy_ws_proxy.config import OPTIONS
    return any(o.name == "backends" for o in OPTIONS)


async def run_ours(sims, jobs, timeout: float, note: list, fleet: Fleet, tmp: str, step_s: float,
                   overrides: dict) -> dict:
    from comfy_ws_proxy.app import make_app
    from comfy_ws_proxy.config import settings_for_tests
    from comfy_ws_proxy.server import LimitedHTTPServer
    from comfy_ws_proxy.testing.tokens import DevKey

    key = DevKey.generate()
    jwks = os.path.join(tmp, f"jwks-{uuid.uuid4().hex[:8]}.json")
    with open(jwks, "w") as f:
        json.dump(key.jwks(), f)
    values = {"comfy_url": sims[0].url, "jwt_key_file": jwks, "upstream_reconnect_min_ms": 20,
              "upstream_reconnect_max_ms": 200, "breaker_open_ms": 50, "breaker_max_open_ms": 400,
              "comfy_connect_timeout_ms": 2000, "comfy_request_timeout_ms": 5000, "submit_burst": 100000,
              "submit_rate_per_s": 100000.0, "max_queued_prompts_per_user": max(100, len(jobs))}
    from comfy_ws_proxy.config import OPTIONS
    if any(o.name == "affinity_max_wait_s" for o in OPTIONS):
        values["affinity_max_wait_s"] = AFFINITY_MAX_WAIT_S * step_s / REAL_STEP_S
    values.update(overrides)
    if proxy_has_backends_option():
        # weight 1 for all: the scheduler must learn speeds online, as no baseline is told them
        values["backends"] = [{"name": spec.name, "url": sim.url, "weight": 1.0, "labels": []}
                              for spec, sim in zip(fleet.backends, sims)]
    elif not any(line.startswith("ours:") for line in note):
        note.append("ours: this proxy has no BACKENDS option (issue 12 not merged): it fronts the first "
                    "backend alone (COMFY_URL)")
    app, state = make_app(settings_for_tests(**values))
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server = LimitedHTTPServer.from_settings(app, state.settings, metrics=state.metrics)
    server.add_sockets(sockets)
    state.start()
    http = AsyncHTTPClient(force_instance=True)
    users: dict[str, ProxyUser] = {}
    try:
        async def ready() -> None:
            """Every backend ready and its capabilities read: the proxy has finished starting."""
            while True:
                answer = await http.fetch(f"http://127.0.0.1:{port}/ready", raise_error=False)
                detail = json.loads(answer.body or b"{}").get("backends")
                if answer.code == 200 and (detail is None or all(
                        b.get("status") == "ready" and b.get("capabilities_known", True) for b in detail.values())):
                    return
                await asyncio.sleep(0.02)
        await asyncio.wait_for(ready(), 10)
        for name in sorted({j.user for j in jobs}):
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Authorization": f"Bearer {key.token(name)}"})
            users[name] = ProxyUser(await websocket_connect(request))
        for job in jobs:
            users[job.user].submit(job)
        outcomes = await asyncio.wait_for(asyncio.gather(*(users[j.user].outcome(j.job_id) for j in jobs)), timeout)
        return {j.job_id: outcome for j, outcome in zip(jobs, outcomes) if outcome != "execution_success"}
    finally:
        for user in users.values():
            await user.close()
        http.close()
        server.stop()
        await state.stop(grace=0)
        await server.close_all_connections()


# --- figures -----------------------------------------------------------------------------------

def measure(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def union(intervals):
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif b > a:
            merged.append([a, b])
    return merged


def minus(base, cut):
    """Measure of the union of ``base`` minus the union of ``cut``."""
    base, cut = union(base), union(cut)
    return measure([tuple(x) for x in base]) - sum(
        max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in base for a2, b2 in cut)


def pct(values: list[float], p: float):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))]


def figures(fleet: Fleet, sims: list[ComfySimulator], jobs: list[Job], t0: float, end: float, failed: dict,
            bound) -> dict:
    """The run's figures; ``bound(jobs)`` is the lower bound of a job list."""
    runs: dict[str, list] = {}
    for index, sim in enumerate(sims):
        for record in sim.jobs:
            runs.setdefault(record.prompt_id, []).append((index, record))
    ran = {j.job_id: next(((i, r) for i, r in runs.get(j.job_id, []) if r.outcome == "success"), None) for j in jobs}
    finishes = [r.finished_at for x in ran.values() if x for r in [x[1]]]
    makespan = (max(finishes) - t0) if finishes else None
    waits = [x[1].started_at - t0 for x in ran.values() if x]
    # GPU idle while work it could do waits: per backend, the time some job it can run is
    # submitted and not started (nor failed), minus the time it is busy.
    idle = waiting = 0.0
    for index, spec in enumerate(fleet.backends):
        busy = [(r.started_at, r.finished_at if r.finished_at is not None else end)
                for r in sims[index].jobs if r.started_at is not None]
        queued = []
        for job in jobs:
            if job.job_id in failed or not spec.can_run(job.kind):
                continue
            started = [r.started_at for _, r in runs.get(job.job_id, []) if r.started_at is not None]
            queued.append((t0, min(started) if started else end))
        waiting += measure(queued)
        idle += minus(queued, busy)
    ran_jobs = [j for j in jobs if ran[j.job_id] is not None]
    ran_bound = bound(ran_jobs) if ran_jobs else None
    return {
        "jobs": len(jobs), "makespan_s": makespan, "lower_bound_all_s": bound(jobs),
        "lower_bound_s": ran_bound,  # of the jobs that ran (all of them, unless some failed)
        "ratio": makespan / ran_bound if makespan and ran_bound else None,
        "idle_share": idle / waiting if waiting else 0.0,
        "model_loads": sum(sim.model_loads for sim in sims),
        "wait_p50_s": pct(waits, 50), "wait_p99_s": pct(waits, 99),
        "failed": len(failed), "unfinished": sum(1 for j in jobs if ran[j.job_id] is None and j.job_id not in failed),
        "ran_twice": sum(1 for j in jobs if sum(1 for _, r in runs.get(j.job_id, []) if r.started_at) > 1),
        "per_backend": {spec.name: sum(1 for r in sims[i].jobs if r.outcome == "success")
                        for i, spec in enumerate(fleet.backends)},
        # where the time went: each backend's busy seconds and when it finished its last job
        "busy_s": {spec.name: round(sum((r.finished_at or end) - r.started_at for r in sims[i].jobs
                                        if r.started_at is not None), 3) for i, spec in enumerate(fleet.backends)},
        "last_finish_s": {spec.name: round(max((r.finished_at for r in sims[i].jobs if r.finished_at), default=t0)
                                           - t0, 3) for i, spec in enumerate(fleet.backends)},
        "failures": dict(list(failed.items())[:5]),
    }


async def run_policy(policy: str, fleet: Fleet, jobs: list[Job], args, tmp: str, note: list) -> dict:
    sims = await start_fleet(fleet, args.step_s, args.load_s)
    try:
        t0 = time.monotonic()
        timeout = args.timeout
        try:
            if policy == "ours":
                failed = await run_ours(sims, jobs, timeout, note, fleet, tmp, args.step_s, args.proxy_options)
            elif policy == "round-robin":
                failed = await run_round_robin(sims, jobs, timeout, note)
            elif policy == "least-queue":
                failed = await run_least_queue(sims, jobs, timeout, note)
            else:
                failed = await run_swarm(sims, jobs, timeout, note, fleet, args.step_s)
        except asyncio.TimeoutError:
            note.append(f"{fleet.name} / {policy}: timed out after {timeout:g} s")
            failed = {}
        end = time.monotonic()
        for sim in sims:
            sim.paused = True  # nothing more starts
        return figures(fleet, sims, jobs, t0, end, failed,
                       lambda some: lower_bound(fleet, some, args.step_s, args.load_s))
    finally:
        for sim in sims:
            await sim.stop()


def fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f} %"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "s":
        return f"{value:.2f}"
    return str(value)


async def main_async(args) -> dict:
    note: list[str] = []
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        for fleet in FLEETS:
            jobs = make_jobs(fleet, args.jobs, args.seed)
            per_policy = {}
            for policy in args.policies:
                per_policy[policy] = await run_policy(policy, fleet, jobs, args, tmp, note)
                print(f"{fleet.name} / {policy}: {json.dumps(per_policy[policy])}", file=sys.stderr)
            results[fleet.name] = {
                "backends": [{"name": b.name, "speed": b.speed, "models": list(b.models), "nodes": list(b.nodes)}
                             for b in fleet.backends],
                "mix": {k: sum(1 for j in jobs if j.kind.name == k) for k in fleet.mix},
                "policies": per_policy}
    return {"results": results, "notes": note}


def main() -> int:
    parser = argparse.ArgumentParser(description="Scheduler benchmark: four placement policies over "
                                                 "simulated ComfyUI fleets (issue 12)")
    parser.add_argument("--jobs", type=int, default=60, help="jobs per fleet (M)")
    parser.add_argument("--step-s", type=float, default=0.01, help="seconds per KSampler step at speed 1")
    parser.add_argument("--load-s", type=float, default=0.2, help="seconds per checkpoint load")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on one run after this long")
    parser.add_argument("--smoke", action="store_true", help="12 jobs per fleet, shorter steps")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--proxy-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of ours (repeatable), e.g. affinity_max_wait_s=2; VALUE is JSON or text")
    args = parser.parse_args()
    args.proxy_options = {}
    for spec in args.proxy_option:
        name, sep, value = spec.partition("=")
        if not sep:
            parser.error(f"--proxy-option: expected NAME=VALUE, got {spec!r}")
        try:
            args.proxy_options[name.strip().lower()] = json.loads(value)
        except ValueError:
            args.proxy_options[name.strip().lower()] = value
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        parser.error(f"--policies: unknown {sorted(unknown)}; known: {', '.join(POLICIES)}")
    if args.smoke:
        args.jobs, args.step_s, args.load_s = 12, 0.005, 0.1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for quiet in ("tornado.access", "comfyui-simulator"):  # every refused prompt is logged there
        logging.getLogger(quiet).setLevel(logging.ERROR)
    started = time.monotonic()
    out = asyncio.run(main_async(args))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.jobs} jobs per fleet by {USERS} users at t=0; "
          f"step {args.step_s * 1000:g} ms at speed 1, load {args.load_s * 1000:g} ms; "
          f"{time.monotonic() - started:.0f} s wall")
    header = ["fleet", "policy", "makespan s", "bound s", "ratio", "idle while waiting", "loads", "wait p50 s",
              "wait p99 s", "failed", "ran twice"]
    columns = [("makespan_s", "s"), ("lower_bound_s", "s"), ("ratio", "x"), ("idle_share", "%"),
               ("model_loads", ""), ("wait_p50_s", "s"), ("wait_p99_s", "s"), ("failed", ""), ("ran_twice", "")]
    rows = []
    for fleet_name, fleet in out["results"].items():
        for policy, f in fleet["policies"].items():
            row = [fleet_name, policy] + [fmt(f.get(key), kind) for key, kind in columns]
            if f.get("failed") or f.get("unfinished"):
                row[3] += "*"  # makespan and bound cover only the jobs that ran
                row[4] += "*"
            rows.append(row)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if any(f.get("failed") or f.get("unfinished") for fleet in out["results"].values()
           for f in fleet["policies"].values()):
        print("* some jobs failed (refused by the backend they were sent to) or never finished: the makespan "
              "and its bound cover only the jobs that ran")
    for line in out["notes"]:
        print("note:", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "cores": os.cpu_count(),
                                                       "python": platform.python_version()}, **out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

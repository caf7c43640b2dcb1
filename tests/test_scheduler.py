"""The scheduler's choices, on its own (an injected clock; backends and jobs as plain data):
the fluid plan, model affinity, work only one backend can do, speed, the bound on waiting."""
from dataclasses import dataclass, field

import pytest

from comfy_ws_proxy.backends.plan import fluid_plan, max_flow
from comfy_ws_proxy.backends.pool import JobNeeds
from comfy_ws_proxy.backends.scheduler import Candidate, Scheduler

from .helpers import FakeClock


@dataclass
class Backend:  # what the scheduler reads of one
    name: str
    weight: float = 1.0


@dataclass
class Job:  # what the scheduler reads of one
    job_id: str
    order: int
    models: frozenset = frozenset()
    steps: int = 10
    queued_since: float = 1000.0
    declined_since: float = 0.0
    switched_model: bool = False
    needs: JobNeeds = field(init=False)

    def __post_init__(self):
        self.needs = JobNeeds(f"txt2img{self.steps}", self.models, frozenset(), float(self.steps))


SDXL, SD15 = frozenset({"sdxl.safetensors"}), frozenset({"sd15.safetensors"})


def run(scheduler: Scheduler, clock: FakeClock, backend: Backend, job: Job, seconds: float) -> None:
    job.needs  # noqa: B018
    scheduler.started(backend, job)
    clock.advance(seconds)
    scheduler.finished(backend, job, True)


def test_the_fluid_plan_gives_each_backend_its_share_and_the_earliest_finish():
    # Kind "x" only backend a can run; kind "y" both: a does all of x, the rest of y is shared
    # so that both finish together.
    finish, flow = fluid_plan({"x": 6.0, "y": 6.0}, {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0},
                              {"x": ["a"], "y": ["a", "b"]})
    assert finish == pytest.approx(6.0, abs=1e-3)
    assert flow[("x", "a")] == pytest.approx(6.0, abs=1e-3) and flow.get(("y", "a"), 0) == pytest.approx(0, abs=1e-3)
    # A faster backend takes more; one already busy takes less.
    finish, flow = fluid_plan({"y": 12.0}, {"a": 3.0, "b": 1.0}, {"a": 0.0, "b": 2.0}, {"y": ["a", "b"]})
    assert finish == pytest.approx(3.5, abs=1e-3)  # a: 3.5 s x 3 = 10.5; b: 1.5 s x 1 = 1.5
    assert flow[("y", "a")] == pytest.approx(10.5, abs=1e-2)
    # The flow reroutes along a backward edge when the greedy first path blocks another kind.
    total, _ = max_flow({"p": 1.0, "q": 1.0}, {"a": 1.0, "b": 1.0}, {"p": ["a", "b"], "q": ["a"]})
    assert total == pytest.approx(2.0)


def test_a_free_backend_takes_the_job_of_the_model_it_has_loaded_and_leaves_the_other_to_the_warm_one():
    clock = FakeClock()
    scheduler = Scheduler(clock, affinity_max_wait_s=10)
    a, b = Backend("a"), Backend("b")
    run(scheduler, clock, a, Job("w1", 0, SDXL), 1.0)
    run(scheduler, clock, b, Job("w2", 1, SD15), 1.0)
    older_sd15, sdxl = Job("j1", 2, SD15), Job("j2", 3, SDXL)
    can_run = lambda job, backend: True  # noqa: E731
    others = [Candidate(b, False, [Job("busy", 4, SD15)])]
    scheduler.started(b, others[0].held[0])
    picked = scheduler.pick(Candidate(a, True, []), [older_sd15, sdxl], [older_sd15, sdxl], others, can_run,
                            clock())
    assert picked is sdxl  # no load for a, and b (warm for sd15) frees soon


def test_work_only_one_backend_can_do_goes_there_and_the_shared_work_elsewhere():
    clock = FakeClock()
    scheduler = Scheduler(clock)
    only_a, shared = Job("x", 0, SDXL), Job("y", 1, SDXL)
    can_run = lambda job, backend: job is not only_a or backend.name == "a"  # noqa: E731
    a, b = Backend("a"), Backend("b")
    picked_a = scheduler.pick(Candidate(a, True, []), [shared, only_a], [shared, only_a],
                              [Candidate(b, True, [])], can_run, clock())
    assert picked_a is only_a
    picked_b = scheduler.pick(Candidate(b, True, []), [shared], [shared], [Candidate(a, False, [only_a])], can_run,
                              clock())
    assert picked_b is shared


def test_a_slow_backend_leaves_the_last_job_to_a_fast_one_about_to_free():
    clock = FakeClock()
    scheduler = Scheduler(clock)
    fast, slow = Backend("fast"), Backend("slow")
    for i in range(3):  # measured: 1 s there, 6 s here
        run(scheduler, clock, fast, Job(f"f{i}", i), 1.0)
        run(scheduler, clock, slow, Job(f"s{i}", 10 + i), 6.0)
    running = Job("r", 20)
    scheduler.started(fast, running)
    clock.advance(0.9)  # fast is 0.1 s from done
    last = Job("last", 21)
    assert scheduler.pick(Candidate(slow, True, []), [last], [last], [Candidate(fast, False, [running])],
                          lambda job, backend: True, clock()) is None
    # ... but not for ever: a job declined this long goes (the bound on waiting).
    clock.advance(scheduler.affinity_max_wait_s)
    assert scheduler.pick(Candidate(slow, True, []), [last], [last], [Candidate(fast, False, [running])],
                          lambda job, backend: True, clock()) is last


def test_speeds_are_learned_per_backend_and_unseen_work_is_guessed_from_its_steps():
    clock = FakeClock()
    scheduler = Scheduler(clock)
    fast, slow = Backend("fast"), Backend("slow")
    run(scheduler, clock, fast, Job("a", 0, steps=10), 1.0)
    run(scheduler, clock, slow, Job("b", 1, steps=10), 3.0)
    assert scheduler.duration(fast, Job("c", 2, steps=40).needs) == pytest.approx(4.0)  # 0.1 s per step
    assert scheduler.duration(slow, Job("d", 3, steps=40).needs) == pytest.approx(12.0)
    assert scheduler.speed(slow, fast) == pytest.approx(1 / 3)

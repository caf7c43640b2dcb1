"""The scheduler benchmark's own arithmetic and dispatchers (scripts/bench_scheduler.py):
the lower bound, the interval sums behind "idle while waiting", and that a baseline run
counts what really happened on the simulators. No figure is timed or compared."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_scheduler", os.path.join(HERE, "..", "scripts",
                                                                               "bench_scheduler.py"))
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_scheduler", bench)  # dataclasses look their module up there
_spec.loader.exec_module(bench)

A, B = "sd15.safetensors", "sdxl.safetensors"
FLEET = bench.Fleet("toy", (bench.BackendSpec("fast", 2.0, (A, B), ("FilmGrain",)),
                            bench.BackendSpec("slow", 1.0, (A,))), {"sd15": 1, "sdxl+grain": 1})


def job(kind: str, n: int) -> "bench.Job":
    k = bench.KINDS[kind]
    return bench.Job(f"00000000-0000-4000-8000-{n:012d}", "user0", k, bench.txt2img_workflow(k.ckpt, steps=k.steps))


def test_the_lower_bound_takes_the_tightest_subset_and_one_load():
    jobs = [job("sd15", 0), job("sd15", 1), job("sd15", 2)]  # 8 steps each, anywhere
    assert bench.lower_bound(FLEET, jobs, 1.0, 0.5) == pytest.approx(0.5 + 24 / 3)
    # sdxl+grain (16 steps) runs only on "fast": 64 steps confined to speed 2 beat 88 / 3
    jobs += [job("sdxl+grain", n) for n in range(3, 7)]
    assert bench.lower_bound(FLEET, jobs, 1.0, 0.5) == pytest.approx(0.5 + 64 / 2)
    # one job alone: its steps on its fastest capable backend (8 / 2), not over the fleet (8 / 3)
    assert bench.lower_bound(FLEET, [job("sd15", 7)], 1.0, 0.0) == pytest.approx(8 / 2)


def test_interval_sums():
    assert bench.measure([(0, 2), (1, 3), (5, 6)]) == 4
    assert bench.minus([(0, 10)], [(1, 2), (1.5, 4), (8, 12)]) == pytest.approx(5)
    assert bench.minus([(0, 1), (0.5, 2)], []) == 2
    assert bench.pct([3, 1, 2], 50) == 2 and bench.pct([], 99) is None


@pytest.mark.timeout(30)
async def test_baseline_runs_count_failures_and_single_executions(io_loop):
    jobs = [job("sdxl+grain", 0), job("sdxl+grain", 1), job("sd15", 2), job("sd15", 3)]
    args = argparse.Namespace(step_s=0.001, load_s=0.0, timeout=20.0)
    round_robin = await bench.run_policy("round-robin", FLEET, jobs, args, "", [])
    # job 1 went to "slow", which has neither sdxl nor FilmGrain: refused, counted as failed
    assert (round_robin["failed"], round_robin["ran_twice"], round_robin["unfinished"]) == (1, 0, 0)
    assert round_robin["per_backend"] == {"fast": 2, "slow": 1}
    swarm = await bench.run_policy("swarm", FLEET, jobs, args, "", [])
    assert (swarm["failed"], swarm["ran_twice"], swarm["unfinished"]) == (0, 0, 0)  # it filters by model
    assert sum(swarm["per_backend"].values()) == 4 and swarm["model_loads"] >= 2

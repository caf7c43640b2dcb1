"""Where a job goes: among the backends that can run it (capabilities, labels) and are up
(breaker), the one expected to finish it soonest.

Expected finish on a backend = when it can start there (now if it has room, else when the
jobs it holds are expected to end) + a model load if it has not just run the job's model
+ how long the job takes there. Durations are learned online per backend: per kind of work
(``capabilities.shape_of``), else per backend across its jobs, else the pool's average scaled
by the configured weights. A model load's cost is learned from the runs that switched model.

A job may wait for a busy backend that would finish it sooner (its model is loaded there, or
it is much faster), but only ``affinity_max_wait_s`` from when it was queued: affinity never
turns into a hot spot while a GPU that could run the job sits idle. Ties between equally good
free backends go to the one given work least recently (never "the first in the list").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .backend import Backend

EWMA = 0.3  # weight of the newest observation
DEFAULT_JOB_S = 5.0  # before anything was measured
DEFAULT_LOAD_S = 5.0
OVERDUE_SHARE = 0.1  # a job past its expected time is expected to need this share of it more
MAX_SHAPES = 256  # kinds of work remembered per backend (least recently seen forgotten)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA * (new - old)


@dataclass
class BackendStats:
    """What the scheduler learned about one backend."""
    shapes: dict[str, float] = field(default_factory=dict)  # kind of work -> seconds
    per_job: float | None = None  # seconds per job, any kind
    load_s: float | None = None  # extra seconds when the model changes
    loaded: frozenset = frozenset()  # the models of the job it started last
    running: dict[str, tuple[float, float]] = field(default_factory=dict)  # job -> (started, expected s)
    last_given: int = 0  # when it was last given a job (a counter)
    loads: int = 0  # model changes seen


@dataclass
class Candidate:
    backend: Backend
    room: bool  # it may take one more job of ours now (BACKEND_QUEUE_DEPTH)
    held: list  # the jobs of ours it holds (placed there, not finished)


class Scheduler:
    def __init__(self, clock: Callable[[], float], affinity_max_wait_s: float = 10.0):
        self.clock = clock
        self.affinity_max_wait_s = affinity_max_wait_s
        self.stats: dict[str, BackendStats] = {}
        self._given = 0

    def _stats(self, name: str) -> BackendStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = BackendStats()
        return stats

    # --- estimates ------------------------------------------------------------------------
    def duration(self, backend: Backend, shape: str) -> float:
        stats = self._stats(backend.name)
        known = stats.shapes.get(shape)
        if known is not None:
            return known
        # The same work measured elsewhere, scaled by how the two backends compare.
        for other, other_stats in self.stats.items():
            seen = other_stats.shapes.get(shape)
            if seen is not None and other != backend.name:
                return seen * self._relative(backend.name, other)
        if stats.per_job is not None:
            return stats.per_job
        measured = [s.per_job for s in self.stats.values() if s.per_job is not None]
        base = sum(measured) / len(measured) if measured else DEFAULT_JOB_S
        return base / max(backend.weight, 1e-6)

    def _relative(self, name: str, other: str) -> float:
        """How much longer ``name`` takes than ``other`` on work both have done."""
        mine, theirs = self.stats[name].shapes if name in self.stats else {}, self.stats[other].shapes
        common = [shape for shape in mine if shape in theirs and theirs[shape] > 0]
        if common:
            return sum(mine[s] / theirs[s] for s in common) / len(common)
        a, b = self.stats.get(name), self.stats[other]
        if a is not None and a.per_job and b.per_job:
            return a.per_job / b.per_job
        return 1.0

    def load_cost(self, backend: Backend, models: frozenset) -> float:
        stats = self._stats(backend.name)
        if not models or models <= stats.loaded:
            return 0.0
        if stats.load_s is not None:
            return stats.load_s
        learned = [s.load_s for s in self.stats.values() if s.load_s is not None]
        return sum(learned) / len(learned) if learned else DEFAULT_LOAD_S

    def busy_until(self, backend: Backend, held: Iterable, shape_of: Callable) -> float:
        """Seconds from now until the jobs it holds are expected to be done."""
        stats, now, total = self._stats(backend.name), self.clock(), 0.0
        for job in held:
            started = stats.running.get(job.job_id)
            if started is not None:
                begun, expected = started
                total += max(expected - (now - begun), expected * OVERDUE_SHARE)
            else:
                total += self.duration(backend, shape_of(job))
        return total

    # --- the choice -----------------------------------------------------------------------
    def choose(self, job, candidates: list[Candidate], shape: str, models: frozenset,
               waited_s: float, commit: bool = True) -> Backend | None:
        """The backend to send ``job`` to now, or None to leave it queued (none has room, or
        a busy one that would finish it sooner is worth waiting for a while)."""
        if not candidates:
            return None

        def finish(c: Candidate, extra: float = 0.0) -> float:
            start = 0.0 if c.room else self.busy_until(c.backend, c.held, lambda j: j.needs.shape)
            return start + extra + self.load_cost(c.backend, models) + self.duration(c.backend, shape)

        ranked = sorted(candidates, key=lambda c: (finish(c), len(c.held), self._stats(c.backend.name).last_given))
        best = ranked[0]
        free = [c for c in ranked if c.room]
        if not free:
            return None
        if best.room or waited_s >= self.affinity_max_wait_s:
            chosen = free[0]
        else:
            return None  # the busy one is expected to finish it sooner: wait (a bounded time)
        if commit:
            self._given += 1
            self._stats(chosen.backend.name).last_given = self._given
        return chosen.backend

    # --- learning -------------------------------------------------------------------------
    def started(self, backend: Backend, job) -> None:
        stats = self._stats(backend.name)
        needs = job.needs
        switched = bool(needs.models) and not needs.models <= stats.loaded
        expected = self.duration(backend, needs.shape) + (self.load_cost(backend, needs.models) if switched else 0.0)
        stats.running[job.job_id] = (self.clock(), expected)
        job.switched_model = switched
        if needs.models:
            stats.loaded = needs.models
            if switched:
                stats.loads += 1

    def finished(self, backend: Backend, job, success: bool) -> None:
        stats = self._stats(backend.name)
        run = stats.running.pop(job.job_id, None)
        if run is None or not success:
            return
        seconds = self.clock() - run[0]
        shape = job.needs.shape
        if job.switched_model:
            base = stats.shapes.get(shape)
            if base is not None:
                stats.load_s = _ewma(stats.load_s, max(0.0, seconds - base))
            return  # the work's own time is learned from runs without a load
        if shape not in stats.shapes and len(stats.shapes) >= MAX_SHAPES:
            stats.shapes.pop(next(iter(stats.shapes)))
        stats.shapes[shape] = _ewma(stats.shapes.pop(shape, None), seconds)  # (re-inserted: recently seen)
        stats.per_job = _ewma(stats.per_job, seconds)

    def cached_models(self, backend: str, models: frozenset) -> None:
        """ComfyUI reported a job's model loader cached: that model is loaded there."""
        if models:
            self._stats(backend).loaded = models

    def snapshot(self) -> dict:
        return {name: {"seconds_per_job": round(s.per_job, 3) if s.per_job is not None else None,
                       "model_load_s": round(s.load_s, 3) if s.load_s is not None else None,
                       "model_loads": s.loads, "kinds_of_work_measured": len(s.shapes), "running": len(s.running)}
                for name, s in self.stats.items()}


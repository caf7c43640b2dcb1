"""Which job a backend starts next. The choice is made when a backend can start one (late
binding: the proxy's queue is the only queue), among the jobs it can run (capabilities,
labels; pool.py), each owner's first of each model in fair order (queue.py).

1. A job this backend declined while it stayed free for ``affinity_max_wait_s`` goes now:
   waiting for a better backend is bounded, so affinity never becomes a hot spot.
2. The fluid plan (plan.py) of all the waiting work says how much of each kind of work
   (jobs of one model that the same backends can run) each backend should do for everything
   to end soonest. The backend takes its planned work first: of the model it has loaded
   first (no load), then what fewer backends can do, then the kinds it should do most of.
3. Any other job it takes only if it would finish it no later than any other backend could,
   counting what that one holds and the older jobs of the same model it would do first.
   Otherwise it stays free (and the job waits, at most as in 1).

Durations are learned online per backend: per kind of work (``capabilities.shape_of``), else
from its seconds per sampler step, else from the same work on another backend scaled by how
the two compare, else the pool's average scaled by the configured weights. A model load's cost
is learned from the runs that switched model. Free backends choose in the order they were last
given work (never "the first in the list" every time).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .backend import Backend
from .plan import fluid_plan

EWMA = 0.3  # weight of the newest observation
DEFAULT_JOB_S = 5.0  # before anything was measured
DEFAULT_LOAD_S = 5.0
OVERDUE_SHARE = 0.1  # a job past its expected time is expected to need this share of it more
MAX_SHAPES = 256  # kinds of work remembered per backend (least recently seen forgotten)
PLANNED_SHARE = 0.5  # a backend takes a job outright when the plan gives it this much of one


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA * (new - old)


@dataclass
class BackendStats:
    """What the scheduler learned about one backend."""
    shapes: dict[str, float] = field(default_factory=dict)  # kind of work -> seconds
    per_job: float | None = None  # seconds per job, any kind
    per_unit: float | None = None  # seconds per work unit (sampler step), any kind
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
        self._memo: dict | None = None  # the estimates of the pick in progress

    def _stats(self, name: str) -> BackendStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = BackendStats()
        return stats

    # --- estimates ------------------------------------------------------------------------
    def duration(self, backend: Backend, needs) -> float:
        """How long a job of these needs takes there (remembered during one pick: a pick asks
        for the same estimates thousands of times)."""
        memo = self._memo
        if memo is None:
            return self._duration(backend, needs)
        key = (backend.name, needs.shape, needs.units)
        known = memo.get(key)
        if known is None:
            known = memo[key] = self._duration(backend, needs)
        return known

    def _duration(self, backend: Backend, needs) -> float:
        """Measured for this kind of work; else its work units (sampler steps) at that
        backend's measured seconds per unit; else ..."""
        shape = needs.shape
        stats = self._stats(backend.name)
        known = stats.shapes.get(shape)
        if known is not None:
            return known
        if stats.per_unit is not None:
            return needs.units * stats.per_unit
        # The same work measured elsewhere, scaled by how the two backends compare.
        for other, other_stats in self.stats.items():
            seen = other_stats.shapes.get(shape)
            if seen is not None and other != backend.name:
                return seen * self._relative(backend.name, other)
        if stats.per_job is not None:
            return stats.per_job
        per_unit = [s.per_unit for s in self.stats.values() if s.per_unit is not None]
        if per_unit:
            return needs.units * sum(per_unit) / len(per_unit) / max(backend.weight, 1e-6)
        return DEFAULT_JOB_S / max(backend.weight, 1e-6)

    def _relative(self, name: str, other: str) -> float:
        """How much longer ``name`` takes than ``other`` on work both have done."""
        mine, theirs = self.stats[name].shapes if name in self.stats else {}, self.stats[other].shapes
        common = [shape for shape in mine if shape in theirs and theirs[shape] > 0]
        if common:
            return sum(mine[s] / theirs[s] for s in common) / len(common)
        a, b = self.stats.get(name), self.stats[other]
        if a is not None and a.per_unit and b.per_unit:
            return a.per_unit / b.per_unit
        if a is not None and a.per_job and b.per_job:
            return a.per_job / b.per_job
        return 1.0

    def busy_until(self, backend: Backend, held: Iterable, needs_of: Callable) -> float:
        """Seconds from now until the jobs it holds are expected to be done."""
        stats, now, total = self._stats(backend.name), self.clock(), 0.0
        for job in held:
            started = stats.running.get(job.job_id)
            if started is not None:
                begun, expected = started
                total += max(expected - (now - begun), expected * OVERDUE_SHARE)
            else:
                total += self.duration(backend, needs_of(job))
        return total

    # --- the choice -----------------------------------------------------------------------
    def loaded(self, backend: Backend, held: list) -> frozenset:
        """The models it will have loaded when it starts its next job: those of the last job
        it holds, else of the last it ran."""
        for job in reversed(held):
            if job.needs is not None and job.needs.models:
                return job.needs.models
        return self._stats(backend.name).loaded

    def pick(self, backend: Candidate, candidates: list, waiting: list, others: list[Candidate],
             can_run: Callable, now: float, commit: bool = True):
        """See ``_pick``; the estimates are remembered for the duration of the call."""
        self._memo = {}
        try:
            return self._pick(backend, candidates, waiting, others, can_run, now, commit)
        finally:
            self._memo = None

    def _pick(self, backend: Candidate, candidates: list, waiting: list, others: list[Candidate],
              can_run: Callable, now: float, commit: bool):
        """The job ``backend`` (which has room) should start next, or None to stay free.

        ``candidates``: the jobs it may take, in the order fairness gives them (each owner's
        first job of each model, owners least recently served first); ``waiting``: every job
        waiting (for the others' backlogs); ``others``: the other backends that are up;
        ``can_run(job, backend)``; ``commit=False``: only asking (nothing is recorded).

        The rules are the module's: a job declined too long first; then this backend's share
        of the fluid plan; then a job it would finish no later than any other backend could;
        else None (it stays free, and the candidates count as declined)."""
        if not candidates:
            return None
        b = backend.backend
        # The bound on affinity: a job this free backend has declined (leaving it to a busier
        # one expected to finish it sooner) for affinity_max_wait_s goes now.
        overdue = [j for j in candidates if j.declined_since and now - j.declined_since >= self.affinity_max_wait_s]
        if overdue:
            return self._given_to(b, min(overdue, key=lambda j: j.declined_since), commit)
        mine_loaded = self.loaded(b, backend.held)
        loaded = {c.backend.name: self.loaded(c.backend, c.held) for c in others}
        warm_count: dict[frozenset, int] = {}
        for models in [mine_loaded, *loaded.values()]:
            warm_count[models] = warm_count.get(models, 0) + 1
        # When each other backend is free again, and the waiting work on the model it has
        # loaded (shared among the backends that have it loaded): it does that work first.
        remaining = {c.backend.name: 0.0 if c.room else self.busy_until(c.backend, c.held, lambda j: j.needs)
                     for c in others}
        warm_backlog = {}
        for c in others:
            models = loaded[c.backend.name]
            warm_backlog[c.backend.name] = sum(
                self.duration(c.backend, job.needs) for job in waiting
                if job.needs.models and job.needs.models == models and can_run(job, c.backend)
            ) / warm_count.get(models, 1)

        # Per other backend and model: the waiting jobs it could run, oldest first, with the
        # running sum of their durations there (so "the older jobs of that model" is a lookup).
        older: dict[tuple, tuple[list, list]] = {}
        for job in sorted(waiting, key=lambda j: j.order):
            for c in others:
                if can_run(job, c.backend):
                    orders, sums = older.setdefault((c.backend.name, job.needs.models), ([], [0.0]))
                    orders.append(job.order)
                    sums.append(sums[-1] + self.duration(c.backend, job.needs))

        def other_finish(job, c: Candidate) -> float:
            """When ``c`` would finish ``job``: once free, after the work it would do first (if
            it has the job's model: the older jobs of that model, shared among those who could
            take them; if not: the work on the model it has), then a load, then the job."""
            name = c.backend.name
            if not job.needs.models or job.needs.models <= loaded[name]:
                able = 1 + sum(1 for o in others if can_run(job, o.backend))
                orders, sums = older.get((name, job.needs.models), ([], [0.0]))
                before = sums[bisect_left(orders, job.order)] / able
                load = 0.0
            else:
                before = warm_backlog[name]
                load = self.load_cost_to(c.backend, loaded[name], job.needs.models)
            return remaining[name] + before + load + self.duration(c.backend, job.needs)

        pressure: dict[frozenset, float] = {}
        for job in waiting:
            pressure[job.needs.models] = pressure.get(job.needs.models, 0.0) + self.duration(b, job.needs)

        def warm(job) -> bool:
            return not job.needs.models or job.needs.models <= mine_loaded

        planned = self._planned_share(backend, others, waiting, remaining, can_run)

        def share(job) -> float:
            return planned.get(job.needs.models, {}).get(job_kind(job, backend, others, can_run), 0.0)

        # The plan's work for this backend first: what it has the model for first, then what
        # fewer backends can do (the plan is only as good as the speeds measured so far: the
        # others can take the rest later), then the kinds it should do most of; then the
        # rest; each in fair order.
        ordered = sorted(enumerate(candidates), key=lambda item: (
            share(item[1]) <= 0, not warm(item[1]), len(job_kind(item[1], backend, others, can_run)),
            -share(item[1]), -pressure.get(item[1].needs.models, 0.0), item[0]))
        for _, job in ordered:
            mine = self.load_cost_to(b, mine_loaded, job.needs.models) + self.duration(b, job.needs)
            if share(job) >= PLANNED_SHARE * self.duration(b, job.needs):
                return self._given_to(b, job, commit)  # the plan gives it (at least half of) this job
            best_other = min((other_finish(job, c) for c in others if can_run(job, c.backend)), default=None)
            if best_other is None or mine <= best_other:
                return self._given_to(b, job, commit)
        if commit:
            for job in candidates:  # it stays free: each of these waits for a busier backend
                job.declined_since = job.declined_since or now
        return None

    def speed(self, backend: Backend, reference: Backend) -> float:
        """How fast ``backend`` is relative to ``reference`` (measured; else the weights)."""
        if backend is reference:
            return 1.0
        mine, theirs = self._stats(backend.name), self._stats(reference.name)
        if any(shape in theirs.shapes for shape in mine.shapes) or (mine.per_unit and theirs.per_unit):
            return 1.0 / max(self._relative(backend.name, reference.name), 1e-6)
        return backend.weight / max(reference.weight, 1e-6)

    def _planned_share(self, me: Candidate, others: list[Candidate], waiting: list, remaining: dict,
                       can_run: Callable) -> dict:
        """The fluid plan (plan.py) of the waiting work: {models: {kind: seconds of it this
        backend should do}}, a kind being the set of backends able to run the job."""
        everyone = [me, *others]
        speeds = {c.backend.name: self.speed(c.backend, me.backend) for c in everyone}
        busy = {c.backend.name: (remaining.get(c.backend.name, 0.0) if c is not me else
                                 self.busy_until(me.backend, me.held, lambda j: j.needs)) for c in everyone}
        demand: dict[tuple, float] = {}
        edges: dict[tuple, list] = {}
        loaded = {c.backend.name: self.loaded(c.backend, c.held) for c in everyone}
        for job in waiting:
            # Backends with the job's model loaded first: the flow fills them first, so the
            # plan keeps models where they are (fewer loads) among equally good plans.
            able = sorted((c for c in everyone if can_run(job, c.backend)),
                          key=lambda c: not (job.needs.models and job.needs.models <= loaded[c.backend.name]))
            if not able:
                continue
            kind = (job.needs.models, frozenset(c.backend.name for c in able))
            first = able[0]
            demand[kind] = demand.get(kind, 0.0) + self.duration(first.backend, job.needs) * \
                speeds[first.backend.name]
            edges[kind] = [c.backend.name for c in able]
        _, flow = fluid_plan(demand, speeds, busy, edges)
        planned: dict[frozenset, dict] = {}
        for (kind, name), seconds in flow.items():
            if name == me.backend.name and seconds > 0:
                planned.setdefault(kind[0], {})[kind[1]] = seconds
        return planned

    def load_cost_to(self, backend: Backend, loaded: frozenset, models: frozenset) -> float:
        if not models or models <= loaded:
            return 0.0
        stats = self._stats(backend.name)
        if stats.load_s is not None:
            return stats.load_s
        learned = [s.load_s for s in self.stats.values() if s.load_s is not None]
        return sum(learned) / len(learned) if learned else DEFAULT_LOAD_S

    def _given_to(self, backend: Backend, job, commit: bool = True):
        if commit:
            self.given(backend)
        return job

    def given(self, backend: Backend) -> None:
        """``backend`` was given a job (free backends choose in the order of this)."""
        self._given += 1
        self._stats(backend.name).last_given = self._given

    def free_order(self, backends: list[Backend]) -> list[Backend]:
        """Free backends in the order they choose: the one given work least recently first
        (never "the first in the list" every time)."""
        return sorted(backends, key=lambda b: self._stats(b.name).last_given)

    # --- learning -------------------------------------------------------------------------
    def started(self, backend: Backend, job) -> None:
        stats = self._stats(backend.name)
        needs = job.needs
        switched = bool(needs.models) and not needs.models <= stats.loaded
        expected = self.duration(backend, needs) + self.load_cost_to(backend, stats.loaded, needs.models)
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
        stats.per_unit = _ewma(stats.per_unit, seconds / job.needs.units)

    def snapshot(self) -> dict:
        return {name: {"seconds_per_job": round(s.per_job, 3) if s.per_job is not None else None,
                       "model_load_s": round(s.load_s, 3) if s.load_s is not None else None,
                       "model_loads": s.loads, "kinds_of_work_measured": len(s.shapes), "running": len(s.running)}
                for name, s in self.stats.items()}



def job_kind(job, me: Candidate, others: list[Candidate], can_run: Callable) -> frozenset:
    """The backends able to run ``job`` (its kind, with its models, in the plan)."""
    return frozenset(c.backend.name for c in (me, *others) if can_run(job, c.backend))

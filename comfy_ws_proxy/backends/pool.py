"""BackendPool: the ComfyUI servers behind this proxy, and where a job may go now.

Placement is late: the queue asks ``place()`` when it is about to send a job, never at
submit time, so a job waits in the proxy (fairly, with the others) rather than behind a
busy ComfyUI. A job may go only to a backend that can run it (its capabilities: every node
class and model file the job names; its labels: every label the job asks for); among those
that are up, the scheduler picks (scheduler.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .backend import Backend
from .capabilities import models_named, shape_of
from .scheduler import Candidate, Scheduler


@dataclass(frozen=True)
class JobNeeds:
    """What placement looks at, computed once from the job's prompt (kept when it is dropped)."""
    shape: str
    models: frozenset
    labels: frozenset


def needs_of(job) -> JobNeeds:
    if job.needs is None:
        payload = job.payload or {}
        prompt = payload.get("prompt") if isinstance(payload.get("prompt"), dict) else {}
        job.needs = JobNeeds(shape_of(prompt), models_named(prompt), frozenset(payload.get("labels") or ()))
    return job.needs


class BackendPool:
    def __init__(self, backends: list[Backend], *, queue_depth: int = 0, scheduler: Scheduler | None = None):
        if not backends:
            raise ValueError("at least one backend")
        self.backends = {b.name: b for b in backends}
        self.default = backends[0]
        # Jobs of ours one backend may hold at once (running plus waiting in ComfyUI's own
        # queue). 0: automatic, 1 with several backends (late binding), no limit with one.
        self.queue_depth = queue_depth or (1 if len(backends) > 1 else 0)
        self.scheduler = scheduler or Scheduler(backends[0].clock)
        # With one backend there is no choice to make: ComfyUI's own answer (its 400 and
        # node_errors) tells what it cannot run.
        self.filtering = len(backends) > 1

    # --- what can run where -------------------------------------------------------------------
    def reasons(self, job, backend: Backend) -> list[str] | None:
        """Why ``backend`` cannot run ``job`` ([] if it can; None: its capabilities are not known
        yet). Remembered per job until that backend's capabilities change."""
        if not self.filtering:
            return []
        needs = needs_of(job)
        missing_labels = sorted(needs.labels - backend.labels)
        if missing_labels:
            return [f"backend has no label {label!r}" for label in missing_labels]
        caps = backend.capabilities
        if caps is None:
            return None
        known = job.fits.get(backend.name)
        if known is not None and known[0] == caps.fingerprint:
            return known[1]
        prompt = (job.payload or {}).get("prompt")
        reasons = caps.missing(prompt) if isinstance(prompt, dict) else []
        job.fits[backend.name] = (caps.fingerprint, reasons)
        return reasons

    def runnable(self, job) -> tuple[bool, dict[str, list[str]]]:
        """(may some backend run it, now or once it is known; why each known one cannot)."""
        why: dict[str, list[str]] = {}
        possible = False
        for backend in self:
            reasons = self.reasons(job, backend)
            if reasons:
                why[backend.name] = reasons
            else:
                possible = True  # it can, or it is not known yet (it may)
        return possible, why

    # --- placement ----------------------------------------------------------------------------
    def has_room(self, backend: Backend, placed: Callable[[str], int]) -> bool:
        return not self.queue_depth or placed(backend.name) < self.queue_depth

    def any_room(self, placed: Callable[[str], int]) -> bool:
        """Could any backend take a job now (one that can run it aside)?"""
        return any(b.available and self.has_room(b, placed) for b in self)

    def place(self, job, held: Callable[[str], list], now: float, commit: bool = True) -> Backend | None:
        """The backend ``job`` should go to now, or None to leave it queued. ``held(name)``:
        our jobs that backend holds. ``commit=False``: only asking (nothing is recorded)."""
        candidates = []
        for backend in self:
            if not backend.available or self.reasons(job, backend):  # (None: not known yet, try it)
                continue
            jobs = held(backend.name)
            for other in jobs:
                needs_of(other)
            candidates.append(Candidate(backend, not self.queue_depth or len(jobs) < self.queue_depth, jobs))
        needs = needs_of(job)
        return self.scheduler.choose(job, candidates, needs.shape, needs.models, now - job.queued_since, commit)

    # --- what the scheduler learns --------------------------------------------------------------
    def job_started(self, job) -> None:
        backend = self.get(job.backend)
        if backend is not None:
            needs_of(job)
            self.scheduler.started(backend, job)

    def job_ended(self, job, success: bool) -> None:
        backend = self.get(job.backend)
        if backend is not None and job.needs is not None:
            self.scheduler.finished(backend, job, success)

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends.values())

    def __len__(self) -> int:
        return len(self.backends)

    def start(self) -> None:
        for b in self:
            b.start()

    def stop(self) -> None:
        for b in self:
            b.stop()

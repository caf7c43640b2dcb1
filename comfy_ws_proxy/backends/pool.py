"""BackendPool: the ComfyUI servers behind this proxy, and where a job may go now.

Placement is late: the queue asks ``place()`` when it is about to send a job, never at
submit time, so a job waits in the proxy (fairly, with the others) rather than behind a
busy ComfyUI. A job may go only to a backend that can run it (its capabilities: every node
class and model file the job names; its labels: every label the job asks for); among those
that are up, the scheduler picks (scheduler.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .backend import Backend
from .capabilities import models_named, shape_of, work_units
from .scheduler import Candidate, Scheduler


@dataclass(frozen=True)
class JobNeeds:
    """What placement looks at, computed once from the job's prompt (kept when it is dropped)."""
    shape: str
    models: frozenset
    labels: frozenset
    units: float = 1.0  # its work, roughly: the sampler steps it runs (at least 1)


def needs_of(job) -> JobNeeds:
    if job.needs is None:
        payload = job.payload or {}
        prompt = payload.get("prompt") if isinstance(payload.get("prompt"), dict) else {}
        job.needs = JobNeeds(shape_of(prompt), models_named(prompt), frozenset(payload.get("labels") or ()),
                             work_units(prompt))
    return job.needs


# (prompt, object_info, partial_execution_targets) -> ComfyUI's 400 body, or None if it would
# accept it: the jobs layer's validator (jobs/validate.py), given to the pool.
Validator = Callable[[dict, dict, Optional[list]], Optional[dict]]


@dataclass(frozen=True)
class Refusal:
    """Why one backend cannot run a job: a line for people, and ComfyUI's 400 body when its
    validation says so (None when the backend lacks a label the job asks for)."""
    reason: str
    body: dict | None = None


class BackendPool:
    def __init__(self, backends: list[Backend], *, queue_depth: int = 0, scheduler: Scheduler | None = None,
                 validator: Validator | None = None):
        if not backends:
            raise ValueError("at least one backend")
        self.backends = {b.name: b for b in backends}
        self.default = backends[0]
        # Jobs of ours one backend may hold at once (running plus waiting in ComfyUI's own
        # queue). 0: automatic, 1 with several backends (late binding), no limit with one.
        self.queue_depth = queue_depth or (1 if len(backends) > 1 else 0)
        self.scheduler = scheduler or Scheduler(backends[0].clock)
        self.validator = validator

    # --- what can run where -------------------------------------------------------------------
    def refusal(self, job, backend: Backend) -> Refusal | None:
        """Why ``backend`` cannot run ``job`` (None if it can, or if its capabilities are not
        known yet: it may). Remembered per job until that backend's capabilities change."""
        needs = needs_of(job)
        missing_labels = sorted(needs.labels - backend.labels)
        if missing_labels:
            return Refusal(f"no label {', '.join(map(repr, missing_labels))}")
        caps = backend.capabilities
        if caps is None or self.validator is None:
            return None
        known = job.fits.get(backend.name)
        if known is not None and known[0] == caps.fingerprint:
            return known[1]
        payload = job.payload or {}
        prompt = payload.get("prompt")
        body = self.validator(prompt, caps.object_info, payload.get("partial_execution_targets")) \
            if isinstance(prompt, dict) else None
        refusal = Refusal(one_line(body), body) if body is not None else None
        if refusal is not None and _lists_in(body):
            # A value not in a list may be a model file added since the list was read: look
            # again (at most every REFRESH_MIN_S), so that trying again soon works.
            backend.refresh_soon()
        job.fits[backend.name] = (caps.fingerprint, refusal)
        return refusal

    def runnable(self, job) -> tuple[bool, dict[str, Refusal]]:
        """(may some backend run it, now or once it is known; why each known one cannot)."""
        why: dict[str, Refusal] = {}
        for backend in self:
            refusal = self.refusal(job, backend)
            if refusal is None:
                return True, {}
            why[backend.name] = refusal
        return False, why

    # --- placement ----------------------------------------------------------------------------
    def has_room(self, backend: Backend, placed: Callable[[str], int]) -> bool:
        return not self.queue_depth or placed(backend.name) < self.queue_depth

    def free(self, placed: Callable[[str], int]) -> list[Backend]:
        """The backends that are up and may take a job now, in the order they choose."""
        return self.scheduler.free_order([b for b in self if b.available and self.has_room(b, placed)])

    def pick(self, backend: Backend, candidates: list, waiting: list, held: Callable[[str], list],
             now: float, commit: bool = True):
        """The job ``backend`` should start now (one of ``candidates``), or None. ``held(name)``:
        our jobs that backend holds."""
        for job in waiting:
            needs_of(job)
        me = Candidate(backend, True, held(backend.name))
        others = [Candidate(b, self.has_room(b, lambda name: len(held(name))), held(b.name))
                  for b in self if b is not backend and b.available]
        for c in [me, *others]:
            for job in c.held:
                needs_of(job)
        known: dict[tuple[str, str], bool] = {}  # (job, backend) -> can run: asked often in one pick

        def can_run(job, b: Backend) -> bool:
            key = (job.job_id, b.name)
            answer = known.get(key)
            if answer is None:
                answer = known[key] = self.refusal(job, b) is None
            return answer
        return self.scheduler.pick(me, candidates, waiting, others, can_run, now, commit)

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


def one_line(body: dict) -> str:
    """ComfyUI's 400 body in a line: its message, and the first node error's details."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    line = str(error.get("message") or "refused")
    for node_id, entry in (body.get("node_errors") or {}).items():
        first = (entry.get("errors") or [{}])[0] if isinstance(entry, dict) else {}
        line += f": node {node_id} ({entry.get('class_type')}): {first.get('details') or first.get('message')}"
        break
    else:
        if error.get("details"):
            line += f": {error['details']}"
    return line[:300]


def _lists_in(body: dict) -> bool:
    return any(e.get("type") == "value_not_in_list" for entry in (body.get("node_errors") or {}).values()
               if isinstance(entry, dict) for e in entry.get("errors") or [] if isinstance(e, dict))

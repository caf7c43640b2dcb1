"""The proxy's own queue: fair across users (least recently served first, one job each per
turn), FIFO per user, and late placement: a job is given a backend only when it is about to be sent.

Every job is POSTed under its prompt_id, minted before the POST and stored first, so a
POST whose outcome is unknown (timeout, broken connection, proxy killed mid-POST) is asked
about (reconcile.py) before it is sent again with the same id: ComfyUI never gets a job
twice, and one that forgot it (a restart) gets it again.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from itertools import islice
from typing import Callable

from ..backends.backend import Backend, ComfyFailed, ComfyRejected, ComfyUnavailable
from ..backends.link import ComfyLink
from ..backends.links import LinkManager
from ..backends.pool import BackendPool, Refusal, needs_of
from ..metrics import Metrics
from ..model import ErrorCode, Job, JobState
from .tracker import JobTracker

log = logging.getLogger(__name__)

# A backend with room looks at this many of each owner's queued jobs for one it should take
# (each owner's first of each model: FIFO per owner and model).
SCAN_PER_OWNER = 32
# ... and at most this many jobs in all, owners in fair order (a pick stays a bounded piece of
# work on the IOLoop however long the queue is).
SCAN_MAX = 512


class FairQueue:
    """Queued job ids: per owner in FIFO order (by ``order``), owners least recently served
    first (ties: who came first), so an owner never gets a second turn while another one
    waits for its first, newcomers included. Pure bookkeeping: no I/O, no clock."""

    def __init__(self) -> None:
        self._owners: dict[str, OrderedDict[str, int]] = {}  # in order of arrival
        self._served: dict[str, int] = {}  # owner -> when last served (a counter)
        self._turns = 0

    def add(self, owner: str, job_id: str, order: int) -> None:
        """Queue a job; one that comes back (ComfyUI lost it) goes ahead of later ones."""
        jobs = self._owners.setdefault(owner, OrderedDict())
        later = bool(jobs) and next(reversed(jobs.values())) > order
        jobs[job_id] = order
        if later:
            items = sorted(jobs.items(), key=lambda item: item[1])
            jobs.clear()
            jobs.update(items)

    def remove(self, owner: str, job_id: str) -> None:
        jobs = self._owners.get(owner)
        if jobs is not None:
            jobs.pop(job_id, None)
            if not jobs:
                del self._owners[owner]
                self._forget_old_turns()

    def _forget_old_turns(self) -> None:
        """Drop the turns of owners gone from the queue that no longer change anyone's place
        (older than every waiting owner's): the record stays bounded."""
        if len(self._served) <= 2 * len(self._owners) + 64:
            return
        oldest = min((self._served.get(o, 0) for o in self._owners), default=self._turns + 1)
        self._served = {o: t for o, t in self._served.items() if t >= oldest or o in self._owners}

    def head(self, owner: str) -> str | None:
        jobs = self._owners.get(owner)
        return next(iter(jobs)) if jobs else None

    def first(self, owner: str, limit: int) -> list[str]:
        """The owner's first ``limit`` queued job ids, in order."""
        return list(islice(self._owners.get(owner, ()), limit))

    def served(self, owner: str) -> int:
        return self._served.get(owner, 0)

    def rotate(self, owner: str) -> None:
        """The owner was served: after everyone not served since."""
        self._turns += 1
        self._served[owner] = self._turns

    def owners(self) -> list[str]:
        """Owners with queued jobs, in the order they are to be served."""
        return sorted(self._owners, key=lambda owner: self._served.get(owner, 0))  # stable: arrival breaks ties

    def size(self, owner: str) -> int:
        return len(self._owners.get(owner, ()))

    def position(self, owner: str, job_id: str) -> int | None:
        """The job's place in its owner's FIFO (0: next of that owner)."""
        for index, queued in enumerate(self._owners.get(owner, ())):
            if queued == job_id:
                return index
        return None

    def sizes(self) -> dict[str, int]:
        return {owner: len(jobs) for owner, jobs in self._owners.items()}

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._owners.values())


def accepted_data(job: Job, *, queued: bool, node_errors: dict | None = None, **flags) -> dict:
    """The prompt_accepted message's data (the one builder of it)."""
    data = {"prompt_id": job.job_id, "number": None if queued else job.number, "node_errors": node_errors or {},
            "queued": queued}
    data.update({k: v for k, v in flags.items() if v})
    if job.template is not None:
        data["template"] = job.template  # {name, params}: the drawn seed too, to make it again
    return data


def no_backend_data(job: Job, why: dict[str, Refusal]) -> dict:
    """A job no backend can run, told as ComfyUI tells a refusal: its 400 body (``error`` and
    ``node_errors``), unchanged when every backend's verdict is the same; when they differ,
    the first one's, and the message names what each backend lacks (and ``backends`` too)."""
    bodies = [r.body for r in why.values()]
    body = next((b for b in bodies if b is not None), None)
    if body is not None and all(b == body for b in bodies):
        # Every backend gives ComfyUI's same verdict: the prompt itself is wrong, and is told
        # exactly as ComfyUI tells it.
        return rejection_data(job, ComfyRejected(400, body))
    if body is not None:
        data = rejection_data(job, ComfyRejected(400, body))
    else:
        data = {"code": ErrorCode.INVALID_PROMPT, "message": "No backend can run this prompt",
                "prompt_id": job.job_id, "status": 400, "node_errors": {},
                "error": {"type": "no_backend", "message": "No backend can run this prompt", "details": "",
                          "extra_info": {}}}
    # The backends differ (or lack a label): say what each one lacks.
    lines = "; ".join(f"{name}: {r.reason}" for name, r in why.items())
    data["message"] = f"No backend can run this prompt ({lines})"[:2000]
    data["backends"] = {name: r.reason for name, r in why.items()}
    return data


def rejection_data(job: Job, e: ComfyRejected) -> dict:
    """ComfyUI's 4xx answer as the owner sees it: its message and node_errors unchanged."""
    body = e.body if isinstance(e.body, dict) else {}
    error = body.get("error")
    message = "ComfyUI rejected the prompt"
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    elif e.status != 400:
        message = f"ComfyUI rejected the prompt (HTTP {e.status})"
    return {"code": ErrorCode.INVALID_PROMPT, "message": message, "prompt_id": job.job_id, "status": e.status,
            "error": error, "node_errors": body.get("node_errors", {})}


class JobQueue:
    """Drains the FairQueue onto the backends; POSTs one job (``post``)."""

    def __init__(self, tracker: JobTracker, pool: BackendPool, links: LinkManager, metrics: Metrics,
                 clock: Callable[[], float], *, max_attempts: int = 3, per_owner: int = 0):
        self.tracker = tracker
        self.max_attempts = max_attempts  # POSTs a poison prompt gets (see ComfyFailed)
        self.per_owner = per_owner  # jobs of one owner the backends may hold (0: no limit)
        self.pool = pool
        self.links = links
        self.metrics = metrics
        self.clock = clock
        self.uploads = None  # an UploadStore: the images a job names go to its backend before it
        self.fair = FairQueue()
        self._draining: asyncio.Future | None = None
        self._drain_again = False
        self._stopped = False
        for job in tracker.unfinished():
            if job.state == JobState.QUEUED:
                self.fair.add(job.owner, job.job_id, job.order)
        tracker.listeners.append(self._job_changed)

    def _job_changed(self, job: Job, old: str) -> None:
        if job.state == JobState.QUEUED and old != JobState.QUEUED:
            self.fair.add(job.owner, job.job_id, job.order)
            job.queued_since = self.clock()
            job.declined_since = 0.0
        elif old == JobState.QUEUED and job.state != JobState.QUEUED:
            self.fair.remove(job.owner, job.job_id)
        if job.state == JobState.RUNNING and old != JobState.RUNNING:
            self.pool.job_started(job)
        elif old == JobState.RUNNING and job.state != JobState.RUNNING:  # (finished, or moved)
            self.pool.job_ended(job, job.state == JobState.SUCCESS)
        self.metrics.queued_prompts.set(len(self.fair))

    def stop(self) -> None:
        self._stopped = True
        if self._draining is not None and not self._draining.done():
            self._draining.cancel()

    # --- submit ---------------------------------------------------------------------------------
    async def submit(self, job: Job) -> None:
        """A new job: refused at once if no backend can run it; straight to a backend when
        nothing of its owner waits before it and one can take it now; otherwise into the
        queue (its owner is told ``queued``)."""
        job.queued_since = self.clock()
        possible, why = self.pool.runnable(job)
        if not possible:
            self.tracker.add(job)
            self.refuse(job, why)
            return
        backend = self._backend_for_new(job) if not self.fair.size(job.owner) and not self.owner_full(job.owner) \
            else None
        link = self.links.get(job.owner, backend.name) if backend is not None else None
        if link is None or not link.ready.is_set():
            self.tracker.add(job)
            self.announce_queued(job)
            self.kick()
            return
        job.state = JobState.SUBMITTING
        job.backend = backend.name
        self.tracker.add(job)
        log.info("prompt submit user=%s prompt=%s nodes=%d", job.owner, job.job_id, len(job.payload["prompt"]))
        await self.post(job, backend, link, announced=False)

    def _backend_for_new(self, job: Job) -> Backend | None:
        """A free backend that would take this new job now (its owner has nothing queued)."""
        for backend in self.pool.free(self.tracker.placed_count):
            candidates, waiting = self._candidates(backend, extra=job)
            if job not in candidates:
                continue
            if self.pool.pick(backend, candidates, waiting, self.tracker.held_by, self.clock(), commit=False) is job:
                self.pool.scheduler.given(backend)
                return backend
        return None

    def _candidates(self, backend: Backend, extra: Job | None = None) -> tuple[list[Job], list[Job]]:
        """(the jobs ``backend`` may take now, in fair order: each owner's first of each model
        that it can run; every waiting job looked at). An owner whose first job's POST has an
        unknown outcome is skipped until the reconciler has asked (its turn is held)."""
        owners = self.fair.owners()
        if extra is not None and extra.owner not in owners:
            owners.append(extra.owner)
            owners.sort(key=self.fair.served)  # (stable: arrival breaks ties)
        candidates, waiting = [], []
        for owner in owners:
            if len(waiting) >= SCAN_MAX:
                break
            jobs = [j for j in (self.tracker.get(i) for i in self.fair.first(owner, SCAN_PER_OWNER)) if j is not None]
            if extra is not None and extra.owner == owner:
                jobs.append(extra)
            waiting.extend(jobs)
            if not jobs or jobs[0].outcome_unknown or self.owner_full(owner):
                continue
            seen = set()
            for job in jobs:
                models = needs_of(job).models
                if models in seen or job.outcome_unknown or self.pool.refusal(job, backend) is not None:
                    continue
                seen.add(models)
                candidates.append(job)
        return candidates, waiting

    def refuse(self, job: Job, why: dict[str, Refusal]) -> None:
        """No backend can run this job (every backend's capabilities are known): it ends now,
        in ComfyUI's 400 shape, saying what each backend lacks."""
        self.metrics.prompts.labels("rejected").inc()
        log.info("prompt refused, no backend can run it user=%s prompt=%s", job.owner, job.job_id)
        self.tracker.end_without_running(job, JobState.REJECTED, "error", no_backend_data(job, why))

    def owner_full(self, owner: str) -> bool:
        """The backends hold as many of this owner's jobs as they may (MAX_COMFY_JOBS_PER_USER
        per backend: one user alone may keep every GPU busy, never fill a ComfyUI's queue)."""
        return bool(self.per_owner) and self.tracker.placed_by_owner[owner] >= self.per_owner * len(self.pool)

    def announce_queued(self, job: Job) -> None:
        self.metrics.prompts.labels("queued").inc()
        log.info("prompt queued user=%s prompt=%s", job.owner, job.job_id)
        self.tracker.notify(job, "prompt_accepted", accepted_data(job, queued=True))

    async def post(self, job: Job, backend: Backend, link: ComfyLink, *, announced: bool = True,
                   resubmitted: bool = False) -> bool:
        moved = bool(job.backend) and job.backend != backend.name and job.attempts > 0
        """POST one job. True when ComfyUI answered (accepted or rejected), False when it is
        unavailable (the job is back in the queue; its owner is told once)."""
        payload = job.payload or {}
        body = {"prompt": payload.get("prompt"), "client_id": link.client_id, "prompt_id": job.job_id}
        for key in ("extra_data", "partial_execution_targets"):
            if payload.get(key) is not None:
                body[key] = payload[key]
        if payload.get("front"):
            body["front"] = True
        self.tracker.move(job, JobState.SUBMITTING, backend=backend.name, attempts=job.attempts + 1)
        self.tracker.hold(job)
        try:
            return await self._post_held(job, backend, link, body, announced, resubmitted, moved)
        finally:
            self.tracker.release(job)  # whatever happened, held frames go out (after our reply)

    async def _post_held(self, job: Job, backend: Backend, link: ComfyLink, body: dict, announced: bool,
                         resubmitted: bool, moved: bool = False) -> bool:
        started = self.clock()
        sent_at = asyncio.get_running_loop().time()  # the link's status times are loop times
        try:
            if self.uploads is not None:
                await self.uploads.place(job, backend)  # the owner's images it names, first
            result = await backend.submit_prompt(body)
        except ComfyRejected as e:
            self.metrics.comfy_duration.labels(backend.name, "rejected").observe(self.clock() - started)
            log.info("prompt rejected user=%s prompt=%s status=%s", job.owner, job.job_id, e.status)
            self.metrics.prompts.labels("rejected").inc()
            self.tracker.end_without_running(job, JobState.REJECTED, "error", rejection_data(job, e))
            return True
        except ComfyFailed as e:
            # ComfyUI is up and broke on this prompt. Not a reason to hold anyone else up (the
            # drain goes on), and only max_attempts times: then it fails, and its owner is told.
            self.metrics.comfy_duration.labels(backend.name, "failed").observe(self.clock() - started)
            log.warning("ComfyUI failed on a prompt (HTTP %s) user=%s prompt=%s attempt=%d", e.status, job.owner,
                        job.job_id, job.attempts)
            if job.state != JobState.SUBMITTING:
                return True  # its events came meanwhile: ComfyUI has it after all
            if job.attempts >= self.max_attempts:
                self.metrics.prompts.labels("rejected").inc()
                self.tracker.end_without_running(job, JobState.REJECTED, "error", {
                    "code": ErrorCode.COMFY_ERROR, "prompt_id": job.job_id, "status": e.status,
                    "message": f"ComfyUI failed on this prompt (HTTP {e.status}) {job.attempts} times"})
                return True
            self.tracker.move(job, JobState.QUEUED)
            if not announced:
                self.announce_queued(job)
            return True
        except ComfyUnavailable as e:
            self.metrics.comfy_duration.labels(backend.name, "unavailable").observe(self.clock() - started)
            log.warning("prompt POST failed user=%s prompt=%s reason=%s outcome_unknown=%s",
                        job.owner, job.job_id, e.reason, e.outcome_unknown)
            if job.state == JobState.SUBMITTING:
                self.tracker.move(job, JobState.QUEUED, outcome_unknown=job.outcome_unknown or e.outcome_unknown)
                if not announced:
                    self.announce_queued(job)
            else:
                # Its events arrived while the POST hung: ComfyUI has it, whatever the POST says
                # (they are held, and follow this reply).
                self.tracker.notify(job, "prompt_accepted", accepted_data(job, queued=False, reconciled=True))
            return False
        self.metrics.comfy_duration.labels(backend.name, "ok").observe(self.clock() - started)
        if job.state == JobState.CANCELLED:
            # Cancelled while its POST was in flight: the owner was told, so it must not run.
            await self.withdraw(job)
            return True
        number = result.get("number")
        if job.state == JobState.SUBMITTING:  # events may already have moved it on
            self.tracker.move(job, JobState.PENDING, number=number, outcome_unknown=False)
        else:
            job.number = number
            self.tracker.save(job)
        job.last_heard = self.clock()
        self.metrics.prompts.labels("accepted").inc()
        if resubmitted:
            self.metrics.prompts.labels("resubmitted").inc()
        if moved:
            self.metrics.prompts.labels("moved").inc()
        log.info("prompt accepted user=%s prompt=%s backend=%s number=%s resubmitted=%s moved=%s", job.owner,
                 job.job_id, backend.name, number, resubmitted, moved)
        self.tracker.notify(job, "prompt_accepted", accepted_data(
            job, queued=False, node_errors=result.get("node_errors", {}), resubmitted=resubmitted, moved=moved))
        self.links.expect_status(link, sent_at)
        return True

    async def withdraw(self, job: Job) -> None:
        """Take a cancelled job back out of the ComfyUI that has it after all."""
        backend = self.pool.get(job.backend)
        if backend is None:
            return
        try:
            await backend.delete_queued(job.job_id)
            await backend.interrupt(job.job_id)  # in case it started already (never a global one)
        except (ComfyUnavailable, ComfyRejected):
            log.warning("could not withdraw a cancelled prompt from ComfyUI user=%s prompt=%s", job.owner, job.job_id)

    # --- the drain --------------------------------------------------------------------------------
    def kick(self) -> None:
        """Drain the queue soon. Cheap; coalesces while a drain runs."""
        if self._stopped:
            return
        if self._draining is not None:
            self._drain_again = True
            return
        if not len(self.fair):
            return
        self._draining = asyncio.ensure_future(self._drain())
        self._draining.add_done_callback(self._drained)

    def _drained(self, future: asyncio.Future) -> None:
        self._draining = None
        if not future.cancelled() and future.exception() is not None:
            log.error("queue drain failed", exc_info=future.exception())
        if self._drain_again:
            self._drain_again = False
            self.kick()

    async def _drain(self) -> None:
        """Each backend that may take a job now pulls the one it should (pool.pick: fair across
        owners, FIFO per owner and model, the one it would finish soonest); again, until no
        backend takes one. Jobs no backend can run are refused on the way."""
        while True:
            if not len(self.fair):
                return
            self._refuse_impossible()
            free = self.pool.free(self.tracker.placed_count)
            if not free:
                return
            progressed = False
            for backend in free:
                if not backend.available or not self.pool.has_room(backend, self.tracker.placed_count):
                    continue
                candidates, waiting = self._candidates(backend)
                job = self.pool.pick(backend, candidates, waiting, self.tracker.held_by, self.clock())
                if job is None:
                    continue
                link = self.links.ensure(job.owner, backend)
                if not link.ready.is_set():
                    # Its link is (re)connecting: the backend waits for it (link_up kicks the
                    # queue again), so the owner keeps the turn.
                    link.wake()
                    continue
                self.fair.rotate(job.owner)  # served: to the back of the round-robin
                if await self.post(job, backend, link, resubmitted=job.attempts > 0):
                    progressed = True
            if not progressed:
                return

    def _refuse_impossible(self) -> None:
        """Queued jobs that no backend can run (capabilities learned, or changed, since they
        were queued) end now, with what each backend lacks."""
        impossible, looked_at = [], 0
        for owner in self.fair.owners():
            if looked_at >= SCAN_MAX:
                break  # (the rest when they come within reach)
            for job_id in self.fair.first(owner, SCAN_PER_OWNER):
                looked_at += 1
                job = self.tracker.get(job_id)
                if job is not None:
                    possible, why = self.pool.runnable(job)
                    if not possible:
                        impossible.append((job, why))
        for job, why in impossible:
            self.refuse(job, why)

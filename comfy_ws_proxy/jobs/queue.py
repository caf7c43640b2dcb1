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
from typing import Callable

from ..backends.backend import Backend, ComfyFailed, ComfyRejected, ComfyUnavailable
from ..backends.link import ComfyLink
from ..backends.links import LinkManager
from ..backends.pool import BackendPool
from ..metrics import Metrics
from ..model import ErrorCode, Job, JobState
from .tracker import JobTracker

log = logging.getLogger(__name__)

# How long a drain round waits for its users' links to (re)register, so that a user whose
# link comes back a moment later is not skipped (fairness) without holding the round up.
LINKS_UP_WAIT_S = 1.0


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


def no_backend_data(job: Job, why: dict[str, list[str]]) -> dict:
    """A job no backend can run, told like ComfyUI's own 400: a message naming what is missing
    where, and node_errors per node (ComfyUI's shape: errors, dependent_outputs, class_type)."""
    first = next(iter(why.values()), ["no backend can run it"])
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in why.items())
    node_errors: dict = {}
    prompt = (job.payload or {}).get("prompt") or {}
    for reasons in why.values():
        for reason in reasons:
            node_id = reason.split(" ", 2)[1].rstrip(":") if reason.startswith("node ") else None
            node = prompt.get(node_id) if node_id else None
            if isinstance(node, dict) and node_id not in node_errors:
                node_errors[node_id] = {"errors": [{"type": "no_backend", "message": "No backend can run this node",
                                                    "details": reason, "extra_info": {}}],
                                        "dependent_outputs": [], "class_type": node.get("class_type")}
    error = {"type": "no_backend", "message": "No backend can run this prompt", "details": detail[:2000],
             "extra_info": {}}
    return {"code": ErrorCode.INVALID_PROMPT, "message": f"No backend can run this prompt ({first[0]})",
            "prompt_id": job.job_id, "status": 400, "error": error, "node_errors": node_errors}


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
        elif old == JobState.QUEUED and job.state != JobState.QUEUED:
            self.fair.remove(job.owner, job.job_id)
        if job.state == JobState.RUNNING and old != JobState.RUNNING:
            self.pool.job_started(job)
        elif old == JobState.RUNNING and job.finished:
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
        backend = (self.pool.place(job, self.tracker.held_by, self.clock())
                   if not self.fair.size(job.owner) and not self.owner_full(job.owner) else None)
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

    def refuse(self, job: Job, why: dict[str, list[str]]) -> None:
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
        """Round-robin across owners, one job each per round, FIFO per owner; each job goes to
        the backend the pool picks for it now (or waits). A job whose last POST has an
        unknown outcome holds its owner's turn until the reconciler has asked."""
        while True:
            owners = self.fair.owners()
            if not owners or not self.pool.any_room(self.tracker.placed_count):
                return
            progressed = False
            await self._links_up(owners)
            for owner in owners:
                job = self.tracker.get(self.fair.head(owner) or "")
                if job is None or job.outcome_unknown or self.owner_full(owner):
                    continue  # (a finished job of theirs kicks the queue again)
                possible, why = self.pool.runnable(job)
                if not possible:  # (capabilities learned since it was queued)
                    self.refuse(job, why)
                    progressed = True
                    continue
                backend = self.pool.place(job, self.tracker.held_by, self.clock())
                if backend is None:
                    continue  # nothing that can run it has room now (or it waits for a better one)
                link = self.links.ensure(owner, backend)
                if not link.ready.is_set():
                    link.wake()
                    continue  # its link is (re)connecting; link_up kicks again
                self.fair.rotate(owner)  # served: to the back of the round-robin
                if not await self.post(job, backend, link, resubmitted=job.attempts > 0):
                    return
                progressed = True
            if not progressed:
                return

    async def _links_up(self, owners: list[str]) -> None:
        """Open the links this round will use, and wait a moment for them, so that an owner
        whose link comes up a moment later keeps their turn."""
        waits = []
        for owner in owners:
            job = self.tracker.get(self.fair.head(owner) or "")
            if job is None:
                continue
            backend = self.pool.place(job, self.tracker.held_by, self.clock(), commit=False)
            if backend is None:
                continue
            link = self.links.ensure(owner, backend)
            if not link.ready.is_set():
                link.wake()
                waits.append((asyncio.ensure_future(link.ready.wait()), backend.connect_timeout))
        if waits:
            await asyncio.wait([w for w, _ in waits], timeout=min(LINKS_UP_WAIT_S, *(t for _, t in waits)))
            for w, _ in waits:
                w.cancel()

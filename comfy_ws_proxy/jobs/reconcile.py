"""Reconciler: where is this job? Asks ComfyUI (``/history/{id}``, ``/queue``) whenever
the proxy may have missed something, and acts on the answer:

- in history: the owner gets what it missed (outputs, final outcome, marked ``replayed``);
- running or pending: nothing was lost; a pending job heard through a registered socket
  will be heard whole from now on;
- absent: ComfyUI restarted and forgot it, so it goes again with the same id;
- no answer: asked again soon (RECONCILE_RETRY_S), and on every watchdog tick after that.

When it asks: after a link (re)registers, for that link's jobs; after a proxy restart,
for every job ComfyUI held; for a POST whose outcome is unknown, before it is sent again;
and, as the watchdog, for any job in ComfyUI not heard from for ``job_watchdog_s``. The
watchdog also enforces each job's execution time limit (an interrupt, then ``timed_out``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from tornado.ioloop import PeriodicCallback

from ..backends.backend import Backend, ComfyRejected, ComfyUnavailable
from ..backends.link import ComfyLink
from ..backends.links import LinkManager
from ..backends.pool import BackendPool
from ..model import ErrorCode, Job, JobState
from .queue import JobQueue, accepted_data
from .tracker import JobTracker

log = logging.getLogger(__name__)

WATCHDOG_TICK_S = 1.0   # the watchdog's (and the retries') resolution
RECONCILE_RETRY_S = 0.2  # a question ComfyUI could not answer is asked again this soon


def queue_ids(items) -> set[str]:
    """Prompt ids of /queue items ([number, prompt_id, prompt, extra_data, outputs])."""
    ids = set()
    for item in items or []:
        if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str):
            ids.add(item[1])
    return ids


async def locate(backend: Backend, job_id: str) -> tuple[str, dict | None] | None:
    """Where ComfyUI has this job: ('history', entry), ('running', None), ('pending', None)
    or ('absent', None); None when ComfyUI cannot be asked."""
    try:
        entry = (await backend.history(job_id)).get(job_id)
        if isinstance(entry, dict):
            return "history", entry
        queue = await backend.queue()
        if job_id in queue_ids(queue.get("queue_running")):
            return "running", None
        if job_id in queue_ids(queue.get("queue_pending")):
            return "pending", None
        # Between the two calls it may have finished: look once more.
        entry = (await backend.history(job_id)).get(job_id)
    except (ComfyUnavailable, ComfyRejected):
        return None
    return ("history", entry) if isinstance(entry, dict) else ("absent", None)


class Reconciler:
    def __init__(self, tracker: JobTracker, queue: JobQueue, pool: BackendPool, links: LinkManager, settings,
                 clock: Callable[[], float]):
        self.tracker = tracker
        self.queue = queue
        self.pool = pool
        self.links = links
        self.clock = clock
        self.watchdog_after = settings.job_watchdog_s
        self.resubmit_unknown = settings.resubmit_unknown
        self.failover_after = settings.failover_after_s
        self.down_since: dict[str, float] = {}  # backend -> since when its breaker is not closed
        self._fencing: dict[str, asyncio.Future] = {}  # job id -> taking it out of a fenced backend
        # Jobs with a fence (a set, so the watchdog's tick does not walk every job kept).
        self.fenced_ids = {job.job_id for job in tracker.jobs.values() if job.fenced}
        for backend in pool:
            backend.add_breaker_listener(lambda old, new, b=backend: self._breaker_moved(b, new))
        self._timer = PeriodicCallback(self.tick, WATCHDOG_TICK_S * 1000)
        self.retry: set[str] = set()  # jobs ComfyUI could not be asked about yet
        self.asking: dict[str, asyncio.Future] = {}  # job id -> the question in flight
        self.again: set[str] = set()  # jobs to ask once more when their question is answered
        self._retry_handle: asyncio.TimerHandle | None = None
        self._interrupts: set[asyncio.Future] = set()  # time-limit interrupts in flight
        self._stopped = False
        self.changed: Callable[[], None] = lambda: None  # set by the service (settled waiters)
        tracker.listeners.append(self._job_changed)
        tracker.gap_final_listeners.append(self.ask)
        links.listeners.append(self)

    def start(self) -> None:
        self._timer.start()
        # After a restart: every job ComfyUI holds, and every POST whose answer was lost, is
        # asked about now; their owners' links come up to hear the rest.
        for job in self.tracker.unfinished():
            if job.backend and self.pool.get(job.backend) is None \
                    and (job.state in JobState.IN_COMFY or job.outcome_unknown):
                # Its backend is no longer configured (renamed or removed): nobody can ask it.
                self._move_away(job, f"Backend {job.backend} is no longer configured")
                continue
            if job.state in JobState.IN_COMFY or job.outcome_unknown:
                self.ask(job)
            backend = self.pool.get(job.backend) or self.pool.default
            self.links.ensure(job.owner, backend)
        self._enforce_fences()
        self.queue.kick()

    def stop(self) -> None:
        self._stopped = True
        self._timer.stop()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for task in [*self.asking.values(), *self._interrupts, *self._fencing.values()]:
            task.cancel()

    @property
    def busy(self) -> bool:
        return bool(self.retry or self.asking)

    # --- triggers -------------------------------------------------------------------------------
    def _job_changed(self, job: Job, old: str) -> None:
        if job.state == JobState.QUEUED and job.outcome_unknown and old != JobState.QUEUED:
            self.ask(job)  # a POST whose answer was lost: ask before it is sent again

    def link_up(self, link: ComfyLink, reconnected: bool) -> None:
        # After a reconnect or a proxy restart, events of jobs in ComfyUI may have been missed.
        for job in self.tracker.in_comfy(link.owner, link.backend.name):
            self.ask(job)
        self.queue.kick()
        self.changed()

    def link_down(self, link: ComfyLink) -> None:
        for job in self.tracker.in_comfy(link.owner, link.backend.name):
            job.gap = True  # what ComfyUI sends it now is lost
            if len(self.pool) > 1:
                # Is that backend gone? Asking now tells its breaker soon (a failover needs it),
                # rather than at the next watchdog round.
                self.ask(job)
        self.changed()

    def tick(self) -> None:
        self.tracker.flush()  # what a failing store could not take, written once it works
        now = self.clock()
        retry, self.retry = self.retry, set()
        for job_id in retry:
            job = self.tracker.get(job_id)
            if job is not None and not job.finished:
                self.ask(job)
        for job in self.tracker.unfinished():
            if job.state in JobState.IN_COMFY and now - job.last_heard >= self.watchdog_after:
                self.ask(job)
            if job.state == JobState.RUNNING:
                self._enforce_time_limit(job)
            if self.down_since and (job.state in JobState.IN_COMFY or job.outcome_unknown):
                since = self.down_since.get(job.backend)
                if since is not None and now - since >= self.failover_after and len(self.pool) > 1:
                    self._move_away(job)
        self._enforce_fences()
        self.queue.kick()

    # --- failover -------------------------------------------------------------------------------
    def _breaker_moved(self, backend: Backend, new) -> None:
        if new.value == "closed":
            self.down_since.pop(backend.name, None)
            self._enforce_fences()
        else:
            self.down_since.setdefault(backend.name, self.clock())

    def _move_away(self, job: Job, why: str | None = None) -> None:
        """Its backend cannot be asked (unreachable for FAILOVER_AFTER_S, or no longer
        configured): the job goes to another one, and is fenced on the old one (it may still
        hold it)."""
        old = job.backend
        why = why or f"Backend {old} has been unreachable for {self.failover_after:g} s"
        may_have_run = job.gap or job.state == JobState.RUNNING
        if may_have_run and not self.resubmit_unknown:
            log.warning("prompt's backend cannot be asked after it may have run, not sent again user=%s "
                        "prompt=%s backend=%s", job.owner, job.job_id, old)
            self.tracker.end_without_running(job, JobState.LOST, "error", {
                "code": ErrorCode.OUTCOME_UNKNOWN, "prompt_id": job.job_id,
                "message": f"{why} while it may have run this prompt; it was not sent again"})
            return
        log.warning("prompt moved off unreachable backend user=%s prompt=%s backend=%s state=%s", job.owner,
                    job.job_id, old, job.state)
        job.gap = job.final_seen = False
        fenced = job.fenced if old in job.fenced else (*job.fenced, old)
        self.tracker.move(job, JobState.QUEUED, outcome_unknown=False, fenced=fenced)
        self.fenced_ids.add(job.job_id)
        self.queue.metrics.prompts.labels("fenced").inc()
        self.queue.kick()

    def _enforce_fences(self) -> None:
        """Take every fenced job out of each fenced backend that can be asked again: delete it
        from that ComfyUI's queue, interrupt it if it runs there, and lift the fence once that
        ComfyUI no longer holds it. (Until then nothing it says about the job is delivered.)"""
        for job_id in list(self.fenced_ids):
            job = self.tracker.get(job_id)
            if job is None or not job.fenced:  # (lifted, or the job forgotten)
                self.fenced_ids.discard(job_id)
                continue
            if job_id in self._fencing or self._stopped:
                continue
            backends = [self.pool.get(name) for name in job.fenced]
            if not any(b is None or b.available for b in backends):  # (None: no longer configured)
                continue
            task = asyncio.ensure_future(self._unfence(job))
            self._fencing[job.job_id] = task
            task.add_done_callback(lambda t, job_id=job.job_id: self._fenced_done(job_id, t))

    def _fenced_done(self, job_id: str, task: asyncio.Future) -> None:
        self._fencing.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("lifting a fence of prompt %s failed", job_id, exc_info=task.exception())

    async def _unfence(self, job: Job) -> None:
        for name in job.fenced:
            backend = self.pool.get(name)
            if backend is None:  # no longer configured: it can deliver nothing
                self.tracker.move(job, job.state, fenced=tuple(n for n in job.fenced if n != name))
                continue
            if not backend.available:
                continue
            try:
                await backend.delete_queued(job.job_id)
                await backend.interrupt(job.job_id)  # (by prompt id: never someone else's run)
            except (ComfyUnavailable, ComfyRejected):
                continue
            answer = await locate(backend, job.job_id)
            if answer is not None and answer[0] in ("absent", "history"):
                log.info("fence lifted prompt=%s backend=%s (%s there)", job.job_id, name, answer[0])
                self.tracker.move(job, job.state, fenced=tuple(n for n in job.fenced if n != name))

    def ask(self, job: Job) -> None:
        """Find out where the job is and act on it; one question per job at a time. Asked
        while a question is in flight, it is asked again once that one is answered (the
        answer may be from before what prompted the new question, e.g. a link coming up)."""
        if self._stopped or job.finished:
            return
        if job.job_id in self.asking:
            self.again.add(job.job_id)
            return
        task = asyncio.ensure_future(self._reconcile(job))
        self.asking[job.job_id] = task
        task.add_done_callback(lambda t, job_id=job.job_id: self._asked(job_id, t))

    def _asked(self, job_id: str, task: asyncio.Future) -> None:
        self.asking.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("reconciling prompt %s failed", job_id, exc_info=task.exception())
            self._retry_soon(job_id)
        elif job_id in self.again:
            self.again.discard(job_id)
            job = self.tracker.get(job_id)
            if job is not None:
                self.ask(job)
        self.changed()

    def _retry_soon(self, job_id: str) -> None:
        """Ask again soon (a job's fate is knowable only while ComfyUI keeps its history),
        and on every tick after that until ComfyUI answers."""
        self.retry.add(job_id)
        if self._retry_handle is None and not self._stopped:
            def retry():
                self._retry_handle = None
                self.tick()
            self._retry_handle = asyncio.get_running_loop().call_later(RECONCILE_RETRY_S, retry)

    # --- acting on the answer -------------------------------------------------------------------
    async def _reconcile(self, job: Job) -> None:
        backend = self.pool.get(job.backend)
        if backend is None:  # never sent anywhere (or to a backend no longer configured)
            if job.outcome_unknown and job.state == JobState.QUEUED and not job.backend:
                self.tracker.move(job, JobState.QUEUED, outcome_unknown=False)
            return
        # The socket registered before we ask: if it is still the same one when the answer
        # comes, it has heard everything since (an end of the job would have reached it).
        link = self.links.get(job.owner, backend.name)
        socket_before = link.connections if link is not None and link.ready.is_set() else None
        answer = await locate(backend, job.job_id)
        if job.finished:
            return
        if answer is None:
            self._retry_soon(job.job_id)
            return
        where, entry = answer
        job.last_heard = self.clock()
        if where == "history":
            self.tracker.finish_from_history(job, entry)
            self.links.release_idle_soon(job.owner)
            self.queue.kick()
        elif where == "absent":
            # Did it perhaps run? If we heard everything since ComfyUI took it (no gap) and it
            # never started, no: it goes again, safely. Otherwise only RESUBMIT_UNKNOWN decides.
            may_have_run = job.gap or job.state == JobState.RUNNING
            if may_have_run and not self.resubmit_unknown:
                log.warning("prompt lost by ComfyUI after it may have run, not sent again user=%s prompt=%s",
                            job.owner, job.job_id)
                self.tracker.end_without_running(job, JobState.LOST, "error", {
                    "code": ErrorCode.OUTCOME_UNKNOWN, "prompt_id": job.job_id,
                    "message": "ComfyUI lost this prompt, and it may have run; it was not sent again"})
                return
            if job.state != JobState.QUEUED:  # (a queued one: its lost POST never arrived)
                log.warning("prompt lost by ComfyUI, requeued user=%s prompt=%s", job.owner, job.job_id)
            # ComfyUI never had it, or restarted and forgot it: it goes again, with the same id.
            job.gap = job.final_seen = False
            self.tracker.move(job, JobState.QUEUED, outcome_unknown=False)
            self.queue.kick()
        else:
            if job.state == JobState.QUEUED:  # a lost POST answer: ComfyUI has it after all
                self.tracker.notify(job, "prompt_accepted", accepted_data(job, queued=False, reconciled=True))
            state = JobState.RUNNING if where == "running" else JobState.PENDING
            if job.state != state and not (job.state == JobState.RUNNING and state == JobState.PENDING):
                self.tracker.move(job, state, outcome_unknown=False)
            elif job.outcome_unknown:
                self.tracker.move(job, job.state, outcome_unknown=False)
            same_socket = (socket_before is not None and self.links.get(job.owner, backend.name) is link
                           and link.ready.is_set() and link.connections == socket_before)
            if where == "running" and same_socket and link.running is None and job.job_id not in link.ended:
                link.running = job.job_id  # its text frames and previews are ours again
            if where == "pending" and same_socket:
                job.gap = False  # it will be heard whole from its start
            if job.final_seen:
                self._retry_soon(job.job_id)  # its final came; the history is written a moment later

    def _enforce_time_limit(self, job: Job) -> None:
        if not job.timeout_s or job.started_at is None or job.interrupt_sent:
            return
        if self.tracker.wall() - job.started_at < job.timeout_s:
            return
        backend = self.pool.get(job.backend)
        if backend is None:
            return
        job.interrupt_sent = True
        log.warning("prompt past its time limit (%gs), interrupting user=%s prompt=%s", job.timeout_s, job.owner,
                    job.job_id)

        async def interrupt() -> None:
            try:
                await backend.interrupt(job.job_id)  # never a global interrupt
            except (ComfyUnavailable, ComfyRejected):
                job.interrupt_sent = False  # the next tick tries again
        task = asyncio.ensure_future(interrupt())
        self._interrupts.add(task)
        task.add_done_callback(self._interrupts.discard)

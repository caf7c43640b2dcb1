"""JobService: what the faces call. Submit, cancel and look up jobs for an owner (never a
socket), the per-owner submit rate, and ``settled()``: nothing left to send or find out.

Settled lives here rather than in the tracker because it depends on everything below it:
the queue, the reconciler, the breakers and the links, which the tracker does not know.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Callable

from tornado.ioloop import PeriodicCallback

from ..backends.backend import ComfyRejected, ComfyUnavailable
from ..backends.breaker import BreakerState
from ..backends.links import LinkManager
from ..backends.pool import BackendPool
from ..metrics import Metrics
from ..model import (
    ErrorCode,
    IdempotentAnswer,
    Job,
    JobState,
    RequestError,
    SubmitRequest,
)
from ..store import StoreError
from .isolation import UserIsolation
from .queue import JobQueue
from .reconcile import Reconciler, locate
from .submission import check_prompt
from .templates import TemplateRegistry
from .tracker import JobTracker
from .webhooks import WebhookSender

log = logging.getLogger(__name__)


class TokenBucket:
    """Per-owner submit rate: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token; return 0 on success, else the seconds until one is available."""
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class JobService:
    def __init__(self, tracker: JobTracker, queue: JobQueue, reconciler: Reconciler, pool: BackendPool,
                 links: LinkManager, metrics: Metrics, settings, clock: Callable[[], float],
                 isolation: UserIsolation | None = None, webhooks: WebhookSender | None = None,
                 templates: TemplateRegistry | None = None):
        self.tracker = tracker
        self.templates = templates
        self.isolation = isolation
        self.webhooks = webhooks
        self.queue = queue
        self.reconciler = reconciler
        self.pool = pool
        self.links = links
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self._settled_waiters: list[asyncio.Future] = []
        self._finish_waiters: dict[str, list[asyncio.Future]] = {}
        self._cleanup_timer = PeriodicCallback(self.cleanup, settings.cleanup_interval_ms)
        self.ready_timeout = settings.comfy_connect_timeout_ms / 1000
        tracker.listeners.append(self._job_changed)
        tracker.stray_listeners.append(self._withdraw_soon)
        self._withdrawals: set[asyncio.Future] = set()
        reconciler.changed = self._changed
        links.listeners.append(self)
        for backend in pool:
            backend.add_breaker_listener(lambda old, new, b=backend: self._breaker_changed(b, new))
            backend.unreachable_listeners.append(lambda since, b=backend: links.backend_unreachable(b, since))
            backend.capability_listeners.append(lambda b: queue.kick())  # placeable now, or impossible

    def start(self) -> None:
        self._cleanup_timer.start()
        self.reconciler.start()

    def stop(self) -> None:
        self._cleanup_timer.stop()
        for task in self._withdrawals:
            task.cancel()
        self.reconciler.stop()
        self.queue.stop()

    # --- submit / cancel / get ------------------------------------------------------------------
    async def submit(self, owner: str, request: SubmitRequest,
                     answer_for: Callable[[Job], IdempotentAnswer] | None = None) -> Job:
        """Record a new job for ``owner`` and send it on (or queue it). Raises RequestError.
        ``answer_for(job)`` gives an Idempotency-Key's answer, recorded with the job."""
        now = self.clock()
        bucket = self.buckets.get(owner)
        if bucket is None:
            bucket = self.buckets[owner] = TokenBucket(self.settings.submit_rate_per_s, self.settings.submit_burst,
                                                       now)
        wait = bucket.take(now)
        if wait:
            self.metrics.prompts.labels("rate_limited").inc()
            raise RequestError(ErrorCode.RATE_LIMITED, details={"retry_after": round(wait, 3)},
                               prompt_id=request.prompt_id)
        if request.front and not self.settings.allow_front:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "front is not allowed here (ALLOW_FRONT)",
                               prompt_id=request.prompt_id)
        job_id = request.prompt_id or str(uuid.uuid4())
        webhook_url = ""
        if self.webhooks is not None:
            webhook_url = await self.webhooks.check(request.webhook_url, job_id)  # (it may resolve a name)
        elif request.webhook_url:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "webhook_url cannot be used here", prompt_id=job_id)
        if request.template is not None:  # (before the checks below: it may wait for a file's stat)
            request = await self._render(owner, request, job_id)
        if self.tracker.id_taken(job_id):
            # Never reveal whose it is; never let a client attach to another user's job.
            raise RequestError(ErrorCode.INVALID_MESSAGE, "prompt_id is already in use", prompt_id=job_id)
        if self.tracker.waiting_count(owner) >= self.settings.max_queued_prompts_per_user:
            self.metrics.prompts.labels("queue_full").inc()
            raise RequestError(ErrorCode.QUEUE_FULL, prompt_id=job_id)
        if self.isolation is not None:
            try:
                request = dataclasses.replace(request, prompt=self.isolation.confine(owner, request.prompt))
            except RequestError as e:
                e.prompt_id = job_id
                raise
        job = Job(job_id, owner, JobState.QUEUED, request.payload(), created_at=self.tracker.wall(),
                  updated_at=self.tracker.wall(), timeout_s=self._time_limit(request), webhook_url=webhook_url)
        job.last_heard = now
        job.nodes_total = len(request.prompt)
        if request.template is not None:
            job.template = {"name": request.template, "params": request.params}
        if answer_for is not None:
            job.answer = answer_for(job)
        await self.queue.submit(job)
        return job

    async def _render(self, owner: str, request: SubmitRequest, job_id: str) -> SubmitRequest:
        """The request with its template's prompt and its resolved parameters (every one,
        drawn seeds included); the prompt is checked like a client's own."""
        try:
            if self.templates is None:
                raise RequestError(ErrorCode.UNKNOWN_TEMPLATE, "No templates are served here (TEMPLATES_DIR)",
                                   details={"template": request.template[:64]})
            rendered = await self.templates.render(owner, request.template, request.params)
            check_prompt(rendered.prompt, self.settings.max_prompt_nodes, self.settings.node_allowlist)
        except RequestError as e:
            e.prompt_id = job_id
            raise
        return dataclasses.replace(request, prompt=rendered.prompt, params=rendered.params,
                                   partial_execution_targets=request.partial_execution_targets
                                   or (list(rendered.outputs) or None))

    # --- the HTTP face's questions ---------------------------------------------------------------
    async def wait_finished(self, job: Job, timeout: float) -> None:
        """Return when the job has finished or ``timeout`` seconds have passed, whichever is
        first. A waiter costs one future, whatever the number of waiters."""
        if job.finished or timeout <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(job.job_id, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiters = self._finish_waiters.get(job.job_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._finish_waiters[job.job_id]

    def queue_position(self, job: Job) -> int | None:
        """How many jobs are expected to start before this one (0: it is next), or None once
        it runs or ended. An estimate: what ComfyUI holds goes first, then the fair queue's
        rounds (one job per owner per round, owners in the order they are served)."""
        if job.state in (JobState.PENDING, JobState.SUBMITTING):
            return sum(1 for j in self.tracker.in_comfy(backend=job.backend)
                       if j is not job and j.state != JobState.RUNNING
                       and j.number is not None and job.number is not None and j.number < job.number)
        if job.state != JobState.QUEUED:
            return None
        fair = self.queue.fair
        mine = fair.position(job.owner, job.job_id)
        if mine is None:
            return None
        ahead = sum(1 for j in self.tracker.unfinished() if j.state in (JobState.SUBMITTING, JobState.PENDING))
        before_me = True
        for owner in fair.owners():
            if owner == job.owner:
                before_me = False
                ahead += mine
                continue
            size = fair.size(owner)
            ahead += min(size, mine) + (1 if before_me and size > mine else 0)
        return ahead

    def jobs_of(self, owner: str, states: set[str] | None = None) -> list[Job]:
        """The owner's jobs the proxy remembers, newest first."""
        jobs = [j for j in self.tracker.jobs_of(owner) if states is None or j.state in states]
        return sorted(jobs, key=lambda j: j.order, reverse=True)

    def expired(self, owner: str, job_id: str) -> bool:
        """Was this the owner's job, forgotten after FINISHED_PROMPT_RETENTION_S?"""
        try:
            return bool(owner) and self.tracker.store.forgotten_owner(job_id) == owner
        except StoreError:
            return False

    def recall(self, owner: str, key: str) -> IdempotentAnswer | None:
        try:
            return self.tracker.store.recall(owner, key, self.tracker.wall())
        except StoreError:
            raise RequestError(ErrorCode.STORE_UNAVAILABLE) from None

    def remember(self, answer: IdempotentAnswer) -> None:
        try:
            self.tracker.store.remember(answer)
        except StoreError as e:
            log.error("store write failed, an idempotent answer was not recorded: %s", e)

    def _time_limit(self, request: SubmitRequest) -> float:
        """The job's execution time limit: the request's, never above the option's (0: none)."""
        configured = self.settings.job_execution_timeout_s
        asked = request.timeout_s
        if asked is None:
            return configured
        return min(asked, configured) if configured else asked

    def get(self, owner: str, job_id: str) -> Job:
        job = self.tracker.owned(owner, job_id)
        if job is None:
            raise RequestError(ErrorCode.NOT_FOUND, prompt_id=job_id)  # unknown and foreign alike
        return job

    async def cancel(self, owner: str, job_id: str) -> None:
        """Cancel the owner's job: dequeued if still ours, deleted from ComfyUI's queue if
        pending there, interrupted (that job only) if running."""
        job = self.get(owner, job_id)
        if job.finished:
            raise RequestError(ErrorCode.INVALID_MESSAGE, f"Prompt already {job.state}", prompt_id=job_id)
        if job.state == JobState.QUEUED and not job.outcome_unknown:
            self._cancelled(job)
            return
        backend = self.pool.get(job.backend)
        if backend is None:
            raise RequestError(ErrorCode.COMFY_UNAVAILABLE, prompt_id=job_id)
        try:
            if job.state == JobState.RUNNING:
                await backend.interrupt(job_id)  # never a global interrupt
                return  # execution_interrupted follows from ComfyUI
            await backend.delete_queued(job_id)
            answer = await locate(backend, job_id)
        except (ComfyUnavailable, ComfyRejected):
            raise RequestError(ErrorCode.COMFY_UNAVAILABLE, prompt_id=job_id) from None
        if answer is None:
            raise RequestError(ErrorCode.COMFY_UNAVAILABLE, prompt_id=job_id)
        where = answer[0]
        if where == "running":
            try:
                await backend.interrupt(job_id)
            except (ComfyUnavailable, ComfyRejected):
                raise RequestError(ErrorCode.COMFY_UNAVAILABLE, prompt_id=job_id) from None
        elif where == "history" and not job.finished:
            self.tracker.finish_from_history(job, answer[1])
        elif where == "absent" and not job.finished:
            self._cancelled(job)

    def _withdraw_soon(self, job: Job) -> None:
        log.warning("a cancelled prompt reached ComfyUI after all, withdrawing it user=%s prompt=%s", job.owner,
                    job.job_id)
        task = asyncio.ensure_future(self.queue.withdraw(job))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    def _cancelled(self, job: Job) -> None:
        self.tracker.end_without_running(job, JobState.CANCELLED, "prompt_cancelled", {"prompt_id": job.job_id})

    # --- the owner's links ----------------------------------------------------------------------
    async def wait_ready(self, owner: str, timeout: float) -> bool:
        """Open the owner's link to a backend that is up (a socket of theirs just opened) and
        wait until ComfyUI registered it, or the first attempt failed, or ``timeout``. (Links
        to the other backends open when a job of theirs is placed there.)"""
        backend = next((b for b in self.pool if b.available), self.pool.default)
        link = self.links.ensure(owner, backend)
        return await link.wait_ready(timeout)

    def owner_left(self, owner: str) -> None:
        """The owner's last socket closed: its links go once nothing of theirs needs them."""
        self.links.release_idle_soon(owner)

    def _job_changed(self, job: Job, old: str) -> None:
        if job.finished and old in JobState.UNFINISHED:
            for waiter in self._finish_waiters.pop(job.job_id, ()):
                if not waiter.done():
                    waiter.set_result(None)
            self.links.release_idle_soon(job.owner)
            self.queue.kick()  # it may have freed a place on its backend
        self._changed()

    def _breaker_changed(self, backend, new: BreakerState) -> None:
        if new is BreakerState.CLOSED:
            self.links.wake(backend)
            self.queue.kick()
        self._changed()

    def link_up(self, link, reconnected: bool) -> None:
        self._changed()

    def link_down(self, link) -> None:
        self._changed()

    # --- settled --------------------------------------------------------------------------------
    def settled(self) -> bool:
        """True when the proxy has nothing left to find out or to send: every breaker is
        closed, no question to ComfyUI is pending or running, nothing waits in (or is leaving)
        the proxy's queue, no POST's outcome is unknown, and every job that ComfyUI holds is
        heard through a registered upstream socket. Until then, a ComfyUI restart can wipe a
        history the proxy still had to read, and the job must go again."""
        if self.reconciler.busy or not all(b.available for b in self.pool):
            return False
        for job in self.tracker.unfinished():
            if job.state not in JobState.IN_COMFY or job.outcome_unknown or job.final_seen:
                return False  # queued or being POSTed, or its fate still to be asked
            if not self.links.ready(job.owner, job.backend):
                return False  # its events would go unheard
        return True

    async def wait_settled(self, timeout: float) -> None:
        """Return once settled() holds; asyncio.TimeoutError after ``timeout`` seconds.
        Event-driven: waiters are woken by the changes settled() depends on (_changed)."""
        async def wait() -> None:
            while not self.settled():  # re-checked: it may have moved on before we resumed
                waiter = asyncio.get_running_loop().create_future()
                self._settled_waiters.append(waiter)
                try:
                    await waiter
                finally:  # after a timeout too: a stale waiter would keep _changed checking
                    if waiter in self._settled_waiters:
                        self._settled_waiters.remove(waiter)
        await asyncio.wait_for(wait(), timeout)

    def _changed(self) -> None:
        """Something settled() depends on moved: wake the waiters if it holds now."""
        if self._settled_waiters and self.settled():
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # --- cleanup --------------------------------------------------------------------------------
    def cleanup(self) -> int:
        """Forget finished jobs older than the retention, and rate buckets that are full
        again (an idle owner's bucket is the same as a new one)."""
        forgotten = self.tracker.forget_finished(self.tracker.wall() - self.settings.finished_prompt_retention_s)
        if forgotten:
            log.info("cleanup forgot %d finished prompts", forgotten)
        try:
            self.tracker.store.forget_answers(self.tracker.wall())
        except StoreError as e:
            log.warning("cleanup could not drop expired idempotency keys: %s", e)
        now = self.clock()
        for owner in [o for o, b in self.buckets.items() if b.full(now)]:
            del self.buckets[owner]
        return forgotten

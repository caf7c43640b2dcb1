"""JobTracker: the only writer of job state, durable through the store, and the one place
that publishes what happens to a job.

Subscribers (a user's WebSocket session today; HTTP event streams and webhooks next)
register per owner and get two kinds of delivery: the proxy's own messages about a job
(``job_notice``: prompt_accepted, prompt_cancelled, prompt_timed_out, error) and ComfyUI's
frames of that job, unchanged (``job_frame``). Each returns whether a live socket took
it; a final outcome that no live socket took is *owed* (``told`` is false, durably) and
is delivered, marked ``replayed``, the next time a socket of its owner opens.

Frames that arrive while a job's POST has not answered are held, so that the owner hears
``prompt_accepted`` first (ComfyUI can be faster than its own HTTP response,
PROTOCOL.md 3.7). State changes they imply apply at once.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Callable, Protocol

from ..backends.routing import Routed
from ..metrics import Metrics
from ..model import FINAL_EVENT_OF, FINAL_EVENTS, ErrorCode, Job, JobState, RequestError
from ..store import JobStore, StoreError

log = logging.getLogger(__name__)

PLACED = frozenset({JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING})
UNFINISHED = JobState.UNFINISHED


class JobSubscriber(Protocol):
    """Returns True when a live socket was given the message. ``on_sent``, if given, is called
    (at once or later, maybe more than once) when one socket's kernel has the message's bytes:
    from then on a crash of this process no longer loses it, so an outcome counts as told."""
    def job_notice(self, job: Job, kind: str, data: dict, on_sent: Callable[[], None] | None = None) -> bool: ...
    def job_frame(self, job: Job | None, kind: str, frame: str | bytes | bytearray,
                  on_sent: Callable[[], None] | None = None) -> bool: ...


def replayed(kind: str, data: dict) -> str:
    """A ComfyUI-shaped message the proxy sends from what it learned later (history, store)."""
    return json.dumps({"type": kind, "data": data, "replayed": True}, separators=(",", ":"))


class JobTracker:
    def __init__(self, store: JobStore, metrics: Metrics, clock: Callable[[], float],
                 wall: Callable[[], float] = time.time, share_comfy_status: bool = False):
        self.store = store
        # ComfyUI's status broadcasts tell its whole queue's length, so everyone's activity:
        # unless the operator shares them, a user is told the count of their own jobs instead,
        # when it changes (SHARE_COMFY_STATUS).
        self.share_comfy_status = share_comfy_status
        # Builds a finished job's webhook message (the webhook sender's), and is told when one
        # is in the store: the message is written with the final state, never without it.
        self.webhook_message: Callable[[Job], object] | None = None
        self.outbox_listeners: list[Callable[[], None]] = []
        self._queue_told: dict[str, int] = {}
        self.metrics = metrics
        self.clock = clock  # monotonic: last_heard
        self.wall = wall    # epoch seconds: the stored timestamps
        self.jobs: dict[str, Job] = {}
        self.by_owner: dict[str, dict[str, Job]] = {}
        self.placed: dict[str, dict[str, Job]] = {}  # backend -> our jobs it holds (submitting, pending, running)
        self.placed_by_owner = Counter()  # owner -> their jobs the backends hold
        self.subscribers: dict[str, set[JobSubscriber]] = {}
        # Jobs whose latest state the store could not take (disk full...): kept in memory, the
        # work goes on, and flush() writes them once the store works again.
        self.unsaved: dict[str, Job] = {}
        self.store_failing = False  # the last write failed (until one succeeds)
        # Called with (job, old state) after every change: the queue's index, settled waiters,
        # the reconciler, link release.
        self.listeners: list[Callable[[Job, str], None]] = []
        # Called with a job whose live final arrived after a gap: its outputs must be read
        # from ComfyUI's history before the owner hears the outcome (the reconciler).
        self.gap_final_listeners: list[Callable[[Job], None]] = []
        # Called with a cancelled job that ComfyUI turns out to have after all (a POST whose
        # answer was lost landed later): it must be taken out again (the queue's withdraw).
        self.stray_listeners: list[Callable[[Job], None]] = []
        self._load()

    def _load(self) -> None:
        for job in self.store.load_jobs():
            if job.state == JobState.SUBMITTING:
                # The proxy died mid-POST: ComfyUI may or may not have it. Ask before resending.
                job.state = JobState.QUEUED
                job.outcome_unknown = True
                self.save(job)
            if job.state in JobState.IN_COMFY or job.outcome_unknown:
                job.gap = True  # its events went to a socket that died with the old process
            self._index(job)

    def _index(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        self.by_owner.setdefault(job.owner, {})[job.job_id] = job
        if job.state in PLACED:
            self.placed.setdefault(job.backend, {})[job.job_id] = job
            self.placed_by_owner[job.owner] += 1

    # --- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def owned(self, owner: str, job_id: str) -> Job | None:
        """The owner's job, or None: another user's job answers exactly like an unknown one."""
        job = self.jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def id_taken(self, job_id: str) -> bool:
        """Is (or was) this id some job's? Then it is never used again, whoever asks."""
        if job_id in self.jobs:
            return True
        try:
            return self.store.id_used(job_id)
        except StoreError:
            raise self._unavailable(job_id) from None

    @property
    def store_healthy(self) -> bool:
        return not self.unsaved and not self.store_failing

    def owns(self, owner: str, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.owner == owner

    def is_running(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.state == JobState.RUNNING

    def jobs_of(self, owner: str) -> list[Job]:
        return list(self.by_owner.get(owner, {}).values())

    def unfinished(self, owner: str | None = None) -> list[Job]:
        jobs = self.jobs.values() if owner is None else self.by_owner.get(owner, {}).values()
        return [j for j in jobs if not j.finished]

    def has_unfinished(self, owner: str) -> bool:
        return any(not j.finished for j in self.by_owner.get(owner, {}).values())

    def in_comfy(self, owner: str | None = None, backend: str | None = None) -> list[Job]:
        return [j for j in self.unfinished(owner) if j.state in JobState.IN_COMFY
                and (backend is None or j.backend == backend)]

    def placed_count(self, backend: str) -> int:
        return len(self.placed.get(backend, ()))

    def held_by(self, backend: str) -> list[Job]:
        """Our jobs that backend holds (or is being sent), oldest first."""
        return list(self.placed.get(backend, {}).values())

    def waiting_count(self, owner: str) -> int:
        """The owner's jobs held by the proxy: queued, or taken from the queue for a POST."""
        return sum(1 for j in self.by_owner.get(owner, {}).values()
                   if j.state in (JobState.QUEUED, JobState.SUBMITTING))

    # --- writes ---------------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        if job.job_id in self.jobs:
            raise KeyError(job.job_id)
        try:
            self.store.insert(job, job.answer)
        except StoreError as e:
            # Not recorded, so not accepted: nothing of it is kept (no record in memory that
            # the store does not have, none counting against the owner's queue).
            self.store_failing = True
            log.error("store write failed, prompt refused user=%s prompt=%s: %s", job.owner, job.job_id, e)
            raise self._unavailable(job.job_id) from None
        job.answer = None
        self.store_failing = False
        self._index(job)
        self._changed(job, "")

    def move(self, job: Job, state: str, **changes) -> None:
        """Every change of a job's durable state goes through here."""
        old = job.state
        if old in PLACED:
            self.placed.get(job.backend, {}).pop(job.job_id, None)
            self.placed_by_owner[job.owner] -= 1
            if not self.placed_by_owner[job.owner]:
                del self.placed_by_owner[job.owner]
        job.state = state
        for name, value in changes.items():
            setattr(job, name, value)
        job.updated_at = self.wall()
        if job.finished and old in JobState.UNFINISHED:
            job.payload = None  # the workflow is not needed once it ran; keep rows small
            job.finished_at = job.updated_at
            if job.webhook_url and self.webhook_message is not None:
                job.outbox = self.webhook_message(job)
        if state in PLACED:
            self.placed.setdefault(job.backend, {})[job.job_id] = job
            self.placed_by_owner[job.owner] += 1
        self.save(job)
        self._changed(job, old)

    def save(self, job: Job) -> None:
        """Write the job's durable fields. A store that fails does not stop the job (nothing
        ComfyUI sent is dropped): it is written again by flush()."""
        try:
            self.store.save(job)
        except StoreError as e:
            if not self.unsaved:
                log.error("store write failed (%s): keeping job state in memory until it works again", e)
            self.unsaved[job.job_id] = job
            self.store_failing = True
            return
        self.store_failing = False
        self.unsaved.pop(job.job_id, None)
        self._outbox_written(job)

    def _outbox_written(self, job: Job) -> None:
        if job.outbox is not None:
            job.outbox = None
            for listener in list(self.outbox_listeners):
                listener()

    def flush(self) -> None:
        """Write what the store could not take before (called on the watchdog's tick)."""
        if not self.unsaved:
            return
        for job in list(self.unsaved.values()):
            try:
                self.store.save(job)
            except StoreError:
                return  # still failing: the next tick tries again
            self.store_failing = False
            del self.unsaved[job.job_id]
            self._outbox_written(job)
        if not self.unsaved:
            log.info("store writes work again")

    def _unavailable(self, job_id: str) -> RequestError:
        return RequestError(ErrorCode.STORE_UNAVAILABLE, prompt_id=job_id)

    def _changed(self, job: Job, old: str) -> None:
        for listener in list(self.listeners):
            listener(job, old)
        if not self.share_comfy_status and (old == "" or job.finished != (old not in JobState.UNFINISHED)):
            self._tell_queue(job.owner)

    def forget_finished(self, older_than: float) -> int:
        """Drop finished jobs last changed before ``older_than`` (epoch seconds)."""
        gone = [j for j in self.jobs.values() if j.finished and j.updated_at < older_than]
        for job in gone:
            del self.jobs[job.job_id]
            mine = self.by_owner.get(job.owner)
            if mine is not None:
                mine.pop(job.job_id, None)
                if not mine:
                    del self.by_owner[job.owner]
        if gone:
            try:
                self.store.delete([j.job_id for j in gone], {j.job_id: j.owner for j in gone})
            except StoreError as e:
                log.error("store delete failed (%s): finished prompts kept until the next cleanup", e)
                for job in gone:
                    self._index(job)
                return 0
        return len(gone)

    # --- subscribers ----------------------------------------------------------------------------
    def subscribe(self, owner: str, subscriber: JobSubscriber) -> None:
        self.subscribers.setdefault(owner, set()).add(subscriber)

    def unsubscribe(self, owner: str, subscriber: JobSubscriber) -> None:
        subs = self.subscribers.get(owner)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self.subscribers[owner]

    def notify(self, job: Job, kind: str, data: dict, on_sent: Callable[[], None] | None = None) -> bool:
        """A proxy message about ``job`` to every subscriber of its owner."""
        delivered = False
        for sub in list(self.subscribers.get(job.owner, ())):
            delivered = sub.job_notice(job, kind, data, on_sent) or delivered
        return delivered

    def _publish_frame(self, job: Job | None, owner: str, kind: str, frame,
                       on_sent: Callable[[], None] | None = None) -> bool:
        delivered = False
        for sub in list(self.subscribers.get(owner, ())):
            delivered = sub.job_frame(job, kind, frame, on_sent) or delivered
        return delivered

    def _deliver(self, job: Job, kind: str, frame) -> None:
        if job.holding:
            job.held.append((kind, frame))
            return
        if kind in FINAL_EVENTS and not job.told:
            self._publish_frame(job, job.owner, kind, frame, self._told_callback(job))
        else:
            self._publish_frame(job, job.owner, kind, frame)

    def _told_callback(self, job: Job) -> Callable[[], None]:
        """Marks the job's outcome told once a socket's kernel has it, not when it is queued
        in this process: a crash before the bytes left would otherwise lose an outcome that
        is no longer owed (the resume buffer dies with the process)."""
        def told() -> None:
            if not job.told:
                job.told = True
                if self.jobs.get(job.job_id) is job:  # (not once it was forgotten)
                    self.save(job)
        return told

    def hold(self, job: Job) -> None:
        job.holding = True

    def release(self, job: Job) -> None:
        """The POST answered (whatever it said): held frames go out, after our reply."""
        job.holding = False
        held, job.held = job.held, []
        for kind, frame in held:
            self._deliver(job, kind, frame)

    # --- ComfyUI's frames (FrameSink, through the links) ----------------------------------------
    def upstream_status(self, owner: str, text: str) -> None:
        if self.share_comfy_status:
            self._publish_frame(None, owner, "status", text)

    def queue_status(self, owner: str) -> dict:
        """A ``status`` message's data in ComfyUI's shape, counting the owner's own jobs not
        yet finished (in the proxy's queue or in ComfyUI's)."""
        remaining = sum(1 for j in self.by_owner.get(owner, {}).values() if not j.finished)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    def _tell_queue(self, owner: str) -> None:
        data = self.queue_status(owner)
        remaining = data["status"]["exec_info"]["queue_remaining"]
        if self._queue_told.get(owner) == remaining:
            return
        if remaining:
            self._queue_told[owner] = remaining
        else:
            self._queue_told.pop(owner, None)  # bounded: idle owners are not kept
        self._publish_frame(None, owner, "status", json.dumps({"type": "status", "data": data},
                                                              separators=(",", ":")))

    def upstream_frame(self, owner: str, backend: str, routed: Routed, frame) -> None:
        job = self.jobs.get(routed.job_id) if routed.job_id else None
        if job is None:
            return
        if backend != job.backend or job.fenced and backend in job.fenced:
            return  # a backend it was moved away from: what it says about the job is never delivered
        job.last_heard = self.clock()
        kind = routed.kind
        if job.state not in UNFINISHED:  # (job.finished, without the property's call: hot path)
            if job.state == JobState.CANCELLED:
                # Its owner was told it is cancelled: none of it is delivered, and it is stopped.
                if kind == "execution_start" or not job.withdrawn:
                    job.withdrawn = True
                    for listener in list(self.stray_listeners):
                        listener(job)
                return
            if not job.final_seen:  # the tail of a finished job (executing null) goes on as it came
                self._deliver(job, kind, frame)
            return
        if job.final_seen:
            return  # a gap job's outcome is being read from history: it will be replayed whole
        if kind == "progress":
            data = routed.data  # a tuple: this is the relay's most frequent event
            job.current = (data.get("node"), data.get("value"), data.get("max"))
        elif kind == "execution_start":
            if job.state != JobState.RUNNING:
                self.move(job, JobState.RUNNING, outcome_unknown=False, started_at=self.wall())
                log.info("prompt running user=%s prompt=%s", job.owner, job.job_id)
        elif kind == "executed":
            output = routed.data.get("output")
            node = routed.data.get("node")
            if isinstance(node, str):
                job.nodes_done.add(node)
            if output is not None and isinstance(node, str):
                job.outputs[node] = output
                self.save(job)
        elif kind == "execution_cached":
            nodes = routed.data.get("nodes")
            if isinstance(nodes, list):
                job.nodes_done.update(n for n in nodes if isinstance(n, str))
        elif kind == "executing" and isinstance(routed.data.get("node"), str):
            if job.current is not None:  # ComfyUI moved on: the node before is done
                job.nodes_done.add(job.current[0])
            job.current = (routed.data["node"], None, None)
        elif kind == "executing" and routed.data.get("node", "") is None:
            # ComfyUI's end marker for a job whose final event we never heard (it went to a
            # socket that was down): its history is written by now; read the outcome there.
            self._deliver(job, kind, frame)
            job.final_seen = True
            for listener in list(self.gap_final_listeners):
                listener(job)
            return
        elif kind in FINAL_EVENTS:
            if job.gap:
                # Events were missed before this socket heard the job again: read the whole
                # outcome (outputs included) from ComfyUI's history and replay it.
                job.final_seen = True
                for listener in list(self.gap_final_listeners):
                    listener(job)
                return
            self._end_with(job, kind, frame, routed.data)
            return
        self._deliver(job, kind, frame)

    def final_state(self, job: Job, state: str) -> str:
        """An interrupt of a job past its time limit is the limit's doing: timed_out."""
        if (state == JobState.INTERRUPTED and job.timeout_s and job.started_at is not None
                and self.wall() - job.started_at >= job.timeout_s):
            return JobState.TIMED_OUT
        return state

    # --- outcomes -------------------------------------------------------------------------------
    def _end_with(self, job: Job, kind: str, frame, data: dict) -> None:
        """ComfyUI's final event ``kind`` (its frame, live or replayed) ends the job: the owner
        hears it (after prompt_timed_out, if the time limit did it), then the state is kept."""
        state = self.final_state(job, FINAL_EVENTS[kind])
        if state == JobState.TIMED_OUT:
            self.notify(job, "prompt_timed_out", {"prompt_id": job.job_id, "timeout_s": job.timeout_s})
        self._deliver(job, kind, frame)
        self.move(job, state, outcome_unknown=False, result=data)
        self.metrics.prompts.labels(state).inc()
        log.info("prompt finished user=%s prompt=%s outcome=%s", job.owner, job.job_id, state)

    def end_without_running(self, job: Job, state: str, kind: str, data: dict) -> None:
        """Cancelled or rejected: the owner hears it from us, not from ComfyUI."""
        self.notify(job, kind, data, self._told_callback(job))
        self.move(job, state, outcome_unknown=False, result=data)
        self.metrics.prompts.labels(state).inc()
        log.info("prompt %s user=%s prompt=%s", state, job.owner, job.job_id)

    def finish_from_history(self, job: Job, entry: dict) -> None:
        """ComfyUI's history has the outcome the owner missed: the outputs not yet heard, the
        final event and the end marker, each marked ``replayed``, then the job is finished."""
        job_id = job.job_id
        for node_id, output in (entry.get("outputs") or {}).items():
            if node_id in job.outputs or not isinstance(node_id, str):
                continue
            job.outputs[node_id] = output
            self._deliver(job, "executed", replayed("executed", {
                "node": node_id, "display_node": node_id, "output": output, "prompt_id": job_id}))
        status = entry.get("status") or {}
        final_kind, final_data = None, None
        for item in status.get("messages") or []:
            if isinstance(item, list) and len(item) == 2 and item[0] in FINAL_EVENTS and isinstance(item[1], dict):
                final_kind, final_data = item
        if final_kind is None:
            final_kind = "execution_success" if status.get("status_str") == "success" else "execution_error"
            final_data = {"prompt_id": job_id}
        job.final_seen = True  # the live tail (if any) would repeat what is replayed now
        self._end_with(job, final_kind, replayed(final_kind, final_data), final_data)
        self._publish_frame(job, job.owner, "executing", replayed("executing", {"node": None, "prompt_id": job_id}))

    def owed(self, owner: str) -> list[Job]:
        """The owner's finished jobs whose outcome no live socket took yet, oldest first."""
        return sorted((j for j in self.by_owner.get(owner, {}).values() if j.finished and not j.told),
                      key=lambda j: j.order)

    def deliver_owed(self, owner: str, subscriber: JobSubscriber) -> list[str]:
        """Give ``subscriber`` (a socket that just opened) every outcome its owner is owed:
        outputs, final event, end marker, all marked ``replayed``. Returns their job ids (each
        is told once the socket's kernel has it)."""
        delivered = []
        for job in self.owed(owner):
            job_id = job.job_id
            data = job.result or {"prompt_id": job_id}
            told = self._told_callback(job)
            if job.state == JobState.CANCELLED:
                ok = subscriber.job_notice(job, "prompt_cancelled", {"prompt_id": job_id, "replayed": True}, told)
            elif job.state in (JobState.REJECTED, JobState.LOST):
                ok = subscriber.job_notice(job, "error", {**data, "replayed": True}, told)
            else:
                for node_id, output in job.outputs.items():
                    subscriber.job_frame(job, "executed", replayed("executed", {
                        "node": node_id, "display_node": node_id, "output": output, "prompt_id": job_id}))
                if job.state == JobState.TIMED_OUT:
                    subscriber.job_notice(job, "prompt_timed_out", {"prompt_id": job_id, "timeout_s": job.timeout_s,
                                                                    "replayed": True})
                kind = FINAL_EVENT_OF[job.state]
                ok = subscriber.job_frame(job, kind, replayed(kind, data), told)
                subscriber.job_frame(job, "executing", replayed("executing", {"node": None, "prompt_id": job_id}))
            if ok:
                delivered.append(job_id)
        return delivered

    def summaries(self, owner: str, limit: int) -> list[dict]:
        """At most ``limit`` of the owner's jobs, oldest first: every unfinished one, then the
        newest finished ones (a resume answer stays small whatever the retention holds)."""
        jobs = self.jobs_of(owner)
        unfinished = [j for j in jobs if not j.finished]
        finished = [j for j in jobs if j.finished]
        keep = unfinished + finished[max(0, len(finished) - max(0, limit - len(unfinished))):]
        return [j.summary() for j in sorted(keep, key=lambda j: j.order)[-limit:]]

    def describe(self, owner: str) -> dict:
        states = Counter(j.state for j in self.unfinished(owner))
        return {"prompts_queued": states.get(JobState.QUEUED, 0),
                "prompts_pending": states.get(JobState.PENDING, 0) + states.get(JobState.SUBMITTING, 0),
                "prompts_running": states.get(JobState.RUNNING, 0)}

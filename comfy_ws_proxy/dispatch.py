"""PromptService: submit, queue while ComfyUI is down, drain, cancel, reconcile.

The proxy mints every prompt_id before the POST and records it (store), so:
- events that beat the HTTP response are attributed (PROTOCOL.md 3.7);
- a POST whose outcome is unknown (timeout, broken connection, proxy killed mid-POST) is
  reconciled through GET /history/{id} and GET /queue before it is sent again with the
  same id: ComfyUI never gets a prompt twice, and one that forgot it (restart) gets it again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Callable

from tornado.ioloop import PeriodicCallback

from .backend import Backend, BackendPool, ComfyRejected, ComfyUnavailable
from .breaker import BreakerState
from .metrics import Metrics
from .protocol import Cancel, ErrorCode, ProtocolError, SubmitPrompt
from .session import Session, SessionRegistry
from .store import PromptRecord, PromptState, Store
from .upstream import FINAL_EVENTS

log = logging.getLogger(__name__)

_FINAL_STATE = {"execution_success": PromptState.SUCCESS, "execution_error": PromptState.ERROR,
                "execution_interrupted": PromptState.INTERRUPTED}


class PromptService:
    def __init__(self, registry: SessionRegistry, store: Store, pool: BackendPool, metrics: Metrics, settings,
                 clock: Callable[[], float]):
        self.registry = registry
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self._draining: asyncio.Future | None = None
        self._drain_again = False
        # A safety net (kicks and reconciliations are event-driven): once a second, drain and
        # retry the reconciliations that ComfyUI could not answer.
        self._timer = PeriodicCallback(self._tick, 1000)
        self.needs_reconcile: set[str] = set()  # users whose prompts' fate is still unknown
        self._retry_handle = None
        self._tasks: set[asyncio.Future] = set()  # reconciliations in flight
        self._settled_waiters: list[asyncio.Future] = []  # see wait_settled
        self._stopped = False
        self.ready_timeout = settings.comfy_connect_timeout_ms / 1000
        self.deaf_after = 5.0  # seconds without the status broadcast that must follow a POST
        for backend in pool:
            backend.add_breaker_listener(self._breaker_changed)
            backend.unreachable_listeners.append(lambda since, b=backend: self._backend_unreachable(b, since))

    def start(self) -> None:
        self._timer.start()
        # Sessions for users with prompts left from before a restart: their links carry events.
        for record in self.store.unfinished():
            self.registry.ensure_link(self.registry.session_for(record.user_id))
        self.kick()

    def stop(self) -> None:
        self._timer.stop()
        self._stopped = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for task in [self._draining, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()

    def _tick(self) -> None:
        for user_id in list(self.needs_reconcile):
            session = self.registry.sessions.get(user_id)
            if session is None or session.link is None or not session.link.ready.is_set():
                continue
            self.needs_reconcile.discard(user_id)
            self._spawn(self.reconcile(session))
        self.kick()

    def _reconcile_later(self, user_id: str) -> None:
        """Retry soon (the fate of a prompt is only knowable while ComfyUI keeps its history),
        and again on every tick until ComfyUI answers."""
        self.needs_reconcile.add(user_id)
        if self._retry_handle is None and not self._stopped:
            def retry():
                self._retry_handle = None
                self._tick()
            self._retry_handle = asyncio.get_running_loop().call_later(0.2, retry)

    def _backend_unreachable(self, backend: Backend, since: float) -> None:
        """ComfyUI refused a connection: the sockets it had before are gone too, even if our
        side has not noticed yet. Stop trusting those (not the ones registered since), so no
        prompt is sent to a client id nobody hears."""
        for session in self.registry.all():
            link = session.link
            if session.backend is backend and link is not None and link.registered_at < since:
                link.recycle()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        self._changed()

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.CLOSED:
            for session in self.registry.all():
                if session.link is not None:
                    session.link.wake()
            self.kick()
            self._changed()

    # --- settled --------------------------------------------------------------------------------
    def settled(self) -> bool:
        """True when the proxy has nothing left to find out or to send: every breaker is
        closed, no reconciliation is pending or running, nothing waits in (or is leaving)
        the proxy's queue, no POST's outcome is unknown, and every prompt that ComfyUI holds
        is heard through a registered upstream socket. Until then, a ComfyUI restart can wipe
        a history the proxy still had to read, and the prompt must go again."""
        if self.needs_reconcile or self._tasks or not all(b.available for b in self.pool):
            return False
        for record in self.store.unfinished():
            if record.state not in PromptState.IN_COMFY or record.outcome_unknown:
                return False  # queued or being POSTed, or its fate still to be asked
            session = self.registry.sessions.get(record.user_id)
            link = session.link if session is not None else None
            if link is None or not link.ready.is_set():
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
        """Something settled() depends on moved (a record's state, a reconciliation, the
        breaker, a link): wake the waiters if it holds now. Checked only while someone waits."""
        if self._settled_waiters and self.settled():
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _update(self, record: PromptRecord, state: str, **changes) -> None:
        """Every state change of a record goes through here, so settled() waiters hear of it."""
        self.store.update(record, state, **changes)
        self._changed()

    # --- submit ---------------------------------------------------------------------------------
    async def submit(self, session: Session, msg: SubmitPrompt) -> None:
        now = self.clock()
        wait = session.bucket.take(now)
        if wait:
            self.metrics.prompts.labels("rate_limited").inc()
            raise ProtocolError(ErrorCode.RATE_LIMITED, details={"retry_after": round(wait, 3)})
        prompt_id = msg.prompt_id or str(uuid.uuid4())
        if self.store.get(prompt_id) is not None:
            # Never reveal whose it is; never let a client attach to another user's prompt.
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "prompt_id is already in use", prompt_id=prompt_id)
        if self.store.waiting_count(session.user_id) >= self.settings.max_queued_prompts_per_user:
            self.metrics.prompts.labels("queue_full").inc()
            raise ProtocolError(ErrorCode.QUEUE_FULL, prompt_id=prompt_id)
        payload = {"prompt": msg.prompt, "extra_data": msg.extra_data,
                   "partial_execution_targets": msg.partial_execution_targets, "front": msg.front}
        record = PromptRecord(prompt_id, session.user_id, PromptState.QUEUED, payload,
                              backend=session.backend.name)
        link = session.link
        direct = (session.backend.available and self.store.queued_count(session.user_id) == 0
                  and link is not None and link.ready.is_set())
        if not direct:
            self.store.add(record)
            self._announce_queued(session, record)
            self.kick()
            return
        record.state = PromptState.SUBMITTING
        self.store.add(record)
        log.info("prompt submit user=%s prompt=%s nodes=%d", session.user_id, prompt_id, len(msg.prompt))
        await self._post(session, record, announced=False)

    def _announce_queued(self, session: Session, record: PromptRecord) -> None:
        self.metrics.prompts.labels("queued").inc()
        self.metrics.queued_prompts.set(sum(self.store.queue_sizes().values()))
        log.info("prompt queued user=%s prompt=%s", record.user_id, record.prompt_id)
        session.send("prompt_accepted", {"prompt_id": record.prompt_id, "number": None, "node_errors": {},
                                         "queued": True})

    async def _post(self, session: Session, record: PromptRecord, *, announced: bool = True,
                    resubmitted: bool = False) -> bool:
        """POST one prompt. True when ComfyUI answered (accepted or rejected), False when it
        is unavailable (the prompt is back in the queue; its owner is told once)."""
        payload = record.payload or {}
        body = {"prompt": payload.get("prompt"), "client_id": session.client_id, "prompt_id": record.prompt_id}
        for key in ("extra_data", "partial_execution_targets"):
            if payload.get(key) is not None:
                body[key] = payload[key]
        if payload.get("front"):
            body["front"] = True
        record.attempts += 1
        session.hold(record.prompt_id)
        try:
            return await self._post_held(session, record, body, announced, resubmitted)
        finally:
            session.release(record.prompt_id)  # whatever happened, held events go out (after our reply)

    async def _post_held(self, session: Session, record: PromptRecord, body: dict, announced: bool,
                         resubmitted: bool) -> bool:
        started = self.clock()
        sent_at = asyncio.get_running_loop().time()  # the link's status times are loop times
        try:
            result = await session.backend.submit_prompt(body)
        except ComfyRejected as e:
            self.metrics.comfy_duration.labels(session.backend.name, "rejected").observe(self.clock() - started)
            self._rejected(session, record, e)
            return True
        except ComfyUnavailable as e:
            self.metrics.comfy_duration.labels(session.backend.name, "unavailable").observe(self.clock() - started)
            if record.state == PromptState.SUBMITTING:
                self._update(record, PromptState.QUEUED,
                             outcome_unknown=record.outcome_unknown or e.outcome_unknown)
                if not announced:
                    self._announce_queued(session, record)
            else:
                # Its events arrived while the POST hung: ComfyUI has it, whatever the POST says.
                session.send("prompt_accepted", {"prompt_id": record.prompt_id, "number": record.number,
                                                 "node_errors": {}, "queued": False, "reconciled": True})
            log.warning("prompt POST failed user=%s prompt=%s reason=%s outcome_unknown=%s",
                        record.user_id, record.prompt_id, e.reason, e.outcome_unknown)
            return False
        self.metrics.comfy_duration.labels(session.backend.name, "ok").observe(self.clock() - started)
        number = result.get("number")
        if record.state == PromptState.SUBMITTING:  # events may already have moved it on
            self._update(record, PromptState.PENDING, number=number, outcome_unknown=False)
        else:
            record.number = number
        self.metrics.prompts.labels("accepted").inc()
        data = {"prompt_id": record.prompt_id, "number": number, "node_errors": result.get("node_errors", {}),
                "queued": False}
        if resubmitted:
            data["resubmitted"] = True
            self.metrics.prompts.labels("resubmitted").inc()
        log.info("prompt accepted user=%s prompt=%s number=%s resubmitted=%s", record.user_id, record.prompt_id,
                 number, resubmitted)
        session.send("prompt_accepted", data)
        self._expect_status(session, sent_at)
        return True

    def _expect_status(self, session: Session, since: float) -> None:
        """ComfyUI broadcasts a status to every socket when its queue changes. If our socket
        saw none after an accepted POST, ComfyUI no longer routes to it (a reused client id
        evicts silently, PROTOCOL.md 3.2): recycle the socket; the reconnect reconciles."""
        link = session.link
        if link is None:
            return

        def check() -> None:
            if session.link is link and link.ready.is_set() and link.last_status_at < since:
                log.warning("upstream socket is deaf (no status after a POST) user=%s: reconnecting",
                            session.user_id)
                link.recycle()
        asyncio.get_running_loop().call_later(self.deaf_after, check)

    def _rejected(self, session: Session, record: PromptRecord, e: ComfyRejected) -> None:
        self._update(record, PromptState.REJECTED)
        self.metrics.prompts.labels("rejected").inc()
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error")
        message = "ComfyUI rejected the prompt"
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif e.status != 400:
            message = f"ComfyUI rejected the prompt (HTTP {e.status})"
        data = {"code": ErrorCode.INVALID_PROMPT, "message": message, "prompt_id": record.prompt_id,
                "status": e.status, "error": error, "node_errors": body.get("node_errors", {})}
        log.info("prompt rejected user=%s prompt=%s status=%s", record.user_id, record.prompt_id, e.status)
        session.send("error", data)

    # --- the queue ------------------------------------------------------------------------------
    def kick(self) -> None:
        """Drain the queues soon. Cheap; coalesces while a drain runs."""
        if self._stopped:
            return
        if self._draining is not None:
            self._drain_again = True
            return
        if not self.store.users_with_queued():
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
        """Round-robin across users, one prompt each per round, per-user FIFO."""
        while True:
            users = self.store.users_with_queued()
            if not users:
                return
            progressed = False
            await self._links_up(users)
            for user_id in users:
                record = self.store.queue_head(user_id)
                if record is None:
                    continue
                backend = self.pool.get(record.backend)
                if not backend.available:
                    return
                session = self.registry.session_for(user_id)
                link = self.registry.ensure_link(session)
                if not link.ready.is_set():
                    continue  # its link is (re)connecting; link_up kicks again
                if record.outcome_unknown:
                    where = await self._locate(backend, record.prompt_id)
                    if where is None:
                        return  # ComfyUI went away again
                    if where != "absent":
                        await self._adopt(session, record, where)
                        progressed = True
                        continue
                    record.outcome_unknown = False
                resubmitted = record.attempts > 0
                self.store.rotate(user_id)  # served: to the back of the round-robin
                self._update(record, PromptState.SUBMITTING)
                if not await self._post(session, record, resubmitted=resubmitted):
                    return
                progressed = True
            self.metrics.queued_prompts.set(sum(self.store.queue_sizes().values()))
            if not progressed:
                return

    async def _links_up(self, users: list[str]) -> None:
        """Give the round's users a moment to get their upstream sockets back, so a user whose
        link reconnects a little later is not skipped (fairness), without waiting for long."""
        waits = []
        for user_id in users:
            link = self.registry.ensure_link(self.registry.session_for(user_id))
            if not link.ready.is_set():
                link.wake()
                waits.append(asyncio.ensure_future(link.ready.wait()))
        if waits:
            await asyncio.wait(waits, timeout=min(1.0, self.ready_timeout))
            for w in waits:
                w.cancel()

    # --- reconcile ------------------------------------------------------------------------------
    async def _locate(self, backend: Backend, prompt_id: str) -> str | None:
        """Where ComfyUI has this prompt: 'history', 'running', 'pending' or 'absent';
        None when ComfyUI cannot be asked."""
        try:
            history = await backend.history(prompt_id)
            if prompt_id in history:
                return "history"
            queue = await backend.queue()
        except (ComfyUnavailable, ComfyRejected):
            return None
        if prompt_id in _ids(queue.get("queue_running")):
            return "running"
        if prompt_id in _ids(queue.get("queue_pending")):
            return "pending"
        # Between the two calls it may have finished: look once more.
        try:
            history = await backend.history(prompt_id)
        except (ComfyUnavailable, ComfyRejected):
            return None
        return "history" if prompt_id in history else "absent"

    async def _adopt(self, session: Session, record: PromptRecord, where: str) -> None:
        """ComfyUI has the prompt after all: take its state, never resubmit."""
        if where == "history":
            await self._deliver_history(session, record)
            return
        state = PromptState.RUNNING if where == "running" else PromptState.PENDING
        self._update(record, state, outcome_unknown=False)
        session.send("prompt_accepted", {"prompt_id": record.prompt_id, "number": record.number,
                                         "node_errors": {}, "queued": False, "reconciled": True})

    async def reconcile(self, session: Session) -> None:
        """After an upstream reconnect: what happened to this user's prompts while we were away?"""
        records = [r for r in self.store.unfinished(session.user_id) if r.state in PromptState.IN_COMFY]
        for record in records:
            backend = self.pool.get(record.backend)
            where = await self._locate(backend, record.prompt_id)
            if record.finished:
                continue
            if where is None:
                self._reconcile_later(session.user_id)  # ComfyUI could not say: ask again soon
                continue
            if where == "history":
                await self._deliver_history(session, record)
            elif where == "absent":
                # ComfyUI restarted and forgot it: it goes again, with the same id.
                log.warning("prompt lost by ComfyUI, requeued user=%s prompt=%s", record.user_id, record.prompt_id)
                self._update(record, PromptState.QUEUED, outcome_unknown=False)
            elif where == "running" and record.state != PromptState.RUNNING:
                self._update(record, PromptState.RUNNING)
        self.kick()

    async def _deliver_history(self, session: Session, record: PromptRecord) -> None:
        """Send the owner what it missed: the outputs and the final outcome, from history."""
        try:
            entry = (await self.pool.get(record.backend).history(record.prompt_id)).get(record.prompt_id)
        except (ComfyUnavailable, ComfyRejected):
            self._reconcile_later(session.user_id)
            return
        if not isinstance(entry, dict) or record.finished:
            return
        prompt_id = record.prompt_id
        outputs = entry.get("outputs") or {}
        for node_id, output in outputs.items():
            session.forward_json("executed", json.dumps(
                {"type": "executed", "data": {"node": node_id, "display_node": node_id, "output": output,
                                              "prompt_id": prompt_id}, "replayed": True}))
        status = entry.get("status") or {}
        final_kind, final_data = None, None
        for item in status.get("messages") or []:
            if isinstance(item, list) and len(item) == 2 and item[0] in FINAL_EVENTS:
                final_kind, final_data = item
        if final_kind is None:
            final_kind = "execution_success" if status.get("status_str") == "success" else "execution_error"
            final_data = {"prompt_id": prompt_id}
        session.forward_json(final_kind, json.dumps({"type": final_kind, "data": final_data, "replayed": True}))
        self._finish(session, record, _FINAL_STATE[final_kind])
        session.forward_json("executing", json.dumps(
            {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}, "replayed": True}))

    def on_link_up(self, session: Session, reconnected: bool) -> None:
        # After a reconnect, or a proxy restart, events of prompts in ComfyUI may have been missed.
        if any(r.state in PromptState.IN_COMFY for r in self.store.unfinished(session.user_id)):
            self._spawn(self.reconcile(session))
        else:
            self.kick()
        self._changed()

    # --- events from ComfyUI ---------------------------------------------------------------------
    def on_event(self, session: Session, kind: str, data: dict, prompt_id: str | None) -> None:
        record = self.store.get(prompt_id) if prompt_id else None
        if record is None or record.finished:
            return
        if kind == "execution_start" and record.state != PromptState.RUNNING:
            self._update(record, PromptState.RUNNING, outcome_unknown=False)
            log.info("prompt running user=%s prompt=%s", record.user_id, record.prompt_id)
        elif kind in _FINAL_STATE:
            self._finish(session, record, _FINAL_STATE[kind])

    def _finish(self, session: Session, record: PromptRecord, state: str) -> None:
        self._update(record, state, outcome_unknown=False)
        self.metrics.prompts.labels(state).inc()
        log.info("prompt finished user=%s prompt=%s outcome=%s", record.user_id, record.prompt_id, state)
        if not session.connections:
            asyncio.get_running_loop().call_soon(self.registry.maybe_release_link, session)

    # --- cancel ---------------------------------------------------------------------------------
    async def cancel(self, session: Session, msg: Cancel) -> None:
        record = self.store.get(msg.prompt_id)
        if record is None or record.user_id != session.user_id:
            # The same answer whether it does not exist or is someone else's.
            raise ProtocolError(ErrorCode.NOT_FOUND, prompt_id=msg.prompt_id)
        if record.finished:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"Prompt already {record.state}",
                                prompt_id=record.prompt_id)
        backend = self.pool.get(record.backend)
        if record.state == PromptState.QUEUED:
            self._update(record, PromptState.CANCELLED)
            self._cancelled(session, record)
            return
        try:
            if record.state == PromptState.RUNNING:
                await backend.interrupt(record.prompt_id)  # never a global interrupt
                return  # execution_interrupted follows from ComfyUI
            await backend.delete_queued(record.prompt_id)
            where = await self._locate(backend, record.prompt_id)
            if where == "running":
                await backend.interrupt(record.prompt_id)
                return
        except (ComfyUnavailable, ComfyRejected):
            raise ProtocolError(ErrorCode.COMFY_UNAVAILABLE, prompt_id=record.prompt_id) from None
        if where == "absent" and not record.finished:
            self._update(record, PromptState.CANCELLED)
            self._cancelled(session, record)

    def _cancelled(self, session: Session, record: PromptRecord) -> None:
        self.metrics.prompts.labels("cancelled").inc()
        log.info("prompt cancelled user=%s prompt=%s", record.user_id, record.prompt_id)
        session.send("prompt_cancelled", {"prompt_id": record.prompt_id})


def _ids(items) -> set[str]:
    """Prompt ids of /queue items ([number, prompt_id, prompt, extra_data, outputs])."""
    ids = set()
    for item in items or []:
        if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str):
            ids.add(item[1])
    return ids

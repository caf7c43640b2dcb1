"""The vocabulary shared by every layer: a Job and its states, ComfyUI's final events, the
request to submit one, and the one error type with its stable codes.

A job is one ComfyUI prompt owned by one user, from submission to outcome. Its id is the
ComfyUI prompt_id (minted by the proxy before the POST, PROTOCOL.md 3.7).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class JobState:
    QUEUED = "queued"          # waiting in the proxy's own queue (no backend free, or ComfyUI down)
    SUBMITTING = "submitting"  # POST /prompt in flight; after a crash, the outcome is unknown
    PENDING = "pending"        # accepted by ComfyUI, waiting in its queue
    RUNNING = "running"        # ComfyUI is executing it
    SUCCESS = "success"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed_out"    # past its execution time limit: interrupted by the proxy
    CANCELLED = "cancelled"    # removed before it ran
    REJECTED = "rejected"      # ComfyUI refused it (HTTP 4xx)
    LOST = "lost"              # ComfyUI lost it after it may have run unheard (RESUBMIT_UNKNOWN=false)
    WAITING = "waiting"        # an identical job runs now: waits for its result (the result cache)

    UNFINISHED = frozenset({QUEUED, SUBMITTING, PENDING, RUNNING, WAITING})
    IN_COMFY = frozenset({PENDING, RUNNING})


# ComfyUI's final events and the state each one ends a job in (PROTOCOL.md 3.5).
FINAL_EVENTS = {"execution_success": JobState.SUCCESS, "execution_error": JobState.ERROR,
                "execution_interrupted": JobState.INTERRUPTED}
# ...and back: the event that tells an owner a job ended in that state.
FINAL_EVENT_OF = {JobState.SUCCESS: "execution_success", JobState.ERROR: "execution_error",
                  JobState.INTERRUPTED: "execution_interrupted", JobState.TIMED_OUT: "execution_interrupted"}


@dataclass
class Job:
    """One prompt's durable record (the store's row) plus what only this process needs."""
    job_id: str
    owner: str
    state: str
    payload: dict | None  # {prompt, extra_data, partial_execution_targets, front}; dropped when finished
    created_at: float = field(default_factory=time.time)  # wall clock: rows outlive the process
    updated_at: float = field(default_factory=time.time)
    order: int = 0            # FIFO position (per owner) in the proxy's queue
    number: float | None = None  # ComfyUI's queue number once accepted
    attempts: int = 0         # POSTs made (resubmissions after a ComfyUI restart count)
    outcome_unknown: bool = False  # a POST timed out or broke: ask ComfyUI before resubmitting
    backend: str = ""         # the backend it was last sent to ("" before placement)
    started_at: float | None = None   # wall clock of execution_start
    finished_at: float | None = None
    timeout_s: float = 0.0    # execution time limit (0: none)
    outputs: dict = field(default_factory=dict)  # node id -> ComfyUI's "executed" output
    result: dict | None = None  # the final event's data (error details), or the rejection
    told: bool = False        # the final outcome reached one of the owner's live sockets
    webhook_url: str = ""     # where its final outcome is delivered ("" : nowhere)
    template: dict | None = None  # {name, params} of the template it was made from (params resolved)
    # Backends it was moved away from while they could not be asked (FAILOVER_AFTER_S): each may
    # still hold it, so it is deleted or interrupted there when that backend returns, and
    # nothing that backend says about it is delivered.
    fenced: tuple[str, ...] = ()
    cached: bool = False      # answered from the result cache (its files are the proxy's copies)

    # --- this process only (never stored) ---
    gap: bool = field(default=False, compare=False)  # events may have been missed (restart, link drop)
    last_heard: float = field(default=0.0, compare=False)  # monotonic: last frame or answer about it
    holding: bool = field(default=False, compare=False)  # its POST has not answered: frames wait
    held: list = field(default_factory=list, compare=False)  # (kind, frame) waiting for the POST's answer
    final_seen: bool = field(default=False, compare=False)  # a live final arrived while gap was set
    interrupt_sent: bool = field(default=False, compare=False)  # the time limit's interrupt went out
    withdrawn: bool = field(default=False, compare=False)  # cancelled, then seen in ComfyUI: taken out
    answer: Any = field(default=None, compare=False)  # an Idempotency-Key's answer, stored with the job
    outbox: Any = field(default=None, compare=False)  # a WebhookMessage, stored with the final state
    current: tuple | None = field(default=None, compare=False)  # running: (node, step, steps)
    nodes_done: set = field(default_factory=set, compare=False)  # executed or cached nodes
    nodes_total: int | None = field(default=None, compare=False)  # the prompt's size (kept when it is dropped)
    needs: Any = field(default=None, compare=False)  # JobNeeds: what placement looks at (kept when dropped)
    fits: dict = field(default_factory=dict, compare=False)  # backend -> (its fingerprint, why it cannot run it)
    switched_model: bool = field(default=False, compare=False)  # it started on a backend with another model
    queued_since: float = field(default=0.0, compare=False)  # monotonic: when it last entered the queue
    declined_since: float = field(default=0.0, compare=False)  # monotonic: a free backend first left it

    @property
    def finished(self) -> bool:
        return self.state not in JobState.UNFINISHED

    def summary(self) -> dict:
        return {"prompt_id": self.job_id, "state": self.state, "number": self.number,
                "attempts": self.attempts, "created_at": self.created_at, "updated_at": self.updated_at}


@dataclass(frozen=True)
class SubmitRequest:
    """What a client asks for, whichever face it came through."""
    prompt: dict
    prompt_id: str | None = None
    extra_data: dict | None = None
    partial_execution_targets: list | None = None
    front: bool = False
    timeout_s: float | None = None  # this job's execution time limit (may only lower the option's)
    webhook_url: str | None = None  # where to deliver the outcome (Standard Webhooks)
    template: str | None = None  # a template's name instead of a prompt (rendered by the service)
    params: dict | None = None  # the template's parameters (once rendered: every one, resolved)
    labels: tuple[str, ...] = ()  # backends it may run on must have every one of these
    no_cache: bool = False  # neither answered from nor stored in the result cache

    def payload(self) -> dict:
        payload = {"prompt": self.prompt, "extra_data": self.extra_data,
                   "partial_execution_targets": self.partial_execution_targets, "front": self.front}
        if self.labels:
            payload["labels"] = list(self.labels)
        return payload


@dataclass(frozen=True)
class IdempotentAnswer:
    """The answer recorded for one (owner, Idempotency-Key): replayed for the same request."""
    owner: str
    key: str
    fingerprint: str  # of the request it answered
    status: int
    body: str
    expires_at: float  # wall clock


@dataclass(frozen=True)
class WebhookMessage:
    """One webhook delivery in the outbox: written with the job's final state, sent until a
    2xx (at least once, the same ``message_id`` each time)."""
    message_id: str
    job_id: str
    owner: str
    url: str
    type: str  # job.completed, job.failed, job.cancelled
    body: str  # the exact bytes signed and sent


@dataclass
class CacheEntry:
    """One result in the result cache (jobs/cache.py): the outputs of a prompt that succeeded,
    per node hash, each file named by the content hash of the proxy's own copy."""
    key: str        # the entry key: the prompt's canonical hash with its scope and environment
    scope: str      # "u:<user>" or "shared"
    outputs: dict   # node hash -> ComfyUI's UI output, files as {filename, subfolder, type, sha256, size, ...}
    bytes: int      # the files' total size
    created_at: float  # wall clock
    expires_at: float
    used_at: float


# Our states as the public statuses (the jobs API, webhooks): the seed's five, plus timed_out.
API_STATUS = {JobState.QUEUED: "pending", JobState.SUBMITTING: "pending", JobState.PENDING: "pending",
              JobState.RUNNING: "processing", JobState.SUCCESS: "completed", JobState.ERROR: "failed",
              JobState.REJECTED: "failed", JobState.LOST: "failed", JobState.INTERRUPTED: "cancelled",
              JobState.CANCELLED: "cancelled", JobState.TIMED_OUT: "timed_out",
              JobState.WAITING: "pending"}


class ErrorCode:
    UNAUTHORIZED = "unauthorized"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    COMFY_UNAVAILABLE = "comfy_unavailable"
    QUEUE_FULL = "queue_full"
    INVALID_MESSAGE = "invalid_message"
    INVALID_PROMPT = "invalid_prompt"
    INVALID_PARAMS = "invalid_params"  # a template's parameters break its rules (every one listed)
    UNKNOWN_TEMPLATE = "unknown_template"
    COMFY_ERROR = "comfy_error"  # ComfyUI failed (5xx) on this prompt, again and again
    OUTCOME_UNKNOWN = "outcome_unknown"  # ComfyUI lost it, and it may have run: not sent again
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


# The wording operators already know from other proxies of this kind.
MESSAGES = {
    ErrorCode.TOO_MANY_CONNECTIONS: "Maximum connections per user exceeded",
    ErrorCode.COMFY_UNAVAILABLE: "ComfyUI is temporarily unavailable",
    ErrorCode.QUEUE_FULL: "Queue full",
    ErrorCode.RATE_LIMITED: "Too many prompts, slow down",
    ErrorCode.MESSAGE_TOO_LARGE: "Message too large",
    ErrorCode.NOT_FOUND: "No such prompt",
    ErrorCode.STORE_UNAVAILABLE: "The proxy cannot record new prompts right now; try again shortly",
    ErrorCode.INTERNAL_ERROR: "Internal error",
}


class RequestError(Exception):
    """A request that cannot be served: a stable ``code``, a human ``message``, and the
    request's prompt id when it has one. The WebSocket face sends it as an ``error``
    message; the HTTP face as its JSON error body."""

    def __init__(self, code: str, message: str | None = None, details: Any = None,
                 prompt_id: str | None = None):
        super().__init__(message or MESSAGES.get(code, code))
        self.code = code
        self.message = message or MESSAGES.get(code, code)
        self.details = details
        self.prompt_id = prompt_id

    def to_data(self) -> dict:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            data["details"] = self.details
        if self.prompt_id is not None:
            data["prompt_id"] = self.prompt_id
        return data


def is_canonical_uuid(value: Any) -> bool:
    """A lowercase hyphenated UUID, the only prompt_id form newer ComfyUI accepts."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False

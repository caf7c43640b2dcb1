"""Durable prompt ownership and the per-user queue: SQLite (WAL), write-through.

Reads on the hot path (who owns prompt X? what is queued for user Y?) come from the
in-memory index; SQLite is written on each state change (small, single-row writes) and
read only at start-up, so a SIGKILL loses nothing that was acknowledged to a client.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

log = logging.getLogger(__name__)


class PromptState:
    QUEUED = "queued"          # waiting in the proxy's own queue (ComfyUI down, or backlog)
    SUBMITTING = "submitting"  # POST /prompt in flight; after a crash, the outcome is unknown
    PENDING = "pending"        # accepted by ComfyUI, waiting in its queue
    RUNNING = "running"        # ComfyUI is executing it
    SUCCESS = "success"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"    # removed before it ran
    REJECTED = "rejected"      # ComfyUI refused it (HTTP 4xx)

    UNFINISHED = frozenset({QUEUED, SUBMITTING, PENDING, RUNNING})
    IN_COMFY = frozenset({PENDING, RUNNING})


@dataclass
class PromptRecord:
    prompt_id: str
    user_id: str
    state: str
    payload: dict | None  # {prompt, extra_data, partial_execution_targets, front}; dropped when finished
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    order: int = 0            # FIFO position within the proxy queue
    number: float | None = None  # ComfyUI's queue number once accepted
    attempts: int = 0         # POSTs made (resubmissions after a ComfyUI restart count)
    outcome_unknown: bool = False  # a POST timed out or broke: reconcile before resubmitting
    backend: str = "default"

    @property
    def finished(self) -> bool:
        return self.state not in PromptState.UNFINISHED

    def summary(self) -> dict:
        return {"prompt_id": self.prompt_id, "state": self.state, "number": self.number,
                "attempts": self.attempts, "created_at": self.created_at, "updated_at": self.updated_at}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ord INTEGER NOT NULL,
    number REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome_unknown INTEGER NOT NULL DEFAULT 0,
    backend TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS prompts_unfinished ON prompts(state, ord);
"""

_COLUMNS = ("prompt_id", "user_id", "state", "payload", "created_at", "updated_at", "ord", "number",
            "attempts", "outcome_unknown", "backend")


class Store:
    """Prompt records by id, with per-user FIFO queues of QUEUED prompts."""

    def __init__(self, path: str):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process kill (SIGKILL); only an OS crash
        # or power loss can drop the last transactions. Keeps each write well under 1 ms.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.records: dict[str, PromptRecord] = {}
        self.by_user: dict[str, dict[str, PromptRecord]] = {}
        self.queues: dict[str, OrderedDict[str, PromptRecord]] = {}
        self._next_order = 1
        self._load()

    def _load(self) -> None:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM prompts ORDER BY ord").fetchall()
        for row in rows:
            (prompt_id, user_id, state, payload, created, updated, order, number, attempts, unknown,
             backend) = row
            record = PromptRecord(prompt_id, user_id, state, json.loads(payload) if payload else None,
                                  created, updated, order, number, attempts, bool(unknown), backend)
            self.records[prompt_id] = record
            self.by_user.setdefault(user_id, {})[prompt_id] = record
            if state == PromptState.SUBMITTING:
                # The proxy died mid-POST: ComfyUI may or may not have it. Reconcile first.
                record.state = PromptState.QUEUED
                record.outcome_unknown = True
                self._write(record)
            if record.state == PromptState.QUEUED:
                self.queues.setdefault(user_id, OrderedDict())[prompt_id] = record
            self._next_order = max(self._next_order, order + 1)

    # --- reads ---------------------------------------------------------------------------------
    def get(self, prompt_id: str) -> PromptRecord | None:
        return self.records.get(prompt_id)

    def owner(self, prompt_id: str) -> str | None:
        record = self.records.get(prompt_id)
        return record.user_id if record is not None else None

    def queued_count(self, user_id: str) -> int:
        queue = self.queues.get(user_id)
        return len(queue) if queue else 0

    def queue_head(self, user_id: str) -> PromptRecord | None:
        queue = self.queues.get(user_id)
        if not queue:
            return None
        return next(iter(queue.values()))

    def rotate(self, user_id: str) -> None:
        """Move a user to the back of the round-robin order (queues keep insertion order)."""
        if user_id in self.queues:
            self.queues[user_id] = self.queues.pop(user_id)

    def users_with_queued(self) -> list[str]:
        return [user for user, queue in self.queues.items() if queue]

    def unfinished(self, user_id: str | None = None) -> list[PromptRecord]:
        records = self.records.values() if user_id is None else self.by_user.get(user_id, {}).values()
        return [r for r in records if not r.finished]

    def waiting_count(self, user_id: str) -> int:
        """Prompts of this user held by the proxy: queued, or taken from the queue for a POST."""
        return sum(1 for r in self.by_user.get(user_id, {}).values()
                   if r.state in (PromptState.QUEUED, PromptState.SUBMITTING))

    def for_user(self, user_id: str) -> Iterable[PromptRecord]:
        return list(self.by_user.get(user_id, {}).values())

    def queue_sizes(self) -> dict[str, int]:
        return {user: len(queue) for user, queue in self.queues.items() if queue}

    # --- writes --------------------------------------------------------------------------------
    def add(self, record: PromptRecord) -> None:
        if record.prompt_id in self.records:
            raise KeyError(record.prompt_id)
        record.order = self._next_order
        self._next_order += 1
        self.records[record.prompt_id] = record
        self.by_user.setdefault(record.user_id, {})[record.prompt_id] = record
        if record.state == PromptState.QUEUED:
            self.queues.setdefault(record.user_id, OrderedDict())[record.prompt_id] = record
        self._write(record)

    def update(self, record: PromptRecord, state: str, **changes) -> None:
        """Move a record to ``state`` (and set fields), keeping the queues in step."""
        was_queued = record.state == PromptState.QUEUED
        record.state = state
        for name, value in changes.items():
            setattr(record, name, value)
        record.updated_at = time.time()
        if record.finished:
            record.payload = None  # the workflow is not needed once it ran; keep rows small
        queue = self.queues.get(record.user_id)
        if was_queued and state != PromptState.QUEUED and queue is not None:
            queue.pop(record.prompt_id, None)
            if not queue:
                del self.queues[record.user_id]
        elif state == PromptState.QUEUED and not was_queued:
            # back into the queue (ComfyUI lost it): ahead of prompts queued later
            queue = self.queues.setdefault(record.user_id, OrderedDict())
            queue[record.prompt_id] = record
            items = sorted(queue.values(), key=lambda r: r.order)
            queue.clear()
            queue.update((r.prompt_id, r) for r in items)
        self._write(record)

    def forget_finished(self, older_than: float) -> int:
        """Drop finished records last changed before ``older_than`` (epoch seconds)."""
        gone = [pid for pid, r in self.records.items() if r.finished and r.updated_at < older_than]
        for pid in gone:
            record = self.records.pop(pid)
            mine = self.by_user.get(record.user_id)
            if mine is not None:
                mine.pop(pid, None)
                if not mine:
                    del self.by_user[record.user_id]
        if gone:  # exactly the rows dropped from memory
            self.db.executemany("DELETE FROM prompts WHERE prompt_id = ?", [(pid,) for pid in gone])
        return len(gone)

    def _write(self, r: PromptRecord) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO prompts ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (r.prompt_id, r.user_id, r.state, json.dumps(r.payload) if r.payload is not None else None,
             r.created_at, r.updated_at, r.order, r.number, r.attempts, int(r.outcome_unknown), r.backend))

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:  # closing twice or after a failed write: nothing left to save
            log.exception("closing the store failed")

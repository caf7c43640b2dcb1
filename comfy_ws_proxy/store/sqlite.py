"""SqliteJobStore: the embedded store (SQLite, WAL), written through on every change.

Each write is one small row, well under a millisecond, so it runs on the IOLoop: a
SIGKILL loses nothing that was acknowledged to a client. Reads happen at start-up only.
A store from the first wave (table ``prompts`` without the later columns) is upgraded in
place.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import uuid
from typing import Iterable

from ..model import CacheEntry, Job, WebhookMessage
from .base import IdempotentAnswer, StoreError

log = logging.getLogger(__name__)

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
    backend TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS prompts_unfinished ON prompts(state, ord);
CREATE TABLE IF NOT EXISTS forgotten_ids (
    prompt_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS idempotency (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    message_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    url TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(state, next_at);
CREATE TABLE IF NOT EXISTS webhook_disabled (
    url TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    outputs TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS client_ids (
    user_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    client_id TEXT NOT NULL,
    PRIMARY KEY (user_id, backend)
);
CREATE TABLE IF NOT EXISTS capabilities (
    backend TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    learned_at REAL NOT NULL
);
"""

# Columns added after the first wave, with the value an older row gets. Rows written before
# outcomes were tracked count as told: their owners were sent them then.
_ADDED = (("started_at", "REAL"), ("finished_at", "REAL"), ("timeout_s", "REAL NOT NULL DEFAULT 0"),
          ("outputs", "TEXT"), ("result", "TEXT"), ("told", "INTEGER NOT NULL DEFAULT 1"),
          ("webhook_url", "TEXT NOT NULL DEFAULT ''"), ("template", "TEXT"), ("fenced", "TEXT NOT NULL DEFAULT ''"),
          ("cached", "INTEGER NOT NULL DEFAULT 0"))

_COLUMNS = ("prompt_id", "user_id", "state", "payload", "created_at", "updated_at", "ord", "number",
            "attempts", "outcome_unknown", "backend", "started_at", "finished_at", "timeout_s", "outputs",
            "result", "told", "webhook_url", "template", "fenced", "cached")
_INSERT = (f"INSERT OR REPLACE INTO prompts ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")


class StoreOpenError(Exception):
    """The store cannot be opened at start-up (a missing folder, a directory, no permission,
    not a database). One line for the operator, naming the path."""


class StoreInUse(StoreOpenError):
    """Another process has this store open: two proxies on one store would each run every
    queued job (a rolling deploy on a shared volume). One line for the operator."""


def _check_path(path: str) -> None:
    """The usual mistakes with a store path, said plainly before SQLite says "unable to open"."""
    if path == ":memory:" or path.startswith("file::memory:"):
        return
    if os.path.isdir(path):
        raise StoreOpenError(f"{path} is a directory; give a file in it, e.g. "
                             f"{os.path.join(path, 'comfy_ws_proxy.sqlite3')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StoreOpenError(f"{path}: the folder {folder} does not exist (create it, or choose another path)")


def _json(value) -> str | None:
    return json.dumps(value, separators=(",", ":")) if value is not None else None


class SqliteJobStore:
    """Jobs by id and the durable client ids, in one SQLite file (':memory:' for tests)."""

    def __init__(self, path: str):
        self.path = path
        _check_path(path)
        self._lock = self._take_lock(path)
        try:
            self._open(path)
        except sqlite3.Error as e:  # e.g. a file that is not a database
            if self._lock is not None:
                self._lock.close()
            raise StoreOpenError(f"{path}: cannot open as an SQLite database: {e}") from None

    def _open(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process kill (SIGKILL); only an OS crash
        # or power loss can drop the last transactions. Keeps each write well under 1 ms.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        present = {row[1] for row in self.db.execute("PRAGMA table_info(prompts)")}
        for name, declaration in _ADDED:
            if name not in present:
                self.db.execute(f"ALTER TABLE prompts ADD COLUMN {name} {declaration}")
        if "user_id" not in {row[1] for row in self.db.execute("PRAGMA table_info(forgotten_ids)")}:
            self.db.execute("ALTER TABLE forgotten_ids ADD COLUMN user_id TEXT NOT NULL DEFAULT ''")
        row = self.db.execute("SELECT MAX(ord) FROM prompts").fetchone()
        self._next_order = (row[0] or 0) + 1

    @staticmethod
    def _take_lock(path: str):
        """An exclusive lock on ``<path>.lock`` for this process's lifetime (the kernel drops
        it when the process dies, SIGKILL included); it names the holder's pid."""
        if path == ":memory:" or path.startswith("file::memory:"):
            return None
        try:
            lock = open(path + ".lock", "a+", encoding="utf-8")
        except OSError as e:
            raise StoreOpenError(f"{path}: cannot create its lock file {path}.lock: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise StoreInUse(f"{path} is in use by another proxy process (pid {holder}); "
                             "give each proxy a store of its own") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        return lock

    def load_jobs(self) -> list[Job]:
        jobs = []
        for row in self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM prompts ORDER BY ord"):
            (job_id, owner, state, payload, created, updated, order, number, attempts, unknown, backend,
             started, finished, timeout_s, outputs, result, told, webhook_url, template, fenced, cached) = row
            jobs.append(Job(job_id, owner, state, json.loads(payload) if payload else None, created, updated,
                            order, number, attempts, bool(unknown), backend or "", started, finished,
                            timeout_s or 0.0, json.loads(outputs) if outputs else {},
                            json.loads(result) if result else None, bool(told), webhook_url or "",
                            template=json.loads(template) if template else None,
                            fenced=tuple(name for name in (fenced or "").split(",") if name), cached=bool(cached)))
        return jobs

    def insert(self, job: Job, answer: "IdempotentAnswer | None" = None) -> None:
        order = self._next_order
        job.order = order
        if answer is None:
            self.save(job)
        else:  # the job and the answer that named it, in one transaction: both or neither
            try:
                with self.db:
                    self.db.execute("BEGIN")
                    self.save(job)
                    self.remember(answer)
            except sqlite3.Error as e:
                raise StoreError(str(e)) from None
        self._next_order = order + 1  # (only once the row is there)

    def remember(self, answer: IdempotentAnswer) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO idempotency (user_id, key, fingerprint, status, body, expires_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (answer.owner, answer.key, answer.fingerprint, answer.status,
                                                          answer.body, answer.expires_at))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def recall(self, owner: str, key: str, now: float) -> IdempotentAnswer | None:
        try:
            row = self.db.execute("SELECT fingerprint, status, body, expires_at FROM idempotency "
                                  "WHERE user_id = ? AND key = ? AND expires_at > ?", (owner, key, now)).fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return IdempotentAnswer(owner, key, *row) if row else None

    def forget_answers(self, now: float) -> None:
        try:
            self.db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def save(self, j: Job) -> None:
        row = (j.job_id, j.owner, j.state, _json(j.payload), j.created_at, j.updated_at, j.order, j.number,
               j.attempts, int(j.outcome_unknown), j.backend, j.started_at, j.finished_at, j.timeout_s,
               _json(j.outputs or None), _json(j.result), int(j.told), j.webhook_url, _json(j.template),
               ",".join(j.fenced), int(j.cached))
        try:
            if j.outbox is None:
                self.db.execute(_INSERT, row)
                return
            m = j.outbox  # the final state and its webhook: both or neither
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(_INSERT, row)
                self.db.execute("INSERT OR IGNORE INTO webhook_outbox (message_id, job_id, user_id, url, type, body, "
                                "next_at) VALUES (?, ?, ?, ?, ?, ?, 0)",
                                (m.message_id, m.job_id, m.owner, m.url, m.type, m.body))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    # --- the webhook outbox ----------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int) -> list[tuple[WebhookMessage, int]]:
        try:
            rows = self.db.execute("SELECT message_id, job_id, user_id, url, type, body, attempts FROM webhook_outbox "
                                   "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                                   (now, limit)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return [(WebhookMessage(*row[:6]), row[6]) for row in rows]

    def webhook_attempted(self, message_id: str, state: str, attempts: int, next_at: float,
                          last_error: str | None) -> None:
        try:
            self.db.execute("UPDATE webhook_outbox SET state = ?, attempts = ?, next_at = ?, last_error = ? "
                            "WHERE message_id = ?", (state, attempts, next_at, last_error, message_id))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def webhooks(self, job_id: str) -> list[dict]:
        try:
            rows = self.db.execute("SELECT message_id, type, state, attempts, next_at, last_error FROM webhook_outbox "
                                   "WHERE job_id = ?", (job_id,)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return [dict(zip(("message_id", "type", "state", "attempts", "next_at", "last_error"), r)) for r in rows]

    def disable_endpoint(self, url: str, at: float) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO webhook_disabled (url, at) VALUES (?, ?)", (url, at))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def endpoint_disabled(self, url: str) -> bool:
        try:
            return self.db.execute("SELECT 1 FROM webhook_disabled WHERE url = ?", (url,)).fetchone() is not None
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def delete(self, job_ids: Iterable[str], owners: dict[str, str] | None = None) -> None:
        """Forget jobs; their ids stay used (see ``id_used``), with whose they were."""
        ids = list(job_ids)
        owners = owners or {}
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("DELETE FROM prompts WHERE prompt_id = ?", [(i,) for i in ids])
                self.db.executemany("INSERT OR IGNORE INTO forgotten_ids (prompt_id, user_id) VALUES (?, ?)",
                                    [(i, owners.get(i, "")) for i in ids])
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def forgotten_owner(self, job_id: str) -> str | None:
        try:
            row = self.db.execute("SELECT user_id FROM forgotten_ids WHERE prompt_id = ?", (job_id,)).fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return row[0] if row else None

    def id_used(self, job_id: str) -> bool:
        try:
            return self.db.execute("SELECT 1 FROM forgotten_ids WHERE prompt_id = ?",
                                   (job_id,)).fetchone() is not None
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    # --- the result cache's index (jobs/cache.py) -------------------------------------------------
    def cache_entries(self) -> list[CacheEntry]:
        try:
            rows = self.db.execute("SELECT key, scope, outputs, bytes, created_at, expires_at, used_at "
                                   "FROM cache_entries ORDER BY used_at").fetchall()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return [CacheEntry(k, scope, json.loads(outputs), size, created, expires, used)
                for k, scope, outputs, size, created, expires, used in rows]

    def cache_put(self, entry: CacheEntry) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO cache_entries (key, scope, outputs, bytes, created_at, "
                            "expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (entry.key, entry.scope, _json(entry.outputs), entry.bytes, entry.created_at,
                             entry.expires_at, entry.used_at))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def cache_used(self, key: str, used_at: float) -> None:
        try:
            self.db.execute("UPDATE cache_entries SET used_at = ? WHERE key = ?", (used_at, key))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def cache_delete(self, keys: Iterable[str]) -> None:
        try:
            self.db.executemany("DELETE FROM cache_entries WHERE key = ?", [(k,) for k in keys])
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def client_id(self, owner: str, backend: str) -> str:
        try:
            row = self.db.execute("SELECT client_id FROM client_ids WHERE user_id = ? AND backend = ?",
                                  (owner, backend)).fetchone()
            if row is not None:
                return row[0]
            client_id = str(uuid.uuid4())  # private: never shown to any client
            self.db.execute("INSERT INTO client_ids (user_id, backend, client_id) VALUES (?, ?, ?)",
                            (owner, backend, client_id))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return client_id

    def capabilities(self) -> dict[str, tuple[str, float]]:
        try:
            return {name: (body, learned_at) for name, body, learned_at in
                    self.db.execute("SELECT backend, body, learned_at FROM capabilities")}
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def save_capabilities(self, backend: str, body: str, learned_at: float) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO capabilities (backend, body, learned_at) VALUES (?, ?, ?)",
                            (backend, body, learned_at))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None

    def secret(self, name: str) -> bytes:
        try:
            row = self.db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return bytes(row[0])
            value = os.urandom(32)
            self.db.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (name, value))
        except sqlite3.Error as e:
            raise StoreError(str(e)) from None
        return value

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:  # closing twice or after a failed write: nothing left to save
            log.exception("closing the store failed")
        if self._lock is not None:
            self._lock.close()  # (releases the lock)
            self._lock = None

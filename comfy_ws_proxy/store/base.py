"""The narrow interface between the domain and whatever keeps its state durable.

Rows are written through, one small write per change; reads happen once, at start-up
(the tracker keeps the index in memory). Nothing here knows about queues or sockets.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from ..model import CacheEntry, IdempotentAnswer, Job, WebhookMessage


class StoreError(Exception):
    """A write (or read) the store could not do: disk full, I/O error, a lost database."""


class JobStore(Protocol):
    def load_jobs(self) -> list[Job]:
        """Every job, oldest first."""

    def insert(self, job: Job, answer: IdempotentAnswer | None = None) -> None:
        """A new job; its ``order`` is assigned here (monotonic per store). With ``answer``,
        the answer naming it is recorded in the same transaction."""

    def remember(self, answer: IdempotentAnswer) -> None:
        """Record an answer without a job (a refusal that is final)."""

    def recall(self, owner: str, key: str, now: float) -> IdempotentAnswer | None:
        """The unexpired answer recorded for this owner's key."""

    def forget_answers(self, now: float) -> None:
        """Drop the expired answers."""

    def save(self, job: Job) -> None:
        """Write the job's durable fields."""

    def delete(self, job_ids: Iterable[str], owners: dict[str, str] | None = None) -> None:
        """Forget these jobs. Their ids stay used: never reusable, by anyone. ``owners``: whose
        each was (so its owner can be told it expired, and nobody else anything)."""

    def forgotten_owner(self, job_id: str) -> str | None:
        """Whose a forgotten job was ("" if not known), or None if the id was never forgotten."""

    def id_used(self, job_id: str) -> bool:
        """Was this id ever a job's (a forgotten one's)? ComfyUI's history of an id outlives
        our record of it, so a new job under an old id would be served the old owner's files."""

    def client_id(self, owner: str, backend: str) -> str:
        """ComfyUI's client id for this (owner, backend): minted once, the same after any
        restart, so ComfyUI keeps routing a running prompt's events to the new socket."""

    def due_webhooks(self, now: float, limit: int) -> list[tuple[WebhookMessage, int]]:
        """Pending webhook deliveries due by ``now`` (with their attempts so far), oldest first.
        A job's message is written by ``save`` with its final state (``job.outbox``)."""

    def webhook_attempted(self, message_id: str, state: str, attempts: int, next_at: float,
                          last_error: str | None) -> None:
        """Record an attempt: state pending (again at ``next_at``), delivered, failed or disabled."""

    def webhooks(self, job_id: str) -> list[dict]:
        """A job's deliveries and where each stands."""

    def disable_endpoint(self, url: str, at: float) -> None:
        """The receiver answered 410 Gone: nothing more is sent there."""

    def endpoint_disabled(self, url: str) -> bool:
        ...

    def cache_entries(self) -> list[CacheEntry]:
        """The result cache's entries, least recently used first (read once, at start-up)."""

    def cache_put(self, entry: CacheEntry) -> None:
        """Record (or replace) an entry."""

    def cache_used(self, key: str, used_at: float) -> None:
        """An entry answered a request at ``used_at`` (its place in the eviction order)."""

    def cache_delete(self, keys: Iterable[str]) -> None:
        """Forget these entries (expired or evicted)."""

    def capabilities(self) -> dict[str, tuple[str, float]]:
        """Each backend's capabilities as last learned: name -> (their JSON, wall time)."""

    def save_capabilities(self, backend: str, body: str, learned_at: float) -> None:
        """Keep a backend's capabilities (JSON) for after a restart."""

    def secret(self, name: str) -> bytes:
        """A random secret of this deployment, minted once and kept: the same after any
        restart and for every process sharing the store."""

    def close(self) -> None:
        ...

"""The store: what must outlive the process. ``JobStore`` is the interface the domain
uses; ``SqliteJobStore`` (sqlite.py) the embedded default. A shared database implements
the same interface without touching jobs/."""
from .base import IdempotentAnswer, JobStore, StoreError
from .sqlite import SqliteJobStore, StoreInUse, StoreOpenError


def open_store(path: str) -> JobStore:
    return SqliteJobStore(path)


__all__ = ["IdempotentAnswer", "JobStore", "SqliteJobStore", "StoreError", "StoreInUse", "StoreOpenError",
           "open_store"]

"""BackendPool: the ComfyUI servers behind this proxy, and where a job may go now.

Placement is late: the queue asks ``place()`` when it is about to send a job, never at
submit time, so a job waits in the proxy (fairly, with the others) rather than behind a
busy ComfyUI. Today the pool holds one backend; the scheduler that scores several
(capabilities, load, model affinity, speed) plugs in here.
"""
from __future__ import annotations

from typing import Callable, Iterator

from .backend import Backend


class BackendPool:
    def __init__(self, backends: list[Backend], *, queue_depth: int = 0):
        if not backends:
            raise ValueError("at least one backend")
        self.backends = {b.name: b for b in backends}
        self.default = backends[0]
        # Jobs of ours one backend may hold at once (running plus waiting in ComfyUI's own
        # queue); 0: no limit, everything goes to ComfyUI as soon as it can take it.
        self.queue_depth = queue_depth

    def place(self, placed: Callable[[str], int]) -> Backend | None:
        """The backend the next job should go to now, or None if none can take one.
        ``placed(name)``: how many of our jobs that backend holds."""
        for backend in self.backends.values():
            if backend.available and (not self.queue_depth or placed(backend.name) < self.queue_depth):
                return backend
        return None

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends.values())

    def start(self) -> None:
        for b in self:
            b.start()

    def stop(self) -> None:
        for b in self:
            b.stop()

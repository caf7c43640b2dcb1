"""CircuitBreaker: closed / open / half_open as explicit states, pure time math.

The breaker never reads a clock of its own and never sleeps: every method that
depends on time takes ``now`` (seconds from an injected monotonic clock). The
owner (backends.Backend) runs the half-open probe on a PeriodicCallback.
"""
from __future__ import annotations

import enum
import random
from typing import Callable


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive countable failures.

    While open, :meth:`allow` is False until ``open_until``; then one probe may run
    (:meth:`try_begin_probe` moves to half_open). A successful probe or call closes
    the breaker; a failed probe re-opens it for a longer, jittered, capped period.
    """

    def __init__(self, *, failure_threshold: int = 5, open_seconds: float = 5.0,
                 max_open_seconds: float = 60.0, jitter: float = 0.2,
                 rng: Callable[[], float] = random.random,
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None):
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.max_open_seconds = max_open_seconds
        self.jitter = jitter
        self._rng = rng
        # Called with (old, new) on every state change: the backend's log line and metrics,
        # the queue (a closed breaker means: drain now).
        self.listeners: list[Callable[[BreakerState, BreakerState], None]] = [on_change] if on_change else []
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.reopen_count = 0  # failed probes in a row: drives the back-off
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    # --- queries ---------------------------------------------------------------------------
    def allow(self, now: float) -> bool:
        """May a normal call go to the backend now? Only when closed."""
        return self.state is BreakerState.CLOSED

    def probe_due(self, now: float) -> bool:
        return self.state is BreakerState.OPEN and now >= self.open_until

    def open_period(self) -> float:
        """The current open period: doubles per failed probe, capped, with +/- jitter."""
        base = min(self.open_seconds * (2 ** self.reopen_count), self.max_open_seconds)
        spread = base * self.jitter
        return max(0.0, min(self.max_open_seconds, base - spread + 2 * spread * self._rng()))

    # --- events ----------------------------------------------------------------------------
    def record_success(self, now: float) -> None:
        self.consecutive_failures = 0
        self.reopen_count = 0
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED)

    def record_failure(self, now: float) -> None:
        """A countable failure (connect error, timeout, 5xx) of a normal call."""
        if self.state is not BreakerState.CLOSED:
            return  # calls that were already in flight when it opened don't extend it
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.failure_threshold:
            self.reopen_count = 0
            self._open(now)

    def try_begin_probe(self, now: float) -> bool:
        """Start the single half-open probe if one is due. False if not due or one runs."""
        if not self.probe_due(now):
            return False
        self._move(BreakerState.HALF_OPEN)
        return True

    def probe_failed(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.reopen_count += 1
            self._open(now)

    def probe_succeeded(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.record_success(now)

    # --- internals -------------------------------------------------------------------------
    def _open(self, now: float) -> None:
        self.open_until = now + self.open_period()
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        self.transitions.append((old, new))
        for listener in list(self.listeners):
            listener(old, new)

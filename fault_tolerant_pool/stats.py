"""What the pool did: counters written on the connect path only, read as an immutable snapshot."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LastError:
    """The most recent failed connect attempt: its class, SQLSTATE and wall-clock time."""

    error_class: str
    sqlstate: str | None
    at: float
    """Seconds since the epoch (``time.time()``) when the attempt failed."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a fault-tolerant pool, cheap to take (for a health endpoint or a test).

    The counters cover the pool's whole life, across ``engine.dispose()``; the gauges
    (``size`` to ``checked_out``) describe the pool at the moment of the snapshot.
    """

    connects: int
    """Physical connections made (each one after zero or more failed attempts)."""
    attempts: int
    """Connect attempts, successful and failed."""
    failed_attempts: int
    """Attempts that raised."""
    give_ups: int
    """Connects that failed for good (attempts or deadline exhausted, or a permanent error)."""
    last_error: LastError | None
    size: int
    checked_in: int
    checked_out: int
    overflow: int


class ConnectCounters:
    """Mutable totals behind :class:`PoolStats`, touched on the connect path only."""

    __slots__ = ("_lock", "attempts", "connects", "failed_attempts", "give_ups", "last_error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connects = 0
        self.attempts = 0
        self.failed_attempts = 0
        self.give_ups = 0
        self.last_error: LastError | None = None

    def attempt_failed(self, error_class: str, sqlstate: str | None) -> None:
        with self._lock:
            self.attempts += 1
            self.failed_attempts += 1
            self.last_error = LastError(error_class, sqlstate, time.time())

    def connected(self) -> None:
        with self._lock:
            self.attempts += 1
            self.connects += 1

    def gave_up(self) -> None:
        with self._lock:
            self.give_ups += 1

    def snapshot(self, size: int, checked_in: int, checked_out: int, overflow: int) -> PoolStats:
        return PoolStats(
            connects=self.connects,
            attempts=self.attempts,
            failed_attempts=self.failed_attempts,
            give_ups=self.give_ups,
            last_error=self.last_error,
            size=size,
            checked_in=checked_in,
            checked_out=checked_out,
            overflow=overflow,
        )

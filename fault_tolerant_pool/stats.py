"""What the pool did: counters written on the connect path only, read as an immutable snapshot.

Besides the connect path, the counters are touched when credentials are fetched, when a
connection is retired and when a leak is reported; an ordinary checkout or checkin writes nothing
here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .probe import GateFigures

#: Why a pooled connection was closed by the pool before its time: see ``PoolStats.retired_*``.
Retirement = Literal["lifetime", "idle", "liveness", "overflow", "drain"]
#: What a leak report is about (see ``fault_tolerant_pool.leaks``).
LeakKind = Literal["held", "reclaimed", "shutdown"]


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
    credential_fetches: int = 0
    """Times the ``credentials`` provider was asked (a cached answer is not a fetch)."""
    credential_refreshes: int = 0
    """Answers of the provider refused by the server, then dropped and asked again (one per
    refused answer, however many connects it failed)."""
    retired_lifetime: int = 0
    """Connections closed because they reached their ``max_lifetime`` (jittered) deadline."""
    retired_idle: int = 0
    """Connections closed because the pool held more idle ones than it used for ``max_idle``."""
    retired_liveness: int = 0
    """Connections found dead at checkout and replaced before the caller saw them."""
    demotions: int = 0
    """Connections whose server turned read-only since they were made (a demoted writer):
    each one invalidated the pool (see docs/failover.md)."""
    ping_timeouts: int = 0
    """Pings that got no answer within ``ping_timeout``: their connection was cut."""
    connect_state: str = "healthy"
    """``healthy``, ``failing`` (one probe at a time, callers wait for it), ``failing_fast``
    (unreachable for a whole ``retry_deadline``: new connections fail at once) or
    ``recovering`` (a probe succeeded; waiting callers connect a few at a time)."""
    unreachable_since: float | None = None
    """``time.time()`` when connecting began to fail, while it fails; else None."""
    outage_attempts: int = 0
    """Failed attempts of the current (or latest) failure."""
    outages: int = 0
    """Failures that ended (a connect succeeded again after failed attempts)."""
    last_outage: float | None = None
    """Seconds the latest ended failure lasted."""
    fast_failures: int = 0
    """Connects refused at once while failing fast."""
    hedged_attempts: int = 0
    """Connect attempts started beside others presumed held (in flight longer than a login
    normally takes here, e.g. accepted by a proxy that has no server to give them)."""
    waiting: int = 0
    """Callers waiting right now for the probe (and, with ``max_waiting``, for a slot)."""
    rejected_waiting: int = 0
    """Checkouts refused at once because ``max_waiting`` callers were already waiting."""
    retired_overflow: int = 0
    """Connections above ``pool_size`` closed after the pool held them idle ``overflow_idle``."""
    retired_drain: int = 0
    """Connections closed because ``drain()`` (or a shutdown) was called after they were made."""
    leaks: int = 0
    """Checkouts reported as held longer than ``leak_threshold`` (each once)."""
    leaks_reclaimed: int = 0
    """Connections never returned: reclaimed by SQLAlchemy's garbage-collector cleanup."""
    leaks_at_shutdown: int = 0
    """Connections still checked out when a shutdown's timeout ran out (closed, reported)."""
    oldest_checkout_age: float | None = None
    """Seconds the oldest connection now checked out has been out (0.0: none is); None when
    ``leak_threshold`` is off (the pool then keeps no record of its checkouts)."""
    transaction_retries: int = 0
    """Units of work the transaction runner ran again on a connection of this pool (see
    docs/transactions.md)."""
    outcomes_unknown: int = 0
    """Units of work whose COMMIT was cut in flight and whose outcome stayed unknown: the runner
    raised ``TransactionOutcomeUnknown`` (or, for an idempotent one, ran it again)."""
    outcomes_resolved: int = 0
    """Units of work whose COMMIT was cut in flight and whose outcome the runner settled: the
    server said it committed (the run succeeded) or not (it ran again), or it wrote nothing."""


class CounterListener(Protocol):
    """Told of the events that have a metric of their own (the telemetry)."""

    def credentials_refreshed(self) -> None: ...

    def retired(self, reason: str) -> None: ...

    def leaked(self, kind: str) -> None: ...


class ConnectCounters:
    """Mutable totals behind :class:`PoolStats`, touched on the connect path only."""

    __slots__ = (
        "_lock",
        "attempts",
        "connects",
        "credential_fetches",
        "credential_refreshes",
        "demotions",
        "failed_attempts",
        "give_ups",
        "last_error",
        "leaks",
        "listener",
        "outcomes_resolved",
        "outcomes_unknown",
        "ping_timeouts",
        "retired",
        "transaction_retries",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connects = 0
        self.attempts = 0
        self.failed_attempts = 0
        self.give_ups = 0
        self.last_error: LastError | None = None
        self.credential_fetches = 0
        self.credential_refreshes = 0
        self.retired: dict[Retirement, int] = {
            "lifetime": 0, "idle": 0, "liveness": 0, "overflow": 0, "drain": 0,
        }  # fmt: skip
        self.leaks: dict[LeakKind, int] = {"held": 0, "reclaimed": 0, "shutdown": 0}
        self.listener: CounterListener | None = None
        self.demotions = 0
        self.ping_timeouts = 0
        self.transaction_retries = 0
        self.outcomes_unknown = 0
        self.outcomes_resolved = 0

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

    def credentials_fetched(self) -> None:
        with self._lock:
            self.credential_fetches += 1

    def credentials_refreshed(self) -> None:
        with self._lock:
            self.credential_refreshes += 1
        if self.listener is not None:
            self.listener.credentials_refreshed()

    def demoted(self) -> None:
        with self._lock:
            self.demotions += 1

    def ping_timed_out(self) -> None:
        with self._lock:
            self.ping_timeouts += 1

    def transaction_retried(self) -> None:
        with self._lock:
            self.transaction_retries += 1

    def outcome_unknown(self) -> None:
        with self._lock:
            self.outcomes_unknown += 1

    def outcome_resolved(self) -> None:
        with self._lock:
            self.outcomes_resolved += 1

    def retire(self, reason: Retirement) -> None:
        with self._lock:
            self.retired[reason] += 1
        if self.listener is not None:
            self.listener.retired(reason)

    def leaked(self, kind: LeakKind) -> None:
        with self._lock:
            self.leaks[kind] += 1
        if self.listener is not None:
            self.listener.leaked(kind)

    def snapshot(
        self,
        size: int,
        checked_in: int,
        checked_out: int,
        overflow: int,
        gate: GateFigures | None = None,
        oldest_checkout_age: float | None = None,
    ) -> PoolStats:
        stats = PoolStats(
            connects=self.connects,
            attempts=self.attempts,
            failed_attempts=self.failed_attempts,
            give_ups=self.give_ups,
            last_error=self.last_error,
            size=size,
            checked_in=checked_in,
            checked_out=checked_out,
            overflow=overflow,
            credential_fetches=self.credential_fetches,
            credential_refreshes=self.credential_refreshes,
            retired_lifetime=self.retired["lifetime"],
            retired_idle=self.retired["idle"],
            retired_liveness=self.retired["liveness"],
            retired_overflow=self.retired["overflow"],
            demotions=self.demotions,
            ping_timeouts=self.ping_timeouts,
            retired_drain=self.retired["drain"],
            leaks=self.leaks["held"],
            leaks_reclaimed=self.leaks["reclaimed"],
            leaks_at_shutdown=self.leaks["shutdown"],
            oldest_checkout_age=oldest_checkout_age,
            transaction_retries=self.transaction_retries,
            outcomes_unknown=self.outcomes_unknown,
            outcomes_resolved=self.outcomes_resolved,
        )
        if gate is None:
            return stats
        return replace(
            stats,
            connect_state=gate.state,
            unreachable_since=gate.unreachable_since,
            outage_attempts=gate.outage_attempts,
            outages=gate.outages,
            last_outage=gate.last_outage,
            fast_failures=gate.fast_failures,
            hedged_attempts=gate.hedged,
            waiting=gate.waiting,
            rejected_waiting=gate.rejected,
        )

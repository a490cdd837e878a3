"""What a queue pool does with a connection before lending it and when it comes back.

Before lending (checkout): a connection past its lifetime is retired, a dead one is replaced.
On return (checkin): a connection past its lifetime is retired, and one is closed when the pool
has held more idle connections than it used for ``max_idle``. Nothing happens to a connection
while it is checked out. ``drain()`` starts a new generation: a connection made before it is
retired at its next checkout or checkin, whichever comes first (see :mod:`.shutdown`). A
retired or replaced connection leaves its pool slot empty, and
SQLAlchemy's ``get_connection()`` fills it again through the pool's creator, that is through
the retry loop, before the caller sees it.
"""

from __future__ import annotations

import logging
import random as _random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DisconnectionError

from .demotion import DemotionWatch
from .doubt import Doubt
from .lifetime import IdleWindow, LifetimePolicy
from .liveness import LivenessPolicy, probe_for
from .notes import ConnectionNotes, notes_of
from .stats import ConnectCounters, Retirement

if TYPE_CHECKING:
    from .shutdown import PoolClosed

logger = logging.getLogger("fault_tolerant_pool.upkeep")

#: What the pool does with a returned connection.
KEEP, REPLACE, SHRINK = 0, 1, 2
"""KEEP: back into the pool. REPLACE: closed, its empty slot back into the pool (the next
checkout connects again). SHRINK: closed, and the slot given up (the pool holds one fewer)."""


class Upkeep:
    """Lifetime, idle and liveness rules of one pool; clock and random source are injectable."""

    def __init__(
        self,
        lifetime: LifetimePolicy,
        liveness: LivenessPolicy,
        counters: ConnectCounters,
        *,
        dialect: Any = None,
        doubt: Doubt | None = None,
        demotion: DemotionWatch | None = None,
        invalidate_pool: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.lifetime = lifetime
        self.counters = counters
        self.clock = clock
        self.random = random
        self.probing = liveness.check
        self.dialect = dialect
        """What pings an idle connection (None: nothing to ping with, as in a pool built by
        hand around a bare creator; then there is no ping)."""
        self.ping_after = liveness.ping_after if liveness.check and dialect is not None else None
        self.idle = IdleWindow(lifetime.max_idle, clock()) if lifetime.max_idle else None
        self.demotion = demotion
        """Judges what the liveness ping learnt: a server demoted since the connect."""
        self.invalidate_pool = invalidate_pool or _nothing
        """Called when the ping found the server demoted: every connection is replaced."""
        self.doubt = doubt
        """Raised when a dead connection is found: a sign of trouble (see :mod:`.doubt`)."""
        self.generation = 0
        """Bumped by :meth:`drain`; a connection of an older generation is not lent again."""
        self.closed: PoolClosed | None = None
        """Set by :meth:`close`: no checkout is served any more."""

    @classmethod
    def wanted(cls, lifetime: LifetimePolicy, liveness: LivenessPolicy) -> bool:
        """Whether any rule is on (otherwise the pool skips the hooks altogether)."""
        return bool(liveness.check or lifetime.max_lifetime or lifetime.max_idle)

    def connected(self, record: Any, driver_connection: Any) -> None:
        """A physical connection was made for ``record``: draw its deadline, build its probe
        (the stamp in the record's notes, written over the previous connection's)."""
        now = self.clock()
        probe = probe_for(driver_connection) if self.probing else None
        deadline = self.lifetime.deadline(now, self.random)
        notes = notes_of(record)
        notes.deadline = deadline
        notes.last_used = now
        notes.probe = probe
        notes.fresh = True
        notes.generation = self.generation

    def drain(self) -> None:
        """From now on, every connection made before this call is retired instead of lent."""
        self.generation += 1

    def close(self, refusal: PoolClosed) -> None:
        """Drain, and refuse every checkout from now on with ``refusal``."""
        self.closed = refusal
        self.drain()

    def stale(self, record: Any) -> bool:
        """Whether ``record`` holds a connection made before the latest :meth:`drain`."""
        if record.dbapi_connection is None:
            return False
        generation = notes_of(record).generation
        # not stamped: made before this upkeep existed (a drain installs one on a rule-less pool)
        return self.generation != (0 if generation is None else generation)

    def checkout(self, record: Any) -> None:
        """Before lending ``record``'s connection: retire it if expired, replace it if dead.

        A connection made for this very checkout (fresh) is not probed or pinged.
        """
        try:  # every checkout: attribute reads, no call
            notes: ConnectionNotes = record.notes
        except AttributeError:  # a record made by hand, not by the pool: nothing noted yet
            notes = notes_of(record)
        connection = record.dbapi_connection
        # not stamped (generation None), or made before the latest drain: the slow path
        if connection is None or notes.generation != self.generation:
            if self.closed is not None:
                raise self.closed
            if self.stale(record):
                self._retire(record, "drain")
            return
        now = self.clock()
        if now >= notes.deadline:
            self._retire(record, "lifetime")
            return
        if notes.fresh:
            return  # made for this very checkout: no probe, no ping (pool_pre_ping skips it too)
        probe = notes.probe
        if probe is not None and (probe.closed() or probe.readable(0)):
            self._replace(record, "closed by the server, or it sent an error, while idle")
            return
        ping_after = self.ping_after
        idle = now - notes.last_used
        if ping_after is not None and idle > ping_after:
            dialect = self.dialect
            if not _answers_ping(dialect, connection):
                self._replace(record, f"no answer to a ping after {idle:.1f}s idle")
                return
            demotion = self.demotion
            if demotion is not None and demotion.judge(
                notes, dialect.get_driver_connection(connection), signal=False
            ):
                self.invalidate_pool()
                self._replace(record, "its server turned read-only")

    def checkin(self, record: Any, idle: int) -> int:
        """``record`` comes back while ``idle`` others sit in the pool: KEEP, REPLACE or SHRINK.

        The caller closes the connection for REPLACE and SHRINK (see the module docstring).
        """
        try:  # every checkin: attribute reads, no call
            notes: ConnectionNotes = record.notes
        except AttributeError:  # a record made by hand, not by the pool: nothing noted yet
            notes = notes_of(record)
        if record.dbapi_connection is None or notes.generation != self.generation:
            if not self.stale(record):
                return KEEP
            self.counters.retire("drain")
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("retiring a pooled connection at checkin (drain)")
            return REPLACE
        now = self.clock()
        window = self.idle
        shrink = window is not None and window.retire_on_checkin(now, idle)
        reason: Retirement
        if now >= notes.deadline:
            reason = "lifetime"
        elif shrink:
            reason = "idle"
        else:
            notes.last_used = now
            notes.fresh = False
            return KEEP
        self.counters.retire(reason)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("retiring a pooled connection at checkin (%s)", reason)
        return SHRINK if shrink else REPLACE

    def _retire(self, record: Any, reason: Retirement) -> None:
        self.counters.retire(reason)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("retiring a pooled connection at checkout (%s)", reason)
        record.close()

    def _replace(self, record: Any, why: str) -> None:
        self.counters.retire("liveness")
        if self.doubt is not None:
            self.doubt.raised()
        logger.info("replacing a dead pooled connection before checkout: %s", why)
        record.invalidate(DisconnectionError(f"liveness check: {why}"))


def _nothing() -> None:
    pass


def _answers_ping(dialect: Any, connection: Any) -> bool:
    """A real round trip, judged as ``pool_pre_ping`` judges it: False for a disconnect (by
    the dialect's ``is_disconnect`` and any ``handle_error`` listener's verdict); any other
    error is raised to the caller, and the pool gives the slot back, as SQLAlchemy does."""
    return bool(dialect._do_ping_w_event(connection))

"""When a queue pool closes the connections it opened beyond ``pool_size``: once they sat idle.

SQLAlchemy closes a returned overflow connection whenever ``pool_size`` others are idle, so under
steady load with bursts (20 workers on a pool of 5 + 10) every burst of returns closes
connections that the next burst opens again: hundreds of logins a second. Here the pool keeps
up to ``pool_size + max_overflow`` connections idle and closes the ones above ``pool_size`` only
once the pool has held them unused for ``overflow_idle`` seconds.

"Unused for that long" is measured by count, not per connection: a FIFO pool (SQLAlchemy's
default) lends every idle connection in turn, so no single one ever looks idle under light
load. The rule tracks the fewest connections that sat idle in the pool at any moment of a
window of ``overflow_idle`` seconds; that many were not needed through the whole window, and
that many overflow connections (at most) are closed at the following checkins, one per checkin.
Only a checkin adds to the idle count (a checkout, a retirement or ``dispose()`` only take from
it), so the fewest since the previous checkin is the count the next checkin finds: the rule
looks at checkins only, and a checkout pays nothing. A pool that saw no checkin for a whole
window held all the idle connections that a checkin finds unused all along: the checkins after
the quiet close what they return until the pool is back at ``pool_size``. Nothing runs in the
background: a pool that sees no traffic at all keeps its connections until its next checkins.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import ArgumentError

from .policy import _number

#: Seconds an overflow connection may sit idle (see docs/lifetime.md for why 30 s).
DEFAULT_OVERFLOW_IDLE = 30.0

_UNSEEN = sys.maxsize  # no count observed yet in the current window


def overflow_idle_seconds(value: Any) -> float:
    """Validate ``overflow_idle``: seconds, at least 0 (0: SQLAlchemy's rule, close at once)."""
    if value is None:
        raise ArgumentError(
            "overflow_idle must be a number of seconds (0: close overflow connections at "
            "once, as SQLAlchemy does), got None"
        )
    return _number("overflow_idle", value, minimum=0.0, strict=False)


def queue_capacity(pool_size: int, max_overflow: int) -> int:
    """The idle connections a pool keeps (its queue's ``maxsize``; 0: no limit)."""
    return 0 if max_overflow < 0 else pool_size + max_overflow


class OverflowIdle:
    """Tells, at checkin, whether to close the returned connection (one above ``pool_size``);
    the clock is injectable.

    Under threads the counts are approximate: at worst a connection more or fewer is closed,
    and a closed one is opened again on demand.
    """

    __slots__ = ("clock", "closing", "last", "low", "seconds", "started", "surplus", "watching")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        now = clock()
        self.started = now  # the current window began
        self.last = now  # the latest checkin
        self.low = _UNSEEN  # the fewest idle connections seen in the current window
        self.surplus = 0  # connections known to be unneeded, not closed yet
        self.closing = 0  # decided and not closed yet (an async close lets others check in)
        self.watching = True
        """Whether the checkins are being watched. The pool asks :meth:`checkin` only while
        connections above ``pool_size`` are open, and clears this when a checkin finds none:
        the next one with overflow starts a new window (connections opened since then cannot
        have sat idle before they were opened)."""

    def checkin(self, idle: int, overflow: int) -> bool:
        """A connection comes back while ``idle`` others sit in the pool and ``overflow`` are
        open beyond ``pool_size``: close it instead of keeping it?

        One close per checkin at most, paid by the caller returning it, as with SQLAlchemy's
        rule (an asyncpg close waits for the server: closing ten at once made one checkin take
        tens of milliseconds on a loaded machine). At least one idle connection always stays (a
        caller waiting for one is served), and the pool never goes below ``pool_size``, counting
        the closes still under way; the pool reports each finished close with :meth:`closed`.
        """
        now = self.clock()
        seconds = self.seconds
        if not self.watching:  # the first checkin since connections above pool_size opened
            self.watching = True
            self.started = self.last = now
            self.low = _UNSEEN
            self.surplus = 0
        if now - self.last >= seconds:  # no checkin for a whole window: these sat unused
            self.surplus = idle
            self.started = now
            self.low = _UNSEEN
        else:
            if idle < self.low:
                self.low = idle
            if now - self.started >= seconds:  # the fewest idle were not needed in the window
                self.surplus = self.low
                self.started = now
                self.low = _UNSEEN
        self.last = now
        surplus = self.surplus
        if surplus <= 0 or idle <= 0:
            return False
        above = overflow - self.closing  # open beyond pool_size once the closes under way end
        if above <= 0:
            self.surplus = 0
            return False
        self.surplus = min(surplus, above) - 1
        self.closing += 1
        return True

    def closed(self) -> None:
        """A connection :meth:`checkin` chose is closed (or its close failed: it is gone)."""
        if self.closing > 0:
            self.closing -= 1

"""The steps of a checkout and of a checkin, chosen once from the pool's settings.

A pool runs, in order:

- **take** a record: SQLAlchemy's queue get, or, with ``max_waiting``, the same get as one of
  at most ``max_waiting`` waiting callers (:func:`seated`);
- **before lending** it (``lend``): the idle window notes how many sat unused, then the upkeep
  retires a connection past its lifetime or drained, and replaces a dead or demoted one
  (:mod:`.upkeep`); a step that raises leaves the slot given back, as SQLAlchemy does when a
  connect fails;
- **once lent** (``lent``): the leak tracker notes the checkout and its site (:mod:`.leaks`);
- **on checkin** (``checkin``): the leak tracker forgets it, the upkeep retires it (lifetime,
  idle, drain), the overflow rule closes one held beyond ``pool_size`` too long
  (:mod:`.overflow`). A step that closed the record and settled its slot returns True and the
  checkin ends there; otherwise the record goes back to the queue.

Only the steps the settings switched on are in the lists, so a capability that is off costs
nothing, and an empty list one loop test. Measuring (telemetry) stays a single truth test in the
pool's frame: OpenTelemetry's global providers may be set after the engine is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# the stock classes as imported now: SQLAlchemy's own pool suite swaps the names for ours
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.pool.base import ConnectionPoolEntry

from .errors import too_many_waiting
from .upkeep import KEEP, SHRINK

#: The pool a step works on (``Pool`` or ``FaultTolerantNullPool``): typed
#: loosely, so that this module imports neither (the pools import it).
Pool = Any

Take = Callable[[], ConnectionPoolEntry]
Lend = Callable[[ConnectionPoolEntry], None]
Lent = Callable[[Any], None]
Checkin = Callable[[ConnectionPoolEntry], bool]


@dataclass(frozen=True, slots=True)
class Steps:
    """One pool's checkout and checkin, in order (see the module docstring). Two are equal
    when they run the same kinds of step (``kinds``), as a pool and its ``recreate()`` do."""

    kinds: tuple[str, ...]
    take: Take = field(compare=False)
    lend: tuple[Lend, ...] = field(default=(), compare=False)
    lent: tuple[Lent, ...] = field(default=(), compare=False)
    checkin: tuple[Checkin, ...] = field(default=(), compare=False)


def queue_steps(pool: Pool) -> Steps:
    """The steps of a queue pool, from what its settings built (and a drain installed)."""
    kinds = ["queue"]
    take: Take = QueuePool._do_get.__get__(pool)
    room = pool._waiting_room
    if room is not None:
        kinds[0] = "queue, max_waiting"
        take = seated(pool, take, room)
    lend: list[Lend] = []
    lent: list[Lent] = []
    checkin: list[Checkin] = []
    tracker = pool._leaks
    if tracker is not None:
        kinds.append("leaks")
        lent.append(leak_note(tracker))
        checkin.append(leak_forget(tracker))
    upkeep = pool._upkeep
    if upkeep is not None:
        window = upkeep.idle
        queue = pool._pool
        if window is not None:
            kinds.append("idle window")
            lend.append(lambda record: window.observe(queue.qsize()))
        kinds.append("upkeep")
        lend.append(upkeep.checkout)
        checkin.append(upkeep_checkin(pool))
    if pool._overflow_idle is not None:
        kinds.append("overflow")
        checkin.append(overflow_checkin(pool))
    return Steps(tuple(kinds), take, tuple(lend), tuple(lent), tuple(checkin))


def null_steps(pool: Pool) -> Steps:
    """The steps of a pool that keeps no connection: only the leak tracker's, when it is on."""
    lent = pool._lent
    get = NullPool._do_get

    def take() -> ConnectionPoolEntry:
        record = get(pool)
        lent.add(record)  # counted until it comes back (the pool's gauges)
        return record

    tracker = pool._leaks
    if tracker is None:
        return Steps(("new connection",), take)
    kinds = ("new connection", "leaks")
    return Steps(kinds, take, (), (leak_note(tracker),), (leak_forget(tracker),))


def leak_note(tracker: Any) -> Lent:
    """Note the checkout, its holder and its site (see :mod:`.leaks`)."""

    def note(connection: Any) -> None:
        record = connection._connection_record
        # the checkout site's walk starts at SQLAlchemy's caller of the pool's connect()
        tracker.checked_out(record, record.fairy_ref, 3)

    return note


def leak_forget(tracker: Any) -> Checkin:
    def forget(record: ConnectionPoolEntry) -> bool:
        tracker.checked_in(record)
        return False

    return forget


def seated(pool: Pool, take: Take, room: Any) -> Take:
    """``take`` as one of at most ``max_waiting`` callers waiting for a slot, or fail at once
    (only when the checkout must wait: an idle connection or a free slot is taken directly)."""

    def take_seated() -> ConnectionPoolEntry:
        if not pool._would_wait():
            return take()
        if not room.join():
            raise too_many_waiting(room.limit or 0, "a connection slot")
        try:
            return take()
        finally:
            room.leave()

    return take_seated


def upkeep_checkin(pool: Pool) -> Checkin:
    """Lifetime, idle and drain at checkin: KEEP goes on; otherwise the record is closed and
    its slot goes back, or is given up (SHRINK) while others are idle."""
    upkeep = pool._upkeep
    assert upkeep is not None
    queue = pool._pool
    give_back = QueuePool._do_return_conn

    def retire(record: ConnectionPoolEntry) -> bool:
        action = upkeep.checkin(record, queue.qsize() if upkeep.idle is not None else 0)
        if action == KEEP:
            return False
        try:
            record.close()
        finally:
            # give the slot up only while others are idle (after an async close too): a getter
            # waiting on an empty queue is woken by a put, the empty record
            if action == SHRINK and queue.qsize() > 0:
                pool._dec_overflow()
            else:
                give_back(pool, record)
        return True

    return retire


def overflow_checkin(pool: Pool) -> Checkin:
    """Close a connection held beyond ``pool_size`` unneeded for ``overflow_idle``."""
    rule = pool._overflow_idle
    assert rule is not None
    idle_now = pool._idle_now
    retire = pool._fault_tolerance.counters.retire

    def shed(record: ConnectionPoolEntry) -> bool:
        if pool._overflow > 0:  # connections above pool_size are open: the rule judges
            if rule.checkin(idle_now(), pool._overflow):
                try:
                    record.close()
                finally:
                    pool._dec_overflow()
                    rule.closed()
                    retire("overflow")
                return True
        elif rule.watching:  # none above pool_size: nothing to judge, no call per checkin
            rule.watching = False
        return False

    return shed

"""When overflow connections are closed: the rule alone (injected clock), then a pool's numbers.

The pool-level tests use a DBAPI stand-in (no database): they check SQLAlchemy's counters
(``size()``, ``checkedin()``, ``overflow()``, ``checkedout()``) while the pool keeps overflow.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.overflow import (
    DEFAULT_OVERFLOW_IDLE,
    OverflowIdle,
    overflow_idle_seconds,
    queue_capacity,
)

from .fakes import Clock


def closes(rule: OverflowIdle, idle: int, overflow: int) -> bool:
    """A checkin finding ``idle`` others in the pool; a close it asks for is done at once."""
    close = rule.checkin(idle, overflow)
    if close:
        rule.closed()
    return close


def test_nothing_closes_before_a_whole_window() -> None:
    clock = Clock()
    rule = OverflowIdle(30.0, clock=clock)
    for _ in range(290):  # 29 s of light traffic: 14 of 15 always idle
        clock.now += 0.1
        assert not closes(rule, 14, overflow=10)


def test_connections_idle_through_a_window_are_closed_down_to_the_peak() -> None:
    clock = Clock()
    rule = OverflowIdle(10.0, clock=clock)
    closed, open_ = 0, 15  # at most 3 in use at once: 12 idle throughout
    for _ in range(200):
        clock.now += 0.1
        for in_use in (3, 2, 1):  # three requests come back, one after the other
            if closes(rule, open_ - in_use, overflow=open_ - 5):
                closed += 1
                open_ -= 1
    # 12 were idle through the first window; only the 10 above pool_size may close, one per
    # checkin
    assert closed == 10 and open_ == 5


def test_steady_load_that_uses_every_connection_closes_none() -> None:
    clock, draw = Clock(), random.Random(7).random
    rule = OverflowIdle(5.0, clock=clock)
    for step in range(20_000):  # 200 s; every second or so all 15 are in use at once
        clock.now += 0.01
        idle = 0 if step % 97 == 0 else int(draw() * 14)
        assert not rule.checkin(idle, overflow=10)


def test_a_pool_quiet_for_a_window_shrinks_to_pool_size_at_the_next_checkins() -> None:
    clock = Clock()
    rule = OverflowIdle(30.0, clock=clock)
    assert not rule.checkin(0, overflow=10)  # busy: nothing idle
    clock.now += 30.0  # no traffic at all, then requests one at a time
    overflow = 10
    for idle in range(14, 4, -1):  # each checkin closes its connection
        clock.now += 0.002
        assert closes(rule, idle, overflow)
        overflow -= 1
    clock.now += 0.01
    assert not closes(rule, 4, overflow)  # back at pool_size: kept


def test_at_least_one_idle_connection_stays() -> None:
    clock = Clock()
    rule = OverflowIdle(1.0, clock=clock)
    rule.checkin(4, overflow=10)
    clock.now += 1.0
    assert closes(rule, 4, overflow=10)  # quiet: 4 sat unused; the returned one is closed
    assert not closes(rule, 0, overflow=9)  # none idle: a waiter may want the returned one
    assert closes(rule, 1, overflow=9)  # the returned one; the idle one stays
    assert closes(rule, 3, overflow=8)
    assert closes(rule, 3, overflow=7)
    assert not closes(rule, 3, overflow=6)  # the 4 are closed, never more


def test_never_below_pool_size() -> None:
    clock = Clock()
    rule = OverflowIdle(1.0, clock=clock)
    clock.now += 5.0
    assert closes(rule, 7, overflow=2)
    assert closes(rule, 6, overflow=1)
    assert not closes(rule, 5, overflow=0)


def test_closes_under_way_count_against_the_overflow() -> None:
    """An async close lets other checkins run before the pool's overflow count drops."""
    clock = Clock()
    rule = OverflowIdle(1.0, clock=clock)
    clock.now += 2.0
    assert rule.checkin(12, overflow=2)  # quiet: 12 surplus; being closed, overflow still 2
    assert rule.checkin(11, overflow=2)  # another task meanwhile: the second one
    assert not rule.checkin(10, overflow=2)  # a third: none left above pool_size
    rule.closed()
    rule.closed()
    assert not rule.checkin(10, overflow=0)


def test_what_is_left_of_a_budget_never_reaches_below_pool_size_later() -> None:
    clock = Clock()
    rule = OverflowIdle(10.0, clock=clock)
    clock.now += 10.0
    overflow = 10
    for idle in range(15, 5, -1):  # quiet: 15 surplus, 10 above pool_size
        clock.now += 0.001
        assert closes(rule, idle, overflow)
        overflow -= 1
    for idle in range(3, 6):  # a burst opened 3 again, within the same window
        clock.now += 0.01
        assert not closes(rule, idle, overflow=3)  # the quiet's budget was spent


def test_the_budget_is_redrawn_each_window() -> None:
    clock = Clock()
    rule = OverflowIdle(1.0, clock=clock)
    clock.now += 1.5
    assert closes(rule, 6, overflow=10)  # quiet: 6 surplus
    clock.now += 0.1
    assert closes(rule, 1, overflow=9)
    clock.now += 1.0  # the window ends: the fewest idle in it was 1
    assert closes(rule, 1, overflow=8)
    assert not closes(rule, 1, overflow=7)  # that one is spent
    clock.now += 1.0  # a window in which none was idle at some moment
    assert not closes(rule, 0, overflow=7)
    clock.now += 0.95
    assert not closes(rule, 2, overflow=7)
    clock.now += 0.1  # a window in which 2 were idle throughout
    assert closes(rule, 2, overflow=7)


@pytest.mark.parametrize(
    ("value", "seconds"), [(0, 0.0), ("0", 0.0), (30, 30.0), ("2.5", 2.5), (0.1, 0.1)]
)
def test_valid_settings(value: Any, seconds: float) -> None:
    assert overflow_idle_seconds(value) == seconds


@pytest.mark.parametrize("value", [-1, "abc", None, float("inf"), True, "nan"])
def test_bad_settings_name_the_parameter(value: Any) -> None:
    with pytest.raises(ArgumentError, match="overflow_idle"):
        overflow_idle_seconds(value)


def test_bad_settings_are_refused_at_engine_creation() -> None:
    import sqlalchemy as sa

    with pytest.raises(ArgumentError, match="overflow_idle must be at least 0, got -2"):
        sa.create_engine(
            "postgresql+psycopg://u:pw@db/app", poolclass=FaultTolerantQueuePool, overflow_idle=-2
        )


def test_queue_capacity() -> None:
    assert queue_capacity(5, 10) == 15
    assert queue_capacity(5, 0) == 5
    assert queue_capacity(5, -1) == 0  # no limit


# -- a pool's numbers (a DBAPI stand-in, no database) ---------------------------------------------


class FakeConnection:
    closed = 0

    def close(self) -> None:
        FakeConnection.closed += 1

    def rollback(self) -> None:
        pass


def make_pool(**kw: Any) -> tuple[Any, Clock]:
    FakeConnection.closed = 0
    pool: Any = FaultTolerantQueuePool(
        FakeConnection, pool_size=5, max_overflow=10, liveness_check=False, **kw
    )
    clock = Clock()
    if pool._overflow_idle is not None:
        pool._overflow_idle = OverflowIdle(pool._overflow_idle.seconds, clock=clock)
        pool._steps = pool._build_steps()  # the checkin steps hold the rule they were built with
    return pool, clock


def numbers(pool: Any) -> tuple[int, int, int, int]:
    return pool.size(), pool.checkedin(), pool.overflow(), pool.checkedout()


def test_overflow_is_kept_idle_and_the_counters_stay_true() -> None:
    pool, clock = make_pool()
    held = [pool.connect() for _ in range(15)]
    assert numbers(pool) == (5, 0, 10, 15)
    for connection in held:
        connection.close()
    assert numbers(pool) == (5, 15, 10, 0)  # all 15 kept, none closed
    assert FakeConnection.closed == 0
    assert pool.stats().size == 5 and pool.stats().checked_in == 15
    assert pool._limits() == (15, 15)
    # a quiet window, then requests one at a time: each returned connection is closed
    clock.now += DEFAULT_OVERFLOW_IDLE
    pool.connect().close()
    assert numbers(pool) == (5, 14, 9, 0)
    for _ in range(12):
        pool.connect().close()
    assert numbers(pool) == (5, 5, 0, 0)  # back to pool_size, and no further
    assert FakeConnection.closed == 10
    assert pool.stats().retired_overflow == 10
    # overflow opens again on demand, up to the limit
    held = [pool.connect() for _ in range(15)]
    assert numbers(pool) == (5, 0, 10, 15)
    for connection in held:
        connection.close()
    pool.dispose()
    assert numbers(pool) == (5, 0, -5, 0)


def test_overflow_idle_zero_is_sqlalchemys_rule() -> None:
    pool, _ = make_pool(overflow_idle=0)
    assert pool._overflow_idle is None and pool._pool.maxsize == 5
    held = [pool.connect() for _ in range(15)]
    for connection in held:
        connection.close()
    assert numbers(pool) == (5, 5, 0, 0)
    assert FakeConnection.closed == 10
    assert pool.stats().retired_overflow == 0  # SQLAlchemy's own closes are not retirements
    assert pool._limits() == (15, 5)


def test_recreate_keeps_the_setting_and_the_size() -> None:
    pool, _ = make_pool(overflow_idle=7)
    again: Any = pool.recreate()
    assert (again.size(), again._max_overflow, again._pool.maxsize) == (5, 10, 15)
    assert again._overflow_idle is not None and again._overflow_idle.seconds == 7.0


def test_unlimited_overflow_and_pool_size_zero() -> None:
    unlimited: Any = FaultTolerantQueuePool(FakeConnection, pool_size=2, max_overflow=-1)
    assert unlimited._pool.maxsize == 0 and unlimited._limits() == (None, None)
    held = [unlimited.connect() for _ in range(6)]
    for connection in held:
        connection.close()
    assert (unlimited.size(), unlimited.checkedin(), unlimited.overflow()) == (2, 6, 4)
    # pool_size=0 is SQLAlchemy's "no limit" (it keeps every connection): left as it is
    no_limit: Any = FaultTolerantQueuePool(FakeConnection, pool_size=0)
    assert no_limit._overflow_idle is None and no_limit.size() == 0


def test_a_window_starts_when_connections_above_pool_size_open() -> None:
    """The pool asks the rule only while connections above pool_size are open; a checkin with
    none clears ``watching``, and the next one with overflow starts a fresh window: the quiet
    before the overflow opened is not idleness of connections that did not exist."""
    clock = Clock()
    rule = OverflowIdle(1.0, clock=clock)
    assert not closes(rule, 3, overflow=1)
    rule.watching = False  # checkins went on with no overflow (the pool skips the rule)...
    clock.now += 5.0  # ...for longer than a window; then a burst opened two above pool_size
    assert not closes(rule, 4, overflow=2)  # a new window: nothing closed at once
    clock.now += 0.5
    assert not closes(rule, 2, overflow=2)
    clock.now += 0.6  # the window of 1 s since the overflow opened is over: 2 sat unused
    assert closes(rule, 3, overflow=2)
    assert rule.watching

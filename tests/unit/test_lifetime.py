"""Lifetime deadlines, the idle window and the checkout/checkin rules, with an injected clock."""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool.lifetime import IdleWindow, LifetimePolicy
from fault_tolerant_pool.liveness import LivenessPolicy
from fault_tolerant_pool.notes import ConnectionNotes
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.upkeep import KEEP, REPLACE, SHRINK, Upkeep

# -- settings -------------------------------------------------------------------------------------


def test_jitter_only_shortens_the_lifetime() -> None:
    policy = LifetimePolicy(max_lifetime=100.0, jitter=0.25)
    assert policy.deadline(10.0, lambda: 0.0) == 110.0
    assert policy.deadline(10.0, lambda: 0.999999) == pytest.approx(85.0, abs=1e-3)
    assert LifetimePolicy().deadline(10.0, lambda: 0.5) == math.inf


def test_lifetime_settings_from_config_strings() -> None:
    policy = LifetimePolicy.from_arguments("1800", "0.1", "none")
    assert (policy.max_lifetime, policy.jitter, policy.max_idle) == (1800.0, 0.1, None)
    assert LifetimePolicy.from_arguments(None, 0, 600).max_idle == 600.0


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"max_lifetime": "soon"}, "max_lifetime"),
        ({"lifetime_jitter": 1}, "lifetime_jitter"),
        ({"lifetime_jitter": -0.1}, "lifetime_jitter"),
        ({"max_idle": -5}, "max_idle"),
    ],
)
def test_bad_lifetime_settings(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        LifetimePolicy.from_arguments(**kw)


def test_liveness_settings() -> None:
    assert LivenessPolicy.from_arguments() == LivenessPolicy(True, 1.0)
    assert LivenessPolicy.from_arguments("false", "none") == LivenessPolicy(False, None)
    assert LivenessPolicy.from_arguments("yes", "0").ping_after == 0.0
    with pytest.raises(ArgumentError, match="liveness_check"):
        LivenessPolicy.from_arguments("maybe")
    with pytest.raises(ArgumentError, match="liveness_ping_after"):
        LivenessPolicy.from_arguments(True, -1)


# -- the idle window -------------------------------------------------------------------------------


class SimulatedPool:
    """Just the counts a queue pool reports to the window."""

    def __init__(self, window: IdleWindow) -> None:
        self.window = window
        self.idle = 0
        self.total = 0

    def checkout(self) -> None:
        if self.idle:
            self.idle -= 1
        else:
            self.total += 1
        self.window.observe(self.idle)

    def checkin(self, now: float) -> bool:
        retired = self.window.retire_on_checkin(now, self.idle)
        if retired:
            self.total -= 1
        else:
            self.idle += 1
        return retired


def test_after_a_burst_the_pool_shrinks_to_what_it_uses() -> None:
    pool = SimulatedPool(IdleWindow(max_idle=10.0, now=0.0))
    for _ in range(10):  # a burst: ten at once
        pool.checkout()
    for _ in range(10):
        assert not pool.checkin(1.0)
    now = 1.0
    retired = 0
    while now < 40.0:  # then one request at a time, every 0.5 s
        now += 0.5
        pool.checkout()
        retired += pool.checkin(now)
    assert pool.total == 1 and retired == 9


def test_nothing_is_retired_before_a_whole_window_passed() -> None:
    pool = SimulatedPool(IdleWindow(max_idle=10.0, now=0.0))
    for _ in range(5):
        pool.checkout()
    for _ in range(5):
        pool.checkin(0.0)
    for step in range(1, 19):
        pool.checkout()
        assert not pool.checkin(step * 0.5)
    assert pool.total == 5


def test_a_pool_in_full_use_never_shrinks() -> None:
    pool = SimulatedPool(IdleWindow(max_idle=1.0, now=0.0))
    now = 0.0
    for _ in range(200):  # five concurrent users all the time: nothing sits idle
        now += 0.1
        for _ in range(5):
            pool.checkout()
        for _ in range(5):
            assert not pool.checkin(now)
    assert pool.total == 5


def test_a_pool_used_at_half_shrinks_by_half() -> None:
    pool = SimulatedPool(IdleWindow(max_idle=1.0, now=0.0))
    for _ in range(10):
        pool.checkout()
    for _ in range(10):
        pool.checkin(0.0)
    now = 0.0
    for _ in range(100):  # five at a time, every 0.1 s
        now += 0.1
        for _ in range(5):
            pool.checkout()
        for _ in range(5):
            pool.checkin(now)
    assert pool.total == 5


# -- the checkout and checkin rules ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Record:
    """Stands for the pool's connection record (``SetUpRetriedRecord``): notes from the start."""

    def __init__(self) -> None:
        self.notes = ConnectionNotes()
        self.dbapi_connection: Any = object()
        self.closed = 0
        self.invalidated: list[BaseException | None] = []

    def close(self) -> None:
        self.closed += 1
        self.dbapi_connection = None

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        self.invalidated.append(e)
        self.dbapi_connection = None


class Probe:
    """Like liveness.Probe: ``closed()`` then ``readable(0)``; counts the looks at the socket."""

    def __init__(self) -> None:
        self.is_dead = False
        self.is_closed = False
        self.looks = 0

    def closed(self) -> bool:
        return self.is_closed

    def readable(self, timeout: int) -> list[int]:
        assert timeout == 0  # never waits
        self.looks += 1
        return [1] if self.is_dead else []


class Dialect:
    def __init__(self) -> None:
        self.pings = 0
        self.answer: bool | Exception = True

    def _do_ping_w_event(self, connection: Any) -> bool:
        self.pings += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def upkeep(
    clock: Clock, draws: list[float] | None = None, **kw: Any
) -> tuple[Upkeep, ConnectCounters]:
    lifetime = LifetimePolicy.from_arguments(
        kw.pop("max_lifetime", None), kw.pop("lifetime_jitter", 0.25), kw.pop("max_idle", None)
    )
    liveness = LivenessPolicy.from_arguments(True, kw.pop("ping_after", 1.0))
    pending = list(draws or [])
    counters = ConnectCounters()
    return (
        Upkeep(
            lifetime, liveness, counters, dialect=Dialect(), clock=clock,
            random=lambda: pending.pop(0) if pending else 0.0,
        ),
        counters,
    )  # fmt: skip


def connected(keeper: Upkeep, probe: Probe | None = None) -> Record:
    record = Record()
    keeper.connected(record, object())
    record.notes.probe = probe
    record.notes.fresh = False  # as if lent once and returned (tests of fresh connections set it)
    return record


def test_ten_connections_made_together_get_spread_deadlines() -> None:
    clock = Clock()
    draws = [i / 10 for i in range(10)]
    keeper, counters = upkeep(clock, draws, max_lifetime=2.0, lifetime_jitter=0.5)
    records = [connected(keeper) for _ in range(10)]
    deadlines = sorted(r.notes.deadline for r in records)
    assert deadlines[0] == pytest.approx(501.1) and deadlines[-1] == pytest.approx(502.0)
    retired_at = []
    for step in range(1, 25):
        clock.now = 500.0 + step * 0.1
        for record in records:
            if record.dbapi_connection is not None and keeper.checkin(record, 0) == REPLACE:
                record.close()
                retired_at.append(round(clock.now, 1))
    assert len(retired_at) == 10
    assert retired_at[0] == pytest.approx(501.1) and retired_at[-1] == pytest.approx(502.0)
    assert counters.retired["lifetime"] == 10


def test_expired_connection_is_retired_at_checkout_not_while_checked_out() -> None:
    clock = Clock()
    keeper, counters = upkeep(clock, [0.0], max_lifetime=10.0)
    record = connected(keeper)
    clock.now += 9.0
    keeper.checkout(record)  # lent at 9 s...
    clock.now += 5.0  # ...and used past its deadline: nothing happens meanwhile
    assert record.closed == 0
    assert keeper.checkin(record, 3) == REPLACE  # retired when it comes back
    record2 = connected(keeper)
    clock.now += 11.0
    keeper.checkout(record2)  # expired while idle in the pool
    assert record2.closed == 1 and counters.retired["lifetime"] == 2


def test_dead_connection_is_replaced_without_a_ping() -> None:
    clock = Clock()
    keeper, counters = upkeep(clock)
    probe, dialect = Probe(), keeper.dialect
    record = connected(keeper, probe)
    keeper.checkout(record)
    assert record.invalidated == [] and probe.looks == 1
    keeper.checkin(record, 0)
    probe.is_dead = True
    keeper.checkout(record)
    assert len(record.invalidated) == 1 and "liveness check" in str(record.invalidated[0])
    assert dialect.pings == 0 and counters.retired["liveness"] == 1


def test_a_connection_its_driver_closed_is_replaced_without_a_look_at_its_socket() -> None:
    # once the driver closed it, its descriptor number may belong to another connection
    clock = Clock()
    keeper, counters = upkeep(clock)
    probe, dialect = Probe(), keeper.dialect
    record = connected(keeper, probe)
    probe.is_closed = True
    keeper.checkout(record)
    assert len(record.invalidated) == 1 and probe.looks == 0 and dialect.pings == 0
    assert counters.retired["liveness"] == 1


def test_ping_only_after_the_idle_threshold() -> None:
    clock = Clock()
    keeper, counters = upkeep(clock, ping_after=1.0)
    dialect = keeper.dialect
    record = connected(keeper, Probe())
    clock.now += 0.9
    keeper.checkout(record)
    assert dialect.pings == 0
    clock.now += 5.0  # in use for 5 s: that is not idleness
    keeper.checkin(record, 0)
    clock.now += 0.5
    keeper.checkout(record)
    assert dialect.pings == 0
    keeper.checkin(record, 0)
    clock.now += 1.5
    keeper.checkout(record)
    assert dialect.pings == 1 and record.invalidated == []
    keeper.checkin(record, 0)
    clock.now += 2.0
    dialect.answer = False
    keeper.checkout(record)
    assert len(record.invalidated) == 1 and counters.retired["liveness"] == 1
    record3 = connected(keeper, Probe())
    clock.now += 2.0
    # The dialect judges a failed ping as pre-ping does: False is a disconnect (its
    # is_disconnect, or a handle_error listener, said so); an error it raises is not one, and
    # reaches the caller (the pool then gives the slot back), the connection is not "dead".
    dialect.answer = RuntimeError("not a disconnect, said handle_error")
    with pytest.raises(RuntimeError, match="not a disconnect"):
        keeper.checkout(record3)
    assert record3.invalidated == [] and counters.retired["liveness"] == 1


def test_a_connection_made_for_this_checkout_is_not_checked() -> None:
    clock = Clock()
    keeper, _ = upkeep(clock, ping_after=0.0)
    dialect, probe = keeper.dialect, Probe()
    record = connected(keeper, probe)
    notes = record.notes
    notes.fresh = True  # just made: the checkout that made it lends it
    clock.now += 0.5
    keeper.checkout(record)
    assert dialect.pings == 0 and probe.looks == 0
    keeper.checkin(record, 0)  # returned: from now on every checkout pings (ping_after=0)
    assert not notes.fresh
    clock.now += 0.001
    keeper.checkout(record)
    assert dialect.pings == 1 and probe.looks == 1 and record.invalidated == []


def test_no_ping_when_disabled() -> None:
    clock = Clock()
    keeper, _ = upkeep(clock, ping_after=None)
    dialect = keeper.dialect
    record = connected(keeper, Probe())
    clock.now += 3600
    keeper.checkout(record)
    assert dialect.pings == 0 and record.invalidated == []


def test_checkin_shrinks_an_idle_surplus() -> None:
    clock = Clock()
    keeper, counters = upkeep(clock, max_idle=10.0)
    assert keeper.idle is not None
    records = [connected(keeper) for _ in range(3)]
    keeper.idle.observe(0)
    for i, record in enumerate(records):
        assert keeper.checkin(record, i) == KEEP
    clock.now += 11.0
    keeper.idle.observe(2)
    # the first window saw the pool empty while it filled: nothing to retire yet
    assert keeper.checkin(records[0], 2) == KEEP
    clock.now += 11.0
    keeper.idle.observe(2)  # one taken out again; two sat idle through the whole window
    assert keeper.checkin(records[0], 2) == SHRINK
    assert counters.retired["idle"] == 1
    record = connected(keeper)
    assert keeper.checkin(record, 0) == KEEP  # nothing else idle: never shrink to zero


def test_records_without_a_connection_are_left_alone() -> None:
    clock = Clock()
    keeper, _ = upkeep(clock, max_lifetime=1.0)
    record = connected(keeper)
    record.dbapi_connection = None
    clock.now += 5
    keeper.checkout(record)
    assert keeper.checkin(record, 0) == KEEP and record.closed == 0
    bare = Record()  # made before the upkeep existed: not stamped
    keeper.checkout(bare)
    assert keeper.checkin(bare, 0) == KEEP
    by_hand = types.SimpleNamespace(dbapi_connection=object())  # SQLAlchemy's, made by hand
    keeper.checkout(by_hand)
    assert keeper.checkin(by_hand, 0) == KEEP and by_hand.notes.generation is None

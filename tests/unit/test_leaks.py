"""Leak reports, drain generations and the shutdown wait, with an injected clock; no database."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import weakref
from typing import Any

import pytest
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool import leaks as leaks_module
from fault_tolerant_pool.leaks import LeakTracker, Site, capture_stack, leak_threshold
from fault_tolerant_pool.shutdown import (
    PoolClosed,
    close_pool,
    sever,
    timeout_seconds,
    wait_until,
)
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.upkeep import KEEP, REPLACE

from .test_lifetime import Clock, Record, connected, upkeep

# -- settings -------------------------------------------------------------------------------------


def test_leak_threshold_settings() -> None:
    assert leak_threshold(None) is None
    assert leak_threshold("none") is None
    assert leak_threshold("2.5") == 2.5
    for bad in (0, -1, "soon", True, float("nan")):
        with pytest.raises(ArgumentError, match="leak_threshold"):
            leak_threshold(bad)


def test_shutdown_timeout_setting() -> None:
    assert timeout_seconds(0) == 0.0 and timeout_seconds(2.5) == 2.5
    for bad in (-1, "5", None, True):
        with pytest.raises(ArgumentError, match="timeout"):
            timeout_seconds(bad)


# -- the tracker ----------------------------------------------------------------------------------


class Fairy:
    """Stands for SQLAlchemy's lent connection: only its weak reference matters."""


class Watcher:
    def __init__(self) -> None:
        self.asked: list[float] = []

    def ensure(self, delay: float) -> None:
        self.asked.append(delay)


def tracker(clock: Clock, threshold: float = 0.5) -> tuple[LeakTracker, ConnectCounters, Watcher]:
    counters = ConnectCounters()
    leaks = LeakTracker(threshold, counters, clock=clock)
    watcher = Watcher()
    leaks.watcher = watcher
    return leaks, counters, watcher


def check_out_here(leaks: LeakTracker, fairy: Any) -> object:
    record = object()
    leaks.checked_out(record, weakref.ref(fairy))
    return record


def test_a_held_connection_is_reported_once_with_holder_and_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    leaks, counters, watcher = tracker(clock)
    fairy = Fairy()
    caplog.set_level(logging.INFO, "fault_tolerant_pool.leak")
    record = check_out_here(leaks, fairy)
    assert watcher.asked == [0.5]
    clock.now += 0.2
    assert leaks.watch() == pytest.approx(0.3)  # not due yet: look again when it is
    assert caplog.records == []
    assert leaks.oldest_age() == pytest.approx(0.2)
    clock.now += 0.3
    assert leaks.watch() is None  # reported; nothing else waits for a report
    assert leaks.watch() is None
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "checked out 0.50s ago by thread 'MainThread'" in message
    assert "test_leaks.py" in message and "in check_out_here" in message
    assert "sqlalchemy" not in message.split("left out):")[1]
    assert counters.leaks["held"] == 1
    clock.now += 1.0
    leaks.checked_in(record)
    assert caplog.records[-1].levelno == logging.INFO
    assert "returned after 1.50s" in caplog.records[-1].getMessage()
    assert leaks.oldest_age() == 0.0 and counters.leaks == {"held": 1, "reclaimed": 0,
                                                             "shutdown": 0}  # fmt: skip


def test_short_holds_are_never_reported(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    leaks, counters, _ = tracker(clock)
    caplog.set_level(logging.INFO, "fault_tolerant_pool.leak")
    fairy = Fairy()
    for _ in range(100):
        record = check_out_here(leaks, fairy)
        clock.now += 0.01
        leaks.checked_in(record)
    assert leaks.watch() is None
    assert caplog.records == [] and counters.leaks["held"] == 0


def test_the_next_wake_is_the_earliest_unreported_deadline() -> None:
    clock = Clock()
    leaks, _, _ = tracker(clock, threshold=10.0)
    fairies = [Fairy(), Fairy()]
    check_out_here(leaks, fairies[0])
    clock.now += 4.0
    check_out_here(leaks, fairies[1])
    clock.now += 1.0
    assert leaks.watch() == pytest.approx(5.0)
    clock.now += 5.0
    assert leaks.watch() == pytest.approx(4.0)  # the first reported, the second in 4 s


def test_a_connection_the_garbage_collector_reclaims_is_reported_with_its_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    leaks, counters, _ = tracker(clock)
    caplog.set_level(logging.INFO, "fault_tolerant_pool.leak")
    fairy = Fairy()
    record = check_out_here(leaks, fairy)
    del fairy
    gc.collect()
    clock.now += 0.1
    leaks.checked_in(record)  # what SQLAlchemy's cleanup of the dead fairy does
    (warning,) = caplog.records
    assert "never returned; reclaimed by the garbage collector" in warning.getMessage()
    assert "in check_out_here" in warning.getMessage()
    assert counters.leaks["reclaimed"] == 1


def test_stragglers_are_reported_as_shutdown_leaks(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    leaks, counters, _ = tracker(clock)
    caplog.set_level(logging.INFO, "fault_tolerant_pool.leak")
    fairy = Fairy()
    check_out_here(leaks, fairy)
    clock.now += 2.0
    ((_, entry),) = leaks.stragglers()
    leaks.report_straggler(entry)
    assert "still checked out by thread 'MainThread' after 2.00s" in caplog.text
    assert counters.leaks["shutdown"] == 1


def test_the_site_leaves_the_house_out_and_keeps_the_order() -> None:
    def outer() -> Any:
        return inner()

    def inner() -> Any:
        return capture_stack()

    site = Site(outer_caller(outer))
    functions = [function for _, _, function in site.frames]
    assert functions[-2:] == ["outer_caller", "outer"]  # capture_stack skips inner (its caller)
    assert site.innermost().endswith("in outer")
    assert 'File "' in site.format()
    assert Site([]).innermost().startswith("an unknown site")


@pytest.mark.parametrize("filename", ["<string>", "<sqlalchemy generated _go() wrapper>"])
def test_code_generated_from_a_string_is_left_out(filename: str) -> None:
    """SQLAlchemy compiles some of its functions from strings (a session's checkout goes through
    one): their frames are named so (2.0: ``<string>``, 2.1: ``<sqlalchemy generated ...>``)
    and are not the application's."""
    namespace: dict[str, Any] = {"capture_stack": capture_stack}
    exec(compile("def generated(fn):\n    return fn()\n", filename, "exec"), namespace)

    def site_of_checkout() -> Any:
        return namespace["generated"](lambda: capture_stack())

    stack = site_of_checkout()
    assert "generated" in [code.co_name for code in stack[::2]]  # walked...
    functions = [function for _, _, function in Site(stack).frames]
    assert "generated" not in functions and "site_of_checkout" in functions  # ...not shown


def outer_caller(fn: Any) -> Any:
    return fn()


# -- drain generations in the upkeep ----------------------------------------------------------


def test_drain_retires_old_connections_at_checkout_and_checkin_only() -> None:
    clock = Clock()
    keeper, counters = upkeep(clock)
    idle, out = connected(keeper), connected(keeper)
    keeper.drain()
    assert keeper.stale(idle) and keeper.stale(out)
    keeper.checkout(idle)  # an old idle connection is not lent: closed, slot empty
    assert idle.closed == 1 and idle.dbapi_connection is None
    assert keeper.checkin(out, 0) == REPLACE  # an old one that was out is closed on return
    fresh = connected(keeper)
    assert not keeper.stale(fresh)
    keeper.checkout(fresh)
    assert fresh.closed == 0 and keeper.checkin(fresh, 0) == KEEP
    assert counters.retired["drain"] == 2


def test_connections_made_before_the_upkeep_existed_count_as_old() -> None:
    keeper, _ = upkeep(Clock())
    unknown = Record()
    assert not keeper.stale(unknown) and keeper.checkin(unknown, 0) == KEEP
    keeper.drain()
    assert keeper.stale(unknown) and keeper.checkin(unknown, 0) == REPLACE


def test_a_closed_upkeep_refuses_every_checkout() -> None:
    keeper, _ = upkeep(Clock())
    record = connected(keeper)
    keeper.close(PoolClosed("shut down"))
    with pytest.raises(PoolClosed):
        keeper.checkout(record)
    empty = Record()
    empty.dbapi_connection = None
    with pytest.raises(PoolClosed):
        keeper.checkout(empty)


# -- the shutdown wait --------------------------------------------------------------------------


class SleepyClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_until_returns_once_done() -> None:
    clock = SleepyClock()
    out = [3]

    def done() -> bool:
        out[0] -= 1
        return out[0] <= 0

    assert wait_until(done, 5.0, clock=clock, sleep=clock.sleep, interval=0.1)
    assert clock.sleeps == [0.1, 0.1]


def test_wait_until_never_sleeps_past_the_timeout() -> None:
    clock = SleepyClock()
    assert not wait_until(lambda: False, 0.25, clock=clock, sleep=clock.sleep, interval=0.1)
    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.05])
    assert not wait_until(lambda: False, 0.0, clock=clock, sleep=clock.sleep)


def test_sever_ends_the_stream_for_the_peer() -> None:
    class Driver:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

    ours, peer = socket.socketpair()
    try:
        assert sever(Driver(ours))
        assert peer.recv(1) == b""  # the end of the stream
        assert ours.fileno() >= 0  # the descriptor is still the driver's
        assert not sever(object())
    finally:
        ours.close()
        peer.close()


# -- the shutdown of a pool ----------------------------------------------------------------------


class FakePool:
    """What ``close_pool`` drives: checkouts that come back when the clock says so."""

    def __init__(self, clock: SleepyClock, leaks: LeakTracker | None, back_at: list[float]):
        self.clock = clock
        self._leaks = leaks
        self.back_at = back_at
        self.refused: PoolClosed | None = None
        self.disposed = False

    def _refuse(self, refusal: PoolClosed) -> None:
        self.refused = refusal

    def _out_now(self) -> int:
        return sum(1 for at in self.back_at if at > self.clock.now)

    def dispose(self) -> None:
        self.disposed = True


class Stuck:
    """A checked-out record whose driver connection has a socket."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.driver_connection = self

    def fileno(self) -> int:
        return self.sock.fileno()


def test_close_waits_for_what_comes_back_in_time() -> None:
    clock = SleepyClock()
    pool = FakePool(clock, None, [clock.now + 0.3, clock.now + 0.5])
    report = close_pool(pool, 2.0, clock=clock, sleep=clock.sleep)
    assert isinstance(pool.refused, PoolClosed) and pool.disposed
    assert report.clean and report.checked_out_at_start == 2
    assert report.waited == pytest.approx(0.5, abs=0.011)


def test_close_reports_and_severs_what_is_still_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = SleepyClock()
    leaks, counters, _ = tracker(clock, threshold=30)
    stuck = Stuck()
    fairy = Fairy()
    leaks.checked_out(stuck, weakref.ref(fairy))
    pool = FakePool(clock, leaks, [clock.now + 100])
    caplog.set_level(logging.WARNING, "fault_tolerant_pool.leak")
    try:
        report = close_pool(pool, 1.0, clock=clock, sleep=clock.sleep)
        assert stuck.peer.recv(1) == b""  # its socket was shut down: the server ends the session
    finally:
        stuck.sock.close()
        stuck.peer.close()
    assert report.waited == pytest.approx(1.0) and report.stragglers == 1
    assert report.holders == ("thread 'MainThread'",) and not report.clean
    assert counters.leaks["shutdown"] == 1 and "when the pool shut down" in caplog.text
    assert pool.disposed


def test_source_lines_in_a_report_are_scrubbed_of_passwords() -> None:
    # fmt: off
    stack = secret_checkout_site("postgresql://app:hunter2@db/app")  # the site's source line
    # fmt: on
    text = Site(stack).format()
    assert "secret_checkout_site" in text and "hunter2" not in text and "***" in text


def secret_checkout_site(url: str) -> Any:
    return capture_stack()


def test_the_walk_of_a_task_stops_at_its_outermost_frame() -> None:
    """``capture_stack(None, outer, last)``: none of this greenlet's frames, the parent's from
    where it is suspended (``outer``) outwards, up to and including ``last`` (the task's
    coroutine)."""

    def task_outermost() -> list[Any]:
        return suspended_in_parent()

    def suspended_in_parent() -> list[Any]:
        return capture_stack(None, sys._getframe(), last=sys._getframe(1))

    stack = task_outermost()
    assert [code.co_name for code in stack[::2]] == ["suspended_in_parent", "task_outermost"]


def test_the_task_lookup_is_asyncios_own() -> None:
    async def inside() -> bool:
        return leaks_module._current_task(asyncio.get_running_loop()) is asyncio.current_task()

    assert asyncio.run(inside())


def test_a_task_is_reported_by_the_name_it_has_when_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside SQLAlchemy's greenlet too (a pool used directly from a coroutine): the walk is
    of this greenlet's frames, the task is kept and its name read when the report is made."""
    clock = Clock()
    leaks = LeakTracker(0.5, None, clock=clock, in_loop=True)
    leaks.watcher = Watcher()
    fairy = Fairy()

    async def handler() -> object:
        return check_out_here(leaks, fairy)

    async def main() -> object:
        task = asyncio.create_task(handler(), name="orders-worker")
        record = await task
        task.set_name("orders-worker-renamed")
        return record

    caplog.set_level(logging.WARNING, "fault_tolerant_pool.leak")
    asyncio.run(main())
    clock.now += 0.6
    leaks.watch()
    (warning,) = caplog.records
    assert "by task 'orders-worker-renamed'" in warning.getMessage()
    assert "in check_out_here" in warning.getMessage()

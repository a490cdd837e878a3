"""Per-attempt connect timeouts: the limits, the drivers' rounding, the retry loop keeping its
deadline against a black hole. A fake clock and fake drivers: no database, no sleeping."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool, timeouts
from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.errors import ConnectRetriesExhausted
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.timeouts import (
    CONNECT_TIMEOUTS,
    MIN_ATTEMPT_TIMEOUT,
    AttemptTimer,
    ConnectTimeout,
    attempt_timeout,
    connect_timeout_for,
)

from .fakes import Clock, FakeDBAPI

URL = "postgresql+{driver}://u:secret@127.0.0.1:1/db"
LIBPQ = CONNECT_TIMEOUTS["psycopg", False]
ASYNCPG = CONNECT_TIMEOUTS["asyncpg", True]


def dialect(driver: str, is_async: bool) -> Any:
    return types.SimpleNamespace(driver=driver, is_async=is_async)


class BlackHole:
    """A creator whose every attempt runs the ``do_connect`` listener as SQLAlchemy would, then
    waits (on the fake clock) for as long as the driver was told, and times out."""

    def __init__(self, clock: Clock, driver: str, is_async: bool, **user: Any) -> None:
        self.clock = clock
        self.dialect = dialect(driver, is_async)
        self.user = user
        self.told: list[Any] = []
        self.limits: list[float | None] = []
        self.healed_at: float | None = None

    def __call__(self, record: Any) -> Any:
        self.limits.append(attempt_timeout())
        cparams = dict(self.user)
        timeouts._inject(self.dialect, record, [], cparams)
        rule = connect_timeout_for(self.dialect)
        assert rule is not None
        told = rule.keyword is not None and "async_creator_fn" not in cparams  # else bounded
        waits = float(cparams[rule.keyword]) if told else self.limits[-1]
        assert waits is not None
        self.told.append(cparams[rule.keyword] if told else waits)
        if self.healed_at is not None and self.clock.now + 0.01 >= self.healed_at:
            self.clock.now += 0.01
            return "connection"
        self.clock.now += waits
        raise TimeoutError("timed out")


def connector(creator: Any, clock: Clock, **policy: Any) -> RetryingConnector:
    return RetryingConnector(
        creator,
        RetryPolicy(**policy),
        ConnectCounters(),
        sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
    )


# -- the drivers' rounding -------------------------------------------------------------------------


def test_libpq_counts_whole_seconds_and_at_least_two() -> None:
    assert LIBPQ.bound(4.97) == 4
    assert LIBPQ.bound(2.999) == 3  # a few milliseconds short of 3 s still makes 3
    assert LIBPQ.bound(1.2) == 2
    assert LIBPQ.bound(0.05) == 2
    assert ASYNCPG.bound(1.234) == 1.234


@pytest.mark.parametrize(
    ("user", "limit", "told"),
    [
        ({}, 4.5, 4),
        ({"connect_timeout": "3"}, 4.5, 3),  # the user's smaller value stays (URL query string)
        ({"connect_timeout": 30}, 4.5, 4),  # a larger one is clamped to the limit
        ({"connect_timeout": 0}, 4.5, 4),  # libpq's 0 means "forever": clamped
        ({"connect_timeout": 1}, 4.5, 2),  # libpq's minimum
    ],
)
def test_libpq_connect_timeout_written_for_the_attempt(
    user: dict[str, Any], limit: float, told: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    cparams = dict(user)
    assert LIBPQ.apply(cparams, limit) == told
    assert cparams["connect_timeout"] == told and isinstance(cparams["connect_timeout"], int)


def test_libpq_environment_default_counts_as_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    cparams: dict[str, Any] = {}
    LIBPQ.apply(cparams, 4.5)
    assert cparams == {"connect_timeout": 2}


def test_asyncpg_timeout_is_exact() -> None:
    cparams: dict[str, Any] = {"timeout": 60}
    assert ASYNCPG.apply(cparams, 1.25) == 1.25
    assert cparams["timeout"] == 1.25


def test_psycopg_async_is_told_a_limit_it_honours_exactly_and_bounded_otherwise() -> None:
    rule = CONNECT_TIMEOUTS["psycopg", True]
    # whole seconds, at least 2, no name to look up: psycopg's own connect_timeout, no wrapper
    for host in ("127.0.0.1", "::1", "/var/run/postgresql", None):
        cparams: dict[str, Any] = {} if host is None else {"host": host}
        assert rule.apply(cparams, 5.0) == 5.0 and cparams.get("connect_timeout") == 5
        assert "async_creator_fn" not in cparams
    assert rule.apply(cp := {"host": "10.0.0.1", "connect_timeout": 3}, 5.0) == 3.0
    assert cp == {"host": "10.0.0.1", "connect_timeout": 3}  # a smaller one of yours stays
    # anything else the pool bounds itself, exactly (psycopg would round, or not cover a lookup)
    for seconds, host in ((2.5, "127.0.0.1"), (1.0, "127.0.0.1"), (5.0, "db.example.com")):
        cparams = {"host": host}
        assert rule.apply(cparams, seconds) == seconds == rule.bound(seconds)
        assert "connect_timeout" not in cparams and callable(cparams["async_creator_fn"])


def test_psycopg_async_creator_is_wrapped_with_an_exact_timeout() -> None:
    rule = CONNECT_TIMEOUTS["psycopg", True]

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    async def quick(*args: Any, **kwargs: Any) -> Any:
        return (args, kwargs)

    async def run() -> None:
        cparams: dict[str, Any] = {"async_creator_fn": never}
        assert rule.apply(cparams, 0.01) == 0.01
        with pytest.raises(TimeoutError, match=r"timed out after 0\.01s"):
            await cparams["async_creator_fn"]("dsn", user="u")
        cparams = {"async_creator_fn": quick}
        rule.apply(cparams, 5)
        assert await cparams["async_creator_fn"]("dsn", user="u") == (("dsn",), {"user": "u"})

    asyncio.run(run())


needs_311 = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="one timer per loop needs Task.uncancel (3.11)"
)


async def _sleeps(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "connection"


@needs_311
def test_one_timer_keeps_every_attempts_own_deadline() -> None:
    """Attempts in flight together share the loop's one timer, and each still ends at its own
    deadline: a later, shorter one re-arms the timer; a longer one is kept for the next."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ended: dict[str, float] = {}

        async def attempt(name: str, limit: float, takes: float) -> str:
            try:
                return str(await timeouts._bounded(_sleeps, limit)(takes))
            except TimeoutError as error:
                return str(error)
            finally:
                ended[name] = loop.time() - started

        outcomes = await asyncio.gather(
            attempt("long", 0.3, 5.0),
            attempt("short", 0.05, 5.0),
            attempt("quick", 5.0, 0.01),
        )
        assert outcomes == [
            "connect attempt timed out after 0.3s",
            "connect attempt timed out after 0.05s",
            "connection",
        ]
        assert ended["quick"] < ended["short"] < ended["long"]
        assert 0.05 <= ended["short"] < 0.3 <= ended["long"] < 1.0  # each at its own deadline
        deadlines = timeouts._deadlines_of(loop)
        assert deadlines.attempts == {}  # nothing left behind
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(run())


@needs_311
def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    """As with ``asyncio.timeout``: only a cancellation the deadline made becomes a
    ``TimeoutError``; the caller's own (a request's time limit, a task group) propagates, also
    when it comes together with the deadline's."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        bounded = timeouts._bounded(_sleeps, 5.0)
        task = asyncio.ensure_future(bounded(5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert timeouts._deadlines_of(loop).attempts == {}

        both = asyncio.ensure_future(timeouts._bounded(_sleeps, 0.05)(5.0))
        await asyncio.sleep(0.04)
        loop.call_at(timeouts._deadlines_of(loop).armed, both.cancel)  # with the deadline
        with pytest.raises(asyncio.CancelledError):
            await both

        async def after_a_timeout() -> str:
            with pytest.raises(TimeoutError):
                await timeouts._bounded(_sleeps, 0.01)(5.0)
            # the deadline's cancellation was taken back: the task goes on, bounded again
            async with asyncio.timeout(1.0):
                return await _sleeps(0.01)

        assert await asyncio.ensure_future(after_a_timeout()) == "connection"

    asyncio.run(run())


@needs_311
def test_each_loop_has_its_own_watch() -> None:
    async def one() -> Any:
        assert await timeouts._bounded(_sleeps, 1.0)(0.0) == "connection"
        return timeouts._deadlines_of(asyncio.get_running_loop())

    first, second = asyncio.run(one()), asyncio.run(one())
    assert first is not second and first.loop is not second.loop


def test_the_environment_is_read_at_each_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    assert timeouts._environ("PGCONNECT_TIMEOUT") is None
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert timeouts._environ("PGCONNECT_TIMEOUT") == "3"
    cparams: dict[str, Any] = {"host": "127.0.0.1"}
    assert LIBPQ.apply(cparams, 5.0) == 3 and cparams["connect_timeout"] == 3
    monkeypatch.delenv("PGCONNECT_TIMEOUT")
    assert timeouts._environ("PGCONNECT_TIMEOUT") is None


def test_table_lookup_by_driver_and_flavour() -> None:
    assert connect_timeout_for(dialect("psycopg", False)) is LIBPQ
    assert connect_timeout_for(dialect("psycopg", True)) == ConnectTimeout(
        "connect_timeout", whole_seconds=True, minimum=2.0, environ="PGCONNECT_TIMEOUT", exact=True
    )
    assert connect_timeout_for(dialect("mysqldb", False)) is None


# -- the limits ------------------------------------------------------------------------------------


def test_limit_is_the_cap_clamped_to_the_deadline_left() -> None:
    timer = AttemptTimer(5.0)
    assert timer.begin(0.0, remaining=10.0) == 5.0
    assert timer.begin(0.0, remaining=3.0) == 3.0
    assert timer.begin(0.0, remaining=-0.2) == MIN_ATTEMPT_TIMEOUT
    assert AttemptTimer(None).begin(0.0, remaining=7.5) == 7.5


def test_another_attempt_unless_black_holed_and_the_driver_cannot_end_in_time() -> None:
    timer = AttemptTimer(5.0)
    timer.begin(0.0, remaining=10.0)
    assert timer.worth_another(0.01, remaining_then=0.5)  # no driver told: nothing to round
    timer.told(LIBPQ, 5)
    assert timer.worth_another(0.01, remaining_then=0.5)  # refused at once: try again
    assert timer.worth_another(5.0, remaining_then=4.9)  # ran out; 4 s fits in 4.9 s
    assert not timer.worth_another(5.0, remaining_then=1.9)  # ran out; libpq would wait 2 s
    timer.told(ASYNCPG, 5)
    assert timer.worth_another(5.0, remaining_then=0.5)  # exact driver: 0.5 s attempt is fine


# -- the retry loop against a black hole -----------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "is_async", "cap", "deadline", "told", "elapsed"),
    [
        ("asyncpg", True, 5.0, 10.0, [5.0, 5.0], 10.0),
        ("asyncpg", True, 1.0, 3.0, [1.0, 1.0, 1.0], 3.0),
        ("psycopg", True, 2.5, 5.0, [2.5, 2.5], 5.0),
        # psycopg async: its own 5 s (whole seconds), then the pool's exact 4.975 s
        ("psycopg", True, 5.0, 10.0, [5, 4.975], 10.0),
        # libpq: 5 s, then 4 s (4.975 rounded down), then less than 2 s left: give up at 9 s.
        ("psycopg", False, 5.0, 10.0, [5, 4], 9.0),
        ("psycopg", False, 1.0, 3.0, [2], 2.0),
    ],
)
def test_black_holed_attempts_keep_the_deadline(
    driver: str,
    is_async: bool,
    cap: float | None,
    deadline: float,
    told: list[float],
    elapsed: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    clock = Clock()
    creator = BlackHole(clock, driver, is_async)
    connect = connector(creator, clock, deadline=deadline, attempt_timeout=cap)
    with pytest.raises(ConnectRetriesExhausted) as info:
        connect(None)
    assert creator.told == pytest.approx(told, abs=0.1)  # backoff sleeps of 25-50 ms between
    assert info.value.attempts == len(told)
    assert clock.now - 100.0 == pytest.approx(elapsed, abs=0.1)
    assert clock.now - 100.0 <= deadline + 1e-9
    assert attempt_timeout() is None  # unpublished after the attempts


@pytest.mark.parametrize(("driver", "is_async"), [("asyncpg", True), ("psycopg", True),
                                                 ("psycopg", False)])  # fmt: skip
def test_no_attempt_timeout_tells_the_driver_nothing(driver: str, is_async: bool) -> None:
    clock = Clock()
    seen: list[tuple[float | None, dict[str, Any]]] = []

    def creator(record: Any) -> Any:
        cparams: dict[str, Any] = {"host": "h"}
        timeouts._inject(dialect(driver, is_async), record, [], cparams)
        seen.append((attempt_timeout(), cparams))
        clock.now += 1.0
        raise TimeoutError("timed out")

    connect = connector(creator, clock, deadline=3.0, attempt_timeout=None)
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)
    assert seen and all(told == (None, {"host": "h"}) for told in seen)  # no timeout, no wrapper
    assert clock.now - 100.0 <= 3.0 + 1.0  # no attempt started after the deadline


def test_users_own_smaller_timeout_gives_more_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    creator = BlackHole(clock, "asyncpg", True, timeout=1.5)
    connect = connector(creator, clock, deadline=5.0, max_delay=0.0, initial_delay=0.0)
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)
    assert creator.told == pytest.approx([1.5, 1.5, 1.5, 0.5])
    assert creator.limits == pytest.approx([5.0, 3.5, 2.0, 0.5])


def test_the_next_attempt_succeeds_once_the_black_hole_heals() -> None:
    clock = Clock()
    creator = BlackHole(clock, "asyncpg", True)
    creator.healed_at = 101.5
    connect = connector(creator, clock, deadline=10.0, attempt_timeout=1.0, max_delay=0.0,
                        initial_delay=0.0)  # fmt: skip
    assert connect(None) == "connection"
    assert creator.told == pytest.approx([1.0, 1.0, 1.0])
    assert connect.counters.failed_attempts == 2


def test_cancellation_unpublishes_the_attempt() -> None:
    clock = Clock()

    def cancelled(record: Any) -> Any:
        assert attempt_timeout() == 5.0
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        connector(cancelled, clock)(None)
    assert attempt_timeout() is None


# -- the pool's settings --------------------------------------------------------------------------


@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
def test_setting_default_coercion_and_refusal(poolclass: type) -> None:
    engine = sa.create_engine(URL.format(driver="psycopg"), poolclass=poolclass)
    assert engine.pool.retry_policy.attempt_timeout == 5.0  # type: ignore[attr-defined]
    for value, expected in (("2.5", 2.5), ("none", None), (None, None), (1, 1.0)):
        engine = sa.create_engine(
            URL.format(driver="psycopg"), poolclass=poolclass, retry_attempt_timeout=value
        )
        assert engine.pool.retry_policy.attempt_timeout == expected  # type: ignore[attr-defined]
        engine.dispose()
        assert engine.pool.retry_policy.attempt_timeout == expected  # type: ignore[attr-defined]
    for bad in (0, -1, "abc", float("inf"), True):
        with pytest.raises(ArgumentError, match="retry_attempt_timeout"):
            create_async_engine(
                URL.format(driver="asyncpg"), poolclass=poolclass, retry_attempt_timeout=bad
            )


def test_listener_installed_once_per_dialect_for_known_drivers_only() -> None:
    engine = create_async_engine(URL.format(driver="asyncpg"), poolclass=FaultTolerantQueuePool)
    dialect_ = engine.sync_engine.dialect
    assert event.contains(dialect_, "do_connect", timeouts._inject)
    engine.sync_engine.dispose()  # recreate(): same dialect, still one listener
    assert list(dialect_.dispatch.do_connect).count(timeouts._inject) == 1
    sqlite = sa.create_engine("sqlite://", poolclass=FaultTolerantNullPool)
    assert not event.contains(sqlite.dialect, "do_connect", timeouts._inject)


def test_a_failed_attempt_releases_what_its_frames_held() -> None:
    """psycopg keeps a timed-out attempt's socket in a reference cycle through its error; the
    pool clears the finished frames so the socket closes now, not when the GC runs."""
    import gc
    import weakref

    class Socket:
        pass

    sockets: list[weakref.ref[Socket]] = []

    def creator(record: Any) -> Any:
        sock = Socket()
        sockets.append(weakref.ref(sock))
        errors: list[BaseException] = []
        try:
            raise TimeoutError("timed out")
        except TimeoutError as error:
            errors.append(error)  # the cycle: this frame -> errors -> error -> traceback -> frame
            raise

    clock = Clock()
    gc.disable()
    try:
        with pytest.raises(ConnectRetriesExhausted) as info:
            connector(creator, clock, attempts=2)(None)
        assert len(sockets) == 2 and all(ref() is None for ref in sockets)
        assert isinstance(info.value.last_error, TimeoutError)  # the error itself is kept
    finally:
        gc.enable()

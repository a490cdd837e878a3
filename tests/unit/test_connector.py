"""The retry loop with a fake creator, a fake clock and a fake sleep: no database, no sleeping."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest

from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.errors import ConnectRetriesExhausted, DatabaseUnreachable
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.probe import Gate
from fault_tolerant_pool.stats import ConnectCounters

from .fakes import Clock, FakeDBAPI


def flaky(failures: list[BaseException], clock: Clock, cost: float = 0.001) -> Any:
    """A creator that raises the given errors in turn, then returns a connection."""
    pending = list(failures)

    def creator(record: Any) -> Any:
        clock.now += cost
        if pending:
            raise pending.pop(0)
        return "connection"

    return creator


def make(creator: Any, clock: Clock, counters: ConnectCounters, **policy: Any) -> RetryingConnector:
    return RetryingConnector(
        creator,
        RetryPolicy(**policy),
        counters,
        sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
    )


def refused() -> ConnectionRefusedError:
    return ConnectionRefusedError(111, "Connection refused")


def test_success_after_transient_failures() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused(), refused()], clock), clock, counters)
    assert connect(None) == "connection"
    assert clock.sleeps == [pytest.approx(0.025), pytest.approx(0.05)]
    snap = counters.snapshot(0, 0, 0, 0)
    assert (snap.connects, snap.attempts, snap.failed_attempts, snap.give_ups) == (1, 3, 2, 0)
    assert snap.last_error is not None and snap.last_error.error_class == "ConnectionRefusedError"


def test_gives_up_at_the_deadline_with_an_operational_error() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused()] * 1000, clock), clock, counters, deadline=2.0, max_delay=0.5)
    with pytest.raises(FakeDBAPI.OperationalError) as info:
        connect(None)
    error = info.value
    assert isinstance(error, ConnectRetriesExhausted)
    assert isinstance(error.__cause__, ConnectionRefusedError)
    assert error.transient is True
    assert error.attempts == counters.failed_attempts
    assert 2.0 <= error.elapsed <= 2.01
    assert sum(clock.sleeps) <= 2.0
    assert f"after {error.attempts} attempts" in str(error)
    assert "ConnectionRefusedError" in str(error)
    assert counters.give_ups == 1


def test_attempts_bound() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused()] * 10, clock), clock, counters, attempts=3)
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)
    assert counters.attempts == 3 and len(clock.sleeps) == 2


def test_permanent_error_fails_on_the_first_attempt() -> None:
    clock, counters = Clock(), ConnectCounters()
    auth = FakeDBAPI.OperationalError("password authentication failed for user \"app\"")
    auth.sqlstate = "28P01"
    connect = make(flaky([auth], clock), clock, counters)
    with pytest.raises(ConnectRetriesExhausted) as info:
        connect(None)
    assert info.value.transient is False
    assert info.value.attempts == 1
    assert getattr(info.value, "sqlstate", None) == "28P01"
    assert clock.sleeps == []


class DriverOwnError(Exception):
    """A driver's server error that is not the dialect's DBAPI Error (asyncpg on SQLAlchemy 2.0)."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize("sqlstate, transient", [("28P01", False), ("57P03", True)])
def test_a_server_error_outside_the_dbapi_hierarchy_is_still_wrapped(
    sqlstate: str, transient: bool
) -> None:
    clock, counters = Clock(), ConnectCounters()
    errors: list[BaseException] = [DriverOwnError("no", sqlstate) for _ in range(100)]
    connect = make(flaky(errors, clock), clock, counters, deadline=1.0)
    with pytest.raises(FakeDBAPI.OperationalError) as info:
        connect(None)
    assert isinstance(info.value, ConnectRetriesExhausted)
    assert info.value.transient is transient
    assert isinstance(info.value.__cause__, DriverOwnError)
    assert getattr(info.value, "sqlstate", None) == sqlstate


def test_a_bug_in_the_creator_is_not_disguised() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([TypeError("bad connect_args")], clock), clock, counters)
    with pytest.raises(TypeError, match="bad connect_args"):
        connect(None)
    assert counters.give_ups == 1


@pytest.mark.parametrize("cancel", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_cancellation_propagates_unchanged_and_is_not_counted(cancel: BaseException) -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused(), cancel], clock), clock, counters)
    with pytest.raises(type(cancel)) as info:
        connect(None)
    assert info.value is cancel
    assert counters.failed_attempts == 1 and counters.give_ups == 0


def test_cancellation_during_the_sleep_propagates() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused()], clock), clock, counters)

    def cancelled_sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    connect.sleep = cancelled_sleep
    with pytest.raises(asyncio.CancelledError):
        connect(None)


def test_user_classifier_overrides_the_table() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([ValueError("flaky proxy")], clock), clock, counters)
    connect.classifier = lambda exc: True if isinstance(exc, ValueError) else None
    assert connect(None) == "connection"
    connect.classifier = lambda exc: False
    connect.creator = flaky([refused()], clock)
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)


def test_each_failed_attempt_is_logged_once_and_the_give_up_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused()] * 3, clock), clock, counters, attempts=3)
    with caplog.at_level(logging.WARNING, logger="fault_tolerant_pool.retry"), pytest.raises(
        ConnectRetriesExhausted
    ):
        connect(None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("connect attempt 1 failed (ConnectionRefusedError")
    assert "retrying in 0.025s" in messages[0]
    assert "failed for good after 3 attempt(s)" in messages[2]


def test_secrets_are_scrubbed_from_logs_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    clock, counters = Clock(), ConnectCounters()
    leaky = ConnectionRefusedError(
        111, "refused for postgresql://app:hunter2@db/x password=hunter2 token s3cr3t"
    )
    connect = make(flaky([leaky] * 2, clock), clock, counters, attempts=2)
    connect.secrets = lambda: ("s3cr3t",)
    with caplog.at_level(logging.WARNING), pytest.raises(ConnectRetriesExhausted) as info:
        connect(None)
    text = str(info.value) + " ".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "app:***@db" in text


def test_a_raw_driver_error_is_wrapped_too() -> None:
    """SQLAlchemy 2.0 lets asyncpg's own exceptions reach the pool unadapted."""
    import asyncpg

    clock, counters = Clock(), ConnectCounters()
    raw = asyncpg.exceptions.InvalidPasswordError("password authentication failed")
    connect = make(flaky([raw], clock), clock, counters)
    with pytest.raises(FakeDBAPI.OperationalError) as info:
        connect(None)
    assert isinstance(info.value, ConnectRetriesExhausted) and info.value.__cause__ is raw


def test_a_drivers_own_server_error_is_wrapped_too() -> None:
    """SQLAlchemy 2.0 lets asyncpg's errors through at connect time, not adapted to the
    dialect's DBAPI ``Error``: one carrying a SQLSTATE is still the server's answer."""

    class InvalidPasswordError(Exception):  # like asyncpg.exceptions.InvalidPasswordError
        sqlstate = "28P01"

    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([InvalidPasswordError("password authentication failed")], clock),
                   clock, counters)  # fmt: skip
    with pytest.raises(FakeDBAPI.OperationalError) as info:
        connect(None)
    assert isinstance(info.value, ConnectRetriesExhausted) and not info.value.transient
    assert getattr(info.value, "sqlstate", None) == "28P01"


def test_a_connection_made_after_retries_is_stamped_when_it_was_made() -> None:
    """SQLAlchemy stamps ``starttime`` before the connect; after an outage that stamp predates
    any pool invalidation of the outage and would get the new connection thrown away."""
    import time as _time

    clock, counters = Clock(), ConnectCounters()
    record = types.SimpleNamespace(starttime=0.0)
    connect = make(flaky([refused()], clock), clock, counters)
    before = _time.time()
    assert connect(record) == "connection"
    assert record.starttime >= before
    untouched = types.SimpleNamespace(starttime=1.0)
    assert make(flaky([], clock), clock, counters)(untouched) == "connection"
    assert untouched.starttime == 1.0  # no retry: SQLAlchemy's own stamp stands


# -- with the pool's gate (fault_tolerant_pool.probe) ------------------------------------------


class ClockWaiter:
    """A gate waiter that lets the fake clock run for the whole wait."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.woken = False

    def wait(self, timeout: float) -> None:
        self.clock.sleep(max(timeout, 0.0))

    def wake(self) -> None:
        self.woken = True


def gated(creator: Any, clock: Clock, counters: ConnectCounters, **kw: Any) -> RetryingConnector:
    gate = Gate(
        10.0, clock=clock, random=lambda: 0.5, waiter=lambda in_loop: ClockWaiter(clock), **kw
    )
    return RetryingConnector(
        creator,
        RetryPolicy(),
        counters,
        sleep=lambda seconds: pytest.fail("with a gate the connector never sleeps itself"),
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
        gate=gate,
    )


def test_with_a_gate_the_probe_schedule_paces_the_retries() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = gated(flaky([refused(), refused()], clock), clock, counters)
    assert connect(None) == "connection"
    schedule = connect.gate.schedule  # type: ignore[union-attr]
    assert clock.sleeps == [
        pytest.approx(schedule.pause(0.001, 0.5)),
        pytest.approx(schedule.pause(clock.sleeps[0] + 0.002, 0.5)),
    ]
    assert connect.gate.state == "healthy"  # type: ignore[union-attr]
    assert connect.gate.figures().outages == 1  # type: ignore[union-attr]


def closed_by_proxy() -> Exception:
    # libpq's words when HAProxy accepts the connection and has no server to give it
    error = FakeDBAPI.OperationalError(
        'connection to server at "127.0.0.1", port 5000 failed: server closed the connection '
        "unexpectedly"
    )
    return error


def test_with_a_gate_quick_closes_alone_keep_the_schedule() -> None:
    # one server behind a TCP proxy, down: the proxy resets every connection at once. Nothing
    # was held, so nothing says the proxy is changing its routes: the schedule's pause
    clock, counters = Clock(), ConnectCounters()
    connect = gated(flaky([closed_by_proxy()] * 2, clock), clock, counters)
    assert connect(None) == "connection"
    schedule = connect.gate.schedule  # type: ignore[union-attr]
    assert clock.sleeps == [
        pytest.approx(schedule.pause(0.001, 0.5)),
        pytest.approx(schedule.pause(clock.sleeps[0] + 0.002, 0.5)),
    ]


def test_with_a_gate_a_close_by_a_proxy_tells_the_gate_so() -> None:
    clock, counters = Clock(), ConnectCounters()
    told: list[bool] = []
    connect = gated(flaky([closed_by_proxy(), refused()], clock), clock, counters)
    gate: Any = connect.gate
    finished = gate.finished

    def spy(now: float, error: Any, *args: Any) -> None:
        if error is not None:
            told.append(args[-1])
        finished(now, error, *args)

    gate.finished = spy
    assert connect(None) == "connection"
    assert told == [True, False]


def test_with_a_gate_closes_by_a_proxy_that_held_an_attempt_are_asked_at_its_pace() -> None:
    # held longer than a login is presumed to take, then closed (HAProxy retrying a server that
    # is gone, then giving up): a proxy changing its routes, asked every ProbeSchedule.proxied
    clock, counters = Clock(), ConnectCounters()
    connect = gated(flaky([closed_by_proxy()] * 2, clock, cost=0.3), clock, counters)
    assert connect(None) == "connection"
    schedule = connect.gate.schedule  # type: ignore[union-attr]
    assert clock.sleeps == [pytest.approx(schedule.proxied)] * 2


def test_with_a_gate_callers_fail_fast_once_unreachable_for_a_deadline() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = gated(flaky([refused()] * 1000, clock), clock, counters)
    with pytest.raises(ConnectRetriesExhausted) as first:
        connect(None)  # retried until its deadline: the outage is a deadline old
    assert not isinstance(first.value, DatabaseUnreachable)
    attempts = counters.snapshot(0, 0, 0, 0).attempts
    started = clock.now
    with pytest.raises(DatabaseUnreachable) as fast:
        connect(None)
    assert clock.now - started < 0.01  # the probe may go once (a refused port is quick)
    assert counters.snapshot(0, 0, 0, 0).attempts <= attempts + 1
    assert isinstance(fast.value, FakeDBAPI.OperationalError)
    assert "database unreachable since" in str(fast.value)
    assert "last error ConnectionRefusedError" in str(fast.value)
    assert connect.gate.figures().fast_failures == 1  # type: ignore[union-attr]


def test_with_a_gate_a_cancelled_attempt_frees_the_probe() -> None:
    clock, counters = Clock(), ConnectCounters()
    connect = gated(flaky([refused(), asyncio.CancelledError()], clock), clock, counters)
    with pytest.raises(asyncio.CancelledError):
        connect(None)
    assert connect.gate._in_flight == 0  # type: ignore[union-attr]
    assert connect(None) == "connection"


class DBAPIWithoutOperationalError(types.SimpleNamespace):
    """A DBAPI module whose ``OperationalError`` is not a class (a stand-in, as in SQLAlchemy's
    own pool tests), but whose ``Error`` is."""

    class Error(Exception):
        pass

    OperationalError = object()


@pytest.mark.parametrize(
    ("dbapi", "base"),
    [
        (FakeDBAPI, FakeDBAPI.OperationalError),
        (DBAPIWithoutOperationalError, DBAPIWithoutOperationalError.Error),
        (types.SimpleNamespace(), OSError),
    ],
)
def test_the_give_up_derives_from_the_dbapis_operational_error_else_its_error(
    dbapi: Any, base: type[BaseException]
) -> None:
    """SQLAlchemy wraps a DBAPI ``Error`` (as ``DBAPIError``) the way it wraps the driver's own
    error: the give-up must stay inside that hierarchy whenever the DBAPI has one."""
    clock, counters = Clock(), ConnectCounters()
    connect = RetryingConnector(
        flaky([refused() for _ in range(100)], clock),
        RetryPolicy(deadline=0.2),
        counters,
        sleep=clock.sleep,
        dbapi=lambda: dbapi,
        clock=clock,
        random=lambda: 0.5,
    )
    with pytest.raises(ConnectRetriesExhausted) as info:
        connect(None)
    assert type(info.value).__mro__[2] is base
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_no_span_is_started_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the API's no-op providers: the connect skips the telemetry (it would all be dropped);
    with a listening provider the same connector traces it."""
    clock, counters = Clock(), ConnectCounters()
    connect = make(flaky([refused()], clock), clock, counters)
    traced: list[object] = []
    real = connect.telemetry.connect

    def spy() -> Any:
        traced.append(True)
        return real()

    monkeypatch.setattr(connect.telemetry, "connect", spy)
    assert not connect.telemetry.active()
    assert connect(None) == "connection"
    assert traced == [] and counters.snapshot(0, 0, 0, 0).attempts == 2
    monkeypatch.setattr(connect.telemetry, "_measuring", True)
    connect.creator = flaky([], clock)
    assert connect(None) == "connection"
    assert traced == [True]


def test_a_caller_held_at_the_gate_is_stamped_when_its_connection_was_made() -> None:
    """A caller that waited for another's probe and then connected at its first attempt made
    its connection at the end of the wait, not when SQLAlchemy stamped the record: otherwise a
    pool invalidation during the outage throws the new connection away (an extra login)."""
    import time as _time

    clock, counters = Clock(), ConnectCounters()
    gate = Gate(10.0, clock=clock, random=lambda: 0.5, waiter=lambda in_loop: ClockWaiter(clock))
    outcomes: list[Any] = [refused()]

    def creator(record: Any) -> Any:
        clock.now += 0.001
        if outcomes:
            raise outcomes.pop(0)
        return "connection"

    connect = RetryingConnector(
        creator, RetryPolicy(attempts=1), counters, sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI, clock=clock, random=lambda: 0.5, gate=gate,
    )  # fmt: skip
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)  # the outage begins: the gate now paces one probe at a time
    assert gate.state != "healthy"
    record = types.SimpleNamespace(starttime=0.0)
    held_from = clock.now
    before = _time.time()
    assert connect(record) == "connection"  # its own first attempt, after the wait
    assert clock.now - held_from > 0.01  # it was held
    assert counters.snapshot(0, 0, 0, 0).failed_attempts == 1  # none of its own
    assert record.starttime >= before

"""The failover pieces without a database: multi-host rounds, the demotion verdict, the doubt
window, ``retry_ping`` values, and the watchdog's cut. Clocks and random sources are injected."""

from __future__ import annotations

import socket
import threading
import time
import types
from typing import Any

import pytest
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool import timeouts, watchdog
from fault_tolerant_pool.classify import classify, not_matching
from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.demotion import (
    DemotionWatch,
    ReadOnlyRoute,
    demoted,
    is_read_only_signal,
    reported_read_only,
)
from fault_tolerant_pool.doubt import Doubt, ping_mode
from fault_tolerant_pool.errors import ConnectRetriesExhausted
from fault_tolerant_pool.hosts import (
    FIRST_LOOK,
    NOT_WRITABLE,
    Host,
    HostRotation,
    hosts_of,
    narrow,
    wants_writer,
)
from fault_tolerant_pool.notes import ConnectionNotes
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.probe import Gate
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.watchdog import Watchdog, bounded, cut

from .fakes import Clock, FakeDBAPI

ASYNCPG = {"host": ["a", "b", "c"], "port": [1, 2, 3], "target_session_attrs": "read-write"}
LIBPQ = {"host": "a,b", "port": "1,2", "dbname": "db"}


# -- hosts ---------------------------------------------------------------------------------------


def test_hosts_of_both_spellings() -> None:
    assert hosts_of(ASYNCPG) == (Host("a", 1), Host("b", 2), Host("c", 3))
    assert hosts_of(LIBPQ) == (Host("a", "1"), Host("b", "2"))
    assert hosts_of({"host": "a,b", "port": "5432"}) == (Host("a", "5432"), Host("b", "5432"))
    assert hosts_of({"host": "a,b"}) == (Host("a", None), Host("b", None))
    assert hosts_of({"host": "a", "port": 1}) == ()  # one host: the driver's own connect
    assert hosts_of({"host": "a,b,c", "port": "1,2"}) == ()  # malformed: the driver says why
    assert hosts_of(None) == ()


def test_rotation_only_for_filtering_attrs_and_no_hostaddr() -> None:
    assert HostRotation.from_arguments(ASYNCPG) is not None
    assert HostRotation.from_arguments({**LIBPQ, "target_session_attrs": "prefer-standby"}) is None
    assert HostRotation.from_arguments({**LIBPQ, "hostaddr": "10.0.0.1,10.0.0.2"}) is None
    assert HostRotation.from_arguments({"host": "a"}) is None
    assert wants_writer(ASYNCPG) and not wants_writer(LIBPQ)
    assert wants_writer({"target_session_attrs": "primary"})


def test_a_round_tries_each_host_once_with_a_first_look_then_full_limits() -> None:
    rotation = HostRotation(hosts_of(ASYNCPG))
    rnd = rotation.round()
    assert rnd.host == Host("a", 1) and rnd.most() == FIRST_LOOK
    assert rnd.failed("TimeoutError") is True and rnd.host == Host("b", 2)
    assert rnd.failed(NOT_WRITABLE) is True and rnd.host == Host("c", 3)
    assert rnd.failed("ConnectionRefusedError") is False  # the round is over
    assert rnd.host == Host("a", 1) and rnd.most() is None  # second round: full limits
    assert rnd.summary(writer=True) == (
        "no host was writable; hosts tried: a:1 [TimeoutError], "
        f"b:2 [{NOT_WRITABLE}], c:3 [ConnectionRefusedError]"
    )
    assert rnd.summary(writer=False).startswith("hosts tried: a:1")
    rnd.failed("TimeoutError")
    rnd.connected()  # made at b: sticky
    assert rotation.round().host == Host("b", 2)


def test_load_balance_hosts_random_starts_anywhere() -> None:
    draws = iter([0.0, 0.5, 0.99])
    rotation = HostRotation(hosts_of(ASYNCPG), balance=True, random=lambda: next(draws))
    assert [rotation.round().host.host for _ in range(3)] == ["a", "b", "c"]
    balanced = HostRotation.from_arguments({**LIBPQ, "load_balance_hosts": "random"})
    assert balanced is not None and balanced.balance


def test_narrow_rewrites_one_attempts_arguments() -> None:
    cparams: dict[str, Any] = dict(ASYNCPG)
    narrow(cparams, Host("b", 2))
    assert cparams["host"] == "b" and cparams["port"] == 2
    cparams = {"host": "a,b"}
    narrow(cparams, Host("b", None))
    assert cparams == {"host": "b"}


class NotMatched(Exception):
    pass


NotMatched.__name__ = "TargetServerAttributeNotMatched"
NotMatched.__module__ = "asyncpg.exceptions"  # as asyncpg raises it


def test_no_writable_host_is_transient() -> None:
    error = NotMatched("None of the hosts match the target attribute requirement")
    assert classify(error).transient and not_matching(error)
    libpq = FakeDBAPI.OperationalError(
        'connection to server at "127.0.0.1", port 1 failed: session is read-only\n'
        'connection to server at "127.0.0.1", port 2 failed: server is in hot standby mode'
    )
    assert classify(libpq).transient and not_matching(libpq)
    assert not not_matching(ConnectionRefusedError(111, "Connection refused"))


def test_the_connector_walks_the_hosts_without_backoff_and_names_them_when_it_gives_up() -> None:
    clock, counters = Clock(), ConnectCounters()
    seen: list[tuple[str, float]] = []
    rotation = HostRotation(hosts_of(ASYNCPG))

    def creator(record: Any) -> Any:
        timer = timeouts._current.get()
        assert timer is not None and timer.host is not None
        seen.append((timer.host.host, timer.limit))
        clock.now += 0.01
        if timer.host.host == "c" and len(seen) > 6:
            return "connection"
        raise NotMatched("None of the hosts match the target attribute requirement")

    connector = RetryingConnector(
        creator, RetryPolicy(), counters, sleep=clock.sleep, dbapi=lambda: FakeDBAPI,
        clock=clock, random=lambda: 0.5, hosts=rotation, wants_writer=True,
    )  # fmt: skip
    assert connector(None) == "connection"
    assert [h for h, _ in seen] == ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
    assert [limit for _, limit in seen[:3]] == [FIRST_LOOK] * 3
    assert all(limit > FIRST_LOOK for _, limit in seen[3:])
    assert len(clock.sleeps) == 2  # one backoff per failed round, none between hosts
    assert rotation.preferred == 2 and counters.failed_attempts == 8

    clock = Clock()

    def never(record: Any) -> Any:
        clock.now += 0.01
        raise NotMatched("None of the hosts match the target attribute requirement")

    connector = RetryingConnector(
        never, RetryPolicy(deadline=1.0), ConnectCounters(), sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI, clock=clock, random=lambda: 0.5,
        hosts=HostRotation(hosts_of(ASYNCPG)), wants_writer=True,
    )  # fmt: skip
    with pytest.raises(ConnectRetriesExhausted) as info:
        connector(None)
    message = str(info.value)
    assert "no host was writable; hosts tried: a:1" in message and "c:3" in message


# -- demotion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connected", "now", "signal", "writer", "had", "verdict"),
    [
        (False, True, True, False, True, True),  # demoted since connected
        (False, True, False, False, True, True),  # ... and a ping sees it too
        (False, False, True, True, True, False),  # the application's own READ ONLY
        (True, True, True, False, False, False),  # a replica pool
        (True, True, True, False, True, True),  # connected to the old writer mid-failover
        (True, True, False, False, True, False),  # a ping alone never judges that
        (None, None, True, True, False, True),  # PostgreSQL 13: the URL asks for a writer
        (None, None, True, False, False, False),  # PostgreSQL 13, no such ask
        (None, None, False, True, False, False),  # ... and never from a ping
    ],
)
def test_the_demotion_table(
    connected: bool | None, now: bool | None, signal: bool, writer: bool, had: bool, verdict: bool
) -> None:
    assert demoted(connected, now, signal=signal, wants_writer=writer, had_writer=had) is verdict


class PsycopgConnection(types.SimpleNamespace):
    """Stands for a psycopg connection: only its module and the attributes read are alike."""


PsycopgConnection.__module__ = "psycopg.connection"


class AsyncpgConnection(types.SimpleNamespace):
    """Stands for an asyncpg connection, likewise."""


AsyncpgConnection.__module__ = "asyncpg.connection"


def psycopg_like(**status: str) -> Any:
    return PsycopgConnection(info=types.SimpleNamespace(parameter_status=status.get))


def asyncpg_like(**status: str) -> Any:
    settings = types.SimpleNamespace(**status)
    return AsyncpgConnection(get_settings=lambda: settings)


@pytest.mark.parametrize("make", [psycopg_like, asyncpg_like])
def test_reported_read_only(make: Any) -> None:
    assert reported_read_only(make(default_transaction_read_only="on", in_hot_standby="off"))
    assert reported_read_only(make(in_hot_standby="on")) is True
    assert reported_read_only(make(default_transaction_read_only="off")) is False
    assert reported_read_only(make()) is None
    assert reported_read_only(types.SimpleNamespace(info=None)) is None  # another driver


class ServerError(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def test_read_only_signals() -> None:
    read_only = "cannot execute INSERT in a read-only transaction"
    assert is_read_only_signal(ServerError(read_only, "25006"))
    assert is_read_only_signal(ServerError("recovery is in progress", "55000"))
    assert not is_read_only_signal(ServerError("lock is held", "55000"))
    assert not is_read_only_signal(ServerError("duplicate key", "23505"))


def context_for(error: BaseException, record: Any, driver: Any) -> Any:
    fairy = types.SimpleNamespace(driver_connection=driver, _connection_record=record)
    return types.SimpleNamespace(
        is_disconnect=False, is_pre_ping=False, original_exception=error,
        connection=types.SimpleNamespace(connection=fairy),
    )  # fmt: skip


def test_the_watch_turns_a_demoted_writers_error_into_a_disconnect() -> None:
    seen: list[int] = []
    watch = DemotionWatch(False, lambda: seen.append(1))
    record = types.SimpleNamespace()  # a record made by hand: given notes at its connect
    watch.connected(record, psycopg_like(default_transaction_read_only="off"))
    assert record.notes.connected_read_only is False and watch.had_writer
    error = ServerError("cannot execute INSERT in a read-only transaction", "25006")
    own = context_for(error, record, psycopg_like(default_transaction_read_only="off"))
    watch.handle_error(own)
    assert own.is_disconnect is False and seen == []
    demoted_ctx = context_for(error, record, psycopg_like(default_transaction_read_only="on"))
    watch.handle_error(demoted_ctx)
    assert demoted_ctx.is_disconnect is True and seen == [1]


@pytest.mark.parametrize("make", [psycopg_like, asyncpg_like])
def test_the_watch_vets_a_new_connection_to_a_read_only_server_in_a_pool_that_had_a_writer(
    make: Any,
) -> None:
    watch = DemotionWatch(False, lambda: None)
    standby = make(in_hot_standby="on", default_transaction_read_only="off")
    watch.vet(standby)  # a pool for a replica: never had a writer, nothing to refuse
    watch.connected(
        types.SimpleNamespace(), make(in_hot_standby="off", default_transaction_read_only="off")
    )
    with pytest.raises(ReadOnlyRoute) as info:
        watch.vet(standby)
    assert isinstance(info.value, ConnectionError)  # transient for the retry loop
    assert classify(info.value).transient
    watch.vet(make(in_hot_standby="off", default_transaction_read_only="off"))
    watch.vet(make())  # PostgreSQL 13: says nothing, passes


@pytest.mark.parametrize("make", [psycopg_like, asyncpg_like])
def test_a_readers_watch_neither_refuses_nor_demotes_a_standby(make: Any) -> None:
    """A read router's reader (``serves_reads``): its server was the writer before a failover,
    and a standby reached later is what it is for, not a route to refuse or a demotion."""
    seen: list[int] = []
    watch = DemotionWatch(False, lambda: seen.append(1))
    watch.serves_reads = True
    notes = ConnectionNotes()
    watch.connected(
        types.SimpleNamespace(notes=notes),
        make(in_hot_standby="off", default_transaction_read_only="off"),
    )
    assert watch.had_writer
    standby = make(in_hot_standby="on", default_transaction_read_only="on")
    watch.vet(standby)  # no ReadOnlyRoute
    assert watch.judge(notes, standby) is False and seen == []


def test_the_connector_retries_a_vetted_connection_and_closes_it() -> None:
    clock = Clock()
    closed: list[Any] = []
    made: list[Any] = []

    class Connection:
        def close(self) -> None:
            closed.append(self)

    def creator(record: Any) -> Any:
        made.append(Connection())
        return made[-1]

    def vet(connection: Any) -> None:
        if len(made) < 3:
            raise ReadOnlyRoute("still the old route")

    connector = RetryingConnector(
        creator, RetryPolicy(), ConnectCounters(), sleep=clock.sleep, dbapi=lambda: FakeDBAPI,
        clock=clock, random=lambda: 0.5, vet=vet, discard=lambda c: c.close(),
    )  # fmt: skip
    assert connector(None) is made[2]
    assert closed == made[:2]
    assert connector.counters.failed_attempts == 2


def test_a_read_only_route_is_no_outage_for_the_gate_only_a_short_backoff() -> None:
    clock = Clock()
    made: list[Any] = []
    gate = Gate(10.0, clock=clock, random=lambda: 0.5)

    def vet(connection: Any) -> None:
        if len(made) < 2:
            raise ReadOnlyRoute("still the old route")

    connector = RetryingConnector(
        lambda record: made.append(object()) or made[-1], RetryPolicy(), ConnectCounters(),
        sleep=clock.sleep, dbapi=lambda: FakeDBAPI, clock=clock, random=lambda: 0.5, vet=vet,
        gate=gate,
    )  # fmt: skip
    started = clock.now
    connector(None)
    assert gate.state == "healthy" and gate.outage_attempts == 0  # the server answered
    assert 0 < clock.now - started <= RetryPolicy().initial_delay  # this loop's own backoff


# -- doubt ---------------------------------------------------------------------------------------


def test_doubt_lasts_its_window() -> None:
    clock = Clock()
    doubt = Doubt(window=10.0, clock=clock)
    assert not doubt.active() and doubt.until == 0.0
    doubt.raised()
    clock.now += 9.9
    assert doubt.active()
    clock.now += 0.2
    assert not doubt.active() and doubt.until == 0.0  # back to the clock-free happy path


def test_ping_mode_values() -> None:
    assert ping_mode("auto") is None and ping_mode(" AUTO ") is None
    assert ping_mode(True) is True and ping_mode("true") is True and ping_mode(1) is True
    assert ping_mode(False) is False and ping_mode("off") is False
    for bad in ("maybe", 2, None):
        with pytest.raises(ArgumentError, match="retry_ping"):
            ping_mode(bad)


def test_the_connector_pings_only_in_doubt() -> None:
    clock = Clock()
    pinged: list[Any] = []
    failures = [ConnectionRefusedError(111, "Connection refused")]

    def creator(record: Any) -> Any:
        if failures:
            raise failures.pop()
        return object()

    doubt = Doubt(clock=clock)
    connector = RetryingConnector(
        creator, RetryPolicy(), ConnectCounters(), sleep=clock.sleep, dbapi=lambda: FakeDBAPI,
        clock=clock, random=lambda: 0.5, ping=pinged.append, doubt=doubt,
    )  # fmt: skip
    connector(None)  # a refusal, then a connection: in doubt, so pinged
    assert len(pinged) == 1
    clock.now += 11.0
    connector(None)  # the doubt has passed: not pinged
    assert len(pinged) == 1


# -- watchdog ------------------------------------------------------------------------------------


def test_cut_ends_a_blocked_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        cut(a.fileno())
        assert a.recv(1) == b""  # the shut-down side reads EOF at once
        assert a.fileno() >= 0  # the descriptor itself stays the owner's to close


def test_the_watchdog_runs_actions_in_deadline_order_unless_cancelled() -> None:
    dog = Watchdog()
    fired: list[str] = []
    done = threading.Event()
    dog.arm(0.05, lambda: fired.append("late")).cancel()
    dog.arm(0.02, lambda: fired.append("second"))
    dog.arm(0.01, lambda: fired.append("first"))
    dog.arm(0.03, done.set)
    assert done.wait(5.0)
    assert fired == ["first", "second"]


def test_a_bounded_operation_is_cut_when_it_overruns() -> None:
    a, b = socket.socketpair()
    timeouts_seen: list[int] = []
    with a, b:
        driver = PsycopgConnection(fileno=a.fileno)
        read = bounded(lambda conn: conn.recv(1), "ping", 0.05, lambda conn: driver,
                       lambda: timeouts_seen.append(1))  # fmt: skip
        started = time.monotonic()
        assert read(a) == b""  # the peer never answered; the watchdog cut the socket
        assert time.monotonic() - started < 2.0 and timeouts_seen == [1]
        b2, c = socket.socketpair()
        with b2, c:
            c.send(b"x")
            quick = bounded(lambda conn: conn.recv(1), "ping", 5.0,
                            lambda conn: PsycopgConnection(fileno=b2.fileno),
                            lambda: timeouts_seen.append(2))  # fmt: skip
            assert quick(b2) == b"x" and timeouts_seen == [1]


def test_a_block_that_overruns_has_its_connection_cut() -> None:
    a, b = socket.socketpair()
    with a, b:
        started = time.monotonic()
        with watchdog.cut_after(0.05, PsycopgConnection(fileno=a.fileno), "reader check"):
            assert a.recv(1) == b""  # the peer never answered; the watchdog cut the socket
        assert time.monotonic() - started < 2.0
    c, d = socket.socketpair()
    with c, d:
        with watchdog.cut_after(0.05, PsycopgConnection(fileno=c.fileno), "reader check"):
            pass  # ended in time: nothing is cut once the block is over
        time.sleep(0.1)
        d.send(b"y")  # still open both ways
        assert c.recv(1) == b"y"
        c.send(b"z")
    with watchdog.cut_after(0.01, object(), "reader check"):  # a driver with no known socket
        time.sleep(0.02)

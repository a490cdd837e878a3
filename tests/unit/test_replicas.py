"""Which reader takes a read: the router's choice, without a database and without sleeping."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine
from sqlalchemy.exc import ArgumentError, InvalidRequestError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from fault_tolerant_pool import FaultTolerantQueuePool, NoReaderAvailable, ReplicaRouter
from fault_tolerant_pool.caller_deadline import policy_for
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.replicas import _check_engine, _Reader

from .fakes import Clock


def engine(port: int) -> Any:
    # never connected: the checkers are not started by these tests
    return create_engine(f"postgresql+psycopg://app:hunter2@db{port}:{port}/app")


def router(clock: Clock, readers: int = 2, **kw: Any) -> ReplicaRouter:
    made = ReplicaRouter(engine(1), [engine(10 + i) for i in range(readers)], clock=clock, **kw)
    made._started = True  # the tests write what the checkers would have found
    return made


def checked(reader: _Reader, clock: Clock, lag: float = 0.0, role: str = "standby") -> None:
    reader.last_check_began = clock.now
    reader.role = role
    reader.lag = lag
    reader.checked_at = clock.now
    reader.checking_since = None


def test_reads_go_round_robin_over_the_readers_in_rotation() -> None:
    clock = Clock()
    chosen = router(clock, readers=3)
    for reader in chosen._readers:
        checked(reader, clock)
    picks = [chosen.choose(read_only=True).url.port for _ in range(6)]
    assert picks == [10, 11, 12, 10, 11, 12]
    assert chosen.choose(read_only=False) is chosen.writer
    stats = chosen.stats()
    assert [r.reads for r in stats.readers] == [2, 2, 2]
    assert (stats.writer_reads, stats.writes) == (0, 1)


def test_a_reader_whose_pool_lends_all_it_may_is_passed_over_while_another_has_a_slot() -> None:
    clock = Clock()
    engines = [
        create_engine(f"postgresql+psycopg://app@db{port}/app", poolclass=FaultTolerantQueuePool,
                      pool_size=1, max_overflow=0)
        for port in (1, 10, 11)
    ]  # fmt: skip
    chosen = ReplicaRouter(engines[0], engines[1:], clock=clock)
    chosen._started = True
    first, second = chosen._readers
    for reader in chosen._readers:
        checked(reader, clock)

    def lend_all(engine: Any, busy: bool) -> None:  # as if its one connection were checked out
        engine.pool._overflow = 0 if busy else -1

    lend_all(engines[1], True)
    assert first.busy() and not second.busy()
    picks = [chosen.choose(read_only=True) for _ in range(3)]
    assert picks == [engines[2]] * 3  # the busy one is passed over, the writer is not used
    lend_all(engines[2], True)  # both busy: wait on the next in turn, never the writer
    assert [chosen.choose(read_only=True) for _ in range(2)] == [engines[1], engines[2]]
    lend_all(engines[1], False)
    assert chosen.choose(read_only=True) is engines[1]
    stats = chosen.stats()
    assert [(r.reads, r.skipped_busy) for r in stats.readers] == [(2, 3), (4, 0)]
    assert (stats.writer_reads, stats.fallbacks) == (0, 0)
    assert not _Reader(engine(12)).busy()  # a stock pool: never seen as busy


def test_a_reader_not_checked_yet_or_promoted_or_down_takes_no_reads() -> None:
    clock = Clock()
    chosen = router(clock, readers=3)
    _unchecked, second, third = chosen._readers
    checked(second, clock, role="primary")  # promoted in a failover
    checked(third, clock)
    third.role = "down"
    assert chosen.choose(read_only=True) is chosen.writer
    stats = chosen.stats()
    assert (stats.fallbacks, stats.writer_reads) == (1, 1)
    assert [r.skipped_down for r in stats.readers] == [1, 1, 1]
    assert [r.role for r in stats.readers] == ["unknown", "primary", "down"]


def test_a_reader_behind_the_limit_is_skipped_for_lag() -> None:
    clock = Clock()
    chosen = router(clock, max_replica_lag=1.0)
    behind, current = chosen._readers
    checked(behind, clock, lag=1.5)
    checked(current, clock, lag=0.01)
    assert {chosen.choose(read_only=True).url.port for _ in range(4)} == {11}
    assert behind.skipped_for_lag >= 2
    assert chosen.stats().readers[0].in_rotation is False


def test_near_the_limit_a_reader_is_presumed_to_fall_further_behind() -> None:
    # lag 0.6 of 1.0 at its check: 0.5 s later it may be 1.1 behind (a stopped replay adds a
    # second a second), so it leaves the rotation before its next check says so
    clock = Clock()
    chosen = router(clock, readers=1, max_replica_lag=1.0)
    [reader] = chosen._readers
    checked(reader, clock, lag=0.6)
    assert chosen.choose(read_only=True) is reader.engine
    clock.now += 0.5
    assert chosen.choose(read_only=True) is chosen.writer
    # a reader well under half the limit keeps its measured lag until the next check
    checked(reader, clock, lag=0.4)
    clock.now += 0.9
    assert chosen.choose(read_only=True) is reader.engine


def test_a_hung_or_stale_check_takes_a_reader_out() -> None:
    clock = Clock()
    chosen = router(clock, readers=1, check_interval=1.0, check_timeout=1.5)
    [reader] = chosen._readers
    checked(reader, clock)
    reader.checking_since = clock.now
    clock.now += 1.0
    assert chosen.choose(read_only=True) is reader.engine  # a check in flight, not yet late
    clock.now += 0.6
    assert chosen.choose(read_only=True) is chosen.writer  # it hangs: a black hole
    checked(reader, clock)
    clock.now += 3.6  # two intervals and a time limit without a check: the checker is stuck
    assert chosen.choose(read_only=True) is chosen.writer


def test_a_disconnect_seen_by_a_request_holds_until_a_later_check() -> None:
    clock = Clock()
    chosen = router(clock, readers=1)
    [reader] = chosen._readers
    checked(reader, clock)
    clock.now += 0.2
    reader.suspect_at = clock.now
    assert chosen.choose(read_only=True) is chosen.writer
    clock.now += 0.5
    checked(reader, clock)  # a check that began after the disconnect vouches for it again
    assert chosen.choose(read_only=True) is reader.engine


def test_a_reader_whose_pool_fails_to_connect_is_skipped() -> None:
    class Gate:
        state = "failing"

    clock = Clock()
    chosen = router(clock, readers=1)
    [reader] = chosen._readers
    checked(reader, clock)
    reader.gate = Gate()
    assert chosen.choose(read_only=True) is chosen.writer
    Gate.state = "healthy"
    assert chosen.choose(read_only=True) is reader.engine


def test_reads_after_a_write_in_the_same_context_stay_on_the_writer() -> None:
    clock = Clock()
    chosen = router(clock, readers=1, max_replica_lag=2.0, check_interval=1.0)
    assert chosen.read_your_writes == 3.0  # the lag limit plus an interval, by default
    [reader] = chosen._readers
    checked(reader, clock)
    chosen._wrote_at.set(clock.now)  # what the writer's commit event does
    clock.now += 2.9
    assert chosen.choose(read_only=True) is chosen.writer
    clock.now += 0.2
    checked(reader, clock)
    assert chosen.choose(read_only=True) is reader.engine
    stats = chosen.stats()
    assert (stats.read_your_writes, stats.fallbacks) == (1, 0)


def test_without_fallback_no_reader_is_a_typed_error_without_secrets() -> None:
    clock = Clock()
    chosen = router(clock, readers=2, fallback_to_writer=False)
    with pytest.raises(NoReaderAvailable) as raised:
        chosen.choose(read_only=True)
    assert "fallback_to_writer" in str(raised.value)
    assert "db10:10/app: unknown" in str(raised.value)
    assert "hunter2" not in str(raised.value) and "hunter2" not in repr(chosen)


def test_no_reader_at_all_sends_reads_to_the_writer() -> None:
    clock = Clock()
    chosen = router(clock, readers=0)
    assert chosen.choose(read_only=True) is chosen.writer


def refusing_router(tried: list[tuple[str, float]], **kw: Any) -> ReplicaRouter:
    """A router whose every server refuses; ``tried`` gets (server, the deadline its connect
    was given) for each connect."""

    def refusing(name: str) -> Any:
        def creator() -> Any:
            tried.append((name, policy_for(RetryPolicy(deadline=10.0)).deadline))
            raise ConnectionRefusedError(111, "Connection refused")

        return creator

    def made(name: str) -> Any:
        return create_engine("postgresql+psycopg://", creator=refusing(name))

    clock = Clock()
    chosen = ReplicaRouter(
        made("writer"), [made("s1"), made("s2")], clock=clock, check_timeout=0.7, **kw
    )
    chosen._started = True
    for reader in chosen._readers:
        checked(reader, clock)
    return chosen


def test_a_sync_checkout_on_a_reader_gives_up_its_connects_after_the_check_timeout() -> None:
    # a reader that stopped a moment ago must not hold a read for its pool's retry_deadline:
    # the connects made for a reader's checkout get check_timeout, the writer's their own
    tried: list[tuple[str, float]] = []
    chosen = refusing_router(tried)
    with pytest.raises(ConnectionRefusedError):
        chosen.connect(read_only=True)  # each reader in turn, then the writer
    assert tried == [("s1", 0.7), ("s2", 0.7), ("writer", 10.0)]
    stats = chosen.stats()
    assert stats.fallbacks == 1 and not any(r.in_rotation for r in stats.readers)


@pytest.mark.parametrize("explicit", [False, True])
def test_a_read_only_sessions_transaction_falls_back_as_a_connect_does(explicit: bool) -> None:
    # the same servers in the same order with the same deadlines, when the transaction begins
    # (its first statement, or begin())
    tried: list[tuple[str, float]] = []
    chosen = refusing_router(tried)
    with (
        chosen.sessionmaker(read_only=True)() as session,
        pytest.raises(ConnectionRefusedError),
        session.begin() if explicit else contextlib.nullcontext(),
    ):
        session.execute(sa.text("SELECT 1"))
    assert tried == [("s1", 0.7), ("s2", 0.7), ("writer", 10.0)]
    assert chosen.stats().fallbacks == 1

    tried.clear()
    chosen = refusing_router(tried, fallback_to_writer=False)
    with chosen.sessionmaker(read_only=True)() as session, pytest.raises(NoReaderAvailable):
        session.scalar(sa.text("SELECT 1"))
    assert tried == [("s1", 0.7), ("s2", 0.7)]


def test_a_read_only_sessions_connection_goes_back_when_its_transaction_ends(
    tmp_path: Path,
) -> None:
    # SQLite files stand in for the servers: what is checked, is when each pool lends and gets
    # back a connection (against PostgreSQL: tests/db/test_replicas.py)
    engines = [
        create_engine(f"sqlite:///{tmp_path / name}.db", poolclass=QueuePool)
        for name in ("writer", "r1", "r2")
    ]
    clock = Clock()
    chosen = ReplicaRouter(engines[0], engines[1:], clock=clock)
    chosen._started = True
    for reader in chosen._readers:
        checked(reader, clock)
    readonly = chosen.sessionmaker(read_only=True)
    one = sa.text("SELECT 1")

    def lent() -> list[int]:
        return [engine.pool.checkedout() for engine in engines]

    with readonly() as session:
        session.execute(one)
        first = session.connection()
        assert lent() == [0, 1, 0]
        session.execute(one)
        assert session.connection() is first and lent() == [0, 1, 0]
        session.commit()  # back at the end of the transaction, not of the session
        assert lent() == [0, 0, 0]
        session.execute(one)
        assert lent() == [0, 0, 1]  # the next transaction, the next reader
        session.rollback()
        assert lent() == [0, 0, 0]
        with session.begin():
            session.execute(one)
            assert lent() == [0, 1, 0]
        assert lent() == [0, 0, 0]
        with pytest.raises(OperationalError):
            session.execute(sa.text("SELECT * FROM nowhere"))
        session.rollback()
        assert lent() == [0, 0, 0]
        # Only looked at outside a transaction: nothing checked out, no reader chosen; the
        # engine of the last transaction (r2's), else the writer's.
        assert session.get_bind() is engines[2] and lent() == [0, 0, 0]
        assert readonly().get_bind() is engines[0]
        with session.begin():
            session.execute(one)
            assert lent() == [0, 1, 0] and session.get_bind() is session.connection()
        assert lent() == [0, 0, 0]
        # Session.connection() outside a transaction begins one, on a checkout made for it.
        connection = session.connection()
        assert lent() == [0, 0, 1] and session.in_transaction()
        assert session.execute(one).scalar() == 1 and session.connection() is connection
        session.commit()
        assert lent() == [0, 0, 0]
        session.execute(one)
    assert lent() == [0, 0, 0]  # closed in the middle of a transaction

    with readonly(autobegin=False) as session:
        with pytest.raises(InvalidRequestError, match="Autobegin"):
            session.connection()
        assert lent() == [0, 0, 0]
    stats = chosen.stats()
    assert [r.reads for r in stats.readers] == [4, 4]  # one choice per transaction
    assert (stats.writer_reads, stats.writes) == (0, 0)


def test_the_checkers_own_engine_leaves_the_readers_gauges_on_the_readers_pool() -> None:
    reader = create_engine("postgresql+psycopg://app@db/app", poolclass=FaultTolerantQueuePool)
    chosen = ReplicaRouter(engine(1), [reader])
    check = _check_engine(chosen._readers[0])
    assert check.pool is not reader.pool
    assert reader.pool._telemetry.pool() is reader.pool  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"max_replica_lag": -1}, "max_replica_lag"),
        ({"max_replica_lag": "soon"}, "max_replica_lag"),
        ({"check_interval": 0}, "check_interval"),
        ({"check_timeout": -2}, "check_timeout"),
        ({"read_your_writes": -1}, "read_your_writes"),
        ({"fallback_to_writer": "no"}, "fallback_to_writer"),
    ],
)
def test_bad_settings_name_the_parameter(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        ReplicaRouter(engine(1), [engine(2)], **kw)


def test_engines_must_be_all_sync_or_all_async() -> None:
    async_engine = create_async_engine("postgresql+asyncpg://app@db/app")
    with pytest.raises(ArgumentError, match=r"readers\[1\] must be an Engine"):
        ReplicaRouter(engine(1), [engine(2), async_engine])
    with pytest.raises(ArgumentError, match="readers must be a list"):
        ReplicaRouter(engine(1), engine(2))  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="writer must be"):
        ReplicaRouter("postgresql://db/app", [])  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="async_sessionmaker"):
        ReplicaRouter(engine(1), []).async_sessionmaker()

"""A connection lost between its login and the end of SQLAlchemy's set-up is made again.

The server ends the session (``pg_terminate_backend``, as a restart or a crash would) from inside
a ``connect`` listener, after the login and before anything is lent: the checkout gets another
connection instead of the error. A listener's own (permanent) error still fails the checkout at
once, as with a stock pool.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.setup_retry import SETUP_RETRIES
from fault_tolerant_pool.testing import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.db]

POOLS = [FaultTolerantQueuePool, FaultTolerantNullPool]


class EndsSessions:
    """A ``connect`` listener that has the server end the first ``times`` new sessions."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.calls = 0
        self.killed_pids: list[int] = []

    def __call__(self, dbapi_connection: Any, record: Any) -> None:
        self.calls += 1
        if self.calls > self.times:
            return
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        self.killed_pids.append(cursor.fetchone()[0])
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # raises: session ended


def sessions_of(server: PostgresServer, pids: list[int]) -> int:
    listed = ",".join(str(pid) for pid in pids) or "0"
    rows = server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({listed})")
    return int(rows[0][0])


@pytest.mark.parametrize("poolclass", POOLS, ids=lambda c: c.__name__)
def test_sync_session_ended_during_set_up_is_made_again(
    pg_server: PostgresServer, poolclass: type, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(pg_server.url("psycopg"), poolclass=poolclass)
    listener = EndsSessions(2)
    event.listen(engine, "connect", listener)
    caplog.set_level(logging.WARNING, "fault_tolerant_pool.retry")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        assert listener.calls == 3 and len(listener.killed_pids) == 2
        assert sessions_of(pg_server, listener.killed_pids) == 0
        warnings = [r for r in caplog.records if "set-up of a new connection" in r.getMessage()]
        assert len(warnings) == 2 and all("nothing was lent" in r.getMessage() for r in warnings)
        assert pg_server.password not in caplog.text
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
async def test_async_session_ended_during_set_up_is_made_again(
    pg_server: PostgresServer, driver: str
) -> None:
    engine = create_async_engine(pg_server.url(driver), poolclass=FaultTolerantQueuePool)
    listener = EndsSessions(1)
    event.listen(engine.sync_engine, "connect", listener)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        assert listener.calls == 2
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    assert sessions_of(pg_server, listener.killed_pids) == 0


def test_a_session_ended_every_time_fails_after_the_bounded_retries(
    pg_server: PostgresServer,
) -> None:
    engine = create_engine(pg_server.url("psycopg"), poolclass=FaultTolerantQueuePool)
    listener = EndsSessions(1000)
    event.listen(engine, "connect", listener)
    try:
        with pytest.raises(Exception, match="terminat"):
            engine.connect()
        assert listener.calls == SETUP_RETRIES + 1
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert sessions_of(pg_server, listener.killed_pids) == 0
    finally:
        engine.dispose()


def test_a_listeners_own_error_is_raised_at_once(pg_server: PostgresServer) -> None:
    engine = create_engine(pg_server.url("psycopg"), poolclass=FaultTolerantQueuePool)
    calls = []

    def broken(dbapi_connection: Any, record: Any) -> None:
        calls.append(1)
        raise ValueError("a bug in the application's listener")

    event.listen(engine, "connect", broken)
    try:
        with pytest.raises(ValueError, match="a bug in the application's listener"):
            engine.connect()
        assert calls == [1]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()

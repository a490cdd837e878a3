"""Settling a COMMIT cut in flight against a real PostgreSQL (``commit_outcome``): the server's
answer for a committed, a rolled-back and a still-open transaction, on the same instance and
after a restart, and the guard that ends only the session still holding the transaction.

The transaction under test is a plain psycopg connection (not through the pool), so the test
decides exactly when it commits, rolls back or stays open; the question is asked through an
engine, as the runner asks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.commit_outcome import NOTE_SQL, CommitNote, settle, settle_async
from fault_tolerant_pool.testing import PostgresServer
from fault_tolerant_pool.testing.server import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.db]


def session(server: PostgresServer) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=server.host, port=server.port, user=server.user, password=server.password,
        dbname="postgres", application_name="ftp-outcome",
    )  # fmt: skip


def write_and_note(conn: psycopg.Connection[Any]) -> CommitNote:
    """A transaction that wrote a row, and what the runner notes just before COMMIT."""
    conn.execute("INSERT INTO t VALUES (1)")
    return CommitNote.from_row(conn.execute(NOTE_SQL).fetchone())


@pytest.fixture
def server(pg_server: PostgresServer) -> Iterator[PostgresServer]:
    pg_server.execute("CREATE TABLE t (k int)")
    yield pg_server


@pytest.fixture
def engine(server: PostgresServer) -> Iterator[sa.Engine]:
    made = sa.create_engine(server.url("psycopg"), poolclass=FaultTolerantQueuePool)
    yield made
    made.dispose()


def rows(server: PostgresServer) -> int:
    return int(server.execute("SELECT count(*) FROM t")[0][0])


def test_the_note_of_a_transaction_that_wrote_nothing_has_no_id(server: PostgresServer) -> None:
    with session(server) as conn:
        conn.execute("SELECT count(*) FROM t")
        note = CommitNote.from_row(conn.execute(NOTE_SQL).fetchone())
        assert note.xid is None
        assert note.pid == conn.info.backend_pid
        assert str(server.port) in note.instance


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_a_transaction_that_ended_is_settled_on_the_same_instance(
    server: PostgresServer, engine: sa.Engine, ending: str
) -> None:
    with session(server) as conn:
        note = write_and_note(conn)
        getattr(conn, ending)()
    assert note.xid is not None
    expected = "committed" if ending == "commit" else "not_committed"
    assert settle(engine, note) == expected
    assert rows(server) == (1 if ending == "commit" else 0)


def test_a_transaction_still_open_is_ended_then_settled(
    server: PostgresServer, engine: sa.Engine
) -> None:
    """The old session still holds the transaction (a network the server has not seen fail):
    it is terminated, and the transaction, rolled back, is settled as not committed."""
    conn = session(server)
    try:
        note = write_and_note(conn)
        assert settle(engine, note) == "not_committed"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    assert rows(server) == 0


async def test_a_transaction_still_open_is_ended_then_settled_async(
    server: PostgresServer,
) -> None:
    engine = create_async_engine(server.url("asyncpg"), poolclass=FaultTolerantQueuePool)
    conn = session(server)
    try:
        note = write_and_note(conn)
        assert await settle_async(engine, note) == "not_committed"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
        await engine.dispose()


def test_only_the_session_holding_the_transaction_is_ended(
    server: PostgresServer, engine: sa.Engine
) -> None:
    """A note naming another session's pid (a pid the server gave again) ends nothing: the
    transaction stays open, so the outcome stays unknown, and the other session lives."""
    holder, bystander = session(server), session(server)
    try:
        note = write_and_note(holder)
        bystander.execute("SELECT 1")
        wrong = CommitNote(note.xid, bystander.info.backend_pid, note.instance)
        assert settle(engine, wrong) == "unknown"
        assert bystander.execute("SELECT 2").fetchone() == (2,)
        holder.commit()
    finally:
        holder.close()
        bystander.close()
    assert rows(server) == 1


def test_after_a_restart_only_not_committed_is_proved(
    server: PostgresServer, engine: sa.Engine
) -> None:
    """Another instance of the server may have given the id again: a committed status proves
    nothing (unknown), an aborted one still proves the transaction did not commit."""
    with session(server) as conn:
        committed = write_and_note(conn)
        conn.commit()
        rolled_back = write_and_note(conn)
        conn.rollback()
    server.restart()
    assert settle(engine, committed) == "unknown"
    assert settle(engine, rolled_back) == "not_committed"


def test_a_server_that_cannot_be_asked_leaves_the_outcome_unknown(server: PostgresServer) -> None:
    with session(server) as conn:
        note = write_and_note(conn)
        conn.commit()
    nowhere = sa.create_engine(
        server.url("psycopg", port=free_port()),
        poolclass=FaultTolerantQueuePool,
        retry_deadline=0.3,
    )
    try:
        assert settle(nowhere, note) == "unknown"
    finally:
        nowhere.dispose()

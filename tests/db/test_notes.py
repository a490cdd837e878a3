"""What the pool notes about a connection (``record.notes``), on a real PostgreSQL: the stamp and
the server's read-only state at connect, written again when the record connects again, and the
mark of a failed statement, taken by the rollback that follows."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.db]

SETTINGS: dict[str, Any] = dict(poolclass=FaultTolerantQueuePool, pool_size=1, max_overflow=0)


def check_notes_at_connect(record: Any) -> Any:
    notes = record.notes
    assert notes.generation == 0 and notes.fresh and notes.deadline < float("inf")
    assert notes.connected_read_only is False  # PostgreSQL 14+ says so at the login
    return notes


def spoil(notes: Any) -> None:
    """Facts a reconnect must write anew (as if left by the connection before)."""
    notes.connected_read_only = None
    notes.generation = None


async def test_asyncpg_notes(pg_server: PostgresServer) -> None:
    engine = create_async_engine(pg_server.url("asyncpg"), max_lifetime=3600, **SETTINGS)
    try:
        async with engine.connect() as conn:
            record = (await conn.get_raw_connection())._connection_record
            notes = check_notes_at_connect(record)
            with pytest.raises(sa.exc.DBAPIError):
                await conn.execute(sa.text("SELECT 1/0"))
            assert notes.suspect  # the engine's handle_error marked it
        assert not notes.suspect  # the rollback took the mark
        async with engine.connect() as conn:
            assert not notes.fresh  # lent before
            await conn.invalidate()  # the physical connection goes; the record stays
        spoil(notes)
        async with engine.connect() as conn:
            again = (await conn.get_raw_connection())._connection_record
            assert again is record and check_notes_at_connect(record) is notes
    finally:
        await engine.dispose()


def test_psycopg_notes(pg_server: PostgresServer) -> None:
    engine = sa.create_engine(pg_server.url("psycopg"), max_lifetime=3600, **SETTINGS)
    try:
        with engine.connect() as conn:
            record = conn.connection._connection_record
            notes = check_notes_at_connect(record)
            with pytest.raises(sa.exc.DBAPIError):
                conn.execute(sa.text("SELECT 1/0"))
            assert notes.suspect
        assert not notes.suspect
        with engine.connect() as conn:
            assert not notes.fresh
            conn.invalidate()
        spoil(notes)
        with engine.connect() as conn:
            assert conn.connection._connection_record is record
            assert check_notes_at_connect(record) is notes
    finally:
        engine.dispose()

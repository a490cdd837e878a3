"""The demo's database side: the engine on a fault-tolerant pool, its schema and its queries."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fault_tolerant_pool import (
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
    PoolStats,
    run_transaction_async,
)

from .settings import Settings

log = logging.getLogger("demo.db")

metadata = sa.MetaData()
notes = sa.Table(
    "demo_notes",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # The write's own key (unique): the insert runs again after a COMMIT cut in flight without
    # writing the note twice. NULL in rows written before the column existed.
    sa.Column("request_key", sa.Text, nullable=True),
)

#: Two demos (pooled and through PgBouncer) may start at once on one database: the advisory
#: lock makes their ``CREATE TABLE IF NOT EXISTS`` take turns (it is not race-free on its own).
_SCHEMA_LOCK = 0x6674_706F  # "ftpo"
_SCHEMA = [
    sa.text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_SCHEMA_LOCK),
    sa.text(
        "CREATE TABLE IF NOT EXISTS demo_notes ("
        " id bigserial PRIMARY KEY,"
        " body text NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now())"
    ),
    # A table made by an earlier version of the demo (a compose volume) gets the key too.
    sa.text("ALTER TABLE demo_notes ADD COLUMN IF NOT EXISTS request_key text"),
    sa.text("CREATE UNIQUE INDEX IF NOT EXISTS demo_notes_request_key ON demo_notes (request_key)"),
]


def _prepared_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def make_engine(
    settings: Settings,
    url: URL | None = None,
    pool_name: str | None = None,
    *,
    reader: bool = False,
) -> AsyncEngine:
    """An async engine on ``FaultTolerantQueuePool`` (or ``FaultTolerantNullPool`` for PgBouncer).

    Each connect attempt gets the driver's own timeout (``connect_timeout``), so a stalled
    network costs one attempt, not the whole retry deadline. With the null pool the driver makes
    no named server-side prepared statements, which PgBouncer in transaction mode cannot keep.
    ``url`` (default: the writer's), ``pool_name`` and ``reader`` make a reader's engine, with
    the same settings; its pool is named without a host, as everything the demo shows.
    """
    if url is None:
        url = settings.url
    asyncpg = url.get_driver_name() == "asyncpg"
    connect_args: dict[str, Any] = {}
    if asyncpg:
        connect_args["timeout"] = settings.connect_timeout
    else:
        connect_args["connect_timeout"] = max(1, round(settings.connect_timeout))
    pool_kw: dict[str, Any] = {
        "retry_deadline": settings.retry_deadline,
        "leak_threshold": settings.leak_threshold,  # a request holding one that long is logged
    }
    if settings.pool == "null":
        poolclass: type = FaultTolerantNullPool
        if asyncpg:
            connect_args.update(
                statement_cache_size=0,
                prepared_statement_cache_size=0,
                prepared_statement_name_func=_prepared_statement_name,
            )
        else:
            connect_args["prepare_threshold"] = None
    else:
        poolclass = FaultTolerantQueuePool
        pool_kw.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_pre_ping=True,  # a connection the restart killed is noticed at checkout
            pool_timeout=settings.retry_deadline + 20,
        )
    if pool_name is not None:
        pool_kw["pool_name"] = pool_name
    return create_async_engine(
        url,
        poolclass=poolclass,
        connect_args=connect_args,
        pool_logging_name=pool_name or settings.service_name,
        **pool_kw,
    )


def pool_stats(engine: AsyncEngine) -> PoolStats:
    stats: PoolStats = engine.pool.stats()  # type: ignore[attr-defined]
    return stats


async def create_schema(engine: AsyncEngine, timeout: float) -> None:
    """Create the table, waiting up to ``timeout`` seconds for the database to come up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.begin() as conn:
                for statement in _SCHEMA:
                    await conn.execute(statement)
            return
        except (sa.exc.DBAPIError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("database not ready for the schema yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1.0)


async def hold_connection(engine: AsyncEngine, seconds: float) -> float:
    """Keep a connection checked out for ``seconds`` (the server sleeps): a slow request."""
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT pg_sleep(:s)").bindparams(s=seconds))
    return seconds


async def server_version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        version: str = (await conn.execute(sa.text("SELECT version()"))).scalar_one()
    return version


async def add_note(
    engine: AsyncEngine, body: str, *, idempotent: bool = True, request_key: str | None = None
) -> dict[str, Any]:
    """Write a note as one unit of work (``run_transaction_async``); which server took it too.

    A statement cut by a restart, a crash, a terminated session or a demoted writer before
    COMMIT was sent leaves nothing behind: the runner runs the unit of work again on a fresh
    connection, and the caller gets its note. A connection lost while COMMIT was in flight
    leaves the outcome unknown. With ``idempotent`` (the default) the insert carries a key of
    its own (``request_key``, new for each call unless given), so running it again cannot
    write the note twice: the runner runs it again after that failure too, and a run that finds
    the key already stored answers the row an earlier run committed. Without, that failure
    raises ``TransactionOutcomeUnknown``: the note may or may not be stored.
    """
    key = request_key if request_key is not None else uuid.uuid4().hex
    written = (
        notes.c.id,
        notes.c.body,
        notes.c.created_at,
        sa.func.inet_server_port().label("server_port"),
        sa.func.pg_is_in_recovery().label("server_in_recovery"),
    )
    insert = postgresql.insert(notes).values(body=body, created_at=sa.func.now(), request_key=key)
    if idempotent:
        insert = insert.on_conflict_do_nothing(index_elements=[notes.c.request_key])
    statement = insert.returning(*written)
    already = sa.select(*written).where(notes.c.request_key == key)

    async def write(conn: AsyncConnection) -> Any:
        row = (await conn.execute(statement)).one_or_none()
        if row is None:  # an earlier run committed it; the answer to its COMMIT was lost
            row = (await conn.execute(already)).one()
        return row

    row = await run_transaction_async(engine, write, idempotent=idempotent)
    # Which server took the write: the page shows writes moving to a new primary.
    return {
        **_note(row),
        "server_port": row.server_port,
        "server_in_recovery": row.server_in_recovery,
    }


async def get_note(conn: AsyncConnection, note_id: int) -> dict[str, Any] | None:
    """One note by id: a unit of work for a read path (``reads.run(...)``)."""
    row = (await conn.execute(sa.select(notes).where(notes.c.id == note_id))).one_or_none()
    return None if row is None else _note(row)


async def latest_notes(conn: AsyncConnection, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """The total number of notes and the ``limit`` newest ones, in one round trip (a unit of
    work for a read path)."""
    total = sa.select(sa.func.count()).select_from(notes).scalar_subquery()
    query = sa.select(notes, total.label("total")).order_by(notes.c.id.desc()).limit(limit)
    rows = (await conn.execute(query)).all()
    if not rows:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(notes))).scalar()
        return int(count or 0), []
    return int(rows[0].total), [_note(row) for row in rows]


def _note(row: Any) -> dict[str, Any]:
    created: datetime = row.created_at
    return {"id": row.id, "text": row.body, "created_at": created.isoformat()}

"""Settling a COMMIT cut in flight: ask the server how the transaction ended.

A connection that fails while COMMIT is in flight leaves the client unable to tell whether the
server committed. PostgreSQL can tell, if the client kept the transaction's id:
``pg_xact_status(xid)`` reports ``committed``, ``aborted`` or ``in progress`` for a recent
transaction ("applications can use this to determine whether their transaction committed or
aborted after the application and database server become disconnected while a COMMIT is in
progress", says its documentation). The runner notes the id just before COMMIT (one round
trip: :data:`NOTE_SQL`), and after a cut asks a fresh connection of the same engine.

The answer is trusted only as far as the id is unique:

- On the **same server instance** (the same postmaster: its start time, address and port), an id
  is never given twice, so ``committed`` and ``aborted`` are the transaction's own outcome.
  ``in progress`` means its old session still holds it (a stalled network the server has not
  noticed): the runner ends that session (``pg_terminate_backend``, only while it still holds
  this id) and asks again.
- On **another instance** (the server restarted, or a standby took over), an id whose WAL never
  reached disk may have been given again to another transaction. ``aborted``, ``in progress`` and
  "not assigned yet" still prove this transaction did not commit there (had it committed, its
  commit record would have been replayed and its id would not be reused); ``committed`` proves
  nothing, and the outcome stays unknown.

:func:`settlement` is that table; :func:`settle` and :func:`settle_async` ask the server. A unit of
work that wrote nothing has no id (``pg_current_xact_id_if_assigned()`` is NULL): its COMMIT
changes nothing, and a cut one is run again without asking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ._asyncio_ext import AsyncConnection, AsyncEngine

#: The oldest server with ``pg_current_xact_id_if_assigned()`` and ``pg_xact_status(xid8)``.
MINIMUM_SERVER_VERSION = (13,)

#: Which server instance answers: a postmaster's start time, with its address and port.
_INSTANCE = (
    "pg_postmaster_start_time()::text || ' ' || "
    "coalesce(host(inet_server_addr()) || ':' || inet_server_port()::text, 'local')"
)

#: Sent just before COMMIT, inside the unit's transaction. It never assigns an id (a read-only
#: transaction stays cheap to commit) and never fails on a standby.
NOTE_SQL = f"SELECT pg_current_xact_id_if_assigned()::text, pg_backend_pid(), {_INSTANCE}"

#: Asked on a fresh connection after the cut. An id not below one assigned now has not been
#: assigned yet (``pg_xact_status`` would raise): "future". (A snapshot's ``xmax`` will not do:
#: it is one past the newest *completed* id, and the transaction asked about may be running.)
STATUS_SQL = text(
    "SELECT CASE WHEN x < pg_current_xact_id() THEN pg_xact_status(x)"
    f" ELSE 'future' END, {_INSTANCE}"
    " FROM (SELECT CAST(CAST(:xid AS text) AS xid8) AS x) AS t"
)

#: Ends the old session, only while it still holds the transaction (``backend_xid`` is the id's
#: low 32 bits): a pid reused by another session is left alone.
TERMINATE_SQL = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE pid = :pid AND backend_xid::text = CAST(:xid32 AS text)"
)

#: Sleeps between asking again while the old session still holds the transaction.
WAITS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)

Status = Literal["committed", "aborted", "in progress", "future"]
Settlement = Literal["committed", "not_committed", "ask_again", "unknown"]

#: (status, asked the same instance) -> what it proves. A pair not listed proves nothing.
SETTLEMENTS: dict[tuple[str | None, bool], Settlement] = {
    ("committed", True): "committed",
    ("aborted", True): "not_committed",
    ("in progress", True): "ask_again",
    ("aborted", False): "not_committed",
    ("in progress", False): "not_committed",
    ("future", False): "not_committed",
}


@dataclass(frozen=True, slots=True)
class CommitNote:
    """What the unit's session said just before COMMIT: its transaction id (None: it wrote
    nothing), its backend's pid, and the server instance."""

    xid: str | None
    pid: int
    instance: str

    @classmethod
    def from_row(cls, row: Any) -> CommitNote:
        xid, pid, instance = row
        return cls(xid, int(pid), str(instance))


def settlement(status: str | None, same_instance: bool) -> Settlement:
    """What a status read after the cut proves (see the module's docstring); pure."""
    return SETTLEMENTS.get((status, same_instance), "unknown")


def note(connection: Connection) -> CommitNote:
    """Ask, inside the connection's transaction, what :data:`NOTE_SQL` says: on the DBAPI cursor
    (SQLAlchemy's statement machinery and events cost more than the round trip itself; the note
    is the runner's, not the application's). A failure there (the connection lost) is asked
    again through SQLAlchemy, which raises it as the ``DBAPIError`` the runner's rules expect."""
    try:
        cursor = connection.connection.cursor()
        try:
            cursor.execute(NOTE_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:
        row = connection.exec_driver_sql(NOTE_SQL).one()
    return CommitNote.from_row(row)


async def note_async(connection: AsyncConnection) -> CommitNote:
    """:func:`note` for asyncio: on the driver's own connection (asyncpg, psycopg), else
    through SQLAlchemy."""
    driver = connection.dialect.driver
    try:
        raw = await connection.get_raw_connection()
        native: Any = raw.driver_connection
        if driver == "asyncpg":
            row: Any = tuple(await native.fetchrow(NOTE_SQL))
        elif driver == "psycopg":
            row = await (await native.execute(NOTE_SQL)).fetchone()
        else:
            row = (await connection.exec_driver_sql(NOTE_SQL)).one()
    except Exception:
        row = (await connection.exec_driver_sql(NOTE_SQL)).one()
    return CommitNote.from_row(row)


def wants_note(connection: Connection | AsyncConnection) -> bool:
    """Whether the connection's server can settle a cut COMMIT (PostgreSQL 13 or later)."""
    dialect = connection.dialect
    version = dialect.server_version_info or ()
    return dialect.name == "postgresql" and tuple(version) >= MINIMUM_SERVER_VERSION


def settle(
    engine: Engine, note: CommitNote, sleep: Callable[[float], None] = time.sleep
) -> Settlement:
    """Ask a fresh connection of ``engine`` how the noted transaction ended: ``committed``,
    ``not_committed`` or ``unknown`` (the server could not be asked, or its answer proves
    nothing)."""
    assert note.xid is not None
    try:
        with engine.connect() as connection:
            for wait in (*WAITS, None):
                verdict = _ask(connection.execute(STATUS_SQL, {"xid": note.xid}).one(), note)
                if verdict != "ask_again":
                    return verdict
                if wait is None:
                    break
                if wait == WAITS[0]:
                    connection.execute(TERMINATE_SQL, _terminate_params(note))
                connection.rollback()  # a new snapshot for the next question
                sleep(wait)
    except Exception:  # the server cannot be asked now: the outcome stays unknown
        return "unknown"
    return "unknown"


async def settle_async(engine: AsyncEngine, note: CommitNote) -> Settlement:
    """:func:`settle` for an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`. Cancellation is
    never caught."""
    assert note.xid is not None
    try:
        async with engine.connect() as connection:
            for wait in (*WAITS, None):
                row = (await connection.execute(STATUS_SQL, {"xid": note.xid})).one()
                verdict = _ask(row, note)
                if verdict != "ask_again":
                    return verdict
                if wait is None:
                    break
                if wait == WAITS[0]:
                    await connection.execute(TERMINATE_SQL, _terminate_params(note))
                await connection.rollback()
                await asyncio.sleep(wait)
    except Exception:
        return "unknown"
    return "unknown"


def _ask(row: Any, note: CommitNote) -> Settlement:
    status, instance = row
    return settlement(status, instance == note.instance)


def _terminate_params(note: CommitNote) -> dict[str, Any]:
    assert note.xid is not None
    return {"pid": note.pid, "xid32": str(int(note.xid) % 2**32)}

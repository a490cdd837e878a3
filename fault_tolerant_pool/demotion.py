"""A writer that turned read-only while still reachable, learnt from what statements see.

Patroni, Aurora and operators demote a primary by making it read-only (``ALTER SYSTEM SET
default_transaction_read_only = on``) or by restarting it as a standby. Its pooled connections
stay open and answer pings; every write fails with SQLSTATE ``25006`` for ever, and SQLAlchemy
treats that as an ordinary error. PostgreSQL 14+ reports ``default_transaction_read_only`` and
``in_hot_standby`` to the client (ParameterStatus), with the answer to the next command, so the
driver knows once a statement has run. The pool reads both when it connects and again when a
statement fails with a read-only signal (or after its liveness ping):

- writable when connected, read-only now: the server was demoted. The connection is a
  disconnect for SQLAlchemy (``handle_error`` sets ``is_disconnect``), which invalidates it and
  the whole pool: every pooled connection made before is replaced before it is lent again, through
  the retry loop (where ``target_session_attrs=read-write`` skips the read-only host and "no host
  is writable yet" is retried).
- still writable (the application's own ``READ ONLY`` transaction, ``SET TRANSACTION READ ONLY``):
  nothing happens.
- read-only already when connected: nothing happens in a pool for a replica (no connection of
  the pool was ever made to a writable server); in a pool that had a writer, the connection was
  made to the old writer during a failover (a single address, a VIP or a proxy, that has not
  moved yet), and is replaced, so that its successor may reach the new writer.
- better still, such a connection is not handed out at all: while the pool is in doubt (a
  connection error or disconnect in the last seconds, see :mod:`.doubt`), a new connection of a
  pool that had a writer whose server reports itself read-only is closed and the connect is
  retried (:class:`ReadOnlyRoute`, a transient connect error), as HAProxy keeps sending new
  connections to a Patroni leader restarted as a replica until its next health check. Outside
  doubt it is handed out (a pool whose address also leads to replicas keeps reading from them).
- the server reports neither (PostgreSQL 13 and older): a read-only signal counts as a
  demotion only when the URL asks for a writer (``target_session_attrs=read-write``/``primary``).

The failed statement is never replayed: the application sees its error, with
``connection_invalidated`` true. A ``handle_error`` listener of the application runs after this
one and may overrule it (``ctx.is_disconnect = False``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .classify import sqlstate_of
from .notes import ConnectionNotes, notes_of

logger = logging.getLogger("fault_tolerant_pool.failover")

#: ParameterStatus values (PostgreSQL 14+) of which either "on" means: this server takes no writes.
READ_ONLY_PARAMETERS: tuple[str, ...] = ("default_transaction_read_only", "in_hot_standby")

#: Statement errors that say the server takes no writes: SQLSTATE -> a fragment the message must
#: hold (None: any message).
READ_ONLY_SIGNALS: dict[str, str | None] = {
    "25006": None,  # read_only_sql_transaction: "cannot execute INSERT in a read-only transaction"
    "55000": "recovery is in progress",  # object_not_in_prerequisite_state, on a standby
}


class ReadOnlyRoute(ConnectionError):
    """A new connection reached a read-only server where this pool's connections reached a
    writer: a route that has not moved yet after a failover. Transient: the connect is retried."""


def reported_read_only(driver_connection: Any) -> bool | None:
    """What the server last reported: True (read-only), False (writable), None (not reported,
    or a driver this module does not know)."""
    module = type(driver_connection).__module__
    status: Callable[[str], Any]
    if module.startswith("psycopg"):  # psycopg 3 and psycopg2: the libpq's ParameterStatus
        status = driver_connection.info.parameter_status
    elif module.startswith("asyncpg"):
        settings = driver_connection.get_settings()

        def status(name: str) -> Any:
            return getattr(settings, name, None)

    else:
        return None
    seen = False
    for name in READ_ONLY_PARAMETERS:
        value = status(name)
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if value == "on":
            return True
        seen = True
    return False if seen else None


def is_read_only_signal(error: BaseException) -> bool:
    """Whether a statement's error says the server takes no writes."""
    code = sqlstate_of(error)
    if code is None or code not in READ_ONLY_SIGNALS:
        return False
    fragment = READ_ONLY_SIGNALS[code]
    return fragment is None or fragment in str(error).lower()


def demoted(
    connected: bool | None, now: bool | None, *, signal: bool, wants_writer: bool, had_writer: bool
) -> bool:
    """The verdict of the table in the module docstring, given what the server said when the
    connection was made (``connected``) and says now (``now``), whether a statement failed with
    a read-only ``signal`` (else: after a ping), whether the URL asks for a writer, and whether
    the pool ever connected to a writable server."""
    if now is False:
        return False  # still writable: the application's own read-only transaction
    if now is True and connected is False:
        return True  # writable when connected, read-only now
    if not signal:
        return False
    if now is True:  # read-only already when connected
        return had_writer  # made during a failover, to the old writer: try for the new one
    return wants_writer  # the server reports nothing (PostgreSQL 13 and older)


class DemotionWatch:
    """One pool's watch for a demoted writer: stamps new connections, judges failed statements.

    ``demoted`` is called (with a description) once per demotion seen, for the stats and logs.
    """

    __slots__ = ("had_writer", "on_demoted", "serves_reads", "wants_writer")

    def __init__(self, wants_writer: bool, on_demoted: Callable[[], None]) -> None:
        self.wants_writer = wants_writer
        self.on_demoted = on_demoted
        self.had_writer = False
        """Some connection of the pool was made to a writable server."""
        self.serves_reads = False
        """A read router's reader (:class:`~fault_tolerant_pool.ReplicaRouter`): a read-only
        server is what it is for, never a demoted writer nor a route to refuse."""

    def connected(self, record: Any, driver_connection: Any) -> None:
        """A new physical connection of ``record``: note whether its server was read-only
        (``connected_read_only`` in the record's notes, written at every connect, so it always
        describes the current connection)."""
        read_only = reported_read_only(driver_connection)
        notes_of(record).connected_read_only = read_only
        if read_only is False and not self.had_writer:
            self.had_writer = True

    def vet(self, driver_connection: Any) -> None:
        """Refuse a new connection to a read-only server in a pool that had a writer (call it
        only while the pool is in doubt: see the module docstring)."""
        if self.had_writer and not self.serves_reads and reported_read_only(driver_connection):
            raise ReadOnlyRoute(
                "the server reached is read-only (a standby, or a demoted writer) where this "
                "pool's connections reached a writer: a route not yet moved after a failover"
            )

    def judge(self, notes: ConnectionNotes, driver_connection: Any, signal: bool = True) -> bool:
        """Whether the server of the connection ``notes`` describe was demoted: after a
        statement's read-only ``signal``, or (``signal`` false) after a ping, where only a
        reported change counts."""
        if self.serves_reads:
            return False
        now = reported_read_only(driver_connection)
        connected = notes.connected_read_only
        if not demoted(
            connected,
            now,
            signal=signal,
            wants_writer=self.wants_writer,
            had_writer=self.had_writer,
        ):
            return False
        self.on_demoted()
        logger.warning(
            "the server of a pooled connection is read-only now (it was %s when the "
            "connection was made): replacing every pooled connection",
            _describe(connected),
        )
        return True

    def handle_error(self, context: Any) -> None:
        """SQLAlchemy's ``handle_error`` listener: a demoted server's error is a disconnect."""
        if context.is_disconnect or context.is_pre_ping:
            return
        if not is_read_only_signal(context.original_exception):
            return
        connection = context.connection
        if connection is None:
            return
        try:
            fairy = connection.connection
            driver_connection = fairy.driver_connection
            notes = notes_of(fairy._connection_record)
        except Exception:  # closed or invalidated meanwhile: nothing left to judge
            return
        if driver_connection is not None and self.judge(notes, driver_connection):
            context.is_disconnect = True


def _describe(read_only: bool | None) -> str:
    return {True: "read-only", False: "writable", None: "silent"}[read_only]

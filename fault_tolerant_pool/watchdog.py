"""Every ping (and rollback) has a time limit: a silent peer cannot hang a checkout or checkin.

A pooled connection whose peer vanished without a word (the old primary's address black-holed
in a cloud failover, a firewall that drops the flow) looks alive: the ping is sent and the
answer never comes, until the kernel gives up on the connection (minutes, with the default TCP
retransmission settings). So the dialect's ``do_ping`` is wrapped once per engine: if the ping
has not returned after ``ping_timeout`` seconds, the connection's socket is shut down. The
driver then sees the connection end, raises, and SQLAlchemy treats that as a disconnect as for
any dead connection: the liveness ping and ``pool_pre_ping`` replace it through the retry
loop, ``retry_ping`` retries the connect. This covers the pool's liveness ping after idleness,
``retry_ping`` and SQLAlchemy's own ``pool_pre_ping`` (all go through ``dialect.do_ping``).

``dialect.do_rollback`` gets the same limit on a connection whose last statement failed (the
engine's ``handle_error`` marks it, see :func:`suspect`): the pool resets every returned
connection with a rollback, which would hang the same way, for ever, after a request's own time
limit cancelled a statement on a black-holed connection (psycopg answers that cancellation with
an error after its own cancel attempt, not with a disconnect). A PostgreSQL ``ROLLBACK`` does not
wait for locks or I/O of the transaction; a healthy server answers it as fast as a ping. The
rollback of a connection whose statements all succeeded is left unbounded: it is on the hot path
(every checkin), and the statement before it just proved the peer alive.

Async engines arm the limit with ``loop.call_later`` (no thread); sync engines with one watchdog
thread per process, started on first use, which sleeps until the earliest deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .notes import notes_of

_T = TypeVar("_T")

logger = logging.getLogger("fault_tolerant_pool.liveness")

#: Seconds a ping may take before its connection is cut (see docs/failover.md: "Every ping has
#: a time limit"). A healthy server answers ``;`` in well under a millisecond on loopback and a
#: few milliseconds across a region; 2 s leaves room for a loaded server without letting a
#: black hole hold a checkout for longer than the retry loop needs to replace it.
DEFAULT_PING_TIMEOUT = 2.0

_WRAPPED = "_fault_tolerant_pool_bounded"


def socket_fd(driver_connection: Any) -> int | None:
    """The socket descriptor of a driver's connection (asyncpg or psycopg), or None (another
    driver: its pings are left unbounded)."""
    module = type(driver_connection).__module__
    if module.startswith("asyncpg"):
        transport = driver_connection._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())
    if module.startswith("psycopg"):
        try:
            return int(driver_connection.fileno())
        except Exception:  # closed already
            return None
    return None


def cut(fd: int) -> None:
    """Shut the socket down in both directions: whoever waits on it sees the connection end.

    Only the duplicate descriptor is closed; the driver closes its own.
    """
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class _Entry:
    __slots__ = ("action", "alive", "deadline", "seq")

    def __init__(self, deadline: float, seq: int, action: Callable[[], None]) -> None:
        self.deadline = deadline
        self.seq = seq
        self.action = action
        self.alive = True

    def __lt__(self, other: _Entry) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        self.alive = False


class Watchdog:
    """One thread that runs each armed action at its deadline unless it was cancelled first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[_Entry] = []
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], None]) -> _Entry:
        entry = _Entry(self.clock() + seconds, next(self._seq), action)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fault_tolerant_pool-ping-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def _run(self) -> None:
        with self._cond:
            while True:
                heap = self._heap
                while heap and not heap[0].alive:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                wait = heap[0].deadline - self.clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                entry = heapq.heappop(heap)
                self._cond.release()
                try:
                    entry.action()
                except Exception:  # never let one action stop the watchdog
                    logger.debug("ping watchdog action failed", exc_info=True)
                finally:
                    self._cond.acquire()


_watchdog = Watchdog()


def bounded(
    operation: Callable[[Any], _T],
    what: str,
    seconds: float,
    driver_connection_of: Callable[[Any], Any],
    on_timeout: Callable[[], None],
) -> Callable[[Any], _T]:
    """``operation(dbapi_connection)`` that cuts the connection if it has not returned after
    ``seconds``."""

    def bounded_operation(dbapi_connection: Any) -> _T:
        try:
            fd = socket_fd(driver_connection_of(dbapi_connection))
        except Exception:
            fd = None
        if fd is None:
            return operation(dbapi_connection)

        def expire() -> None:
            on_timeout()
            logger.warning("a %s got no answer within %.3gs: cutting its connection", what, seconds)
            cut(fd)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            handle: asyncio.TimerHandle | _Entry = _watchdog.arm(seconds, expire)
        else:
            handle = loop.call_later(seconds, expire)
        try:
            return operation(dbapi_connection)
        finally:
            handle.cancel()

    setattr(bounded_operation, _WRAPPED, True)
    return bounded_operation


@contextlib.contextmanager
def cut_after(seconds: float, driver_connection: Any, what: str) -> Iterator[None]:
    """Cut ``driver_connection`` if the block has not ended after ``seconds``: a thread blocked
    on it (a statement sent into a black hole) then sees the connection end and raises. For sync
    code (the watchdog thread); a driver whose socket is unknown is left unbounded."""
    fd = socket_fd(driver_connection)
    if fd is None:
        yield
        return

    def expire() -> None:
        logger.warning("a %s got no answer within %.3gs: cutting its connection", what, seconds)
        cut(fd)

    entry = _watchdog.arm(seconds, expire)
    try:
        yield
    finally:
        entry.cancel()


def suspect(record: Any) -> None:
    """A statement failed on the connection of a pool record: bound its next rollback (the
    ``suspect`` mark in the record's notes)."""
    notes_of(record).suspect = True


def _rollback_when_suspect(
    rollback: Callable[[Any], None], bounded_rollback: Callable[[Any], None]
) -> Callable[[Any], None]:
    def do_rollback(dbapi_connection: Any) -> None:
        # every checkin comes here: three attribute reads, no call, on the happy path
        try:
            notes = dbapi_connection._connection_record.notes  # SQLAlchemy's proxy
        except Exception:  # a raw DBAPI connection, a proxy detached from its record, or a
            notes = None  # record made by hand that never had a statement fail
        if notes is not None and notes.suspect:
            notes.suspect = False
            bounded_rollback(dbapi_connection)
        else:
            rollback(dbapi_connection)

    setattr(do_rollback, _WRAPPED, True)
    return do_rollback


def install(dialect: Any, seconds: float | None, on_timeout: Callable[[], None]) -> None:
    """Give the dialect's pings, and rollbacks after a failed statement, the time limit (once
    per dialect; None: no limit)."""
    if seconds is None or getattr(dialect.do_ping, _WRAPPED, False):
        return
    driver = dialect.get_driver_connection
    dialect.do_ping = bounded(dialect.do_ping, "ping", seconds, driver, on_timeout)
    rollback = dialect.do_rollback
    dialect.do_rollback = _rollback_when_suspect(
        rollback, bounded(rollback, "rollback", seconds, driver, on_timeout)
    )

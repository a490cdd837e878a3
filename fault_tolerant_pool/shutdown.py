"""Drain and graceful shutdown: replace every connection, or stop lending and let them come back.

``drain(engine)``: every connection is replaced without failing a request. Idle ones are closed
at once, checked-out ones when they come back (never while in use), and every checkout after the
call gets a connection made after it (the pool's upkeep compares a generation stamped on each
connection when it was made). For a credential rotation, after a failover, after moving
PgBouncer; psycopg_pool 3.3 has the same word.

``shutdown(engine, timeout)``: stop lending (a checkout raises :class:`PoolClosed`), wait up to
``timeout`` seconds for the checked-out connections to come back (each is closed as it does),
then close everything. What is still out at the timeout is reported as a leak with its holder and
checkout site (with ``leak_threshold`` set) and its socket is shut down, so that the server ends
the session at once and the holder's next statement fails as on any lost connection.

Both take a sync ``Engine`` (and return when done) or an ``AsyncEngine`` (and return an awaitable).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, overload

from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, InvalidRequestError
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sqla_queue

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .leaks import LeakTracker

logger = logging.getLogger("fault_tolerant_pool.shutdown")

#: Seconds a shutdown waits for checked-out connections unless told otherwise.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: How often a shutdown looks whether the connections have come back.
POLL_INTERVAL = 0.01


class PoolClosed(InvalidRequestError):
    """A checkout from a pool that was shut down (``fault_tolerant_pool.shutdown``)."""


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a shutdown did: how long it waited and what was still out at its timeout."""

    waited: float
    """Seconds spent waiting for checked-out connections."""
    checked_out_at_start: int
    """Connections that were out when the shutdown began."""
    stragglers: int
    """Connections still out at the timeout (closed and reported)."""
    holders: tuple[str, ...] = ()
    """The holders of the stragglers (``task 'name'`` / ``thread 'name'``), with
    ``leak_threshold`` set; empty without it."""

    @property
    def clean(self) -> bool:
        """Every connection came back in time."""
        return self.stragglers == 0


def wait_until(
    done: Callable[[], bool],
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    interval: float = POLL_INTERVAL,
) -> bool:
    """Look at ``done()`` every ``interval`` seconds until it is true (True) or ``timeout``
    seconds have passed (False). Never sleeps past the timeout."""
    deadline = clock() + timeout
    while not done():
        left = deadline - clock()
        if left <= 0:
            return done()
        sleep(min(interval, left))
    return True


def timeout_seconds(value: Any) -> float:
    """A shutdown ``timeout``: seconds, at least 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ArgumentError(f"timeout must be a number of seconds, at least 0, got {value!r}")
    return float(value)


def sever(driver_connection: Any) -> bool:
    """Shut the socket of a connection that is in use elsewhere down, from any thread.

    Closing the driver's connection under its holder is not safe (libpq would free what the other
    thread is using); a ``shutdown()`` of the socket is: the server sees the end of the stream and
    ends the session, the holder's next read or write fails as on a lost connection, and the
    descriptor stays the driver's to close. Returns whether a socket was found.
    """
    fd = _socket_fd(driver_connection)
    if fd is None:
        return False
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer
        pass
    finally:
        sock.close()  # the duplicate only
    return True


def _socket_fd(driver_connection: Any) -> int | None:
    try:
        if hasattr(driver_connection, "fileno"):  # psycopg 3, psycopg2
            return int(driver_connection.fileno())
        transport = getattr(driver_connection, "_transport", None)  # asyncpg
        sock = transport.get_extra_info("socket") if transport is not None else None
        return None if sock is None else int(sock.fileno())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    except Exception:  # a driver's own "connection is closed"
        return None


class Closable(Protocol):
    """What :func:`close_pool` needs of a pool."""

    _leaks: LeakTracker | None

    def _refuse(self, refusal: PoolClosed) -> None: ...

    def _out_now(self) -> int: ...

    def dispose(self) -> None: ...


def close_pool(
    pool: Closable,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ShutdownReport:
    """The shutdown of one pool: refuse, wait, report and sever the stragglers, dispose."""
    pool._refuse(
        PoolClosed("the pool is shut down: no new checkouts (engine.dispose() gives a fresh pool)")
    )
    leaks = pool._leaks
    out_at_start = pool._out_now()
    started = clock()

    def all_back() -> bool:
        # the tracker also knows what the pools this one replaced (engine.dispose()) lent
        return pool._out_now() <= 0 and (leaks is None or not leaks.out)

    wait_until(all_back, timeout, clock=clock, sleep=sleep)
    waited = clock() - started
    stragglers = leaks.stragglers() if leaks is not None else []
    for record, entry in stragglers:
        leaks.report_straggler(entry)  # type: ignore[union-attr]
        driver_connection = record.driver_connection
        if driver_connection is not None:
            sever(driver_connection)
    left = pool._out_now()
    if left and not stragglers:
        logger.warning(
            "%d connection(s) still checked out when the pool shut down; they are closed when "
            "returned (set leak_threshold to see who holds them)", left,
        )  # fmt: skip
    pool.dispose()
    return ShutdownReport(
        waited, out_at_start, max(left, len(stragglers)),
        tuple(entry.holder for _, entry in stragglers),
    )  # fmt: skip


# -- the engine-level helpers ---------------------------------------------------------------------


def _is_async(engine: Engine | AsyncEngine) -> bool:
    """Whether ``engine`` is an ``AsyncEngine``, without importing SQLAlchemy's asyncio module
    (it needs greenlet, which a sync application may not have): unloaded, no engine is one."""
    asyncio_ext = sys.modules.get("sqlalchemy.ext.asyncio")
    return asyncio_ext is not None and isinstance(engine, asyncio_ext.AsyncEngine)


def _pool_of(engine: Engine | AsyncEngine, what: str) -> Any:
    pool = engine.pool
    if not hasattr(pool, what):
        raise ArgumentError(
            f"{what}() needs an engine on FaultTolerantQueuePool or FaultTolerantNullPool, "
            f"not {type(pool).__name__}"
        )
    return pool


@overload
def drain(engine: AsyncEngine) -> Awaitable[int]: ...
@overload
def drain(engine: Engine) -> int: ...
def drain(engine: Engine | AsyncEngine) -> int | Awaitable[int]:
    """Replace every connection of ``engine``'s pool (see the module docstring).

    ``drain(engine)`` for a sync engine, ``await drain(async_engine)`` for an async one. Returns
    how many idle connections were closed at once.
    """
    pool = _pool_of(engine, "drain")
    if _is_async(engine):
        return greenlet_spawn(pool.drain)
    return pool.drain()  # type: ignore[no-any-return]


@overload
def shutdown(
    engine: AsyncEngine, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
) -> Awaitable[ShutdownReport]: ...
@overload
def shutdown(engine: Engine, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> ShutdownReport: ...
def shutdown(
    engine: Engine | AsyncEngine, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
) -> ShutdownReport | Awaitable[ShutdownReport]:
    """Stop lending, wait up to ``timeout`` seconds for checked-out connections, close all.

    ``shutdown(engine, 20)`` for a sync engine, ``await shutdown(async_engine, 20)`` for an async
    one (the event loop keeps running the holders meanwhile). After it the pool refuses
    checkouts with :class:`PoolClosed`; ``engine.dispose()`` gives the engine a fresh pool.
    """
    pool = _pool_of(engine, "close")
    seconds = timeout_seconds(timeout)
    if _is_async(engine):
        return greenlet_spawn(pool.close, seconds)
    return pool.close(seconds)  # type: ignore[no-any-return]


def close_stale_idle(pool: Any, upkeep: Any, give_back: Callable[[Any, Any], None]) -> int:
    """Close ``pool``'s idle connections made before the latest drain (``upkeep.stale``); their
    slots stay (``give_back`` returns each empty record to the queue). Returns how many."""
    queue = pool._pool
    taken = []
    for _ in range(queue.qsize()):
        try:
            taken.append(queue.get(False))
        except sqla_queue.Empty:
            break
    stale = [record for record in taken if upkeep.stale(record)]
    for record in taken:
        if not upkeep.stale(record):
            give_back(pool, record)
    for index, record in enumerate(stale):
        try:
            pool._fault_tolerance.counters.retire("drain")
            record.close()
        except BaseException:  # cancelled, or no greenlet: no slot may be lost
            for left in stale[index:]:
                give_back(pool, left)
            raise
        give_back(pool, record)  # the empty slot goes back
    return len(stale)

"""The pool classes: SQLAlchemy's own pools whose every DBAPI connect goes through the retry loop.

SQLAlchemy funnels every physical connect of a pool (new connections, and reconnects after
invalidation, recycle or a failed pre-ping) through the callable built by
``Pool._should_wrap_creator``; wrapping it there is the connect half of the integration (the
:class:`RetryingConnector`). The checkout half is the queue pool's own hooks, ``_do_get`` and
``_do_return_conn``, which run the steps :mod:`.checkout` chose from the settings when the pool
was made (upkeep, overflow, leaks). The queue, events, pre-ping and recycle stay SQLAlchemy's.

Both classes take SQLAlchemy's arguments as their stock class does (positionally too) and this
project's settings keyword-only (:mod:`.settings`); what the settings build is assembled once
(:class:`FaultTolerance`) and handed to the new pool by ``recreate()``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, Pool, QueuePool
from sqlalchemy.pool.base import ConnectionPoolEntry

from . import settings
from .base import _FaultTolerantPool
from .checkout import Steps, null_steps, queue_steps
from .fault_tolerance import FaultTolerance as FaultTolerance
from .liveness import LivenessPolicy
from .overflow import OverflowIdle, queue_capacity
from .shutdown import PoolClosed, close_stale_idle
from .upkeep import Upkeep

#: This project's keyword arguments of both pool classes (see :mod:`.settings`).
POOL_ARGUMENTS: tuple[str, ...] = settings.NAMES


def _stock_logger_name(stock: type[Pool]) -> str:
    """The logger name SQLAlchemy gives a stock pool class (``sqlalchemy.pool.impl.QueuePool``):
    a pool logs where ``logging.getLogger("sqlalchemy.pool")`` and ``echo_pool`` look."""
    return f"{stock.__module__}.{stock.__name__}"


class FaultTolerantQueuePool(_FaultTolerantPool, QueuePool):
    """SQLAlchemy's ``QueuePool`` whose connects are retried with backoff.

    One name for sync and async engines: constructed with an asyncio dialect (as
    ``create_async_engine`` does), it becomes :class:`FaultTolerantAsyncQueuePool`.
    Connections are checked before they are lent (liveness, lifetime) and when they come back
    (lifetime, idle); see :mod:`fault_tolerant_pool.upkeep`.
    """

    _sqla_logger_namespace = _stock_logger_name(QueuePool)

    def __new__(cls, *args: Any, **kw: Any) -> FaultTolerantQueuePool:
        if cls is FaultTolerantQueuePool and getattr(kw.get("dialect"), "is_async", False):
            cls = FaultTolerantAsyncQueuePool
        return object.__new__(cls)

    def __init__(
        self, creator: Any, *args: Any, _fault_tolerance: FaultTolerance | None = None, **kw: Any
    ) -> None:
        self._take_settings(creator, kw, _fault_tolerance)
        ft = self._fault_tolerance
        QueuePool.__init__(self, creator, *args, **kw)
        self._pool_size = self._pool.maxsize
        if ft.overflow_idle > 0 and self._pool_size > 0 and self._max_overflow != 0:
            # keep overflow connections idle: a larger queue
            self._overflow_idle = OverflowIdle(ft.overflow_idle)
            capacity = queue_capacity(self._pool_size, self._max_overflow)
            self._pool = self._queue_class(capacity, use_lifo=self._pool.use_lifo)
        self._wire()

    def _build_steps(self) -> Steps:
        return queue_steps(self)

    def _give_back(self, record: ConnectionPoolEntry) -> None:
        QueuePool._do_return_conn(self, record)

    def _idle_now(self) -> int:
        """The idle connections in the queue (its deque's length: ``qsize()`` takes a lock)."""
        return len(self._pool.queue)  # type: ignore[attr-defined]

    def size(self) -> int:
        return self._pool_size

    def overflow(self) -> int:
        return self._overflow if self._pool_size else 0

    def checkedout(self) -> int:
        return self._pool_size - self._pool.qsize() + self._overflow

    def drain(self) -> int:
        self._upkeep_for_drain().drain()
        return close_stale_idle(self, self._upkeep_for_drain(), QueuePool._do_return_conn)

    def _refuse(self, refusal: PoolClosed) -> None:
        self._closed = refusal
        self._upkeep_for_drain().close(refusal)
        close_stale_idle(self, self._upkeep_for_drain(), QueuePool._do_return_conn)

    def _upkeep_for_drain(self) -> Upkeep:
        """The upkeep, installed now (with every rule off) on a pool that had none."""
        if self._upkeep is None:
            self._upkeep = self._new_upkeep(LivenessPolicy(check=False))
            self._steps = queue_steps(self)  # its checkin step retires the drained ones
        return self._upkeep

    def recreate(self) -> FaultTolerantQueuePool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            pool_size=self._pool_size,
            max_overflow=self._max_overflow,
            use_lifo=self._pool.use_lifo,
            timeout=self._timeout,
            **self._recreate_arguments(),
        )

    def _gauges(self) -> tuple[int, int, int, int]:
        return self.size(), self.checkedin(), self.checkedout(), self.overflow()

    def _would_wait(self) -> bool:
        return -1 < self._max_overflow <= self._overflow and self._pool.empty()

    def _limits(self) -> tuple[int | None, int | None]:
        size = self._pool_size
        most = None if self._max_overflow < 0 else size + self._max_overflow
        return most, self._pool.maxsize or None  # the queue holds the idle ones (0: no limit)


class FaultTolerantAsyncQueuePool(FaultTolerantQueuePool, AsyncAdaptedQueuePool):
    """The asyncio flavour (asyncio queue); chosen for you by :class:`FaultTolerantQueuePool`."""

    _sqla_logger_namespace = _stock_logger_name(AsyncAdaptedQueuePool)

    def _idle_now(self) -> int:
        return self._pool.qsize()  # the asyncio queue's: no lock


class FaultTolerantNullPool(_FaultTolerantPool, NullPool):
    """SQLAlchemy's ``NullPool`` (a new connection per checkout) with every connect retried.

    For PgBouncer: each checkout is a login to the bouncer, so the retry (and ``credentials``)
    is the resilience. Works with sync and async engines. ``max_lifetime``, ``max_idle``,
    ``overflow_idle`` and the liveness check are accepted and have nothing to do: every
    connection is new at checkout and closed at checkin.
    """

    _sqla_logger_namespace = _stock_logger_name(NullPool)
    _keeps_connections = False

    def __init__(
        self, creator: Any, *args: Any, _fault_tolerance: FaultTolerance | None = None, **kw: Any
    ) -> None:
        self._take_settings(creator, kw, _fault_tolerance)
        self._lent: set[ConnectionPoolEntry] = set()  # atomic add/discard: no lock to recreate
        NullPool.__init__(self, creator, *args, **kw)
        self._wire()

    def _build_steps(self) -> Steps:
        return null_steps(self)

    def _give_back(self, record: ConnectionPoolEntry) -> None:
        self._lent.discard(record)
        NullPool._do_return_conn(self, record)

    def recreate(self) -> FaultTolerantNullPool:
        self.logger.info("Pool recreating")
        return self.__class__(self._creator, **self._recreate_arguments())

    def _gauges(self) -> tuple[int, int, int, int]:
        return 0, 0, len(self._lent), 0

    def _limits(self) -> tuple[int | None, int | None]:
        return None, 0  # no limit on open connections; none is ever kept idle


for _pool_class, _stock in (
    (FaultTolerantQueuePool, QueuePool),
    (FaultTolerantNullPool, NullPool),
):
    # help() and inspect show SQLAlchemy's parameters, then the settings (keyword-only)
    _signature = settings.signature(_stock)
    setattr(_pool_class.__init__, "__signature__", _signature)  # noqa: B010
    _pool_class.__signature__ = _signature.replace(  # type: ignore[union-attr]
        parameters=list(_signature.parameters.values())[1:]
    )

"""The pool classes: SQLAlchemy's own pools whose every DBAPI connect goes through the retry loop.

SQLAlchemy funnels every physical connect of a pool (new connections, and reconnects after
invalidation, recycle or a failed pre-ping) through the callable built by
``Pool._should_wrap_creator``; wrapping it there is the whole integration. Checkout, checkin and
the queue are SQLAlchemy's, untouched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, Pool, QueuePool
from sqlalchemy.pool.base import ConnectionPoolEntry
from sqlalchemy.util import await_only

from . import timeouts
from .classify import Classifier
from .connector import RetryingConnector
from .policy import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_ATTEMPTS,
    DEFAULT_DEADLINE,
    DEFAULT_INITIAL_DELAY,
    DEFAULT_MAX_DELAY,
    RetryPolicy,
)
from .stats import ConnectCounters, PoolStats


@dataclass(frozen=True)
class FaultTolerance:
    """Everything a fault-tolerant pool adds to SQLAlchemy's; carried over by ``recreate()``."""

    policy: RetryPolicy
    classifier: Classifier | None = None
    ping: bool = False
    """Ping each new connection inside the retry loop (``retry_ping``)."""
    counters: ConnectCounters = field(default_factory=ConnectCounters, compare=False)

    @classmethod
    def from_arguments(
        cls,
        retry_attempts: Any,
        retry_deadline: Any,
        retry_initial_delay: Any,
        retry_max_delay: Any,
        retry_classifier: Any,
        retry_attempt_timeout: Any = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: Any = False,
    ) -> FaultTolerance:
        if retry_classifier is not None and not callable(retry_classifier):
            from sqlalchemy.exc import ArgumentError

            raise ArgumentError(
                f"retry_classifier must be a callable taking an exception, got {retry_classifier!r}"
            )
        policy = RetryPolicy.from_arguments(
            retry_attempts,
            retry_deadline,
            retry_initial_delay,
            retry_max_delay,
            retry_attempt_timeout,
        )
        return cls(policy, retry_classifier, _boolean("retry_ping", retry_ping))


def _boolean(name: str, value: Any) -> bool:
    """A flag, also from ``engine_from_config`` strings ("true", "false", "1", "0")."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0", ""):
            return False
    elif isinstance(value, bool | int) and value in (0, 1):
        return bool(value)
    from sqlalchemy.exc import ArgumentError

    raise ArgumentError(f"{name} must be true or false, got {value!r}")


def _async_sleep(seconds: float) -> None:
    """Sleep inside SQLAlchemy's greenlet bridge: yields to the event loop, cancellable."""
    await_only(asyncio.sleep(seconds))


class _FaultTolerantPool(Pool):
    """What both pool classes share: the wrapped creator and the stats snapshot."""

    _fault_tolerance: FaultTolerance

    def _init_fault_tolerance(
        self, fault_tolerance: FaultTolerance | None, **arguments: Any
    ) -> None:
        self._fault_tolerance = fault_tolerance or FaultTolerance.from_arguments(**arguments)

    def _should_wrap_creator(self, creator: Any) -> Any:
        ft = self._fault_tolerance
        return RetryingConnector(
            super()._should_wrap_creator(creator),
            ft.policy,
            ft.counters,
            sleep=self._backoff_sleep,
            dbapi=self._loaded_dbapi,
            classifier=ft.classifier,
            ping=self._ping_new if ft.ping else None,
            discard=self._discard_new,
        )

    def _ping_new(self, dbapi_connection: Any) -> None:
        dialect: Any = self._dialect  # a real dialect: retry_ping needs an engine's pool
        dialect.do_ping(dbapi_connection)

    def _discard_new(self, dbapi_connection: Any) -> None:
        self._dialect.do_terminate(dbapi_connection)

    def _backoff_sleep(self, seconds: float) -> None:
        if self._dialect.is_async:
            _async_sleep(seconds)
        else:
            time.sleep(seconds)

    def _loaded_dbapi(self) -> Any:
        return getattr(self._dialect, "loaded_dbapi", None)

    @property
    def retry_policy(self) -> RetryPolicy:
        """The validated retry settings this pool (and every pool it is recreated as) uses."""
        return self._fault_tolerance.policy

    def stats(self) -> PoolStats:
        """A snapshot of what the pool did and holds; see :class:`PoolStats`."""
        return self._fault_tolerance.counters.snapshot(*self._gauges())

    def _gauges(self) -> tuple[int, int, int, int]:
        raise NotImplementedError


class FaultTolerantQueuePool(_FaultTolerantPool, QueuePool):
    """SQLAlchemy's ``QueuePool`` whose connects are retried with backoff.

    One name for sync and async engines: constructed with an asyncio dialect (as
    ``create_async_engine`` does), it becomes :class:`FaultTolerantAsyncQueuePool`.
    """

    def __new__(cls, *args: Any, **kw: Any) -> FaultTolerantQueuePool:
        if cls is FaultTolerantQueuePool and getattr(kw.get("dialect"), "is_async", False):
            cls = FaultTolerantAsyncQueuePool
        return object.__new__(cls)

    def __init__(
        self,
        creator: Any,
        retry_attempts: int | None = DEFAULT_ATTEMPTS,
        retry_deadline: float = DEFAULT_DEADLINE,
        retry_initial_delay: float = DEFAULT_INITIAL_DELAY,
        retry_max_delay: float = DEFAULT_MAX_DELAY,
        retry_classifier: Classifier | None = None,
        retry_attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: bool = False,
        _fault_tolerance: FaultTolerance | None = None,
        **kw: Any,
    ) -> None:
        self._init_fault_tolerance(
            _fault_tolerance,
            retry_attempts=retry_attempts,
            retry_deadline=retry_deadline,
            retry_initial_delay=retry_initial_delay,
            retry_max_delay=retry_max_delay,
            retry_classifier=retry_classifier,
            retry_attempt_timeout=retry_attempt_timeout,
            retry_ping=retry_ping,
        )
        QueuePool.__init__(self, creator, **kw)
        timeouts.install(self._dialect)

    def recreate(self) -> FaultTolerantQueuePool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            pool_size=self._pool.maxsize,
            max_overflow=self._max_overflow,
            pre_ping=self._pre_ping,
            use_lifo=self._pool.use_lifo,
            timeout=self._timeout,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
            _fault_tolerance=self._fault_tolerance,
        )

    def _gauges(self) -> tuple[int, int, int, int]:
        return self.size(), self.checkedin(), self.checkedout(), self.overflow()


class FaultTolerantAsyncQueuePool(FaultTolerantQueuePool, AsyncAdaptedQueuePool):
    """The asyncio flavour (asyncio queue); chosen for you by :class:`FaultTolerantQueuePool`."""


class FaultTolerantNullPool(_FaultTolerantPool, NullPool):
    """SQLAlchemy's ``NullPool`` (a new connection per checkout) with every connect retried.

    For PgBouncer: each checkout is a login to the bouncer, so the retry is the resilience.
    Works with sync and async engines.
    """

    def __init__(
        self,
        creator: Any,
        retry_attempts: int | None = DEFAULT_ATTEMPTS,
        retry_deadline: float = DEFAULT_DEADLINE,
        retry_initial_delay: float = DEFAULT_INITIAL_DELAY,
        retry_max_delay: float = DEFAULT_MAX_DELAY,
        retry_classifier: Classifier | None = None,
        retry_attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: bool = False,
        _fault_tolerance: FaultTolerance | None = None,
        **kw: Any,
    ) -> None:
        self._init_fault_tolerance(
            _fault_tolerance,
            retry_attempts=retry_attempts,
            retry_deadline=retry_deadline,
            retry_initial_delay=retry_initial_delay,
            retry_max_delay=retry_max_delay,
            retry_classifier=retry_classifier,
            retry_attempt_timeout=retry_attempt_timeout,
            retry_ping=retry_ping,
        )
        self._checked_out = 0
        self._checked_out_lock = threading.Lock()
        NullPool.__init__(self, creator, **kw)
        timeouts.install(self._dialect)

    def _do_get(self) -> ConnectionPoolEntry:
        record = NullPool._do_get(self)
        with self._checked_out_lock:
            self._checked_out += 1
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        with self._checked_out_lock:
            self._checked_out -= 1
        NullPool._do_return_conn(self, record)

    def recreate(self) -> FaultTolerantNullPool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping,
            _dispatch=self.dispatch,
            dialect=self._dialect,
            _fault_tolerance=self._fault_tolerance,
        )

    def _gauges(self) -> tuple[int, int, int, int]:
        return 0, 0, self._checked_out, 0

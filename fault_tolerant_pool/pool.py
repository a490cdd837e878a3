"""The pool classes: SQLAlchemy's own pools whose every DBAPI connect goes through the retry loop.

SQLAlchemy funnels every physical connect of a pool (new connections, and reconnects after
invalidation, recycle or a failed pre-ping) through the callable built by
``Pool._should_wrap_creator``; wrapping it there is the connect half of the integration (retry,
credentials). The checkout half is two hooks of the queue pool: ``_do_get`` hands the record
taken from the queue to :class:`Upkeep` before SQLAlchemy lends it (lifetime, liveness), and
``_do_return_conn`` asks it what to do with a returned one (lifetime, idle, drain). The queue
holds up to ``pool_size + max_overflow`` idle connections, and :class:`OverflowIdle` tells at
checkin when one above ``pool_size`` has been unneeded for ``overflow_idle``. With
``leak_threshold`` set, ``connect`` and ``_do_return_conn`` tell the leak tracker too. The queue,
events, pre-ping and recycle stay SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, Pool, QueuePool
from sqlalchemy.pool.base import ConnectionPoolEntry, PoolProxiedConnection, _ConnDialect
from sqlalchemy.util import await_only
from sqlalchemy.util import queue as sqla_queue

from . import credentials as _credentials
from . import leaks, timeouts, watchdog
from .classify import Classifier, classify
from .connector import RetryingConnector
from .credentials import CredentialSource
from .demotion import DemotionWatch
from .doubt import Doubt, ping_mode
from .endpoint import connect_arguments, endpoint_of, password_of
from .errors import too_many_waiting
from .hosts import HostRotation, wants_writer
from .leaks import DEFAULT_LEAK_THRESHOLD, LeakTracker
from .lifetime import (
    DEFAULT_LIFETIME_JITTER,
    DEFAULT_MAX_IDLE,
    DEFAULT_MAX_LIFETIME,
    LifetimePolicy,
)
from .liveness import DEFAULT_LIVENESS_CHECK, DEFAULT_PING_AFTER, LivenessPolicy
from .overflow import DEFAULT_OVERFLOW_IDLE, OverflowIdle, overflow_idle_seconds, queue_capacity
from .policy import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_ATTEMPTS,
    DEFAULT_DEADLINE,
    DEFAULT_INITIAL_DELAY,
    DEFAULT_MAX_DELAY,
    RetryPolicy,
    _optional_seconds,
)
from .probe import Gate, WaitingRoom
from .setup_retry import SetUpRetriedRecord
from .shutdown import PoolClosed, ShutdownReport, close_pool
from .stats import ConnectCounters, PoolStats
from .telemetry import PoolTelemetry
from .upkeep import KEEP, SHRINK, Upkeep
from .watchdog import DEFAULT_PING_TIMEOUT


@dataclass(frozen=True)
class FaultTolerance:
    """Everything a fault-tolerant pool adds to SQLAlchemy's; carried over by ``recreate()``."""

    policy: RetryPolicy
    telemetry: PoolTelemetry
    classifier: Classifier | None = None
    ping: bool | None = None
    """Ping each new connection inside the retry loop (``retry_ping``): True always, False
    never, None only while the pool has reason to doubt (see :mod:`.doubt`)."""
    counters: ConnectCounters = field(default_factory=ConnectCounters, compare=False)
    credentials: CredentialSource | None = field(default=None, compare=False)
    lifetime: LifetimePolicy = field(default_factory=LifetimePolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    secrets: Callable[[], tuple[str, ...]] = field(default=tuple, compare=False)
    """The passwords known to the pool (URL, credentials), scrubbed from every message."""
    hosts: HostRotation | None = field(default=None, compare=False)
    """A multi-host URL's hosts, tried one by one (see :mod:`.hosts`)."""
    wants_writer: bool = False
    """The URL asks for a writable server (``target_session_attrs``)."""
    demotion: DemotionWatch | None = field(default=None, compare=False)
    """Statement-time signals of a demoted writer (``demotion_check``)."""
    doubt: Doubt = field(default_factory=Doubt, compare=False)
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    leaks: LeakTracker | None = field(default=None, compare=False)
    """The checkouts and their leak reports (``leak_threshold``), shared by recreated pools."""

    def handle_error(self, context: Any) -> None:
        """The engine's ``handle_error`` listener (the first one; the application's come after):
        a demoted writer's error becomes a disconnect, and a disconnect or a connection-class
        error raises the doubt that makes new connections pinged."""
        connection = context.connection
        if connection is not None and not context.is_disconnect:
            with contextlib.suppress(Exception):  # closed meanwhile: nothing to mark
                watchdog.suspect(connection.connection._connection_record.__dict__)
        demotion = self.demotion
        if demotion is not None:
            demotion.handle_error(context)
        if context.is_disconnect or classify(context.original_exception).transient:
            self.doubt.raised()

    gate: Gate = field(default_factory=lambda: Gate(DEFAULT_DEADLINE), compare=False)
    """The pool's connect state: the probe, fail-fast, ``max_waiting`` (see :mod:`.probe`)."""
    overflow_idle: float = DEFAULT_OVERFLOW_IDLE
    """Seconds connections beyond ``pool_size`` may sit idle (0: SQLAlchemy's rule)."""

    @classmethod
    def from_arguments(
        cls,
        creator: Any,
        dialect: Any,
        retry_attempts: Any = DEFAULT_ATTEMPTS,
        retry_deadline: Any = DEFAULT_DEADLINE,
        retry_initial_delay: Any = DEFAULT_INITIAL_DELAY,
        retry_max_delay: Any = DEFAULT_MAX_DELAY,
        retry_classifier: Any = None,
        credentials: Any = None,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
        lifetime_jitter: Any = DEFAULT_LIFETIME_JITTER,
        max_idle: Any = DEFAULT_MAX_IDLE,
        liveness_check: Any = DEFAULT_LIVENESS_CHECK,
        liveness_ping_after: Any = DEFAULT_PING_AFTER,
        pool_name: Any = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        retry_attempt_timeout: Any = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: Any = "auto",
        demotion_check: Any = True,
        ping_timeout: Any = DEFAULT_PING_TIMEOUT,
        fail_fast: Any = True,
        max_waiting: Any = None,
        overflow_idle: Any = DEFAULT_OVERFLOW_IDLE,
        leak_threshold: Any = DEFAULT_LEAK_THRESHOLD,
    ) -> FaultTolerance:
        if retry_classifier is not None and not callable(retry_classifier):
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
        counters = ConnectCounters()
        provider = _credentials.coerce_provider(credentials)
        source = CredentialSource(provider, counters) if provider is not None else None
        arguments = connect_arguments(creator)

        def secrets() -> tuple[str, ...]:
            known = password_of(arguments)
            return known + source.secrets() if source is not None else known

        telemetry = PoolTelemetry.from_arguments(
            endpoint=endpoint_of(arguments),
            system=getattr(dialect, "name", None) or "postgresql",
            pool_name=pool_name,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            secrets=secrets,
        )
        counters.listener = telemetry
        threshold = leaks.leak_threshold(leak_threshold)
        writer = wants_writer(arguments)
        demotion = (
            DemotionWatch(writer, counters.demoted)
            if _boolean("demotion_check", demotion_check)
            else None
        )
        gate = Gate(
            policy.deadline,
            fail_fast=_boolean("fail_fast", fail_fast),
            room=WaitingRoom(_max_waiting(max_waiting)),
        )
        gate.listener = telemetry
        telemetry.connect_figures = gate.figures
        return cls(
            policy=policy,
            telemetry=telemetry,
            classifier=retry_classifier,
            ping=ping_mode(retry_ping),
            hosts=HostRotation.from_arguments(arguments),
            wants_writer=writer,
            demotion=demotion,
            ping_timeout=_optional_seconds("ping_timeout", ping_timeout),
            counters=counters,
            credentials=source,
            lifetime=LifetimePolicy.from_arguments(max_lifetime, lifetime_jitter, max_idle),
            liveness=LivenessPolicy.from_arguments(liveness_check, liveness_ping_after),
            secrets=secrets,
            gate=gate,
            overflow_idle=overflow_idle_seconds(overflow_idle),
            leaks=None if threshold is None else LeakTracker(threshold, counters),
        )


def _max_waiting(value: Any) -> int | None:
    """``max_waiting``: a positive integer, or None / 0 (psycopg_pool's "no limit")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0")):
        return None
    try:
        number = int(value) if isinstance(value, str) and not isinstance(value, bool) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ArgumentError(f"max_waiting must be a positive integer or None, got {value!r}")
    return number or None


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
    raise ArgumentError(f"{name} must be true or false, got {value!r}")


#: This project's keyword arguments of both pool classes, in the order of
#: :meth:`FaultTolerance.from_arguments`. SQLAlchemy only passes a pool the arguments its
#: ``__init__`` names, so each class lists them again; a unit test keeps the lists equal.
POOL_ARGUMENTS: tuple[str, ...] = tuple(
    inspect.signature(FaultTolerance.from_arguments).parameters
)[2:]


def _stock_logger_name(stock: type[Pool]) -> str:
    """The logger name SQLAlchemy gives a stock pool class (``sqlalchemy.pool.impl.QueuePool``):
    a pool logs where ``logging.getLogger("sqlalchemy.pool")`` and ``echo_pool`` look."""
    return f"{stock.__module__}.{stock.__name__}"


def _async_sleep(seconds: float) -> None:
    """Sleep inside SQLAlchemy's greenlet bridge: yields to the event loop, cancellable."""
    await_only(asyncio.sleep(seconds))


class _FaultTolerantPool(Pool):
    """What both pool classes share: the wrapped creator, credentials, the measured checkout,
    the stats."""

    _fault_tolerance: FaultTolerance
    _telemetry: PoolTelemetry
    _upkeep: Upkeep | None = None
    _keeps_connections = True
    """Whether connections outlive a checkout (a demoted server's connections are worth
    replacing only then)."""
    _waiting_room: WaitingRoom | None = None
    """The gate's room when ``max_waiting`` is set: slot waiters count too."""
    _overflow_idle: OverflowIdle | None = None
    _leaks: LeakTracker | None
    _closed: PoolClosed | None

    def _init_fault_tolerance(self, arguments: dict[str, Any], kw: dict[str, Any]) -> None:
        """Validate this project's keyword arguments (``arguments`` is the ``__init__``'s
        ``locals()``), or take over a recreated pool's settings."""
        given: FaultTolerance | None = arguments["_fault_tolerance"]
        self._fault_tolerance = given or FaultTolerance.from_arguments(
            arguments["creator"],
            kw.get("dialect"),
            **{name: arguments[name] for name in POOL_ARGUMENTS},
        )
        self._telemetry = self._fault_tolerance.telemetry
        room = self._fault_tolerance.gate.room
        self._waiting_room = room if room.limit is not None else None
        self._leaks = self._fault_tolerance.leaks
        self._closed = None

    def _install_credentials(self) -> None:
        """Called once SQLAlchemy's ``__init__`` has set the dialect (which also tells the leak
        tracker how to watch: on the event loop or from a thread)."""
        if self._leaks is not None:
            self._leaks.use_loop(bool(self._dialect.is_async))
        if self._fault_tolerance.credentials is None:
            return
        if isinstance(self._dialect, _ConnDialect):
            raise ArgumentError(
                "credentials= needs an engine: pass it to create_engine() or "
                "create_async_engine() with a database URL"
            )
        _credentials.install(self._dialect)

    def _create_connection(self) -> ConnectionPoolEntry:
        """SQLAlchemy's record, whose connect is made again when the set-up after the login
        fails with a transient error (see :mod:`fault_tolerant_pool.setup_retry`)."""
        return SetUpRetriedRecord(self)

    def _should_wrap_creator(self, creator: Any) -> Any:
        ft = self._fault_tolerance
        credentials = ft.credentials
        return RetryingConnector(
            super()._should_wrap_creator(creator),
            ft.policy,
            ft.counters,
            sleep=self._backoff_sleep,
            dbapi=self._loaded_dbapi,
            classifier=ft.classifier,
            telemetry=ft.telemetry,
            secrets=ft.secrets,
            credentials=credentials,
            in_loop=self._in_loop,
            # a pool that keeps connections always stamps them: drain() may add an upkeep later
            on_connect=self._connected if self._keeps_connections else None,
            ping=self._ping_new if ft.ping is not False else None,
            doubt=ft.doubt if ft.ping is None else None,
            discard=self._discard_new,
            hosts=ft.hosts,
            wants_writer=ft.wants_writer,
            gate=ft.gate,
            vet=self._vet_new if ft.demotion is not None and self._keeps_connections else None,
        )

    def _vet_new(self, dbapi_connection: Any) -> None:
        """While in doubt, refuse a read-only server in a pool that had a writer (a route not
        yet moved after a failover: see :mod:`.demotion`)."""
        ft = self._fault_tolerance
        doubt = ft.doubt
        demotion = ft.demotion
        if doubt.until and demotion is not None and demotion.had_writer and doubt.active():
            demotion.vet(self._dialect.get_driver_connection(dbapi_connection))

    def _ping_new(self, dbapi_connection: Any) -> None:
        dialect: Any = self._dialect
        if self._fault_tolerance.ping is None and isinstance(dialect, _ConnDialect):
            return  # "auto" in a pool built by hand around a bare creator: nothing to ping with
        dialect.do_ping(dbapi_connection)

    def _discard_new(self, dbapi_connection: Any) -> None:
        self._dialect.do_terminate(dbapi_connection)

    def _in_loop(self) -> bool:
        return bool(self._dialect.is_async)

    def _connected(self, record: Any, connection: Any) -> None:
        driver_connection = self._dialect.get_driver_connection(connection)
        upkeep = self._upkeep
        if upkeep is not None:
            upkeep.connected(record, driver_connection)
        demotion = self._fault_tolerance.demotion
        if demotion is not None and record is not None and self._keeps_connections:
            demotion.connected(record.__dict__, driver_connection)

    def _install_failover(self) -> None:
        """Called once SQLAlchemy's ``__init__`` has set the dialect: bound pings, and the
        statement-time signals (demotion, doubt) through ``handle_error``."""
        dialect = self._dialect
        if not isinstance(dialect, Dialect) or isinstance(dialect, _ConnDialect):
            return  # a pool built by hand, or a stand-in dialect: nothing to listen to
        ft = self._fault_tolerance
        watchdog.install(dialect, ft.ping_timeout, ft.counters.ping_timed_out)
        if not event.contains(dialect, "handle_error", ft.handle_error):
            event.listen(dialect, "handle_error", ft.handle_error)
        upkeep = self._upkeep
        if upkeep is not None:
            upkeep.doubt = ft.doubt
        if upkeep is not None and ft.demotion is not None:
            upkeep.demotion = ft.demotion
            upkeep.invalidate_pool = self._invalidate_all

    def _invalidate_all(self) -> None:
        """Every connection made before now is replaced at its next checkout (as SQLAlchemy
        does after a disconnect)."""
        self._invalidate_time = time.time()

    def connect(self) -> PoolProxiedConnection:
        """SQLAlchemy's checkout, measured (wait time, pending requests, timeouts, slow spans),
        refused once the pool is shut down, told to the leak tracker when there is one."""
        if self._closed is not None:
            raise self._closed
        telemetry = self._telemetry
        if not telemetry.active():  # only the API's no-op providers: nothing would be kept
            connection = Pool.connect(self)  # super().connect(), without making a super object
        else:
            checkout = telemetry.checkout_started(self._would_wait())
            try:
                connection = Pool.connect(self)
            except BaseException as error:
                telemetry.checkout_failed(checkout, error)
                raise
            telemetry.checked_out(checkout, connection)
        if self._leaks is not None:
            record: Any = connection._connection_record
            # the walk of the checkout site starts at SQLAlchemy's caller of this method
            self._leaks.checked_out(record, record.fairy_ref, 2)
        return connection

    # -- drain and shutdown (see fault_tolerant_pool.shutdown) ------------------------------------

    def drain(self) -> int:
        """Replace every connection without failing a request: idle ones are closed now,
        checked-out ones when they come back, and every later checkout gets a connection made
        after this call. Returns how many idle connections were closed. In an async engine, call
        ``await fault_tolerant_pool.drain(engine)``."""
        return 0

    def close(self, timeout: float = 30.0) -> ShutdownReport:
        """Stop lending, wait up to ``timeout`` s for checked-out connections (each is closed as
        it comes back), then close everything; stragglers are reported as leaks and their
        sockets shut down. In an async engine, ``await fault_tolerant_pool.shutdown(engine)``."""
        return close_pool(self, timeout, sleep=self._backoff_sleep)

    def _out_now(self) -> int:
        return self._gauges()[2]

    def _refuse(self, refusal: PoolClosed) -> None:
        """From now on no checkout is served (``refusal`` is raised), and returned connections
        are closed."""
        self._closed = refusal

    def _would_wait(self) -> bool:
        """Whether a checkout now must wait for a slot (no idle connection, none may be opened)."""
        return False

    def _limits(self) -> tuple[int | None, int | None]:
        """(most connections open at once, most idle connections kept); None: no limit."""
        raise NotImplementedError

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
        ft = self._fault_tolerance
        leaks = self._leaks
        oldest = None if leaks is None else leaks.oldest_age()
        return ft.counters.snapshot(*self._gauges(), ft.gate.figures(), oldest)

    def _gauges(self) -> tuple[int, int, int, int]:
        raise NotImplementedError


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
        self,
        creator: Any,
        retry_attempts: int | None = DEFAULT_ATTEMPTS,
        retry_deadline: float = DEFAULT_DEADLINE,
        retry_initial_delay: float = DEFAULT_INITIAL_DELAY,
        retry_max_delay: float = DEFAULT_MAX_DELAY,
        retry_classifier: Classifier | None = None,
        pool_name: str | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        credentials: Any = None,
        max_lifetime: float | None = DEFAULT_MAX_LIFETIME,
        lifetime_jitter: float = DEFAULT_LIFETIME_JITTER,
        max_idle: float | None = DEFAULT_MAX_IDLE,
        liveness_check: bool = DEFAULT_LIVENESS_CHECK,
        liveness_ping_after: float | None = DEFAULT_PING_AFTER,
        retry_attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: bool | str = "auto",
        demotion_check: bool = True,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        fail_fast: bool = True,
        max_waiting: int | None = None,
        overflow_idle: float = DEFAULT_OVERFLOW_IDLE,
        leak_threshold: float | None = DEFAULT_LEAK_THRESHOLD,
        _fault_tolerance: FaultTolerance | None = None,
        **kw: Any,
    ) -> None:
        self._init_fault_tolerance(locals(), kw)
        ft = self._fault_tolerance
        if Upkeep.wanted(ft.lifetime, ft.liveness):
            self._upkeep = Upkeep(ft.lifetime, ft.liveness, ft.counters)
        QueuePool.__init__(self, creator, **kw)
        self._pool_size = self._pool.maxsize
        if ft.overflow_idle > 0 and self._pool_size > 0 and self._max_overflow != 0:
            # keep overflow connections idle: a larger queue
            self._overflow_idle = OverflowIdle(ft.overflow_idle)
            capacity = queue_capacity(self._pool_size, self._max_overflow)
            self._pool = self._queue_class(capacity, use_lifo=self._pool.use_lifo)
        self._telemetry.bind(self)
        self._install_credentials()
        timeouts.install(self._dialect)
        self._install_failover()
        if self._upkeep is not None and isinstance(self._dialect, _ConnDialect):
            self._upkeep.ping_after = None  # no dialect to ping with (a pool built by hand)

    def _do_get(self) -> ConnectionPoolEntry:
        room = self._waiting_room
        if room is not None and self._would_wait():  # max_waiting: count the queue too
            record = self._seated_get(room)
        else:
            record = QueuePool._do_get(self)  # super(), without making a super object
        upkeep = self._upkeep
        if upkeep is not None:
            if upkeep.idle is not None:
                upkeep.idle.observe(self._pool.qsize())
            try:
                upkeep.checkout(record, self._dialect)
            except BaseException as error:
                # nothing lent yet: give the slot back, as SQLAlchemy does when a connect fails
                record._checkin_failed(error, _fairy_was_created=False)  # type: ignore[attr-defined]
                raise
        return record

    def _seated_get(self, room: WaitingRoom) -> ConnectionPoolEntry:
        """Wait for a slot as one of at most ``max_waiting`` callers, or fail at once."""
        if not room.join():
            raise too_many_waiting(room.limit or 0, "a connection slot")
        try:
            return QueuePool._do_get(self)
        finally:
            room.leave()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        telemetry = self._telemetry
        if telemetry._measuring:  # never measured before: no checkout of it was measured
            telemetry.checked_in(record)
        if self._leaks is not None:
            self._leaks.checked_in(record)
        upkeep = self._upkeep
        if upkeep is not None:
            idle = self._pool.qsize() if upkeep.idle is not None else 0
            action = upkeep.checkin(record, idle)
            if action != KEEP:
                try:
                    record.close()
                finally:
                    # give the slot up only while others are idle (after an async close too):
                    # a getter waiting on an empty queue is woken by a put, the empty record
                    if action == SHRINK and self._pool.qsize() > 0:
                        self._dec_overflow()
                    else:
                        QueuePool._do_return_conn(self, record)
                return
        rule = self._overflow_idle
        if rule is not None:
            if self._overflow > 0:  # connections above pool_size are open: the rule judges
                if rule.checkin(self._idle_now(), self._overflow):
                    self._shed_overflow(record, rule)
                    return
            elif rule.watching:  # none above pool_size: nothing to judge, no call per checkin
                rule.watching = False
        QueuePool._do_return_conn(self, record)

    def _shed_overflow(self, record: ConnectionPoolEntry, rule: OverflowIdle) -> None:
        """Close ``record``: the pool held more than ``pool_size`` unused for ``overflow_idle``
        (see :mod:`fault_tolerant_pool.overflow`)."""
        try:
            record.close()
        finally:
            self._dec_overflow()
            rule.closed()
            self._fault_tolerance.counters.retire("overflow")

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
        return self._close_stale_idle()

    def _refuse(self, refusal: PoolClosed) -> None:
        self._closed = refusal
        self._upkeep_for_drain().close(refusal)
        self._close_stale_idle()

    def _upkeep_for_drain(self) -> Upkeep:
        """The upkeep, installed now (with every rule off) on a pool that had none."""
        if self._upkeep is None:
            ft = self._fault_tolerance
            self._upkeep = Upkeep(ft.lifetime, LivenessPolicy(check=False), ft.counters)
        return self._upkeep

    def _close_stale_idle(self) -> int:
        """Close the idle connections made before the latest drain; their slots stay."""
        upkeep = self._upkeep_for_drain()
        taken = []
        for _ in range(self._pool.qsize()):
            try:
                taken.append(self._pool.get(False))
            except sqla_queue.Empty:
                break
        stale = [record for record in taken if upkeep.stale(record)]
        for record in taken:
            if not upkeep.stale(record):
                QueuePool._do_return_conn(self, record)
        for index, record in enumerate(stale):
            try:
                self._fault_tolerance.counters.retire("drain")
                record.close()
            except BaseException:  # cancelled, or no greenlet: no slot may be lost
                for left in stale[index:]:
                    QueuePool._do_return_conn(self, left)
                raise
            QueuePool._do_return_conn(self, record)  # the empty slot goes back
        return len(stale)

    def recreate(self) -> FaultTolerantQueuePool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            pool_size=self._pool_size,
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

    def __init__(
        self,
        creator: Any,
        retry_attempts: int | None = DEFAULT_ATTEMPTS,
        retry_deadline: float = DEFAULT_DEADLINE,
        retry_initial_delay: float = DEFAULT_INITIAL_DELAY,
        retry_max_delay: float = DEFAULT_MAX_DELAY,
        retry_classifier: Classifier | None = None,
        pool_name: str | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        credentials: Any = None,
        max_lifetime: float | None = DEFAULT_MAX_LIFETIME,
        lifetime_jitter: float = DEFAULT_LIFETIME_JITTER,
        max_idle: float | None = DEFAULT_MAX_IDLE,
        liveness_check: bool = DEFAULT_LIVENESS_CHECK,
        liveness_ping_after: float | None = DEFAULT_PING_AFTER,
        retry_attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT,
        retry_ping: bool | str = "auto",
        demotion_check: bool = True,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        fail_fast: bool = True,
        max_waiting: int | None = None,
        overflow_idle: float = DEFAULT_OVERFLOW_IDLE,
        leak_threshold: float | None = DEFAULT_LEAK_THRESHOLD,
        _fault_tolerance: FaultTolerance | None = None,
        **kw: Any,
    ) -> None:
        self._init_fault_tolerance(locals(), kw)
        if _fault_tolerance is None:  # every checkout is a connect: capping them caps the app
            gate = self._fault_tolerance.gate
            gate.schedule = replace(gate.schedule, healthy_concurrency=None)
        self._lent: set[ConnectionPoolEntry] = set()  # atomic add/discard: no lock to recreate
        NullPool.__init__(self, creator, **kw)
        self._telemetry.bind(self)
        self._install_credentials()
        timeouts.install(self._dialect)
        self._install_failover()

    _keeps_connections = False

    def _do_get(self) -> ConnectionPoolEntry:
        record = NullPool._do_get(self)
        self._lent.add(record)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        telemetry = self._telemetry
        if telemetry._measuring:
            telemetry.checked_in(record)
        if self._leaks is not None:
            self._leaks.checked_in(record)
        self._lent.discard(record)
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
        return 0, 0, len(self._lent), 0

    def _limits(self) -> tuple[int | None, int | None]:
        return None, 0  # no limit on open connections; none is ever kept idle

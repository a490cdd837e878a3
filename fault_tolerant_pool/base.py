"""What both pool classes share: the assembled pieces, the connect path's hooks, the checkout
frame, drain and shutdown, the stats.

The checkout frame is SQLAlchemy's ``connect``, ``_do_get`` and ``_do_return_conn``: each runs the
steps :mod:`.checkout` chose when the pool was made, and nothing else. The connect half is
``_should_wrap_creator``: every physical connect goes through the :class:`RetryingConnector`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import ConnectionPoolEntry, PoolProxiedConnection, _ConnDialect
from sqlalchemy.util import await_only

from . import credentials as _credentials
from . import timeouts, watchdog
from .checkout import Steps
from .connector import RetryingConnector
from .fault_tolerance import FaultTolerance
from .leaks import LeakTracker
from .liveness import LivenessPolicy
from .overflow import OverflowIdle
from .policy import RetryPolicy
from .probe import WaitingRoom
from .settings import PoolSettings, SettingNames
from .setup_retry import SetUpRetriedRecord
from .shutdown import PoolClosed, ShutdownReport, close_pool
from .stats import PoolStats
from .telemetry import PoolTelemetry
from .upkeep import Upkeep


def _async_sleep(seconds: float) -> None:
    """Sleep inside SQLAlchemy's greenlet bridge: yields to the event loop, cancellable."""
    await_only(asyncio.sleep(seconds))


class _FaultTolerantPool(SettingNames, Pool):
    """What both pool classes share: the assembled pieces, the wrapped creator, the measured
    checkout, drain and shutdown, the stats."""

    _fault_tolerance: FaultTolerance
    _telemetry: PoolTelemetry
    _steps: Steps
    _upkeep: Upkeep | None = None
    _keeps_connections = True
    """Whether connections outlive a checkout (a demoted server's connections are worth
    replacing only then)."""
    _waiting_room: WaitingRoom | None = None
    """The gate's room when ``max_waiting`` is set: slot waiters count too."""
    _overflow_idle: OverflowIdle | None = None
    _leaks: LeakTracker | None
    _closed: PoolClosed | None = None

    def _take_settings(
        self, creator: Any, kw: dict[str, Any], given: FaultTolerance | None
    ) -> None:
        """Before SQLAlchemy's ``__init__``: this project's settings out of ``kw``, validated
        and assembled (or a recreated pool's, taken over)."""
        settings = PoolSettings.take(kw)  # out of kw in any case: the rest is SQLAlchemy's
        self._fault_tolerance = ft = given or FaultTolerance.assemble(
            creator, kw.get("dialect"), settings, null_pool=not self._keeps_connections
        )
        self._telemetry = ft.telemetry
        room = ft.gate.room
        self._waiting_room = room if room.limit is not None else None
        self._leaks = ft.leaks

    def _wire(self) -> None:
        """After SQLAlchemy's ``__init__`` (the dialect is known): gauges, credentials, time
        limits, the statement-time signals, and the checkout steps."""
        ft = self._fault_tolerance
        dialect = self._dialect
        hand_made = isinstance(dialect, _ConnDialect)  # a pool built around a bare creator
        self._telemetry.bind(self)
        if self._leaks is not None:
            self._leaks.use_loop(bool(dialect.is_async))
        if ft.credentials is not None:
            if hand_made:
                raise ArgumentError(
                    "credentials= needs an engine: pass it to create_engine() or "
                    "create_async_engine() with a database URL"
                )
            _credentials.install(dialect)
        timeouts.install(dialect)
        if isinstance(dialect, Dialect) and not hand_made:
            watchdog.install(dialect, ft.ping_timeout, ft.counters.ping_timed_out)
            signals = ft.signals
            if signals is not None and not event.contains(
                dialect, "handle_error", signals.handle_error
            ):
                event.listen(dialect, "handle_error", signals.handle_error)
        if self._keeps_connections and Upkeep.wanted(ft.lifetime, ft.liveness):
            self._upkeep = self._new_upkeep(ft.liveness)
        self._steps = self._build_steps()

    def _new_upkeep(self, liveness: LivenessPolicy) -> Upkeep:
        """The upkeep of this pool's connections, given all it works with (the dialect is known:
        after SQLAlchemy's ``__init__``)."""
        ft = self._fault_tolerance
        dialect = self._dialect
        if isinstance(dialect, _ConnDialect):  # a pool built around a bare creator
            return Upkeep(ft.lifetime, liveness, ft.counters)  # nothing to ping with
        signals = isinstance(dialect, Dialect)  # a stand-in (SQLAlchemy's suite) only pings
        return Upkeep(
            ft.lifetime,
            liveness,
            ft.counters,
            dialect=dialect,
            doubt=ft.doubt if signals else None,
            demotion=ft.demotion if signals else None,
            invalidate_pool=self._invalidate_all,
        )

    def _build_steps(self) -> Steps:
        raise NotImplementedError

    def _create_connection(self) -> ConnectionPoolEntry:
        """SQLAlchemy's record, whose connect is made again when the set-up after the login
        fails with a transient error (see :mod:`fault_tolerant_pool.setup_retry`)."""
        return SetUpRetriedRecord(self)

    # -- the connect path (see fault_tolerant_pool.connector) --------------------------------------

    def _should_wrap_creator(self, creator: Any) -> Any:
        ft = self._fault_tolerance
        keeps = self._keeps_connections
        return RetryingConnector(
            super()._should_wrap_creator(creator),
            ft.policy,
            ft.counters,
            sleep=self._backoff_sleep,
            dbapi=self._loaded_dbapi,
            classifier=ft.classifier,
            telemetry=ft.telemetry,
            secrets=ft.secrets,
            credentials=ft.credentials,
            in_loop=self._in_loop,
            # a pool that keeps connections always stamps them: drain() may add an upkeep later
            on_connect=self._connected if keeps else None,
            ping=self._ping_new if ft.ping is not False else None,
            doubt=ft.doubt if ft.ping is None else None,
            discard=self._discard_new,
            hosts=ft.hosts,
            wants_writer=ft.wants_writer,
            gate=ft.gate,
            vet=self._vet_new if ft.demotion is not None and keeps else None,
        )

    def _vet_new(self, dbapi_connection: Any) -> None:
        """While in doubt, refuse a read-only server in a pool that had a writer (a route not
        yet moved after a failover: see :mod:`.demotion`)."""
        ft = self._fault_tolerance
        demotion = ft.demotion
        if ft.doubt.until and demotion is not None and demotion.had_writer and ft.doubt.active():
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
        if demotion is not None and record is not None:
            demotion.connected(record, driver_connection)

    def _invalidate_all(self) -> None:
        """Every connection made before now is replaced at its next checkout (as SQLAlchemy
        does after a disconnect)."""
        self._invalidate_time = time.time()

    def _backoff_sleep(self, seconds: float) -> None:
        if self._dialect.is_async:
            _async_sleep(seconds)
        else:
            time.sleep(seconds)

    def _loaded_dbapi(self) -> Any:
        return getattr(self._dialect, "loaded_dbapi", None)

    # -- the checkout (see fault_tolerant_pool.checkout) -------------------------------------------

    def connect(self) -> PoolProxiedConnection:
        """SQLAlchemy's checkout, measured when telemetry is on (wait time, pending requests,
        timeouts, slow spans), refused once the pool is shut down, then the ``lent`` steps."""
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
        for step in self._steps.lent:
            step(connection)
        return connection

    def _do_get(self) -> ConnectionPoolEntry:
        steps = self._steps
        record = steps.take()
        try:
            for step in steps.lend:
                step(record)
        except BaseException as error:
            # nothing lent yet: give the slot back, as SQLAlchemy does when a connect fails
            record._checkin_failed(error, _fairy_was_created=False)  # type: ignore[attr-defined]
            raise
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        telemetry = self._telemetry
        if telemetry._measuring:  # never measured before: no checkout of it was measured
            telemetry.checked_in(record)
        for step in self._steps.checkin:
            if step(record):
                return
        self._give_back(record)

    def _give_back(self, record: ConnectionPoolEntry) -> None:
        raise NotImplementedError

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

    # -- what the pool holds and did -------------------------------------------------------------

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

    def _limits(self) -> tuple[int | None, int | None]:
        """(most connections open at once, most idle connections kept); None: no limit."""
        raise NotImplementedError

    def _recreate_arguments(self) -> dict[str, Any]:
        """What ``recreate()`` passes on (SQLAlchemy's own, the assembled pieces)."""
        return dict(
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping,
            _dispatch=self.dispatch,
            dialect=self._dialect,
            _fault_tolerance=self._fault_tolerance,
        )

"""Read/write routing: one writer, any number of readers, skipping readers that are down or behind.

A :class:`ReplicaRouter` holds the writer's engine and one engine per reader (each built with
this project's pools, or stock ones). A transaction the application marks read-only goes to a
healthy reader, every other one to the writer:

- Core: ``router.connect(read_only=True)`` (a ``Connection``, or an ``AsyncConnection`` to use
  with ``async with``), or ``router.reads`` / ``router.writes`` handed to the transaction runner;
- ORM: ``router.sessionmaker(read_only=True)`` (``router.async_sessionmaker(...)``): every
  transaction of such a session goes to one reader, chosen when it begins.

What "healthy" means is decided off the request path. A checker per reader (a daemon thread for
sync engines, a task in the application's event loop for async ones) asks the reader once a
second (``check_interval``) whether it is a standby and how far behind it is
(:data:`LAG_SQL`): never per query. A reader is in rotation while its last check says it is a
standby within ``max_replica_lag``, that check is recent, no check has hung past
``check_timeout``, its pool is not failing to connect, and no request has seen it disconnect
since. A standby promoted in a failover reports it is no longer in recovery and leaves the
rotation; a writer that comes back as a standby joins it. When no reader is in rotation, reads
go to the writer (``fallback_to_writer``) or raise :class:`NoReaderAvailable`.

A checkout that fails on the chosen reader (its pool gave up) is tried on the next reader, then
on the writer, before the connection is handed out; a checkout on a reader gives up after
``check_timeout``, not its pool's ``retry_deadline`` (its connects take it as their deadline,
in a thread or a task: :mod:`.caller_deadline`). A read-only session's transaction
gets its connection from that same checkout, when it begins (:class:`RoutingSession`).
Statements in flight on a reader that goes away fail as on any engine: hand the read to the
transaction runner (``run_transaction_async(router.reads, fn)``) and it runs again on another
server.

Read-your-writes: after a transaction on the writer commits, reads in the same context (the
same asyncio task, or thread: a request) stay on the writer for ``read_your_writes`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import sqlalchemy as sa
from opentelemetry import metrics
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm import sessionmaker as _sessionmaker
from sqlalchemy.util import await_only, greenlet_spawn

from . import watchdog
from ._asyncio_ext import AsyncConnection, AsyncEngine, AsyncSession
from ._asyncio_ext import async_sessionmaker as _async_sessionmaker
from .caller_deadline import connects_within
from .policy import _number
from .telemetry import INSTRUMENTATION_NAME, _version

logger = logging.getLogger("fault_tolerant_pool.replicas")

#: Defaults (see docs/replicas.md).
DEFAULT_MAX_REPLICA_LAG = 5.0
DEFAULT_CHECK_INTERVAL = 1.0
DEFAULT_CHECK_TIMEOUT = 1.5

#: A sync check's statement is given at least this long, however long its connect took: a
#: healthy server answers in milliseconds, and one that does not is out of rotation by then.
MIN_CHECK_STATEMENT = 0.5
#: Seconds ``close()`` waits for the sync checkers beyond ``check_timeout``: a check in flight
#: ends by then (its connect gives up at ``check_timeout``, libpq's connect timeout is whole
#: seconds, at least 2; its statement is cut).
CLOSE_SLACK = 1.0

#: One round trip per check: whether the server is a standby, and its lag in seconds. A standby
#: that has replayed all it received from a primary it streams from is not behind (however old
#: its last transaction: the primary may be idle); otherwise the lag is the age of the last
#: transaction it replayed (the primary's commit time against the standby's clock), and a
#: standby that has replayed nothing yet counts as far behind.
LAG_SQL = sa.text(
    "SELECT pg_is_in_recovery() AS standby, CASE"
    " WHEN NOT pg_is_in_recovery() THEN 0.0"
    " WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"
    "  AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') THEN 0.0"
    " ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8, 1e9)"
    " END AS lag"
)


class NoReaderAvailable(OperationalError):
    """A read-only transaction found no reader in rotation and ``fallback_to_writer`` is off."""

    def __init__(self, message: str) -> None:
        super().__init__(None, None, ConnectionError(message))
        self._text = message

    def __str__(self) -> str:
        return self._text


@dataclass(frozen=True, slots=True)
class ReaderStatus:
    """One reader as the router sees it (``ReplicaRouter.stats()``)."""

    name: str
    """``host:port/database`` of its engine (never credentials)."""
    role: str
    """``unknown`` (not checked yet), ``standby``, ``primary`` (promoted: takes no reads) or
    ``down`` (its last check failed or hung)."""
    lag: float | None
    """Seconds behind at its last check (None before the first one)."""
    in_rotation: bool
    reads: int
    """Read-only transactions routed to it."""
    skipped_for_lag: int
    """Times it was passed over because it was further behind than ``max_replica_lag``."""
    skipped_down: int
    """Times it was passed over because it was down, promoted, unchecked or its pool failing."""
    skipped_busy: int = 0
    """Times it was passed over because its pool lent all it may (a checkout would wait for a
    slot) while another reader had one free."""


@dataclass(frozen=True, slots=True)
class RouterStats:
    """What the router did: reads per reader, reads the writer took, and why."""

    readers: tuple[ReaderStatus, ...]
    writer_reads: int
    """Read-only transactions sent to the writer (no reader in rotation, or read-your-writes)."""
    fallbacks: int
    """Of those, the ones sent there because no reader was in rotation (or all failed)."""
    read_your_writes: int
    """Of those, the ones kept there because their context wrote within ``read_your_writes``."""
    writes: int
    """Transactions routed to the writer that were not read-only."""


class _Reader:
    """One reader's engine and what its checker last found (written by the checker only)."""

    __slots__ = (
        "check_engine",
        "checked_at",
        "checking_since",
        "engine",
        "gate",
        "lag",
        "last_check_began",
        "listener",
        "name",
        "reads",
        "role",
        "skipped_busy",
        "skipped_down",
        "skipped_for_lag",
        "suspect_at",
        "sync_engine",
    )

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.engine = engine
        self.sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        tolerance = getattr(self.sync_engine.pool, "_fault_tolerance", None)
        self.gate = None if tolerance is None else tolerance.gate
        demotion = None if tolerance is None else tolerance.demotion
        if demotion is not None:
            # A reader's server is the writer now and then (every node listed as a reader, a
            # failover swapping them): its pool must not refuse the standby it reaches later
            # as "a route not yet moved after a failover" (ReadOnlyRoute), nor take a standby
            # for a demoted writer. Which server is a standby is the checks' call.
            demotion.serves_reads = True
        self.name = _name(self.sync_engine)
        self.check_engine: Engine | AsyncEngine | None = None
        self.listener: Callable[[Any], None] | None = None
        self.role = "unknown"
        self.lag: float | None = None
        self.checked_at = -1e18
        self.last_check_began = -1e18
        self.checking_since: float | None = None
        self.suspect_at: float | None = None
        self.reads = 0
        self.skipped_for_lag = 0
        self.skipped_down = 0
        self.skipped_busy = 0

    def busy(self) -> bool:
        """Whether a checkout on it would wait for a slot now: its pool lends all it may (the
        pool as it is now: ``dispose()`` makes a new one)."""
        would_wait = getattr(self.sync_engine.pool, "_would_wait", None)
        return would_wait is not None and bool(would_wait())

    def why_not(self, now: float, max_lag: float, stale_after: float, timeout: float) -> str | None:
        """None when the reader may take a read now; else ``lag`` or ``down``."""
        if self.role != "standby":
            return "down"
        since = self.checking_since
        if since is not None and now - since > timeout:
            return "down"  # its check hangs: a black hole, or a server too busy to answer
        if now - self.checked_at > stale_after:
            return "down"
        suspect = self.suspect_at
        if suspect is not None and suspect >= self.last_check_began:
            return "down"  # a request saw it disconnect since its last check began
        gate = self.gate
        if gate is not None and gate.state != "healthy":
            return "down"  # its pool is failing to connect: let its probe find out
        lag = self.lag
        if lag is None:
            return "lag"
        if lag > max_lag / 2:
            # Near the limit: presumed to fall further behind until the next check (a replay
            # that stopped, as under recovery_min_apply_delay, adds a second of lag a second).
            lag += now - self.checked_at
        if lag > max_lag:
            return "lag"
        return None


def _check_engine(reader: _Reader) -> Engine | AsyncEngine:
    """An engine of the checker's own on the reader's pool configuration (``recreate()``: the
    same creator, credentials and settings): a check never queues behind the requests for a
    slot of a busy reader's pool, which would look like a server too slow to answer."""
    sync = reader.sync_engine
    pool = sync.pool
    engine = Engine(pool.recreate(), sync.dialect, sync.url, logging_name=sync.logging_name)
    telemetry = getattr(pool, "_telemetry", None)
    if telemetry is not None:
        telemetry.bind(pool)  # the reader's gauges read its own pool, not the checker's
    return AsyncEngine(engine) if isinstance(reader.engine, AsyncEngine) else engine


def _name(engine: Engine) -> str:
    url = engine.url
    host = url.host
    if host is None:
        hosts = url.query.get("host")
        host = hosts if isinstance(hosts, str) else ",".join(hosts or ())
    return f"{host or ''}:{url.port or ''}/{url.database or ''}"


class ReplicaRouter:
    """Routes read-only transactions to readers and the rest to the writer (see the module).

    ``writer`` and ``readers`` are all sync engines or all async engines. A reader may be listed
    that is the writer now (every node of a cluster, each by its own URL): while it is a
    primary it takes no reads, and it joins the rotation once it is a standby.
    """

    def __init__(
        self,
        writer: Engine | AsyncEngine,
        readers: Sequence[Engine | AsyncEngine],
        *,
        max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG,
        read_your_writes: float | None = None,
        fallback_to_writer: bool = True,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        meter_provider: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        asynchronous = isinstance(writer, AsyncEngine)
        if not asynchronous and not isinstance(writer, Engine):
            raise ArgumentError(
                f"writer must be an Engine or an AsyncEngine, got {type(writer).__name__}"
            )
        if isinstance(readers, Engine | AsyncEngine) or not isinstance(readers, Sequence):
            raise ArgumentError("readers must be a list of engines (it may be empty)")
        kind = AsyncEngine if asynchronous else Engine
        for i, given in enumerate(readers):
            if not isinstance(given, kind):
                raise ArgumentError(
                    f"readers[{i}] must be {'an AsyncEngine' if asynchronous else 'an Engine'} "
                    f"like the writer, got {type(given).__name__}"
                )
        self.max_replica_lag = _number(
            "max_replica_lag", max_replica_lag, minimum=0.0, strict=False
        )
        self.check_interval = _number("check_interval", check_interval, minimum=0.0, strict=True)
        self.check_timeout = _number("check_timeout", check_timeout, minimum=0.0, strict=True)
        if read_your_writes is None:
            read_your_writes = self.max_replica_lag + self.check_interval
        self.read_your_writes = _number(
            "read_your_writes", read_your_writes, minimum=0.0, strict=False
        )
        if not isinstance(fallback_to_writer, bool):
            raise ArgumentError(
                f"fallback_to_writer must be True or False, got {fallback_to_writer!r}"
            )
        self.fallback_to_writer = fallback_to_writer
        self.writer = writer
        self.asynchronous = asynchronous
        self._sync_writer = writer.sync_engine if isinstance(writer, AsyncEngine) else writer
        self._readers = tuple(_Reader(r) for r in readers)
        self._clock = clock
        # A check older than two intervals plus its time limit is stale: the checker is stuck.
        self._stale_after = 2 * self.check_interval + self.check_timeout
        self._next = 0
        self._writer_reads = 0
        self._fallbacks = 0
        self._sticky_reads = 0
        self._writes = 0
        self._wrote_at: contextvars.ContextVar[float] = contextvars.ContextVar(
            "fault_tolerant_pool_wrote_at", default=-1e18
        )
        self._closed = False
        self._started = False
        self._start_lock = threading.Lock()
        self._first_round: threading.Event | asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.reads = Route(self, read_only=True)
        """A bind for the transaction runner: each run on a reader chosen then."""
        self.writes = Route(self, read_only=False)
        """A bind for the transaction runner: each run on the writer."""
        _RouterMetrics.register(self, meter_provider)
        event.listen(self._sync_writer, "commit", self._committed)
        for reader in self._readers:
            reader.listener = _suspect(reader, clock)
            event.listen(reader.sync_engine, "handle_error", reader.listener)

    # -- choosing ----------------------------------------------------------------------------------

    def choose(self, read_only: bool) -> Engine | AsyncEngine:
        """The engine the next transaction goes to (a reader in rotation, or the writer)."""
        if not read_only:
            self._writes += 1
            return self.writer
        if not self._started:
            self._start()
        now = self._clock()
        if now - self._wrote_at.get() < self.read_your_writes:
            self._writer_reads += 1
            self._sticky_reads += 1
            return self.writer
        reader = self._pick(now, ())
        if reader is None:
            return self._no_reader()
        return reader.engine

    def _pick(self, now: float, tried: tuple[_Reader, ...]) -> _Reader | None:
        readers = self._readers
        count = len(readers)
        start = self._next
        busy: list[int] | None = None  # readers in rotation whose pools lend all they may
        for step in range(count):
            reader = readers[(start + step) % count]
            if reader in tried:
                continue
            why = reader.why_not(now, self.max_replica_lag, self._stale_after, self.check_timeout)
            if why is None:
                if reader.busy():  # another reader may have a slot free now
                    busy = [step] if busy is None else [*busy, step]
                    continue
                for passed in busy or ():
                    readers[(start + passed) % count].skipped_busy += 1
                return self._take(start + step)
            if why == "lag":
                reader.skipped_for_lag += 1
            else:
                reader.skipped_down += 1
        if busy is not None:  # every reader in rotation is busy: wait on the next in turn
            return self._take(start + busy[0])
        return None

    def _take(self, position: int) -> _Reader:
        readers = self._readers
        reader = readers[position % len(readers)]
        self._next = (position + 1) % len(readers)
        reader.reads += 1
        return reader

    def _no_reader(self) -> Engine | AsyncEngine:
        if not self.fallback_to_writer:
            raise NoReaderAvailable(
                f"no reader in rotation ({self._describe()}) and fallback_to_writer is off"
            )
        self._writer_reads += 1
        self._fallbacks += 1
        return self.writer

    def _describe(self) -> str:
        return (
            ", ".join(
                f"{r.name}: {r.role}" + ("" if r.lag is None else f" lag {r.lag:.1f}s")
                for r in self._readers
            )
            or "none configured"
        )

    def _committed(self, connection: Connection) -> None:
        """The writer's ``commit`` event: reads in this context now stay on the writer (a
        read-only transaction the writer took is marked, and does not count)."""
        if not connection.get_execution_options().get(_READ_ONLY_KEY):
            self._wrote_at.set(self._clock())

    # -- Core --------------------------------------------------------------------------------------

    def connect(self, *, read_only: bool = False) -> Any:
        """A connection on the chosen engine: a ``Connection`` (sync router), or an
        ``AsyncConnection`` to use as ``async with router.connect(read_only=True) as conn``.
        A reader whose checkout fails is skipped for the next, then for the writer."""
        if self.asynchronous:
            return _AsyncConnect(self, read_only)
        return self._connect_sync(read_only)

    def _connect_sync(self, read_only: bool) -> Connection:
        engine: Any = self.choose(read_only)
        tried: tuple[_Reader, ...] = ()
        while True:
            try:
                connection = self._checkout_sync(engine)
            except Exception:
                reader = self._reader_of(engine)
                if reader is None:
                    raise
                engine, tried = self._after_failed_checkout(reader, tried)
                continue
            if read_only and engine is self.writer:
                connection.execution_options(**_READ_ONLY)
            return connection

    async def _connect_async(
        self, read_only: bool, holder: _AsyncConnect | None = None
    ) -> AsyncConnection:
        """The async checkout of :meth:`connect`, with the same fallback as the sync one. If it
        is cancelled, what it had checked out goes back before the cancellation goes on. The
        connection is also kept on ``holder`` (``async with router.connect()``), which awaits
        this coroutine itself: one coroutine less between the caller and the greenlet (its
        switches copy the stack in between)."""
        engine = self.choose(read_only)
        tried: tuple[_Reader, ...] = ()
        while True:
            assert isinstance(engine, AsyncEngine)
            connection = engine.connect()
            try:
                if engine is self.writer:
                    await connection.start()
                else:
                    # A reader that stopped a moment ago: its pool would retry the reconnect for
                    # its whole retry_deadline; another server can serve this read now. Its
                    # connects give up after check_timeout (a caller deadline: a timer around
                    # every checkout, asyncio.wait_for, cost 5-7 % of a one-row read's CPU).
                    with connects_within(self.check_timeout):
                        await connection.start()
                if read_only and engine is self.writer:
                    await connection.execution_options(**_READ_ONLY)
                if holder is not None:
                    holder._connection = connection
                return connection
            except BaseException as error:
                await _give_back(connection)
                reader = self._reader_of(engine)
                if reader is None or not isinstance(error, Exception):
                    raise  # the writer's own failure, or a cancellation
                engine, tried = self._after_failed_checkout(reader, tried)

    def _checkout_for_session(self) -> Connection:
        """A read-only ORM transaction's connection, checked out as :meth:`connect` does it. An
        ``AsyncSession`` runs its sync session in a greenlet, which awaits the async checkout."""
        if not self.asynchronous:
            return self._connect_sync(True)
        connection = await_only(self._connect_async(True)).sync_connection
        assert connection is not None  # started
        return connection

    def _checkout_sync(self, engine: Engine) -> Connection:
        if engine is self._sync_writer:
            return engine.connect()
        # A reader that stopped a moment ago: its pool would retry the reconnect for its whole
        # retry_deadline; another server can serve this read now: its connects give up then.
        with connects_within(self.check_timeout):
            return engine.connect()

    def _reader_of(self, engine: Any) -> _Reader | None:
        for reader in self._readers:
            if reader.engine is engine:
                return reader
        return None

    def _after_failed_checkout(
        self, reader: _Reader, tried: tuple[_Reader, ...]
    ) -> tuple[Engine | AsyncEngine, tuple[_Reader, ...]]:
        reader.suspect_at = self._clock()
        tried = (*tried, reader)
        logger.warning("reader %s: checkout failed; trying another server", reader.name)
        following = self._pick(self._clock(), tried)
        if following is not None:
            return following.engine, tried
        return self._no_reader(), tried

    # -- ORM ---------------------------------------------------------------------------------------

    def sessionmaker(self, *, read_only: bool = False, **kw: Any) -> _sessionmaker[Any]:
        """A ``sessionmaker`` whose sessions send every transaction to the writer, or (with
        ``read_only``) each transaction to one reader chosen when it begins, with the checkout,
        time limit and fallback of ``connect(read_only=True)``."""
        if self.asynchronous:
            raise ArgumentError("an async router makes async_sessionmaker(), not sessionmaker()")
        return _sessionmaker(class_=RoutingSession, router=self, read_only=read_only, **kw)

    def async_sessionmaker(
        self, *, read_only: bool = False, **kw: Any
    ) -> _async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` of :meth:`sessionmaker`."""
        if not self.asynchronous:
            raise ArgumentError("a sync router makes sessionmaker(), not async_sessionmaker()")
        return _async_sessionmaker(
            sync_session_class=RoutingSession, router=self, read_only=read_only, **kw
        )

    # -- the checkers ------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            if self.asynchronous:
                loop = asyncio.get_running_loop()
                ready = asyncio.Event()
                self._first_round = ready
                pending = [len(self._readers)]
                for reader in self._readers:
                    reader.check_engine = _check_engine(reader)
                    task = loop.create_task(self._check_forever_async(reader, ready, pending))
                    self._tasks.append(task)
                if not self._readers:
                    ready.set()
            else:
                first = threading.Event()
                self._first_round = first
                pending = [len(self._readers)]
                for reader in self._readers:
                    reader.check_engine = _check_engine(reader)
                    thread = threading.Thread(
                        target=_check_forever_sync,
                        args=(weakref.ref(self), reader, first, pending),
                        name=f"fault_tolerant_pool replica check {reader.name}",
                        daemon=True,
                    )
                    self._threads.append(thread)
                    thread.start()
                if not self._readers:
                    first.set()
            self._started = True
        if not self.asynchronous:
            assert isinstance(self._first_round, threading.Event)
            self._first_round.wait(self.check_timeout)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Start the checkers and wait for every reader's first check (or ``timeout``,
        default ``check_timeout``): reads before that go to the writer."""
        if not self._started:
            self._start()
        first = self._first_round
        if isinstance(first, asyncio.Event):
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(first.wait(), timeout or self.check_timeout)

    def _record(self, reader: _Reader, began: float, standby: bool, lag: float) -> None:
        reader.last_check_began = began
        reader.role = "standby" if standby else "primary"
        reader.lag = max(0.0, lag)
        reader.checked_at = self._clock()
        reader.checking_since = None

    def _failed(self, reader: _Reader, error: BaseException) -> None:
        if reader.role != "down":
            logger.warning(
                "reader %s: check failed (%s): out of rotation", reader.name, type(error).__name__
            )
        reader.role = "down"
        reader.checking_since = None

    async def _check_forever_async(
        self, reader: _Reader, ready: asyncio.Event, pending: list[int]
    ) -> None:
        engine = reader.check_engine
        assert isinstance(engine, AsyncEngine)
        first = True
        while not self._closed:
            began = self._clock()
            reader.checking_since = began
            try:
                row = await asyncio.wait_for(_check_async(engine), self.check_timeout)
                self._record(reader, began, bool(row[0]), float(row[1]))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._failed(reader, error)
            if first:
                first = False
                pending[0] -= 1
                if pending[0] <= 0:
                    ready.set()
            await asyncio.sleep(max(0.0, self.check_interval - (self._clock() - began)))

    def stats(self) -> RouterStats:
        now = self._clock()
        readers = tuple(
            ReaderStatus(
                name=r.name,
                role=r.role,
                lag=r.lag,
                in_rotation=r.why_not(
                    now, self.max_replica_lag, self._stale_after, self.check_timeout
                )
                is None,
                reads=r.reads,
                skipped_for_lag=r.skipped_for_lag,
                skipped_down=r.skipped_down,
                skipped_busy=r.skipped_busy,
            )
            for r in self._readers
        )
        return RouterStats(
            readers=readers,
            writer_reads=self._writer_reads,
            fallbacks=self._fallbacks,
            read_your_writes=self._sticky_reads,
            writes=self._writes,
        )

    def close(self) -> None:
        """Stop the checkers and close their connections (the engines given to the router stay
        open: they are the application's). A sync router waits for its checker threads, about
        ``check_timeout`` at most: each closes its connections as it ends. An async router:
        call ``await aclose()``, which also waits for its checker tasks to end and closes their
        connections."""
        if not self._closed:
            event.remove(self._sync_writer, "commit", self._committed)
            for reader in self._readers:
                if reader.listener is not None:
                    event.remove(reader.sync_engine, "handle_error", reader.listener)
        self._closed = True
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        until = time.monotonic() + self.check_timeout + CLOSE_SLACK
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))
        left = [thread.name for thread in self._threads if thread.is_alive()]
        if left:
            logger.warning("router closed with checks still in flight: %s", ", ".join(left))

    async def aclose(self) -> None:
        """:meth:`close` for an async router, from its event loop."""
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for reader in self._readers:
            engine = reader.check_engine
            if isinstance(engine, AsyncEngine):
                await greenlet_spawn(engine.sync_engine.pool.dispose)

    def __repr__(self) -> str:
        return f"<ReplicaRouter writer={_name(self._sync_writer)} readers=[{self._describe()}]>"


#: The execution option that marks a read-only transaction the writer took (its COMMIT is not
#: a write for read-your-writes). Set on the ``Connection``, which lives for one checkout.
_READ_ONLY_KEY = "fault_tolerant_pool_read_only"
_READ_ONLY = {_READ_ONLY_KEY: True}


async def _check_async(engine: AsyncEngine) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(LAG_SQL)).one()


def _check_forever_sync(
    ref: weakref.ref[ReplicaRouter], reader: _Reader, first: threading.Event, pending: list[int]
) -> None:
    """A sync reader's checker thread: a check every ``check_interval`` until the router is
    closed (or no one holds it); then it closes its engine's connections."""
    engine = reader.check_engine
    assert isinstance(engine, Engine)
    announced = False
    try:
        while True:
            router = ref()
            if router is None or router._closed:
                return
            began = router._clock()
            reader.checking_since = began
            try:
                row = _check_sync(engine, router.check_timeout)
                router._record(reader, began, bool(row[0]), float(row[1]))
            except Exception as error:
                router._failed(reader, error)
            if not announced:
                announced = True
                pending[0] -= 1
                if pending[0] <= 0:
                    first.set()
            pause = max(0.0, router.check_interval - (router._clock() - began))
            stop = router._stop
            del router  # a router no one holds any more stops its checkers
            if stop.wait(pause):
                return
    finally:
        engine.pool.dispose()  # not engine.dispose(): that would make another pool


def _check_sync(engine: Engine, timeout: float) -> Any:
    """One check that ends within about ``timeout``, as the async one is cancelled then: its
    connect gives up (a reader that just stopped would be retried for its pool's whole
    ``retry_deadline``), and its statement's connection is cut (a black hole)."""
    started = time.monotonic()
    with connects_within(timeout):
        connection = engine.connect()
    with connection:
        left = max(timeout - (time.monotonic() - started), MIN_CHECK_STATEMENT)
        driver_connection = connection.connection.driver_connection
        with watchdog.cut_after(left, driver_connection, "reader check"):
            return connection.execute(LAG_SQL).one()


async def _give_back(connection: AsyncConnection) -> None:
    """Close ``connection`` if its checkout completed: a cancellation that lands after that
    (in ``execution_options()``, or a time limit's) would leave it checked out. Shielded: a
    second cancellation leaves the close running."""
    if connection.sync_connection is not None:
        await asyncio.shield(connection.close())


def _suspect(reader: _Reader, clock: Callable[[], float]) -> Callable[[Any], None]:
    def handle_error(context: Any) -> None:
        if context.is_disconnect:
            reader.suspect_at = clock()

    return handle_error


class _AsyncConnect:
    """``async with router.connect(read_only=True) as conn``: the async checkout, with the
    same fallback as the sync one."""

    __slots__ = ("_connection", "_read_only", "_router")

    def __init__(self, router: ReplicaRouter, read_only: bool) -> None:
        self._router = router
        self._read_only = read_only
        self._connection: AsyncConnection | None = None

    def __aenter__(self) -> Awaitable[AsyncConnection]:
        return self._router._connect_async(self._read_only, self)

    async def __aexit__(self, *exc: Any) -> None:
        connection = self._connection
        self._connection = None
        if connection is not None:
            # SQLAlchemy's own exit: the close runs in a task of its own, shielded, as for a
            # plain ``async with engine.connect()``. Awaited here instead, the close's greenlet
            # switches copy this task's deeper stack: 5 % of a one-row read's CPU (asyncpg).
            await connection.__aexit__(*exc)


class Route:
    """``router.reads`` / ``router.writes``: what the transaction runner connects through."""

    __slots__ = ("read_only", "router")

    def __init__(self, router: ReplicaRouter, read_only: bool) -> None:
        self.router = router
        self.read_only = read_only

    def connect(self) -> Any:
        return self.router.connect(read_only=self.read_only)

    @property
    def asynchronous(self) -> bool:
        return self.router.asynchronous


class RoutingSession(Session):
    """A ``Session`` whose transactions go where its router says: all to the writer, or (a
    read-only session) each to one reader chosen when the transaction begins.

    A read-only transaction's connection is checked out by the router, as
    ``router.connect(read_only=True)`` is (a reader's checkout gives up after ``check_timeout``
    and the next reader, then the writer, is tried), and :meth:`get_bind` hands SQLAlchemy that
    ``Connection``, not yet in a transaction: the session begins, commits and rolls back a
    transaction on it as on one it connected itself, whatever its ``join_transaction_mode``.
    A session closes only the connections it made, so this one goes back to its pool when the
    transaction ends (``after_transaction_end``).

    SQLAlchemy asks for the bind of a statement before it begins the transaction the statement
    needs (autobegin), and asks the same question when the bind is only looked at
    (``str(query)``, ``session.get_bind()``). So that a look checks nothing out, a statement
    outside a transaction begins one first (``do_orm_execute``, :meth:`connection`), and
    :meth:`get_bind` outside a transaction only names an engine.
    """

    def __init__(
        self, *args: Any, router: ReplicaRouter, read_only: bool = False, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.router = router
        self.read_only = read_only
        # The transaction and what its statements run on (an Engine for the writer, the
        # Connection of a read-only transaction). A transaction of None: chosen before the
        # session began one, for the next to take (``after_transaction_create``).
        self._route: tuple[SessionTransaction | None, Engine | Connection] | None = None
        self._connecting = False
        self._last_engine: Engine = router._sync_writer

    def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
        given = kw.get("bind")
        if given is not None:  # a bind the caller named (bind_arguments): used as it is
            return given
        transaction = self.get_transaction()
        route = self._route
        if route is not None and route[0] is transaction:
            return route[1]
        router = self.router
        bind: Engine | Connection
        if not self.read_only:
            chosen = router.choose(False)
            bind = chosen.sync_engine if isinstance(chosen, AsyncEngine) else chosen
        elif transaction is None and not self._connecting:
            # Only looked at: no statement runs outside a transaction. The engine of the last
            # transaction (a pool to count a failed run on), else the writer's.
            return self._last_engine
        else:
            self._end_route(route[0] if route is not None else None)  # never expected
            bind = router._checkout_for_session()
        self._route = (transaction, bind)
        return bind

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Connection:
        """``Session.connection()``: outside a transaction, it begins one (autobegin) on the
        connection checked out for it."""
        self._connecting = True
        try:
            return super().connection(bind_arguments, execution_options)
        finally:
            self._connecting = False
            self._end_route(None)  # checked out, but no transaction took it (autobegin off)

    def _end_route(self, transaction: SessionTransaction | None) -> None:
        """Forget the route of ``transaction`` (None: one chosen outside a transaction), and
        give its connection back."""
        route = self._route
        if route is None or route[0] is not transaction:
            return
        self._route = None
        bind = route[1]
        if isinstance(bind, Connection):
            self._last_engine = bind.engine
            bind.close()


@event.listens_for(RoutingSession, "do_orm_execute")
def _begin_before_statement(state: Any) -> None:
    session = state.session
    if session.read_only and session.get_transaction() is None:
        session.connection()  # its transaction begins, on a reader's connection (or the writer's)


@event.listens_for(RoutingSession, "after_transaction_create")
def _transaction_created(session: RoutingSession, transaction: SessionTransaction) -> None:
    route = session._route
    if transaction.parent is None and route is not None and route[0] is None:
        session._route = (transaction, route[1])


@event.listens_for(RoutingSession, "after_transaction_end")
def _transaction_ended(session: RoutingSession, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session._end_route(transaction)


class _RouterMetrics:
    """Observable instruments over every live router of one meter provider: read when the
    metrics are collected, so routing itself records nothing."""

    _by_provider: ClassVar[weakref.WeakKeyDictionary[Any, _RouterMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _global: ClassVar[_RouterMetrics | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, meter: Any) -> None:
        self.routers: weakref.WeakSet[ReplicaRouter] = weakref.WeakSet()
        meter.create_observable_counter(
            "fault_tolerant_pool.router.reads",
            callbacks=[self._reads],
            unit="{transaction}",
            description="Read-only transactions routed, by server (a reader; the writer, and why)",
        )
        meter.create_observable_counter(
            "fault_tolerant_pool.router.skipped",
            callbacks=[self._skipped],
            unit="{transaction}",
            description="Times a reader was passed over, by reason (lag, down, busy)",
        )
        meter.create_observable_gauge(
            "fault_tolerant_pool.router.replica_lag",
            callbacks=[self._lag],
            unit="s",
            description="Seconds a reader was behind at its last check",
        )

    @classmethod
    def register(cls, router: ReplicaRouter, meter_provider: Any) -> None:
        with cls._lock:
            global_provider = metrics.get_meter_provider()
            if meter_provider is None or meter_provider is global_provider:
                if cls._global is None:
                    cls._global = cls(global_provider.get_meter(INSTRUMENTATION_NAME, _version()))
                chosen = cls._global
            else:
                found = cls._by_provider.get(meter_provider)
                if found is None:
                    found = cls(meter_provider.get_meter(INSTRUMENTATION_NAME, _version()))
                    cls._by_provider[meter_provider] = found
                chosen = found
            chosen.routers.add(router)

    def _reads(self, options: Any) -> Iterator[metrics.Observation]:
        for router in list(self.routers):
            writer = _name(router._sync_writer)
            for reader in router._readers:
                yield metrics.Observation(reader.reads, {_SERVER: reader.name, _ROUTE: "reader"})
            fallback = {_SERVER: writer, _ROUTE: "fallback"}
            yield metrics.Observation(router._fallbacks, fallback)
            sticky = {_SERVER: writer, _ROUTE: "read_your_writes"}
            yield metrics.Observation(router._sticky_reads, sticky)

    def _skipped(self, options: Any) -> Iterator[metrics.Observation]:
        for router in list(self.routers):
            for reader in router._readers:
                yield metrics.Observation(
                    reader.skipped_for_lag, {_SERVER: reader.name, _REASON: "lag"}
                )
                yield metrics.Observation(
                    reader.skipped_down, {_SERVER: reader.name, _REASON: "down"}
                )
                yield metrics.Observation(
                    reader.skipped_busy, {_SERVER: reader.name, _REASON: "busy"}
                )

    def _lag(self, options: Any) -> Iterator[metrics.Observation]:
        for router in list(self.routers):
            for reader in router._readers:
                if reader.lag is not None:
                    yield metrics.Observation(reader.lag, {_SERVER: reader.name})


_SERVER = "fault_tolerant_pool.router.server"
_ROUTE = "fault_tolerant_pool.router.route"
_REASON = "fault_tolerant_pool.router.reason"

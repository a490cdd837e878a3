"""The transaction runner against a real PostgreSQL (issue 22): all three driver flavours, Core and
the ORM, ``FaultTolerantQueuePool`` (and ``FaultTolerantNullPool``).

A unit of work is written once for every flavour and both APIs (:class:`Unit`): its body is a
generator that yields what to do and gets each statement's result back; the adapter runs the
steps on a ``Connection``, a ``Session``, or their async counterparts. Rows go to ``entries``,
whose ``key`` is *not* unique: a unit committed twice shows as two rows.

Faults are placed where the runner's rules differ: a session ended before COMMIT (the function
terminates its own backend, a background task terminates backends, the proxy resets the
connection), COMMIT itself cut in flight (``FaultProxy.cut_on``, before and after the server saw
it), a serialization failure and a deadlock, errors that must not be re-run, cancellation, and
the pool's own give-up. Backoffs are short (:data:`QUICK`) to keep the file fast.

The tests share the session's server (a database of their own, emptied before each test); each
test's engines connect with an ``application_name`` of its own, which is how the server's view
(``pg_stat_activity``) and the terminations tell one test's sessions from everything else's.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fault_tolerant_pool import (
    ConnectRetriesExhausted,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
    PoolStats,
    TransactionOutcomeUnknown,
    TransactionRunner,
    run_transaction,
    run_transaction_async,
    transactional,
)
from fault_tolerant_pool.testing import FaultProxy, PostgresServer
from fault_tolerant_pool.testing.server import free_port

from .client import ASYNC_FLAVOURS, FLAVOURS

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

#: The database of this module on the session's server.
DBNAME = "ftp_transaction"
#: Short sleeps between runs: the rules are under test here, not the backoff.
QUICK = TransactionRunner(initial_delay=0.005, max_delay=0.02)

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
async_flavours = pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)


def live(test: _F) -> _F:
    """A test on a real PostgreSQL, run by anyio (the bad-input tests below need neither)."""
    return pytest.mark.db(pytest.mark.anyio(test))  # type: ignore[no-any-return]


class Base(DeclarativeBase):
    pass


class Entry(Base):
    """One row per committed run of a unit of work; ``key`` names the unit (not unique)."""

    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[int] = mapped_column(index=True)
    run: Mapped[int]


class Account(Base):
    """A row with a unique key: conflicts, deadlocks, upserts, unique violations."""

    __tablename__ = "accounts"
    key: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


# -- a unit of work for every flavour and both APIs ------------------------------------------------

#: A step a unit's body yields: a statement (with parameters, as a tuple), an ORM object to add,
#: a :class:`Get`, or a ``threading.Barrier`` to wait at.
Step = Any


class Get:
    """``session.get(entity, key)`` as a step (the ORM only)."""

    def __init__(self, entity: type[Base], key: int) -> None:
        self.entity = entity
        self.key = key


class Unit(Generic[_T]):
    """A unit of work written once: ``body(run)`` (``run`` counts the calls, from 1) yields steps.

    ``calls`` counts the runner's calls, ``finished`` the calls that returned (a run that failed
    after that failed at COMMIT); ``raised`` holds every error a step raised (the very objects,
    to check that the runner re-raises them unchanged).
    """

    def __init__(self, body: Callable[[int], Generator[Step, Any, _T]]) -> None:
        self.body = body
        self.calls = 0
        self.finished = 0
        self.raised: list[BaseException] = []

    def sync(self, conn: sa.Connection | Session) -> _T:
        self.calls += 1
        steps = self.body(self.calls)
        result: Any = None
        while True:
            try:
                step = steps.send(result)
            except StopIteration as stop:
                self.finished += 1
                return stop.value  # type: ignore[no-any-return]
            try:
                result = self._sync_step(conn, step)
            except BaseException as error:
                self.raised.append(error)
                raise

    async def aio(self, conn: AsyncConnection | AsyncSession) -> _T:
        self.calls += 1
        steps = self.body(self.calls)
        result: Any = None
        while True:
            try:
                step = steps.send(result)
            except StopIteration as stop:
                self.finished += 1
                return stop.value  # type: ignore[no-any-return]
            try:
                result = await self._async_step(conn, step)
            except BaseException as error:
                self.raised.append(error)
                raise

    @staticmethod
    def _sync_step(conn: Any, step: Step) -> Any:
        if isinstance(step, threading.Barrier):
            return step.wait()
        if isinstance(step, Base):
            return conn.add(step)
        if isinstance(step, Get):
            return conn.get(step.entity, step.key)
        statement, params = step if isinstance(step, tuple) else (step, None)
        return conn.execute(statement, params)

    @staticmethod
    async def _async_step(conn: Any, step: Step) -> Any:
        if isinstance(step, threading.Barrier):
            return await asyncio.to_thread(step.wait)
        if isinstance(step, Base):
            return conn.add(step)
        if isinstance(step, Get):
            return await conn.get(step.entity, step.key)
        statement, params = step if isinstance(step, tuple) else (step, None)
        return await conn.execute(statement, params)


def add_entry(orm: bool, key: int, run: int) -> Step:
    """The step that writes a unit's row: an ORM object or a Core INSERT."""
    return Entry(key=key, run=run) if orm else sa.insert(Entry).values(key=key, run=run)


TERMINATE_SELF = sa.text("SELECT pg_terminate_backend(pg_backend_pid())")


# -- engines and the server's view -----------------------------------------------------------------


def connect_args(flavour: str, app: str) -> dict[str, Any]:
    """What makes the driver set ``application_name``."""
    if flavour == "asyncpg":
        return {"server_settings": {"application_name": app}}
    return {"application_name": app}


class Target:
    """An engine of one flavour, with the bind the runner gets (engine or sessionmaker)."""

    def __init__(
        self,
        url: str,
        flavour: str,
        *,
        app: str,
        orm: bool = False,
        poolclass: type = FaultTolerantQueuePool,
        isolation_level: str | None = None,
        **engine_kw: Any,
    ) -> None:
        self.flavour = flavour
        self.orm = orm
        self.is_async = flavour in ASYNC_FLAVOURS
        self._threads = ThreadPoolExecutor(max_workers=16)  # sync runs, as a threaded app has
        engine_kw = {
            "poolclass": poolclass,
            "connect_args": connect_args(flavour, app),
            **engine_kw,
        }
        self.async_engine: AsyncEngine | None = None
        bind: Any
        if self.is_async:
            self.async_engine = create_async_engine(url, **engine_kw)
            self.engine = self.async_engine.sync_engine
            bind = self.async_engine
            if isolation_level is not None:
                bind = bind.execution_options(isolation_level=isolation_level)
            if orm:
                bind = async_sessionmaker(bind, expire_on_commit=False)
        else:
            self.engine = sa.create_engine(url, **engine_kw)
            bind = self.engine
            if isolation_level is not None:
                bind = bind.execution_options(isolation_level=isolation_level)
            if orm:
                bind = sessionmaker(bind, expire_on_commit=False)
        self.bind = bind

    @property
    def pool(self) -> Any:
        return self.engine.pool

    def stats(self) -> PoolStats:
        stats: PoolStats = self.pool.stats()
        return stats

    async def run(self, unit: Unit[_T], runner: TransactionRunner = QUICK) -> _T:
        """Run ``unit`` through ``runner`` (sync flavours in a worker thread)."""
        if self.is_async:
            return await runner.run_async(self.bind, unit.aio)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, runner.run, self.bind, unit.sync)

    async def run_function(self, unit: Unit[_T], **kw: Any) -> _T:
        """Run ``unit`` through ``run_transaction`` / ``run_transaction_async`` (their defaults,
        but for ``kw``)."""
        if self.is_async:
            return await run_transaction_async(self.bind, unit.aio, **kw)
        run = functools.partial(run_transaction, self.bind, unit.sync, **kw)
        return await asyncio.get_running_loop().run_in_executor(self._threads, run)

    async def warm_up(self) -> None:
        """One connection made and checked in: later checkouts send nothing but the unit's SQL."""
        if self.async_engine is not None:
            async with self.async_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            return
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        if self.async_engine is not None:
            await self.async_engine.dispose()
        else:
            self.engine.dispose()
        self._threads.shutdown(wait=True)


class Side:
    """One test's view of the database: a plain psycopg connection (autocommit; not through the
    pool or a proxy) for setting up, looking at the result and acting as the other client of a
    conflict, and the ``application_name`` (:attr:`app`) the test's engines connect with."""

    def __init__(self, server: PostgresServer, app: str) -> None:
        self.server = server
        self.app = app
        self.conn = self.connect(autocommit=True)
        self._lock = threading.Lock()  # one connection, used from the loop and from threads

    def connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        """Another plain connection to the test's database (not one of :attr:`app`)."""
        server = self.server
        return psycopg.connect(
            host=server.host, port=server.port, user=server.user, password=server.password,
            dbname=DBNAME, application_name="ftp-side", autocommit=autocommit,
        )  # fmt: skip

    def url(self, flavour: str, port: int | None = None) -> str:
        return self.server.url(flavour, dbname=DBNAME, port=port)

    def target(self, flavour: str, *, port: int | None = None, **kw: Any) -> Target:
        """An engine of ``flavour`` on the test's database (through ``port``, a proxy's)."""
        return Target(self.url(flavour, port), flavour, app=self.app, **kw)

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock, self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def runs_of(self, key: int) -> list[int]:
        """The ``run`` of every row of unit ``key`` (one element: committed exactly once)."""
        rows = self.execute("SELECT run FROM entries WHERE key = %(k)s ORDER BY id", {"k": key})
        return [run for (run,) in rows]

    def balance(self, key: int) -> int:
        rows = self.execute("SELECT balance FROM accounts WHERE key = %(k)s", {"k": key})
        return int(rows[0][0])

    def sessions(self, running: str = "%") -> list[tuple[Any, ...]]:
        """(pid, state, query) of the test's sessions (``application_name`` :attr:`app`),
        those whose last query is ``LIKE running``."""
        return self.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %(app)s"
            " AND query LIKE %(running)s",
            {"app": self.app, "running": running},
        )

    async def sessions_settle(
        self, done: Callable[[list[tuple[Any, ...]]], bool], timeout: float = 5.0
    ) -> list[tuple[Any, ...]]:
        """The engines' sessions, once ``done(sessions)`` (or the timeout passed): a closed
        connection's backend takes a moment to exit."""
        deadline = time.monotonic() + timeout
        sessions = self.sessions()
        while not done(sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            sessions = self.sessions()
        return sessions

    def close(self) -> None:
        """End the test's sessions a failed test may have left, and this connection."""
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %(app)s",
            {"app": self.app},
        )
        self.conn.close()


@pytest.fixture(scope="module")
def database(pg_server_session: PostgresServer) -> PostgresServer:
    """The session's server, with this module's database and its tables."""
    server = pg_server_session
    if not server.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DBNAME}'"):
        server.execute(f"CREATE DATABASE {DBNAME}")
    engine = sa.create_engine(server.url("psycopg", dbname=DBNAME), poolclass=sa.pool.NullPool)
    Base.metadata.create_all(engine)
    engine.dispose()
    return server


@pytest.fixture
def side(database: PostgresServer) -> Iterator[Side]:
    """The tables emptied, and a :class:`Side` with an ``application_name`` for this test."""
    helper = Side(database, f"ftp-tx-{uuid.uuid4().hex[:12]}")
    try:
        helper.execute("TRUNCATE entries, accounts RESTART IDENTITY")
        yield helper
    finally:
        helper.close()


@pytest.fixture
def proxy(database: PostgresServer) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the session's server, for this test alone."""
    with FaultProxy(database.host, database.port) as front:
        yield front


def checked_out(target: Target) -> int:
    """Connections the pool has lent and not got back (both pool classes)."""
    count = target.stats().checked_out
    if isinstance(target.pool, FaultTolerantQueuePool):
        assert target.pool.checkedout() == count
    return count


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a wrapped driver error (psycopg's ``sqlstate``, asyncpg's adapter's)."""
    orig = getattr(error, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


# -- a unit cut before COMMIT runs again, and commits once -----------------------------------------


@live
@flavours
@pytest.mark.parametrize(
    ("api", "poolclass", "cut"),
    [
        ("core", FaultTolerantQueuePool, "terminate"),
        ("orm", FaultTolerantQueuePool, "terminate"),
        ("core", FaultTolerantQueuePool, "proxy_reset"),
        ("orm", FaultTolerantNullPool, "proxy_reset"),
    ],
    ids=["core-queue-terminate", "orm-queue-terminate", "core-queue-reset", "orm-null-reset"],
)
async def test_a_unit_cut_before_commit_runs_again_and_commits_once(
    side: Side,
    request: pytest.FixtureRequest,
    flavour: str,
    api: str,
    poolclass: type,
    cut: str,
) -> None:
    """Run 1 writes its row, then loses its session (its backend terminated, or the connection
    reset by the proxy) before COMMIT: run 2 on a fresh connection commits; one row, run 2's."""
    orm = api == "orm"
    proxy: FaultProxy | None = None
    if cut == "proxy_reset":
        proxy = request.getfixturevalue("proxy")
    port = None if proxy is None else proxy.port
    target = side.target(flavour, port=port, orm=orm, poolclass=poolclass)

    def body(run: int) -> Generator[Step, Any, int]:
        yield add_entry(orm, 7, run)
        if run == 1:
            if proxy is None:
                yield TERMINATE_SELF
            else:
                assert proxy.reset() == 1
                yield sa.text("SELECT 1")
        yield sa.text("SELECT 2")
        return run

    unit = Unit(body)
    assert await target.run_function(unit) == 2
    assert unit.calls == 2
    assert side.runs_of(7) == [2]
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown) == (1, 0)
    assert checked_out(target) == 0
    await target.dispose()


# -- many units while backends are terminated ------------------------------------------------------

UNITS = 200
WORKERS = 10


def doomed(key: int, run: int) -> bool:
    """Whether run ``run`` of unit ``key`` waits to be terminated (twice for some units)."""
    return (run == 1 and key % 10 == 0) or (run == 2 and key % 50 == 0)


class Terminator:
    """A thread that terminates, every 10 ms, every backend of the test running a doomed
    statement (``pg_sleep(30) AS doomed``), through a connection of its own.

    Only statements that cannot end otherwise are terminated, so each termination lands inside
    the unit's work, never while its COMMIT is in flight (where the outcome would be unknown):
    the test stays deterministic.
    """

    def __init__(self, side: Side) -> None:
        self.terminated: set[int] = set()  # pids (one may be signalled twice while it exits)
        self._app = side.app
        self._conn = side.connect(autocommit=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            rows = self._conn.execute(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %(app)s AND state = 'active' AND query LIKE %(doomed)s",
                {"app": self._app, "doomed": "%AS doomed%"},
            ).fetchall()
            self.terminated.update(pid for pid, signalled in rows if signalled)

    def __enter__(self) -> Terminator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


@live
@pytest.mark.parametrize(
    ("flavour", "api"),
    [("asyncpg", "core"), ("asyncpg", "orm"), ("psycopg_async", "core"), ("psycopg", "orm")],
)
async def test_many_units_while_backends_are_terminated(side: Side, flavour: str, api: str) -> None:
    """200 units over 10 concurrent workers while a task terminates backends: every unit
    returns, each has exactly one row (nothing lost, nothing doubled), each termination was
    one re-run."""
    orm = api == "orm"
    target = side.target(flavour, orm=orm)
    runner = QUICK.new(attempts=4)

    def unit_for(key: int) -> Unit[int]:
        def body(run: int) -> Generator[Step, Any, int]:
            yield add_entry(orm, key, run)
            if doomed(key, run):
                yield sa.text("SELECT pg_sleep(30) AS doomed")
            yield sa.text("SELECT count(*) FROM entries WHERE key = :k"), {"k": key}
            return key

        return Unit(body)

    units = [unit_for(key) for key in range(UNITS)]
    results: list[int] = []

    async def worker(share: list[Unit[int]]) -> None:
        for unit in share:
            results.append(await target.run(unit, runner))

    started = time.monotonic()
    with Terminator(side) as terminator:
        await asyncio.wait_for(
            asyncio.gather(*(worker(units[i::WORKERS]) for i in range(WORKERS))), 60
        )
    elapsed = time.monotonic() - started
    expected_reruns = sum(doomed(k, 1) + (doomed(k, 1) and doomed(k, 2)) for k in range(UNITS))
    assert sorted(results) == list(range(UNITS))
    assert [unit.calls for unit in units] == [
        1 + doomed(k, 1) + (doomed(k, 1) and doomed(k, 2)) for k in range(UNITS)
    ]
    rows = side.execute("SELECT key, count(*) FROM entries GROUP BY key ORDER BY key")
    assert rows == [(key, 1) for key in range(UNITS)]
    stats = target.stats()
    assert stats.transaction_retries == expected_reruns
    assert 0 < len(terminator.terminated) <= expected_reruns  # each landed in a doomed run
    assert stats.outcomes_unknown == 0
    assert checked_out(target) == 0
    assert elapsed < 30, elapsed
    await target.dispose()


# -- COMMIT cut in flight --------------------------------------------------------------------------


async def warm_unit(
    side: Side, flavour: str, proxy: FaultProxy, key: int, orm: bool = False
) -> tuple[Target, Unit[int]]:
    """An engine through ``proxy`` with one connection made, and a unit writing one row of
    ``key`` and returning its run number."""
    target = side.target(flavour, port=proxy.port, orm=orm)
    await target.warm_up()

    def body(run: int) -> Generator[Step, Any, int]:
        yield add_entry(orm, key, run)
        return run

    return target, Unit(body)


@live
@flavours
@pytest.mark.parametrize(
    ("api", "forward"),
    [("core", False), ("core", True), ("orm", True)],
    ids=["core-not-forwarded", "core-forwarded", "orm-forwarded"],
)
async def test_commit_cut_in_flight_has_an_unknown_outcome_unless_resolved(
    proxy: FaultProxy, side: Side, flavour: str, api: str, forward: bool
) -> None:
    """The connection dies while COMMIT is in flight, and the runner does not ask the server
    (``resolve_outcome=False``): not run again, TransactionOutcomeUnknown. Whether the row is
    there depends on whether the server saw the COMMIT, which the client cannot know; here the
    test knows."""
    target, unit = await warm_unit(side, flavour, proxy, 3, orm=api == "orm")
    proxy.cut_on(b"COMMIT", forward=forward)
    with pytest.raises(TransactionOutcomeUnknown) as info:
        await target.run(unit, QUICK.new(resolve_outcome=False))
    assert proxy.connections_cut == 1
    error = info.value
    assert isinstance(error, sa.exc.OperationalError)
    assert isinstance(error.__cause__, sa.exc.DBAPIError)
    assert error.orig is error.__cause__.orig
    assert error.attempts == 1
    assert "outcome unknown" in str(error)
    assert unit.calls == 1
    assert side.runs_of(3) == ([1] if forward else [])
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown, stats.outcomes_resolved) == (0, 1, 0)
    assert checked_out(target) == 0
    await target.dispose()


@live
@flavours
@pytest.mark.parametrize(
    ("api", "forward"),
    [("core", False), ("core", True), ("orm", False), ("orm", True)],
    ids=["core-not-forwarded", "core-forwarded", "orm-not-forwarded", "orm-forwarded"],
)
async def test_commit_cut_in_flight_is_resolved_by_asking_the_server(
    proxy: FaultProxy, side: Side, flavour: str, api: str, forward: bool
) -> None:
    """With the defaults the runner noted the transaction's id before COMMIT and, after the
    cut, asks the server: it committed (the server saw the COMMIT), so run 1's result is
    returned and nothing runs again; or it did not, so the unit runs again. One row either way."""
    target, unit = await warm_unit(side, flavour, proxy, 4, orm=api == "orm")
    proxy.cut_on(b"COMMIT", forward=forward)
    assert await target.run(unit) == (1 if forward else 2)
    assert proxy.connections_cut == 1
    assert unit.calls == (1 if forward else 2)
    assert side.runs_of(4) == ([1] if forward else [2])
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown, stats.outcomes_resolved) == (
        0 if forward else 1,
        0,
        1,
    )
    assert checked_out(target) == 0
    await target.dispose()


@live
@flavours
async def test_a_connection_lost_while_noting_the_id_runs_the_unit_again(
    proxy: FaultProxy, side: Side, flavour: str
) -> None:
    """The connection dies as the runner asks for the transaction's id (before COMMIT): nothing
    was committed, so the unit runs again, like any failure before COMMIT."""
    target, unit = await warm_unit(side, flavour, proxy, 6)
    proxy.cut_on(b"pg_current_xact_id_if_assigned", forward=False)
    assert await target.run(unit) == 2
    assert proxy.connections_cut == 1
    assert side.runs_of(6) == [2]
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown, stats.outcomes_resolved) == (1, 0, 0)
    assert checked_out(target) == 0
    await target.dispose()


@live
@flavours
async def test_a_unit_that_wrote_nothing_runs_again_after_commit_cut(
    proxy: FaultProxy, side: Side, flavour: str
) -> None:
    """A transaction without an id (it only read) changes nothing at COMMIT: a cut COMMIT is
    run again without asking the server."""
    target = side.target(flavour, port=proxy.port)
    await target.warm_up()

    def body(run: int) -> Generator[Step, Any, int]:
        result = yield sa.text("SELECT count(*) FROM entries")
        return int(result.scalar_one()) + run

    unit = Unit(body)
    proxy.cut_on(b"COMMIT", forward=True)
    assert await target.run(unit) == 2
    assert unit.calls == 2
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown, stats.outcomes_resolved) == (1, 0, 1)
    await target.dispose()


@live
@flavours
@pytest.mark.parametrize("forward", [False, True], ids=["not-forwarded", "forwarded"])
async def test_an_idempotent_unit_runs_again_after_commit_cut_in_flight(
    proxy: FaultProxy, side: Side, flavour: str, forward: bool
) -> None:
    """With ``idempotent=True`` (an upsert) the cut COMMIT is run again; run 2 finds the row
    if and only if run 1's COMMIT reached the server."""
    target = side.target(flavour, port=proxy.port)
    await target.warm_up()
    upsert = sa.text(
        "INSERT INTO accounts (key, balance) VALUES (5, 100)"
        " ON CONFLICT (key) DO UPDATE SET balance = excluded.balance"
        " RETURNING xmax = 0 AS inserted"
    )

    def body(run: int) -> Generator[Step, Any, bool]:
        result = yield upsert
        return bool(result.scalar_one())

    unit = Unit(body)
    proxy.cut_on(b"COMMIT", forward=forward)
    inserted = await target.run_function(unit, idempotent=True)
    assert proxy.connections_cut == 1
    assert unit.calls == 2
    assert inserted is not forward  # run 2 updated the row run 1 committed, or inserted it
    assert side.execute("SELECT key, balance FROM accounts") == [(5, 100)]
    stats = target.stats()
    assert stats.transaction_retries == 1
    assert stats.outcomes_unknown == 1  # documented: counted, even when run again
    assert checked_out(target) == 0
    await target.dispose()


# -- conflicts: serialization failure, deadlock ----------------------------------------------------


@live
@flavours
@pytest.mark.parametrize("api", ["core", "orm"])
async def test_a_serialization_failure_is_run_again(side: Side, flavour: str, api: str) -> None:
    """REPEATABLE READ: run 1 reads the balance, another client updates it and commits, run 1's
    update fails with 40001; run 2 reads the new balance and commits (no lost update)."""
    orm = api == "orm"
    side.execute("INSERT INTO accounts (key, balance) VALUES (1, 0)")
    target = side.target(flavour, orm=orm, isolation_level="REPEATABLE READ")
    errors: list[BaseException] = []

    def body(run: int) -> Generator[Step, Any, int]:
        if orm:
            account = yield Get(Account, 1)
            seen = account.balance
        else:
            result = yield sa.select(Account.balance).where(Account.key == 1)
            seen = result.scalar_one()
        if run == 1:
            side.execute("UPDATE accounts SET balance = balance + 10 WHERE key = 1")
        if orm:
            account.balance = seen + 1  # flushed by the runner, before COMMIT
        else:
            yield sa.update(Account).where(Account.key == 1).values(balance=seen + 1)
        return int(seen)

    unit = Unit(body)
    assert await target.run(unit, QUICK.new(classifier=errors.append)) == 10
    assert unit.calls == 2
    assert [sqlstate(error) for error in errors] == ["40001"]
    assert side.balance(1) == 11
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown) == (1, 0)
    assert checked_out(target) == 0
    await target.dispose()


@live
@flavours
async def test_a_serialization_failure_at_commit_is_run_again(side: Side, flavour: str) -> None:
    """SERIALIZABLE write skew: run 1 and another client each read both rows and update one; the
    other commits first, so run 1's COMMIT is refused (40001): a conflict, not an unknown
    outcome, even at COMMIT. Run 2 sees the other's write and commits."""
    side.execute("INSERT INTO accounts (key, balance) VALUES (1, 0), (2, 0)")
    target = side.target(flavour, isolation_level="SERIALIZABLE")
    other = side.connect(autocommit=False)
    other.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    total = sa.select(sa.func.sum(Account.balance))
    errors: list[BaseException] = []

    def body(run: int) -> Generator[Step, Any, int]:
        seen = int((yield total).scalar_one())
        if run == 1:
            other.execute("SELECT sum(balance) FROM accounts")
            other.execute("UPDATE accounts SET balance = balance + 1 WHERE key = 2")
        yield sa.update(Account).where(Account.key == 1).values(balance=Account.balance + 1)
        if run == 1:
            other.commit()
        return seen

    unit = Unit(body)
    try:
        assert await target.run(unit, QUICK.new(classifier=errors.append)) == 1
    finally:
        other.close()
    assert (unit.calls, unit.finished) == (2, 2)  # run 1 returned: its COMMIT was refused
    assert [sqlstate(error) for error in errors] == ["40001"]
    assert side.balance(1) == side.balance(2) == 1
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown) == (1, 0)
    await target.dispose()


@live
@flavours
async def test_a_deadlock_is_run_again(side: Side, flavour: str) -> None:
    """Two units lock two rows in opposite orders, meeting at a barrier in between: the server
    aborts one of them (40P01), which runs again once the other has committed."""
    side.execute("INSERT INTO accounts (key, balance) VALUES (1, 0), (2, 0)")
    target = side.target(flavour)
    barrier = threading.Barrier(2, timeout=10)
    add = sa.text("UPDATE accounts SET balance = balance + 1 WHERE key = :k")
    errors: list[BaseException] = []

    def unit_for(first: int, second: int) -> Unit[int]:
        def body(run: int) -> Generator[Step, Any, int]:
            yield sa.text("SET LOCAL deadlock_timeout = '20ms'")
            yield add, {"k": first}
            if run == 1:
                yield barrier
            yield add, {"k": second}
            return run

        return Unit(body)

    units = [unit_for(1, 2), unit_for(2, 1)]
    runner = QUICK.new(classifier=errors.append)
    started = time.monotonic()
    runs = await asyncio.gather(*(target.run(unit, runner) for unit in units))
    assert sorted(runs) == [1, 2]  # one unit committed on its first run, the other on its second
    assert sorted(unit.calls for unit in units) == [1, 2]
    assert [sqlstate(error) for error in errors] == ["40P01"]
    assert side.balance(1) == side.balance(2) == 2
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown) == (1, 0)
    assert checked_out(target) == 0
    assert time.monotonic() - started < 5
    await target.dispose()


# -- errors that are not run again -----------------------------------------------------------------


@live
@flavours
@pytest.mark.parametrize("kind", ["value_error", "unique_violation", "syntax_error", "orm_unique"])
async def test_other_errors_are_raised_at_once_unchanged(
    side: Side, flavour: str, kind: str
) -> None:
    """The application's own error, a unique violation (from a statement, and from the ORM's
    flush at the end of the run), a syntax error: one call, the very error, nothing counted."""
    side.execute("INSERT INTO accounts (key, balance) VALUES (1, 0)")
    orm = kind == "orm_unique"
    target = side.target(flavour, orm=orm)
    own = ValueError("the application's own")

    def body(run: int) -> Generator[Step, Any, None]:
        yield add_entry(orm, 9, run)
        if kind == "value_error":
            raise own
        if kind == "unique_violation":
            yield sa.insert(Account).values(key=1, balance=5)
        if kind == "syntax_error":
            yield sa.text("SELEC 1")
        if kind == "orm_unique":
            yield Account(key=1, balance=5)  # the runner's flush sends it

    unit = Unit(body)
    expected = {
        "value_error": ValueError,
        "unique_violation": sa.exc.IntegrityError,
        "syntax_error": sa.exc.ProgrammingError,
        "orm_unique": sa.exc.IntegrityError,
    }[kind]
    with pytest.raises(Exception) as info:
        await target.run(unit)
    assert type(info.value) is expected
    if kind == "value_error":
        assert info.value is own
    elif kind == "orm_unique":
        assert sqlstate(info.value) == "23505"
    else:
        assert [info.value] == unit.raised  # the error the statement raised, not a copy
        assert sqlstate(info.value) == ("23505" if kind == "unique_violation" else "42601")
    assert unit.calls == 1
    assert side.runs_of(9) == []
    assert side.balance(1) == 0
    stats = target.stats()
    assert (stats.transaction_retries, stats.outcomes_unknown) == (0, 0)
    assert checked_out(target) == 0
    await target.dispose()


# -- cancellation ----------------------------------------------------------------------------------


@live
@async_flavours
@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool],
                         ids=lambda p: p.__name__)  # fmt: skip
@pytest.mark.parametrize("where", ["backoff", "run_2_query"])
async def test_cancellation_leaves_nothing_behind(
    side: Side, flavour: str, poolclass: type, where: str
) -> None:
    """A task cancelled while it sleeps between runs, or while run 2's statement runs: no
    connection lent, no server session busy for it, no row, no further run."""
    target = side.target(flavour, poolclass=poolclass)
    if where == "backoff":  # a 4.5 s sleep after run 1
        runner = TransactionRunner(initial_delay=5.0, max_delay=5.0, random=lambda: 0.9)
    else:
        runner = QUICK

    def body(run: int) -> Generator[Step, Any, int]:
        yield add_entry(False, 4, run)
        if run == 1:
            yield TERMINATE_SELF
        yield sa.text("SELECT pg_sleep(30) AS slow")
        return run

    unit = Unit(body)
    task = asyncio.create_task(target.run(unit, runner))
    if where == "backoff":
        assert await wait_for(lambda: target.stats().transaction_retries == 1)
        await asyncio.sleep(0.1)
        assert unit.calls == 1  # sleeping before run 2
    else:
        assert await wait_for(lambda: bool(side.sessions("%AS slow%")))
        assert unit.calls == 2
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert checked_out(target) == 0
    sessions = await side.sessions_settle(lambda sessions: not sessions)
    assert sessions == []  # none left running pg_sleep, in a transaction, or idle
    assert side.runs_of(4) == []
    await asyncio.sleep(0.1)
    assert unit.calls == (1 if where == "backoff" else 2)  # nothing ran after the cancellation
    await target.dispose()


# -- the pool's own verdict ------------------------------------------------------------------------


@live
@flavours
@pytest.mark.parametrize(
    ("api", "poolclass"),
    [("core", FaultTolerantQueuePool), ("orm", FaultTolerantNullPool)],
    ids=["core-queue", "orm-null"],
)
async def test_the_pools_give_up_is_not_run_again(flavour: str, api: str, poolclass: type) -> None:
    """Nothing listens: the pool retries the connect for its ``retry_deadline`` (0.5 s), then
    gives up; the runner raises that at once, without calling the function or re-running."""
    dead = f"127.0.0.1:{free_port()}"
    target = Target(
        f"postgresql+{flavour}://postgres:pw@{dead}/postgres", flavour, app="ftp-tx-nowhere",
        orm=api == "orm", poolclass=poolclass, retry_deadline=0.5,
    )  # fmt: skip

    def body(run: int) -> Generator[Step, Any, None]:
        yield sa.text("SELECT 1")

    unit = Unit(body)
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await target.run(unit, TransactionRunner(initial_delay=0.5, max_delay=0.5))
    elapsed = time.monotonic() - started
    assert isinstance(info.value.orig, ConnectRetriesExhausted)
    assert not isinstance(info.value, TransactionOutcomeUnknown)
    assert unit.calls == 0
    stats = target.stats()
    assert stats.give_ups == 1
    assert (stats.transaction_retries, stats.outcomes_unknown) == (0, 0)
    assert 0.5 <= elapsed < 3.0
    assert checked_out(target) == 0
    await target.dispose()


# -- the decorator ---------------------------------------------------------------------------------


@live
async def test_transactional_on_a_sync_function(side: Side) -> None:
    """A Core engine (psycopg): the connection first, the caller's arguments after it."""
    engine = sa.create_engine(
        side.url("psycopg"), poolclass=FaultTolerantQueuePool,
        connect_args=connect_args("psycopg", side.app),
    )  # fmt: skip
    calls: list[tuple[int, str]] = []

    @transactional(engine, QUICK)
    def record(conn: sa.Connection, key: int, *, note: str) -> str:
        """Write a row for ``key``."""
        calls.append((key, note))
        conn.execute(sa.insert(Entry).values(key=key, run=len(calls)))
        if len(calls) == 1:
            conn.execute(TERMINATE_SELF)
        return f"{note} {key}"

    assert record.__name__ == "record" and record.__doc__ == "Write a row for ``key``."
    assert await asyncio.to_thread(record, 11, note="done") == "done 11"
    assert calls == [(11, "done"), (11, "done")]
    assert side.runs_of(11) == [2]
    assert engine.pool.stats().transaction_retries == 1  # type: ignore[attr-defined]
    engine.dispose()


@live
@async_flavours
async def test_transactional_on_a_coroutine_function(side: Side, flavour: str) -> None:
    """An async_sessionmaker: the session first, the caller's arguments after it."""
    engine = create_async_engine(
        side.url(flavour), poolclass=FaultTolerantQueuePool,
        connect_args=connect_args(flavour, side.app),
    )  # fmt: skip
    calls: list[tuple[int, int]] = []

    @transactional(async_sessionmaker(engine), QUICK)
    async def record(session: AsyncSession, key: int, run_offset: int = 0) -> int:
        calls.append((key, run_offset))
        session.add(Entry(key=key, run=len(calls) + run_offset))
        if len(calls) == 1:
            await session.execute(TERMINATE_SELF)
        return len(calls)

    assert record.__name__ == "record"
    assert await record(12, run_offset=100) == 2
    assert calls == [(12, 100), (12, 100)]
    assert side.runs_of(12) == [102]
    assert engine.sync_engine.pool.stats().transaction_retries == 1  # type: ignore[attr-defined]
    await engine.dispose()


# -- bad input (no server) -------------------------------------------------------------------------

URL = "postgresql+{driver}://postgres:pw@127.0.0.1:1/postgres"


def never(conn: Any) -> None:
    raise AssertionError("the function must not be called")


async def never_async(conn: Any) -> None:
    raise AssertionError("the function must not be called")


@pytest.fixture
def engines() -> Iterator[tuple[sa.Engine, AsyncEngine]]:
    """A sync and an async engine (nothing listens: they are never connected)."""
    engine = sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool)
    async_engine = create_async_engine(
        URL.format(driver="asyncpg"), poolclass=FaultTolerantQueuePool
    )
    yield engine, async_engine
    engine.dispose()


def test_a_bind_of_the_wrong_kind_is_refused(engines: tuple[sa.Engine, AsyncEngine]) -> None:
    engine, async_engine = engines
    with pytest.raises(ArgumentError, match=r"bind must be .*AsyncEngine.*run_transaction_async"):
        run_transaction(async_engine, never)  # type: ignore[arg-type]
    with pytest.raises(
        ArgumentError, match=r"bind must be .*async_sessionmaker.*run_transaction_async"
    ):
        run_transaction(async_sessionmaker(async_engine), never)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"bind must be .*fresh connection"):
        run_transaction(Session(engine), never)  # type: ignore[arg-type]
    with (
        sa.create_engine("sqlite://").connect() as connection,
        pytest.raises(ArgumentError, match=r"bind must be .*fresh connection"),
    ):
        run_transaction(connection, never)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="bind must be"):
        run_transaction("postgresql://", never)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_an_async_bind_of_the_wrong_kind_is_refused(
    engines: tuple[sa.Engine, AsyncEngine],
) -> None:
    engine, async_engine = engines
    with pytest.raises(ArgumentError, match=r"bind must be .*Engine.*use run_transaction\)"):
        await run_transaction_async(engine, never_async)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"bind must be .*fresh connection"):
        await run_transaction_async(AsyncSession(async_engine), never_async)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"bind must be .*fresh connection"):
        await run_transaction_async(async_engine.connect(), never_async)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="attempts"):
        await run_transaction_async(async_engine, never_async, attempts=0)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"attempts": 0}, "attempts"),
        ({"deadline": -1}, "deadline"),
        ({"idempotent": 1}, "idempotent"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    engines: tuple[sa.Engine, AsyncEngine], kw: dict[str, Any], named: str
) -> None:
    engine, _ = engines
    with pytest.raises(ArgumentError, match=named):
        run_transaction(engine, never, **kw)


def test_bad_runner_settings_are_refused_naming_them() -> None:
    with pytest.raises(ArgumentError, match=r"max_delay \(0\.5\) must be at least initial_delay"):
        TransactionRunner(initial_delay=1.0, max_delay=0.5)
    with pytest.raises(ArgumentError, match="attempts"):
        QUICK.new(attempts=0)
    with pytest.raises(ArgumentError, match="deadline"):
        QUICK.new(deadline=-1)


def test_transactional_checks_when_applied(engines: tuple[sa.Engine, AsyncEngine]) -> None:
    engine, async_engine = engines
    with pytest.raises(ArgumentError, match=r"bind must be .*fresh connection"):
        transactional(Session(engine))  # type: ignore[call-overload]
    with pytest.raises(ArgumentError, match="must be a coroutine function"):
        transactional(async_engine)(never)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"must be a plain \(sync\) function"):
        transactional(engine)(never_async)

"""Read/write routing against real servers (issue 23): a primary and two hot standbys.

Every engine, the writer's and each reader's, is built on ``FaultTolerantQueuePool`` with its
defaults, as docs/replicas.md shows. Where a read landed is what the server says
(``inet_server_port()``, ``pg_is_in_recovery()``), never what the router says; the router's
``stats()`` is checked against it. Reads under load go through the transaction runner
(``run_transaction_async(router.reads, fn)``), which re-runs a read on another server after a
lost connection: a read that still fails is a failed read, and none may fail. Nor may a read
wait out a dead reader's ``retry_deadline`` (10 s) while another server could answer it: no read
under load takes 2.5 s (``check_interval`` + ``check_timeout``, the router's own bound for
noticing a dead reader) or more, except those a black hole holds (see that test).

Every test closes its router (``aclose()`` for async ones) and disposes its engines whatever
happens; when it passed, the checker tasks or threads must be gone, no connection checked out,
and no connection left open on any running server. A test that stops, promotes or delays a
server gets servers of its own (``pg_replicas``); the others share one trio
(``running_replicas``).

Async routers run in the test's event loop; the sync router (psycopg) runs in plain threads.
Servers are stopped, started and promoted from a worker thread so the event loop, which runs
the router's checkers, keeps turning meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fault_tolerant_pool import (
    FaultTolerantQueuePool,
    NoReaderAvailable,
    ReaderStatus,
    ReplicaRouter,
    run_transaction,
    run_transaction_async,
)
from fault_tolerant_pool.testing import FaultProxy, PostgresServer

from .client import ASYNC_FLAVOURS

pytestmark = [pytest.mark.anyio, pytest.mark.db]

async_flavours = pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)

Replicas = tuple[PostgresServer, PostgresServer, PostgresServer]

#: Where a statement ran, as the server sees it.
WHERE = sa.text("SELECT inet_server_port(), pg_is_in_recovery()")
#: The same, and the backend: two statements of one transaction must name the same one.
WHERE_EXACTLY = sa.text("SELECT inet_server_port(), pg_is_in_recovery(), pg_backend_pid()")
#: The name the sync router gives its checker threads (a prefix; the reader's name follows).
CHECKER_THREAD = "fault_tolerant_pool replica check"
#: The method the async router runs as one task per reader.
CHECKER_TASK = "_check_forever_async"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str]


# -- servers -------------------------------------------------------------------------------------


def make_items(primary: PostgresServer, standbys: Sequence[PostgresServer]) -> None:
    """Create ``items`` on the primary and wait until every standby has replayed it."""
    primary.execute("CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL)")
    replayed(standbys, "IS NOT NULL", "CREATE TABLE")


def replayed(standbys: Sequence[PostgresServer], test: str, what: str) -> None:
    deadline = time.monotonic() + 10
    for standby in standbys:
        while standby.execute(f"SELECT to_regclass('items') {test}") != [("t",)]:
            assert time.monotonic() < deadline, f"{standby} never replayed {what}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def shared_servers() -> Iterator[Replicas]:
    """A primary and two standbys for the whole module (see :func:`running_replicas`)."""
    from _fault_tolerant_pool_pytest import _new_server, _require

    made = [_require(_new_server)]
    try:
        made += [_require(made[0].standby) for _ in range(2)]
        yield made[0], made[1], made[2]
    finally:
        for server in reversed(made):
            server.destroy()


@pytest.fixture
def running_replicas(shared_servers: Replicas) -> Iterator[Replicas]:
    """``pg_replicas`` for the tests that stop, promote and delay no server: they share one
    primary and two standbys (a fresh trio costs a test about 0.4 s). After each test its table
    is dropped, everywhere, and every server must still be running in its role."""
    yield shared_servers
    primary, *standbys = shared_servers
    assert all(server.is_running for server in shared_servers), shared_servers
    assert not primary.is_in_recovery() and all(s.is_in_recovery() for s in standbys)
    primary.execute("DROP TABLE IF EXISTS items")
    replayed(standbys, "IS NULL", "DROP TABLE")


# -- engines and routers -------------------------------------------------------------------------


def engine_for(flavour: str, url: str, **kw: Any) -> Any:
    """An engine of ``flavour`` on ``FaultTolerantQueuePool``, every other setting at its
    default."""
    if flavour in ASYNC_FLAVOURS:
        return create_async_engine(url, poolclass=FaultTolerantQueuePool, **kw)
    return sa.create_engine(url, poolclass=FaultTolerantQueuePool, **kw)


def checker_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__name__", "") == CHECKER_TASK and not task.done()
    ]


def checker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(CHECKER_THREAD)]


def no_client_on(server: PostgresServer) -> Callable[[], bool]:
    return lambda: server.backend_count() == 0


async def no_backends_left(servers: Sequence[PostgresServer]) -> None:
    """Every client connection to the running ``servers`` is gone (the router's own checks'
    included) a moment after the router is closed and the engines disposed."""
    for server in servers:
        if not server.is_running:
            continue
        count = await asyncio.to_thread(server.backend_count)
        deadline = time.monotonic() + 3.0
        while count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            count = await asyncio.to_thread(server.backend_count)
        assert count == 0, f"{count} connections left open on {server}"


@contextlib.asynccontextmanager
async def routed(
    flavour: str,
    writer: PostgresServer,
    readers: Sequence[PostgresServer | str],
    servers: Sequence[PostgresServer] = (),
    engine_kw: dict[str, Any] | None = None,
    **router_kw: Any,
) -> AsyncIterator[ReplicaRouter]:
    """An async router over fresh engines (a reader may be given as a URL, e.g. a proxy's;
    ``engine_kw`` go to every engine). Closed (``aclose()``) and disposed whatever happens; when
    the test passed, its checker tasks must be gone, every connection back in its pool, and none
    left open on ``servers``."""
    urls = [r if isinstance(r, str) else r.url(flavour) for r in readers]
    engines = [engine_for(flavour, writer.url(flavour), **(engine_kw or {}))]
    engines += [engine_for(flavour, url, **(engine_kw or {})) for url in urls]
    router = ReplicaRouter(engines[0], engines[1:], **router_kw)
    try:
        yield router
    finally:
        try:
            await asyncio.wait_for(router.aclose(), 5.0)
        finally:
            left = checker_tasks()
            for task in left:  # a stuck checker: end it so the test fails instead of hanging
                task.cancel()
            checked_out = [e.sync_engine.pool.checkedout() for e in engines]
            for engine in engines:
                await engine.dispose()
    assert not left, f"router.aclose() left checker tasks running: {left}"
    assert checked_out == [0] * len(engines), f"connections never returned: {checked_out}"
    await no_backends_left(servers)


@contextlib.contextmanager
def routed_sync(
    writer: PostgresServer, readers: Sequence[PostgresServer], **router_kw: Any
) -> Iterator[ReplicaRouter]:
    """:func:`routed` for psycopg (sync): checker threads instead of tasks."""
    engines = [engine_for("psycopg", s.url("psycopg")) for s in (writer, *readers)]
    router = ReplicaRouter(engines[0], engines[1:], **router_kw)
    try:
        yield router
    finally:
        router.close()
        for engine in engines:
            engine.dispose()


async def ready(router: ReplicaRouter, roles: Sequence[str] = ("standby", "standby")) -> None:
    """``wait_ready()``, then every reader has been checked and has the role expected, a
    standby in rotation (within a few checks: one just made may not stream yet, and a standby
    that has replayed nothing since it streams counts as far behind)."""
    await router.wait_ready()
    wanted = (list(roles), [r == "standby" for r in roles])

    def as_wanted() -> bool:
        readers = router.stats().readers
        return ([r.role for r in readers], [r.in_rotation for r in readers]) == wanted

    deadline = time.monotonic() + 3.0
    while not as_wanted() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stats = router.stats()
    assert [r.role for r in stats.readers] == list(roles), stats
    assert [r.in_rotation for r in stats.readers] == [r == "standby" for r in roles], stats


def status(router: ReplicaRouter, index: int) -> ReaderStatus:
    return router.stats().readers[index]


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 20 ms; the time ``condition`` first held (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic()


def wait_until_sync(condition: Callable[[], bool], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic()


# -- reads under load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    started: float
    """Before the runner was called."""
    landed: float
    """When its statement returned (in the run that succeeded)."""
    finished: float
    port: int
    standby: bool

    @property
    def took(self) -> float:
        return self.finished - self.started


async def where(conn: AsyncConnection) -> tuple[int, bool, float]:
    port, standby = (await conn.execute(WHERE)).one()
    return port, standby, time.monotonic()


def where_sync(conn: Connection) -> tuple[int, bool, float]:
    port, standby = conn.execute(WHERE).one()
    return port, standby, time.monotonic()


@dataclass
class Load:
    """Reads recorded by some workers; ``failures`` are (start time, exception)."""

    reads: list[Read] = field(default_factory=list)
    failures: list[tuple[float, BaseException]] = field(default_factory=list)

    def on(self, port: int, after: float = 0.0, before: float = float("inf")) -> list[Read]:
        return [r for r in self.reads if r.port == port and after <= r.landed <= before]

    def since(self, after: float) -> list[Read]:
        return [r for r in self.reads if r.started >= after]

    def ports(self, after: float = 0.0, before: float = float("inf")) -> set[int]:
        return {r.port for r in self.reads if after <= r.started <= before}


class ReadLoad(Load):
    """``workers`` tasks, each reading through ``run_transaction_async(router.reads, ...)`` in
    a loop (``pause`` between reads) until the block ends; leaving it waits for every read in
    flight (at most ``drain`` seconds: a read hanging longer fails the test)."""

    def __init__(
        self, router: ReplicaRouter, workers: int = 10, pause: float = 0.005, drain: float = 15.0
    ) -> None:
        super().__init__()
        self.router = router
        self.workers = workers
        self.pause = pause
        self.drain = drain
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                port, standby, landed = await run_transaction_async(self.router.reads, where)
            except Exception as error:
                self.failures.append((started, error))
            else:
                self.reads.append(Read(started, landed, time.monotonic(), port, standby))
            await asyncio.sleep(self.pause)

    async def __aenter__(self) -> ReadLoad:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=self.drain)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} reads still hanging {self.drain} s after the load"
        for task in done:
            task.result()


class ThreadReadLoad(Load):
    """:class:`ReadLoad` for the sync router: threads calling ``run_transaction``."""

    def __init__(self, router: ReplicaRouter, workers: int = 8, drain: float = 15.0) -> None:
        super().__init__()
        self.router = router
        self.workers = workers
        self.drain = drain
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reader")
        self._futures: list[Any] = []

    def stop(self) -> None:
        """Start no more reads (leaving the block waits for those in flight)."""
        self._stop.set()

    def _work(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                port, standby, landed = run_transaction(self.router.reads, where_sync)
            except Exception as error:
                with self._lock:
                    self.failures.append((started, error))
            else:
                with self._lock:
                    self.reads.append(Read(started, landed, time.monotonic(), port, standby))
            time.sleep(0.005)

    def __enter__(self) -> ThreadReadLoad:
        self._futures = [self._pool.submit(self._work) for _ in range(self.workers)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + self.drain
        try:
            for future in self._futures:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._pool.shutdown(wait=False)


# -- 1. routing ----------------------------------------------------------------------------------


@async_flavours
async def test_reads_go_round_robin_to_the_standbys_and_writes_to_the_primary(
    running_replicas: Replicas, flavour: str
) -> None:
    primary, s1, s2 = running_replicas
    make_items(primary, [s1, s2])
    standbys = {s1.port, s2.port}
    async with routed(flavour, primary, [s1, s2], running_replicas) as router:
        await ready(router)

        # Core, one read after another: round robin alternates between the standbys.
        seen = []
        for _ in range(10):
            async with router.connect(read_only=True) as conn:
                seen.append(tuple((await conn.execute(WHERE)).one()))
        assert {standby for _, standby in seen} == {True}
        ports = [port for port, _ in seen]
        assert set(ports) == standbys and ports.count(s1.port) == ports.count(s2.port) == 5

        # 20 at once, through the transaction runner: a fair share each.
        many = await asyncio.gather(
            *(run_transaction_async(router.reads, where) for _ in range(20))
        )
        ports = [port for port, _, _ in many]
        assert ports.count(s1.port) == ports.count(s2.port) == 10

        # Writes: Core, the runner, the ORM; all on the primary. In a task of their own: reads
        # in the task that wrote stay on the writer for a while (read-your-writes).
        async def writes() -> None:
            async with router.connect() as conn:
                assert tuple((await conn.execute(WHERE)).one()) == (primary.port, False)
                await conn.execute(sa.text("INSERT INTO items (note) VALUES ('core')"))
                await conn.commit()

            async def write(conn: AsyncConnection) -> tuple[int, bool]:
                await conn.execute(sa.text("INSERT INTO items (note) VALUES ('runner')"))
                port, standby, _ = await where(conn)
                return port, standby

            assert await run_transaction_async(router.writes, write) == (primary.port, False)
            async with router.async_sessionmaker()() as session:
                session.add(Item(note="orm"))
                assert tuple((await session.execute(WHERE)).one()) == (primary.port, False)
                await session.commit()

        await asyncio.create_task(writes())
        assert primary.execute("SELECT count(*) FROM items") == [("3",)]

        # A read-only session: each transaction on one reader, every statement of it on that
        # reader and on the same backend (a transaction begun by its first statement, or by
        # begin()); consecutive transactions alternate.
        reads_before = sum(r.reads for r in router.stats().readers)
        readonly = router.async_sessionmaker(read_only=True)
        servers = []
        for explicit in (False, True, False, True):
            async with readonly() as session:
                for _ in range(2):  # two transactions of one session
                    async with (
                        session.begin() if explicit else contextlib.nullcontext()
                    ):  # fmt: skip
                        first = tuple((await session.execute(WHERE_EXACTLY)).one())
                        notes = (await session.scalars(sa.select(Item.note))).all()
                        last = tuple((await session.execute(WHERE_EXACTLY)).one())
                        assert first == last, f"one transaction, two servers ({explicit=})"
                        assert len(notes) <= 3
                    if not explicit:
                        await session.commit()
                    servers.append(first[0])
        assert {s for s in servers} == standbys
        assert servers.count(s1.port) == servers.count(s2.port) == 4
        # one choice per transaction
        assert sum(r.reads for r in router.stats().readers) - reads_before == 8

        stats = router.stats()
        assert [r.reads for r in stats.readers] == [19, 19]
        assert (stats.writer_reads, stats.fallbacks, stats.read_your_writes) == (0, 0, 0)
        assert stats.writes == 3
        assert [r.in_rotation for r in stats.readers] == [True, True]
        assert [(r.skipped_down, r.skipped_for_lag) for r in stats.readers] == [(0, 0), (0, 0)]


@async_flavours
async def test_a_reader_with_every_slot_lent_is_passed_over_for_one_with_a_slot_free(
    running_replicas: Replicas, flavour: str
) -> None:
    primary, s1, s2 = running_replicas
    one_slot = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 10}
    async with routed(
        flavour, primary, [s1, s2], running_replicas, engine_kw=one_slot
    ) as router:  # fmt: skip
        await ready(router)
        busy = router._readers[0].engine
        async with busy.connect() as held:  # s1's one slot, lent (a hung request, say)
            assert tuple((await held.execute(WHERE)).one()) == (s1.port, True)
            landed = []
            for _ in range(4):
                started = time.monotonic()
                async with router.connect(read_only=True) as conn:
                    port = (await conn.execute(WHERE)).one()[0]
                landed.append((port, time.monotonic() - started))
            assert [port for port, _ in landed] == [s2.port] * 4  # no wait for s1's slot
            assert max(took for _, took in landed) < 2.0, landed
        ports = []
        for _ in range(4):  # s1's slot free again: round robin over both
            async with router.connect(read_only=True) as conn:
                ports.append((await conn.execute(WHERE)).one()[0])
        assert sorted(ports) == sorted([s1.port, s2.port] * 2)
        stats = router.stats()
        assert stats.readers[0].skipped_busy >= 2 and stats.readers[1].skipped_busy == 0
        assert (stats.writer_reads, stats.fallbacks) == (0, 0)


# -- 2. failures ---------------------------------------------------------------------------------


@async_flavours
async def test_stopped_standbys_leave_the_rotation_without_a_failed_read_and_come_back(
    pg_replicas: Replicas, flavour: str
) -> None:
    primary, s1, s2 = pg_replicas
    async with routed(flavour, primary, [s1, s2], pg_replicas) as router:
        await ready(router)
        async with ReadLoad(router, workers=10) as load:
            await asyncio.sleep(0.5)
            assert load.ports() == {s1.port, s2.port}

            # One standby stops (fast: its sessions are terminated): it leaves the rotation and
            # the other standby takes every read; the writer takes none.
            stopped = time.monotonic()
            await asyncio.to_thread(s1.stop)
            out = await wait_until(
                lambda: not status(router, 0).in_rotation, 2.5, "s1 out of rotation"
            )
            routed_to_s1 = status(router, 0).reads
            # its check, refused until it runs into check_timeout, then says so
            await wait_until(lambda: status(router, 0).role == "down", 3.0, "s1 checked down")
            await asyncio.sleep(0.3)
            first = router.stats()
            assert not first.readers[0].in_rotation
            assert first.readers[0].reads == routed_to_s1, "reads still routed to a stopped reader"
            assert first.readers[1].in_rotation and first.readers[0].skipped_down > 0
            assert first.fallbacks == first.writer_reads == 0
            assert load.ports(after=out) == {s2.port}

            # Both down: reads go to the writer, counted as fallbacks.
            both = time.monotonic()
            await asyncio.to_thread(s2.stop)
            await wait_until(lambda: not status(router, 1).in_rotation, 2.5, "s2 out of rotation")
            # A read that picked s2 just before it left the rotation waits on s2's probe until
            # check_timeout (1.5 s), then falls back: the first read on the writer comes by then.
            await wait_until(lambda: bool(load.on(primary.port)), 3.0, "a read on the writer")
            await asyncio.sleep(max(0.3, both + 0.8 - time.monotonic()))
            second = router.stats()
            on_writer = load.on(primary.port)
            assert on_writer and all(not r.standby for r in on_writer)
            assert load.ports(after=both + 0.5) == {primary.port}
            assert second.fallbacks == second.writer_reads >= len(on_writer)

            # s1 starts again: reads reach it within 5 s of it accepting connections.
            await asyncio.to_thread(s1.start)
            accepting = s1.ready_at  # when its log said it accepts connections
            assert accepting is not None
            back = await wait_until(
                lambda: bool(load.on(s1.port, after=accepting)), 5.0, "a read on s1 after restart"
            )
            print(f"{flavour}: out of rotation {out - stopped:.2f}s after stop, read again "
                  f"{back - accepting:.2f}s after restart")  # fmt: skip
        assert load.failures == [], load.failures[:3]
        slowest = max(load.reads, key=lambda r: r.took)
        print(f"{flavour}: {len(load.reads)} reads, slowest {slowest.took:.2f}s")
        # A read never waits out a dead reader's retries while another server can answer.
        names = {primary.port: "primary", s1.port: "s1", s2.port: "s2"}
        slow = [(round(r.started - stopped, 2), round(r.took, 2), names[r.port])
                for r in load.reads if r.took >= 2.5]  # fmt: skip
        assert slow == [], f"(started after s1 stopped, took, landed on) of {len(slow)}: {slow}"


async def test_without_fallback_no_reader_raises_no_reader_available(pg_replicas: Replicas) -> None:
    primary, s1, s2 = pg_replicas
    async with routed(
        "asyncpg", primary, [s1, s2], pg_replicas, fallback_to_writer=False
    ) as router:
        await ready(router)
        assert (await run_transaction_async(router.reads, where))[0] in {s1.port, s2.port}
        await asyncio.to_thread(s1.stop)
        await asyncio.to_thread(s2.stop)
        await wait_until(
            lambda: not any(r.in_rotation for r in router.stats().readers), 2.5, "both out"
        )
        with pytest.raises(NoReaderAvailable) as raised:
            async with router.connect(read_only=True):
                pass
        assert "fallback_to_writer" in str(raised.value)
        # the runner takes it for a connection failure and re-runs it (5 runs, a few tenths of
        # a second), then raises it unchanged
        started = time.monotonic()
        with pytest.raises(NoReaderAvailable):
            await run_transaction_async(router.reads, where)
        print(f"run_transaction_async(router.reads) raised after {time.monotonic() - started:.2f}s")
        # writes are not affected, and nothing was read on the writer
        assert (await run_transaction_async(router.writes, where))[:2] == (primary.port, False)
        stats = router.stats()
        assert stats.writer_reads == stats.fallbacks == 0


async def test_a_black_holed_reader_leaves_the_rotation_within_the_check_timeout(
    running_replicas: Replicas,
) -> None:
    """s1 is reached through a proxy that is then black-holed: statements sent to it hang (no
    error, no timeout). Reads are started at a steady rate, each in its own task, so a read
    hanging on s1 holds no other back. Reads the router sent to s1 before it could know (in
    flight at the black hole, or routed there before its check ran into ``check_timeout``)
    hang until the proxy forwards again: they are counted, and must all have started before s1
    left the rotation; every read started after that must finish promptly on s2."""
    primary, s1, s2 = running_replicas
    with FaultProxy(s1.host, s1.port) as proxy:
        proxied = s1.url("asyncpg", port=proxy.port)
        async with routed("asyncpg", primary, [proxied, s2], running_replicas) as router:
            await ready(router)
            load = Load()
            tasks: list[asyncio.Task[None]] = []

            async def one_read() -> None:
                started = time.monotonic()
                try:
                    port, standby, landed = await run_transaction_async(router.reads, where)
                except Exception as error:
                    load.failures.append((started, error))
                else:
                    load.reads.append(Read(started, landed, time.monotonic(), port, standby))

            until = [time.monotonic() + 0.5]  # reads are launched until then

            async def launch() -> None:
                while time.monotonic() < until[0]:
                    tasks.append(asyncio.create_task(one_read()))
                    await asyncio.sleep(0.02)

            await launch()
            assert load.ports() == {s1.port, s2.port}
            proxy.blackhole()
            holed = time.monotonic()
            until[0] = holed + 4.0
            launcher = asyncio.create_task(launch())
            out = await wait_until(
                lambda: not status(router, 0).in_rotation, 4.0, "black-holed s1 out of rotation"
            )
            until[0] = out + 0.5  # and half a second after s1 left the rotation
            await launcher
            late = [r for r in load.since(out + 0.05)]
            still_running = sum(1 for t in tasks if not t.done())
            proxy.healthy()
            _, pending = await asyncio.wait(tasks, timeout=15.0)
            assert not pending, f"{len(pending)} reads still hang after the proxy healed"
            back = await wait_until(
                lambda: status(router, 0).in_rotation, 3.0, "s1 back after the black hole"
            )
            hung = [r for r in load.reads if r.took > 1.0]
            print(f"out of rotation {out - holed:.2f}s after the black hole; {len(hung)} reads "
                  f"hung on it ({still_running} in flight when it healed); back in "
                  f"{back - out:.2f}s")  # fmt: skip
            assert out - holed < 3.0  # check_interval (1 s) + check_timeout (1.5 s), and slack
            assert load.failures == [], load.failures[:3]
            # A read routed to s1 before it left the rotation either hangs there until the hole
            # ends, or gives up its checkout after check_timeout (1.5 s) and lands on s2.
            assert all(
                r.started < out + 0.05 and (r.port == s1.port or r.took < 2.5) for r in hung
            ), hung[:3]
            assert late and all(r.port == s2.port and r.took < 0.5 for r in late), [
                r for r in late if r.port != s2.port or r.took >= 0.5
            ][:3]
            assert router.stats().fallbacks == 0


# -- 3. lag and read-your-writes -----------------------------------------------------------------


async def test_a_lagging_standby_takes_no_reads_two_seconds_after_it_falls_behind(
    pg_replicas: Replicas,
) -> None:
    primary, s1, s2 = pg_replicas
    make_items(primary, [s1, s2])
    async with routed(
        "psycopg_async", primary, [s1, s2], pg_replicas, max_replica_lag=1.0
    ) as router:
        await ready(router)
        writes: list[float] = []
        write_failures: list[BaseException] = []
        stop = asyncio.Event()

        async def insert(conn: AsyncConnection) -> None:
            await conn.execute(sa.text("INSERT INTO items (note) VALUES ('tick')"))

        async def writer() -> None:  # its own task: read-your-writes concerns it alone
            while not stop.is_set():
                try:
                    await run_transaction_async(router.writes, insert)
                    writes.append(time.monotonic())
                except Exception as error:
                    write_failures.append(error)
                await asyncio.sleep(0.02)

        writing = asyncio.create_task(writer())
        try:
            async with ReadLoad(router, workers=4, pause=0.02) as load:
                await asyncio.sleep(1.0)
                assert load.ports() == {s1.port, s2.port}  # a steady write load is no lag
                await asyncio.to_thread(s1.delay_replay, 5)
                delayed = time.monotonic()
                bar = delayed + 2.0
                await asyncio.sleep(2.6)
        finally:
            stop.set()
            await writing
        assert write_failures == [] and len(writes) > 100
        assert load.failures == [], load.failures[:3]
        last = max((r.landed for r in load.on(s1.port, after=delayed)), default=delayed)
        print(f"last read on the delayed standby {last - delayed:.2f}s after delay_replay")
        assert load.on(s1.port, after=bar) == []
        assert load.on(s2.port, after=bar)
        stats = router.stats()
        lagging = stats.readers[0]
        assert not lagging.in_rotation and lagging.skipped_for_lag > 0
        assert lagging.lag is not None and lagging.lag > 1.0
        assert stats.readers[1].in_rotation and stats.readers[1].skipped_for_lag == 0
        assert (stats.fallbacks, stats.writer_reads, stats.read_your_writes) == (0, 0, 0)


async def test_reads_after_a_write_stay_on_the_writer_in_that_task_only(
    running_replicas: Replicas,
) -> None:
    primary, s1, s2 = running_replicas
    make_items(primary, [s1, s2])
    standbys = {s1.port, s2.port}
    window = 1.0
    async with routed(
        "psycopg_async", primary, [s1, s2], running_replicas, read_your_writes=window
    ) as router:
        await ready(router)
        writes = router.async_sessionmaker()
        reads = router.async_sessionmaker(read_only=True)

        async def writing_task() -> tuple[float, float, list[tuple[float, int, bool]]]:
            async with writes() as session:
                item = Item(note="mine")
                session.add(item)
                await session.flush()
                item_id = item.id
                began = time.monotonic()
                await session.commit()
                committed = time.monotonic()
            seen = []
            while time.monotonic() < committed + window + 0.6:
                at = time.monotonic()
                async with reads() as session:
                    port, _ = (await session.execute(WHERE)).one()
                    found = await session.get(Item, item_id) is not None
                seen.append((at, port, found))
                async with router.connect(read_only=True) as conn:  # Core follows it too
                    core_port, _ = (await conn.execute(WHERE)).one()
                seen.append((at, core_port, True))
                await asyncio.sleep(0.04)
            return began, committed, seen

        async def other_task() -> list[int]:
            ports = []
            end = time.monotonic() + window + 0.6
            while time.monotonic() < end:
                async with reads() as session:
                    ports.append((await session.execute(WHERE)).one()[0])
                await asyncio.sleep(0.04)
            return ports

        (began, committed, seen), others = await asyncio.gather(writing_task(), other_task())
        early = [s for s in seen if s[0] < began + window - 0.1]
        late = [s for s in seen if s[0] > committed + window + 0.1]
        assert early and all(port == primary.port and found for _, port, found in early), early
        assert late and {port for _, port, _ in late} <= standbys, late
        assert others and set(others) <= standbys  # another task is not affected
        stats = router.stats()
        assert stats.read_your_writes >= len(early)
        assert stats.read_your_writes == stats.writer_reads and stats.fallbacks == 0


# -- 4. read-only sessions -----------------------------------------------------------------------


def lent(router: ReplicaRouter) -> list[int]:
    """Connections checked out of the writer's pool and of each reader's."""
    pools = [router._sync_writer.pool, *(reader.sync_engine.pool for reader in router._readers)]
    return [pool.checkedout() for pool in pools]


async def session_read(readonly: Any) -> tuple[int, bool, float]:
    """Two statements in one read-only session's transaction: one server, one backend."""
    async with readonly() as session:
        first = tuple((await session.execute(WHERE_EXACTLY)).one())
        landed = time.monotonic()
        assert tuple((await session.execute(WHERE_EXACTLY)).one()) == first
    return first[0], first[1], landed


def session_read_sync(readonly: Any) -> tuple[int, bool, float]:
    with readonly() as session:
        first = tuple(session.execute(WHERE_EXACTLY).one())
        landed = time.monotonic()
        assert tuple(session.execute(WHERE_EXACTLY).one()) == first
    return first[0], first[1], landed


@async_flavours
async def test_read_only_sessions_ride_out_standbys_that_just_stopped(
    pg_replicas: Replicas, flavour: str
) -> None:
    """A read-only session whose transaction is routed to a standby that has just stopped (its
    checker has not found out yet, its pool's connections are dead) takes the next standby,
    then the writer, within ``check_timeout``: never its pool's ``retry_deadline`` (10 s), and
    no read fails. No read is in flight at a stop: a statement in flight fails on any engine
    (the transaction runner is for those).

    The checks are 30 s apart (the first round excepted), so that no check finds a stopped
    standby before the sessions do: every session routed to it must move on by itself."""
    primary, s1, s2 = pg_replicas
    make_items(primary, [s1, s2])  # both stream and have replayed: in rotation at once
    async with routed(flavour, primary, [s1, s2], pg_replicas, check_interval=30.0) as router:
        await ready(router)
        readonly = router.async_sessionmaker(read_only=True)
        load = Load()

        async def read() -> None:
            started = time.monotonic()
            try:
                port, standby, landed = await session_read(readonly)
            except Exception as error:
                load.failures.append((started, error))
            else:
                load.reads.append(Read(started, landed, time.monotonic(), port, standby))

        async def reads_for(seconds: float) -> None:
            async def worker() -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await read()
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(worker() for _ in range(4)))

        # Each standby's pool holds connections, for the stop to kill.
        await asyncio.gather(*(read() for _ in range(8)))
        assert load.ports() == {s1.port, s2.port} and load.failures == []

        phases = []
        for stopping, index in ((s1, 0), (s2, 1)):
            before = status(router, index).reads
            await asyncio.to_thread(stopping.stop)
            stopped = time.monotonic()
            assert status(router, index).in_rotation  # nothing has found out yet
            await reads_for(2.0)
            phases.append((stopped, status(router, index).reads - before))
        stats = router.stats()

    assert load.failures == [], load.failures[:3]
    names = {primary.port: "primary", s1.port: "s1", s2.port: "s2"}
    (first_stop, to_s1), (second_stop, to_s2) = phases
    for stopped, to_stopped in phases:
        after = load.since(stopped)
        slowest = max(r.took for r in after)
        print(f"{flavour}: {to_stopped} sessions routed to the stopped standby; "
              f"{len(after)} reads, slowest {slowest:.2f}s")  # fmt: skip
        slow = [(round(r.started - stopped, 2), round(r.took, 2), names[r.port])
                for r in after if r.took >= 2.5]  # fmt: skip
        # check_timeout (1.5 s) and slack: a session routed to the stopped standby waits for it
        # no longer than that, then lands on the next server
        assert slow == [], f"(started after the stop, took, landed on) of {len(slow)}: {slow}"
    assert load.ports(after=first_stop, before=second_stop) == {s2.port}
    assert load.ports(after=second_stop) == {primary.port}
    assert all(not r.standby for r in load.since(second_stop))
    # Sessions were routed to each standby after it stopped (4 began at once, round robin
    # over the standbys in rotation), and moved on; after s2 to the writer, s1 being out.
    assert to_s1 >= 1 and to_s2 >= 1
    assert stats.fallbacks == stats.writer_reads > 0


def test_sync_read_only_sessions_ride_out_a_standby_that_just_stopped(
    pg_replicas: Replicas,
) -> None:
    """:func:`test_read_only_sessions_ride_out_standbys_that_just_stopped` for a sync router
    (psycopg), from 4 threads: a reader's checkout gives up its connects after
    ``check_timeout`` (:mod:`fault_tolerant_pool.caller_deadline`)."""
    primary, s1, s2 = pg_replicas
    make_items(primary, [s1, s2])
    load = Load()
    lock = threading.Lock()
    with routed_sync(primary, [s1, s2], check_interval=30.0) as router:
        readonly = router.sessionmaker(read_only=True)

        def read() -> None:
            started = time.monotonic()
            try:
                port, standby, landed = session_read_sync(readonly)
            except Exception as error:
                with lock:
                    load.failures.append((started, error))
            else:
                with lock:
                    load.reads.append(Read(started, landed, time.monotonic(), port, standby))

        def worker(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                read()
                time.sleep(0.01)

        read()  # starts the checkers and waits for their first round
        wait_until_sync(
            lambda: all(r.in_rotation for r in router.stats().readers), 3.0, "both in rotation"
        )
        with ThreadPoolExecutor(max_workers=4) as threads:
            list(threads.map(lambda _: read(), range(8)))
            assert load.ports() >= {s1.port, s2.port} and load.failures == []
            before = router.stats()
            s1.stop()
            stopped = time.monotonic()
            assert status(router, 0).in_rotation  # nothing has found out yet
            list(threads.map(worker, [2.0] * 4))
        stats = router.stats()
        to_s1 = stats.readers[0].reads - before.readers[0].reads
        left = lent(router)
    assert load.failures == [], load.failures[:3]
    after = load.since(stopped)
    slowest = max(r.took for r in after)
    print(f"sync: {to_s1} sessions routed to the stopped standby; {len(after)} reads, "
          f"slowest {slowest:.2f}s")  # fmt: skip
    assert slowest < 2.5  # check_timeout (1.5 s) and slack; retry_deadline is 10 s
    assert load.ports(after=stopped) == {s2.port}
    assert to_s1 >= 1
    assert stats.fallbacks == before.fallbacks and stats.writer_reads == before.writer_reads
    assert left == [0, 0, 0], f"connections never returned: {left}"


@async_flavours
async def test_a_read_only_session_gives_back_every_connection_it_checks_out(
    running_replicas: Replicas, flavour: str
) -> None:
    """Each transaction's connection is back in its pool when the transaction ends (commit,
    rollback, an error, the session closed in the middle, a savepoint), not when the session
    does; and when the task is cancelled in the middle of a statement, or of the checkout."""
    primary, s1, s2 = running_replicas
    with FaultProxy(s1.host, s1.port) as proxy:
        proxied = s1.url(flavour, port=proxy.port)
        async with routed(flavour, primary, [proxied, s2], running_replicas) as router:
            await ready(router)
            readonly = router.async_sessionmaker(read_only=True)

            # Cancelled in its checkout: s1 (round robin starts there; its pool, not the
            # checker's, is still empty) is black-holed, so the connect hangs.
            proxy.blackhole()
            reading = asyncio.create_task(session_read(readonly))
            await asyncio.sleep(0.3)
            assert not reading.done()
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert lent(router) == [0, 0, 0]
            assert status(router, 0).reads == 1
            proxy.healthy()
            await wait_until(lambda: status(router, 0).in_rotation, 5.0, "s1 back in rotation")

            async with readonly() as session:
                await session.execute(WHERE)
                assert sum(lent(router)) == 1
                await session.commit()
                assert lent(router) == [0, 0, 0]
                await session.execute(WHERE)
                await session.rollback()
                assert lent(router) == [0, 0, 0]
                with pytest.raises(sa.exc.DBAPIError):
                    await session.execute(sa.text("SELECT 1 / 0"))
                await session.rollback()
                assert lent(router) == [0, 0, 0]
                async with session.begin():
                    first = tuple((await session.execute(WHERE_EXACTLY)).one())
                    async with session.begin_nested():
                        assert tuple((await session.execute(WHERE_EXACTLY)).one()) == first
                    assert sum(lent(router)) == 1
                assert lent(router) == [0, 0, 0]
                await session.execute(WHERE)
            assert lent(router) == [0, 0, 0]  # closed in the middle of a transaction

            # Cancelled in the middle of a statement: SQLAlchemy closes the session shielded.
            async def sleeper() -> None:
                async with readonly() as session:
                    await session.execute(sa.text("SELECT pg_sleep(2)"))

            sleeping = asyncio.create_task(sleeper())
            await asyncio.sleep(0.3)
            assert sum(lent(router)) == 1
            sleeping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sleeping
            assert lent(router) == [0, 0, 0]
            assert router.stats().fallbacks == 0


# -- 5. failover ---------------------------------------------------------------------------------


async def test_a_promoted_standby_leaves_the_rotation_and_the_primary_takes_no_reads(
    pg_replicas: Replicas,
) -> None:
    primary, s1, s2 = pg_replicas
    async with routed("asyncpg", primary, [primary, s1, s2], pg_replicas) as router:
        await ready(router, ["primary", "standby", "standby"])
        async with ReadLoad(router, workers=4, pause=0.01) as load:
            await asyncio.sleep(0.6)
            assert load.ports() == {s1.port, s2.port}
            await asyncio.to_thread(s1.promote)
            promoted = time.monotonic()
            left = await wait_until(
                lambda: status(router, 1).role == "primary", 3.0, "s1 seen as a primary"
            )
            await asyncio.sleep(max(0.0, promoted + 2.5 - time.monotonic()))
        assert load.failures == [], load.failures[:3]
        assert load.on(primary.port) == []  # the primary took no read while it was primary
        on_a_primary = [r for r in load.reads if not r.standby]
        assert all(r.port == s1.port for r in on_a_primary)
        last = max((r.landed for r in on_a_primary), default=promoted)
        print(f"promoted s1 seen {left - promoted:.2f}s after promotion; took {len(on_a_primary)} "
              f"reads as a primary, the last {last - promoted:.2f}s after")  # fmt: skip
        assert load.on(s1.port, after=promoted + 2.0) == []
        assert load.on(s2.port, after=promoted + 2.0)
        stats = router.stats()
        assert [r.role for r in stats.readers] == ["primary", "primary", "standby"]
        assert [r.in_rotation for r in stats.readers] == [False, False, True]
        assert stats.readers[0].reads == 0
        assert stats.fallbacks == 0


# -- 6. a sync router ----------------------------------------------------------------------------


def test_a_sync_router_routes_rides_out_a_stopped_standby_and_close_ends_its_threads(
    pg_replicas: Replicas,
) -> None:
    primary, s1, s2 = pg_replicas
    make_items(primary, [s1, s2])
    standbys = {s1.port, s2.port}
    before = set(checker_threads())
    with routed_sync(primary, [s1, s2]) as router:
        # The first read starts a checker thread per reader and waits for their first round.
        seen = []
        for _ in range(10):
            with router.connect(read_only=True) as conn:
                seen.append(tuple(conn.execute(WHERE).one()))
        mine = set(checker_threads()) - before
        assert len(mine) == 2
        assert {standby for _, standby in seen} == {True}
        ports = [port for port, _ in seen]
        assert ports.count(s1.port) == ports.count(s2.port) == 5

        # Writes land on the primary; reads in the thread that wrote follow them there.
        def writes() -> int:
            with router.connect() as conn:
                assert tuple(conn.execute(WHERE).one()) == (primary.port, False)
                conn.execute(sa.text("INSERT INTO items (note) VALUES ('sync')"))
                conn.commit()
            assert run_transaction(router.writes, where_sync)[:2] == (primary.port, False)
            port: int = run_transaction(router.reads, where_sync)[0]
            return port

        with ThreadPoolExecutor(max_workers=1) as one:
            assert one.submit(writes).result() == primary.port

        readonly = router.sessionmaker(read_only=True)
        servers = []
        for _ in range(4):
            with readonly() as session:
                first = tuple(session.execute(WHERE_EXACTLY).one())
                assert session.scalars(sa.select(Item.note)).all() in ([], ["sync"])
                assert tuple(session.execute(WHERE_EXACTLY).one()) == first
            servers.append(first[0])
        assert set(servers) == standbys
        with readonly() as session:  # a bind the caller names wins, as in SQLAlchemy's Session
            named = session.execute(WHERE, bind_arguments={"bind": router.writer}).one()
            assert tuple(named) == (primary.port, False)

        # Reads from 8 threads; s1 stops (fast) meanwhile.
        with ThreadReadLoad(router, workers=8) as load:
            time.sleep(0.5)
            assert load.ports() == standbys
            stopped = time.monotonic()
            s1.stop()
            out = wait_until_sync(lambda: not status(router, 0).in_rotation, 2.5, "s1 out")
            try:  # its check says so (role "down") within check_interval + check_timeout
                down: float | None = wait_until_sync(
                    lambda: status(router, 0).role == "down", 3.0, "s1 checked down"
                )
            except AssertionError:
                down = None  # asserted at the end: close() and the reads are checked first
            time.sleep(0.5)
            load.stop()  # no new reads; the block waits for those in flight
            stats = router.stats()

            # close(), s1 still down: it ends the checker threads, the stopped reader's too.
            router.close()
            closed = time.monotonic()
            for thread in mine:
                thread.join(timeout=max(0.0, closed + 3.0 - time.monotonic()))
            alive = [t.name for t in mine if t.is_alive()]
        assert load.failures == [], load.failures[:3]
        slowest = max(load.reads, key=lambda r: r.took)
        print(f"sync: out of rotation {out - stopped:.2f}s after stop, checked down "
              f"{'never' if down is None else f'{down - stopped:.2f}s'}; {len(load.reads)} "
              f"reads, slowest {slowest.took:.2f}s")  # fmt: skip
        assert load.ports(after=out) == {s2.port}
        assert not stats.readers[0].in_rotation and stats.readers[1].in_rotation
        assert stats.fallbacks == 0
        assert alive == [], f"checker threads alive 3 s after close(): {alive}"
    for server in (primary, s2):
        wait_until_sync(no_client_on(server), 3.0, f"{server}: no connection left")
    # A read never waits out a dead reader's retries while another server can answer.
    names = {primary.port: "primary", s1.port: "s1", s2.port: "s2"}
    slow = [(round(r.started - stopped, 2), round(r.took, 2), names[r.port])
            for r in load.reads if r.took >= 2.5]  # fmt: skip
    assert slow == [], f"(started after s1 stopped, took, landed on) of {len(slow)}: {slow}"
    assert down is not None, f"a stopped reader's role 3 s after its stop: {stats.readers[0]}"

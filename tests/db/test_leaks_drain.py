"""Leak reports, drain() and graceful shutdown against a real PostgreSQL, all three flavours.

- a connection held 1.5 s with ``leak_threshold=0.5`` in a named task (or thread): one WARNING
  naming the holder and the checkout site, 0.5 to 1.0 s after the checkout, and one INFO when it
  comes back; none for short holds;
- ``drain()`` under 10 workers: no failed request, every backend pid after it is new, and none of
  the old server connections is left;
- shutdown with connections out: the one returned in time is waited for, the one still out at the
  timeout is closed (its server session ends) and reported with its holder; later checkouts are
  refused.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fault_tolerant_pool import (
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
    PoolClosed,
    ShutdownReport,
    drain,
    shutdown,
)
from fault_tolerant_pool.testing import PostgresServer

from .client import ASYNC_FLAVOURS, FLAVOURS

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
PID = sa.text("SELECT pg_backend_pid()")


class Recorder(logging.Handler):
    """Keeps the leak logger's records with the monotonic time each was emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record))

    def at(self, level: int) -> list[tuple[float, str]]:
        return [(t, r.getMessage()) for t, r in self.records if r.levelno == level]


@pytest.fixture
def leak_log() -> Iterator[Recorder]:
    recorder = Recorder()
    logger = logging.getLogger("fault_tolerant_pool.leak")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)


class Db:
    """One engine of a flavour; ``request`` checks out, asks the backend pid, holds, returns."""

    def __init__(self, server: PostgresServer, flavour: str, **kw: Any) -> None:
        self.is_async = flavour in ASYNC_FLAVOURS
        url = server.url(flavour)
        self.async_engine: AsyncEngine | None = None
        if self.is_async:
            self.async_engine = create_async_engine(url, **kw)
            self.engine = self.async_engine.sync_engine
        else:
            self.engine = sa.create_engine(url, **kw)

    @property
    def target(self) -> Any:
        return self.async_engine if self.async_engine is not None else self.engine

    async def request(self, hold: float = 0.0, name: str | None = None) -> int:
        """In a task (async) or a thread (sync) named ``name``: the backend pid it used."""
        if self.async_engine is not None:
            engine = self.async_engine

            async def run() -> int:
                async with engine.connect() as conn:
                    pid = int((await conn.execute(PID)).scalar_one())
                    if hold:
                        await asyncio.sleep(hold)
                return pid

            return await asyncio.create_task(run(), name=name)
        return await in_thread(self._sync_request, hold, name=name)

    def _sync_request(self, hold: float) -> int:
        with self.engine.connect() as conn:
            pid = int(conn.execute(PID).scalar_one())
            if hold:
                time.sleep(hold)
        return pid

    async def drain(self) -> int:
        if self.async_engine is not None:
            return await drain(self.async_engine)
        return await asyncio.to_thread(drain, self.engine)

    async def shutdown(self, timeout: float) -> ShutdownReport:
        if self.async_engine is not None:
            return await shutdown(self.async_engine, timeout)
        return await asyncio.to_thread(shutdown, self.engine, timeout)

    async def dispose(self) -> None:
        if self.async_engine is not None:
            await self.async_engine.dispose()
        else:
            self.engine.dispose()


async def in_thread(fn: Any, *args: Any, name: str | None = None) -> Any:
    """``fn(*args)`` in a new thread named ``name``; its result or its exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as error:
            loop.call_soon_threadsafe(future.set_exception, error)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


async def settle(server: PostgresServer, gone: set[int], timeout: float = 3.0) -> set[int]:
    """The pids of ``gone`` still on the server once they have left (a close takes a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await asyncio.to_thread(
            server.execute, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        left = {int(row[0]) for row in rows} & gone
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


# -- leaks ----------------------------------------------------------------------------------------


@flavours
@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
async def test_a_held_connection_is_reported_once_with_holder_and_site(
    pg_server_session: PostgresServer, flavour: str, poolclass: type, leak_log: Recorder
) -> None:
    db = Db(pg_server_session, flavour, poolclass=poolclass, leak_threshold=0.5)
    await db.request()  # warm: the first connect is not part of the hold
    started = time.monotonic()
    held = asyncio.ensure_future(db.request(hold=1.5, name="report-builder"))
    for _ in range(20):  # short holds meanwhile: never reported
        await db.request(hold=0.02)
    await held
    warnings, infos = leak_log.at(logging.WARNING), leak_log.at(logging.INFO)
    stats = db.engine.pool.stats()
    await db.dispose()

    assert len(warnings) == 1, warnings
    at, message = warnings[0]
    holder = "task 'report-builder'" if db.is_async else "thread 'report-builder'"
    assert f"by {holder} and not returned (leak_threshold=0.5s)" in message
    assert "test_leaks_drain.py" in message
    assert "in run" in message if db.is_async else "in _sync_request" in message
    assert "sqlalchemy" not in message.split("left out):")[1]
    assert 0.5 <= at - started <= 1.0, at - started
    assert len(infos) == 1 and f"of {holder} returned after 1.5" in infos[0][1]
    assert infos[0][0] - started >= 1.5
    assert stats.leaks == 1 and stats.leaks_reclaimed == 0


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg"])
async def test_a_connection_never_returned_is_reported_when_reclaimed(
    pg_server_session: PostgresServer, flavour: str, leak_log: Recorder
) -> None:
    db = Db(pg_server_session, flavour, poolclass=FaultTolerantQueuePool, leak_threshold=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy's own "garbage collector" warning
        await forget_a_connection(db)
        gc.collect()
        await asyncio.sleep(0.05)
    stats = db.engine.pool.stats()
    await db.dispose()
    (warning,) = leak_log.at(logging.WARNING)
    assert "never returned; reclaimed by the garbage collector" in warning[1]
    assert "in forget_a_connection" in warning[1]
    assert stats.leaks_reclaimed == 1 and stats.leaks == 0 and stats.checked_out == 0


async def forget_a_connection(db: Db) -> None:
    if db.async_engine is not None:
        conn = await db.async_engine.connect()
        await conn.execute(PID)
    else:
        sync = db.engine.connect()
        sync.execute(PID)
    # dropped here without close(): a leak only the garbage collector ends


async def test_oldest_checkout_age_in_stats(pg_server_session: PostgresServer) -> None:
    db = Db(pg_server_session, "asyncpg", poolclass=FaultTolerantQueuePool, leak_threshold=30)
    assert db.engine.pool.stats().oldest_checkout_age == 0.0
    held = asyncio.ensure_future(db.request(hold=0.5))
    await asyncio.sleep(0.3)
    age = db.engine.pool.stats().oldest_checkout_age
    await held
    assert age is not None and 0.2 <= age <= 0.5
    assert db.engine.pool.stats().oldest_checkout_age == 0.0
    await db.dispose()
    off = Db(pg_server_session, "asyncpg", poolclass=FaultTolerantQueuePool)
    assert off.engine.pool.stats().oldest_checkout_age is None
    await off.dispose()


# -- drain ----------------------------------------------------------------------------------------


@flavours
async def test_drain_under_load_replaces_every_connection(
    pg_server: PostgresServer, flavour: str
) -> None:
    db = Db(pg_server, flavour, poolclass=FaultTolerantQueuePool, pool_size=10, max_overflow=0)
    failures: list[BaseException] = []
    before: set[int] = set()
    after: set[int] = set()
    draining = False
    drained_at: float | None = None
    stop = False

    async def worker() -> None:
        while not stop:
            began = time.monotonic()
            try:
                pid = await db.request(hold=0.01)
            except Exception as error:  # any failure fails the test below
                failures.append(error)
                continue
            # before: done before drain() was called; after: begun once it had returned (a
            # request in between may have had either: a connection made during the call is new)
            if not draining:
                before.add(pid)
            elif drained_at is not None and began > drained_at:
                after.add(pid)

    workers = [asyncio.ensure_future(worker()) for _ in range(10)]
    await asyncio.sleep(1.0)
    draining = True
    closed_at_once = await db.drain()
    drained_at = time.monotonic()
    await asyncio.sleep(1.0)
    stop = True
    await asyncio.gather(*workers)
    stats = db.engine.pool.stats()
    left = await settle(pg_server, before)
    await db.dispose()

    assert failures == []
    assert len(before) >= 5 and len(after) >= 5
    assert not before & after, before & after
    assert left == set()
    assert stats.retired_drain == len(before)
    assert 0 <= closed_at_once <= 10


async def test_drain_closes_idle_connections_at_once(pg_server: PostgresServer) -> None:
    db = Db(pg_server, "asyncpg", poolclass=FaultTolerantQueuePool, liveness_check=False)
    pids = set(await asyncio.gather(*(db.request(hold=0.1) for _ in range(3))))
    assert len(pids) == 3
    assert await db.drain() == 3  # a pool without any upkeep rule: the drain installs one
    assert await settle(pg_server, pids) == set()
    assert await db.request() not in pids
    await db.dispose()


# -- shutdown -------------------------------------------------------------------------------------


@flavours
async def test_shutdown_waits_then_closes_what_is_still_out(
    pg_server: PostgresServer, flavour: str, leak_log: Recorder
) -> None:
    db = Db(pg_server, flavour, poolclass=FaultTolerantQueuePool, leak_threshold=30)
    await db.request()
    short = asyncio.ensure_future(db.request(hold=0.3, name="short-request"))
    long = asyncio.ensure_future(db.request(hold=4.0, name="stuck-job"))
    await asyncio.sleep(0.1)
    pids = set(
        int(row[0])
        for row in await asyncio.to_thread(
            pg_server.execute,
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'",
        )
    )
    started = time.monotonic()
    report = await db.shutdown(1.0)
    took = time.monotonic() - started
    assert short.done() and not short.exception()  # waited for
    with pytest.raises(PoolClosed):
        await db.request()
    left = await settle(pg_server, pids)
    with pytest.raises(sa.exc.DBAPIError):  # its connection was closed under it
        await long
    stats = db.engine.pool.stats()
    await db.dispose()

    assert 0.9 <= took <= 2.0, took
    assert report.checked_out_at_start == 2 and report.stragglers == 1
    holder = "task 'stuck-job'" if db.is_async else "thread 'stuck-job'"
    assert report.holders == (holder,)
    assert left == set()  # the stuck job's server session ended at the timeout, the rest closed
    (warning,) = [m for _, m in leak_log.at(logging.WARNING) if "shut down" in m]
    assert f"still checked out by {holder}" in warning and "test_leaks_drain.py" in warning
    assert stats.leaks_at_shutdown == 1
    assert await db.request() > 0  # dispose() gave the engine a fresh pool


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg"])
async def test_shutdown_with_everything_back_is_clean(
    pg_server_session: PostgresServer, flavour: str
) -> None:
    db = Db(pg_server_session, flavour, poolclass=FaultTolerantNullPool)
    held = asyncio.ensure_future(db.request(hold=0.3))
    await asyncio.sleep(0.1)
    report = await db.shutdown(5.0)
    assert report.clean and report.checked_out_at_start == 1
    assert 0.1 <= report.waited <= 1.5
    assert await held > 0  # returned (its close may finish just after the count drops)
    await db.dispose()

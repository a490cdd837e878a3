"""One awaitable face for the three flavours the suite runs: asyncpg, psycopg async, psycopg sync.

Sync engines are driven from worker threads (``asyncio.to_thread``), as a threaded app would drive
them; the pool code under test runs exactly as it does in production for each flavour.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool, PoolStats
from fault_tolerant_pool.testing import PostgresServer

FLAVOURS = ("asyncpg", "psycopg_async", "psycopg")
ASYNC_FLAVOURS = ("asyncpg", "psycopg_async")
POOLS = (FaultTolerantQueuePool, FaultTolerantNullPool)


def url_for(server: PostgresServer, flavour: str, **kw: Any) -> str:
    return server.url(flavour, **kw)


class Client:
    """An engine of one flavour with awaitable helpers."""

    def __init__(self, url: str, flavour: str, **engine_kw: Any) -> None:
        self.flavour = flavour
        self.is_async = flavour in ASYNC_FLAVOURS
        self.async_engine: AsyncEngine | None = None
        self._threads: ThreadPoolExecutor | None = None
        if self.is_async:
            self.async_engine = create_async_engine(url, **engine_kw)
            self.engine = self.async_engine.sync_engine
        else:
            self.engine = sa.create_engine(url, **engine_kw)

    @property
    def pool(self) -> Any:
        return self.engine.pool

    def stats(self) -> PoolStats:
        stats: PoolStats = self.engine.pool.stats()
        return stats

    async def scalar(self, sql: str = "SELECT 1") -> Any:
        if self.async_engine is not None:
            async with self.async_engine.connect() as conn:
                return (await conn.execute(sa.text(sql))).scalar()
        return await self._in_thread(self._sync_scalar, sql)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        """Run sync engine code in a worker thread (enough threads for the load tests)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=32)
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def _sync_scalar(self, sql: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()

    async def checkout_then(self, sql: str = "SELECT 1") -> tuple[bool, bool]:
        """Check out, run ``sql``, check in: (checkout succeeded, statement succeeded).

        A failed checkout is any exception before the connection is handed out; a failed
        statement is a database error after it (running the statement or the rollback at
        checkin). Statements in flight when the server stops may fail; they are never replayed.
        """
        if self.async_engine is not None:
            try:
                conn = await self.async_engine.connect()
            except Exception:
                return False, False
            executed = True
            try:
                await conn.execute(sa.text(sql))
            except sa.exc.DBAPIError:
                executed = False
            try:
                await conn.close()
            except sa.exc.DBAPIError:
                executed = False
            return True, executed
        result: tuple[bool, bool] = await self._in_thread(self._sync_checkout_then, sql)
        return result

    def _sync_checkout_then(self, sql: str) -> tuple[bool, bool]:
        try:
            conn = self.engine.connect()
        except Exception:
            return False, False
        try:
            with conn:
                conn.execute(sa.text(sql))
            return True, True
        except sa.exc.DBAPIError:
            return True, False

    async def backend_pids(self, pause: float = 0.0) -> tuple[int, int]:
        """In one checkout: the backend pid, a pause, the backend pid again."""
        sql = sa.text("SELECT pg_backend_pid()")
        if self.async_engine is not None:
            async with self.async_engine.connect() as conn:
                first = (await conn.execute(sql)).scalar_one()
                await asyncio.sleep(pause)
                return first, (await conn.execute(sql)).scalar_one()
        result: tuple[int, int] = await self._in_thread(self._sync_backend_pids, pause)
        return result

    def _sync_backend_pids(self, pause: float) -> tuple[int, int]:
        sql = sa.text("SELECT pg_backend_pid()")
        with self.engine.connect() as conn:
            first = conn.execute(sql).scalar_one()
            time.sleep(pause)
            return first, conn.execute(sql).scalar_one()

    async def dispose(self) -> None:
        if self.async_engine is not None:
            await self.async_engine.dispose()
        else:
            self.engine.dispose()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

"""What the reliability scenarios share: a load of workers that records the fate of every
request, a recorder of failed connect attempts, and the leak checks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from fault_tolerant_pool import ConnectRetriesExhausted
from fault_tolerant_pool.classify import classify
from fault_tolerant_pool.testing import PostgresServer
from tests.db.client import Client

Stage = Literal["ok", "checkout", "statement"]


def label(error: BaseException) -> str:
    """``Class[SQLSTATE]`` of the driver's error (SQLSTATE as classified; psycopg has none at
    connect time), e.g. ``AdminShutdownError[57P01]``."""
    orig = getattr(error, "orig", None)
    inner = orig if isinstance(orig, BaseException) else error
    if isinstance(inner, ConnectRetriesExhausted):
        inner = inner.last_error
    return f"{type(inner).__name__}[{classify(inner).sqlstate}]"


def is_disconnect(error: BaseException | None) -> bool:
    """A statement failed because its connection was lost (SQLAlchemy invalidated it)."""
    return isinstance(error, sa.exc.DBAPIError) and bool(error.connection_invalidated)


@dataclass(frozen=True)
class Outcome:
    """One request: check out, run a statement, check in."""

    started: float
    ended: float
    stage: Stage
    """``ok``, or where it failed: ``checkout`` (no connection) or ``statement`` (after it)."""
    error: BaseException | None = None

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def label(self) -> str:
        return "" if self.error is None else label(self.error)


async def request(client: Client, sql: str = "SELECT 1") -> Outcome:
    """One request through ``client``; never raises (but lets cancellation through)."""
    if client.async_engine is None:
        outcome: Outcome = await client._in_thread(_sync_request, client, sql)
        return outcome
    started = time.monotonic()
    try:
        conn = await client.async_engine.connect()
    except Exception as error:
        return Outcome(started, time.monotonic(), "checkout", error)
    failure: BaseException | None = None
    try:
        await conn.execute(sa.text(sql))
    except sa.exc.DBAPIError as error:
        failure = error
    finally:
        try:
            await conn.close()
        except sa.exc.DBAPIError as error:
            failure = failure or error
    return Outcome(started, time.monotonic(), "ok" if failure is None else "statement", failure)


def _sync_request(client: Client, sql: str) -> Outcome:
    started = time.monotonic()
    try:
        conn = client.engine.connect()
    except Exception as error:
        return Outcome(started, time.monotonic(), "checkout", error)
    try:
        with conn:
            conn.execute(sa.text(sql))
    except sa.exc.DBAPIError as error:
        return Outcome(started, time.monotonic(), "statement", error)
    return Outcome(started, time.monotonic(), "ok")


class Load:
    """``workers`` tasks looping requests through a client until stopped (an async context)."""

    def __init__(
        self, client: Client, workers: int, sql: str = "SELECT 1", pause: float = 0.0
    ) -> None:
        self.client = client
        self.workers = workers
        self.sql = sql
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await request(self.client, self.sql))
            await asyncio.sleep(self.pause)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def select(
        self, stage: Stage | None = None, since: float = 0.0, until: float = float("inf")
    ) -> list[Outcome]:
        """Requests (of a stage) that started in ``[since, until)``."""
        return [
            o
            for o in self.outcomes
            if (stage is None or o.stage == stage) and since <= o.started < until
        ]

    def summary(self) -> dict[str, Any]:
        stages = Counter(o.stage for o in self.outcomes)
        labels = Counter(f"{o.stage}:{o.label}" for o in self.outcomes if o.error is not None)
        return {"stages": dict(stages), "errors": dict(labels)}


class Attempts:
    """A ``retry_classifier`` that records every failed connect attempt and defers to the table.

    ``seen`` counts them by SQLSTATE (as classified), else by exception class.
    """

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def __call__(self, error: BaseException) -> bool | None:
        verdict = classify(error)
        self.seen[verdict.sqlstate or verdict.error_type] += 1
        return None


async def later(delay: float, action: Callable[[], Any]) -> Any:
    """Run a blocking ``action`` in a thread after ``delay`` seconds (the loop keeps serving)."""
    await asyncio.sleep(delay)
    return await asyncio.to_thread(action)


async def settle(count: Callable[[], int], target: int, timeout: float = 10.0) -> int:
    """Poll ``count()`` until it is at most ``target`` or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    value = await asyncio.to_thread(count)
    while value > target and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await asyncio.to_thread(count)
    return value


async def assert_no_leaks(
    clients: Iterable[Client], server: PostgresServer, baseline: int = 0
) -> None:
    """Every slot checked in; after ``dispose()``, the server's backends back to ``baseline``."""
    for client in clients:
        assert client.stats().checked_out == 0, client.stats()
        if hasattr(client.pool, "checkedout"):
            assert client.pool.checkedout() == 0
        await client.dispose()
    assert await settle(server.backend_count, baseline) == baseline

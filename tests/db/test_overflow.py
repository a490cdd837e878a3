"""Overflow connections kept idle (``overflow_idle``), on a real PostgreSQL, all three flavours.

Steady load makes no logins once warmed up; the pool shrinks back to ``pool_size`` after
``overflow_idle`` without load; a burst larger than the pool still waits for ``pool_timeout``;
nothing above ``pool_size + max_overflow`` is ever open.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import sqlalchemy as sa

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

from .client import ASYNC_FLAVOURS, FLAVOURS, Client
from .test_checkout import backends_settle, fill

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)


async def steady(
    client: Client, seconds: float, workers: int = 20, think: float = 0.01
) -> set[int]:
    """``workers`` loop a request then ``think`` seconds, for ``seconds``; the backend pids seen."""
    stop = time.monotonic() + seconds
    seen: set[int] = set()

    async def worker() -> None:
        while time.monotonic() < stop:
            first, _ = await client.backend_pids()
            seen.add(first)
            await asyncio.sleep(think)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return seen


@flavours
async def test_steady_load_makes_no_logins_after_warm_up(
    pg_server: PostgresServer, flavour: str
) -> None:
    # SQLAlchemy's default pool size (5 + 10 overflow); stock closes and reopens about a
    # quarter of the checkouts' connections under this load
    client = Client(pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool)
    warm = await steady(client, 1.0)
    burst = await fill(client, 15, hold=0.05)  # every slot opened once: the load's worst burst
    warmed_up = client.stats().connects
    later = await steady(client, 2.0)
    stats = client.stats()
    await client.dispose()
    assert warmed_up <= 15
    assert stats.connects == warmed_up, "a login after warm-up"
    assert later <= warm | burst  # every request ran on a connection opened in the warm-up
    assert stats.retired_overflow == 0 and stats.size == 5


@flavours
async def test_the_pool_shrinks_to_pool_size_after_overflow_idle_without_load(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=5, max_overflow=10, overflow_idle=0.5,
    )  # fmt: skip
    assert len(await fill(client, 15)) == 15
    stats = client.stats()
    assert (stats.size, stats.checked_in, stats.overflow, stats.checked_out) == (5, 15, 10, 0)
    assert await backends_settle(pg_server, 15) == 15  # the overflow was kept, not closed
    await asyncio.sleep(0.6)  # no traffic at all: nothing has run, all 15 are still open
    assert pg_server.backend_count() == 15
    for _ in range(12):  # requests one at a time: each checkin closes one, down to pool_size
        assert await client.scalar() == 1
    stats = client.stats()
    assert (stats.size, stats.checked_in, stats.overflow, stats.checked_out) == (5, 5, 0, 0)
    assert stats.retired_overflow == 10
    assert await backends_settle(pg_server, 5) == 5
    # a new burst opens overflow again
    assert len(await fill(client, 8)) == 8
    assert client.stats().overflow == 3
    await client.dispose()


@flavours
async def test_a_burst_larger_than_the_pool_still_waits(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=2, max_overflow=1, pool_timeout=0.5,
    )  # fmt: skip
    # one more than the pool: the last one waits for a returned connection and gets it
    pids = await fill(client, 4, hold=0.2)
    assert len(pids) == 3 and client.stats().connects == 3
    # all three held: a fourth checkout times out after pool_timeout, as with stock
    release = asyncio.Event()

    async def hold() -> None:
        if client.async_engine is not None:
            async with client.async_engine.connect():
                await release.wait()
        else:
            conn = await client._in_thread(client.engine.connect)
            await release.wait()
            await client._in_thread(conn.close)

    holders = [asyncio.ensure_future(hold()) for _ in range(3)]
    while client.pool.checkedout() < 3:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(sa.exc.TimeoutError):
        await client.scalar()
    assert 0.4 <= time.monotonic() - started < 5.0
    release.set()
    await asyncio.gather(*holders)
    stats = client.stats()
    assert (stats.checked_in, stats.overflow, stats.connects) == (3, 1, 3)
    await client.dispose()


@flavours
async def test_never_more_than_pool_size_plus_max_overflow_open(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=3, max_overflow=4, overflow_idle=0.2, pool_timeout=10,
    )  # fmt: skip
    most = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, await asyncio.to_thread(pg_server.backend_count))
            pool = client.pool
            assert pool.checkedin() + pool.checkedout() <= 7
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    for _ in range(3):  # bursts of 20 tasks, each followed by a quiet longer than overflow_idle
        await asyncio.gather(*(client.backend_pids(pause=0.02) for _ in range(20)))
        await steady(client, 0.3, workers=12, think=0.0)
        await asyncio.sleep(0.25)
        await client.scalar()
    done.set()
    await watcher
    stats = client.stats()
    await client.dispose()
    assert 3 <= most <= 7
    assert stats.retired_overflow >= 4  # the quiet spells shrank it, and bursts regrew it
    assert stats.connects - stats.retired_overflow <= 7


@pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
async def test_cancelled_while_the_pool_shrinks(pg_server: PostgresServer, flavour: str) -> None:
    """Requests cancelled at random moments while their checkins close overflow connections:
    no slot leaks, none is left open on the server."""
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=3, max_overflow=12, overflow_idle=0.15, pool_timeout=10,
    )  # fmt: skip
    draw = random.Random(15).random
    cancelled = 0
    async def requests() -> None:
        for _ in range(5):
            await client.scalar()

    for _ in range(8):
        await fill(client, 15, hold=0.02)
        await asyncio.sleep(0.2)  # a quiet window: the next checkins close what they return
        tasks = [asyncio.ensure_future(requests()) for _ in range(3)]
        await asyncio.sleep(0.002 + 0.03 * draw())
        for task in tasks:
            cancelled += task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    pool = client.pool
    assert cancelled > 0 and client.stats().retired_overflow > 0
    assert pool.checkedout() == 0, pool.status()
    assert pool.checkedin() == pool.size() + pool.overflow(), pool.status()
    # every slot can still be checked out at once
    assert len(await asyncio.wait_for(fill(client, 15, hold=0.05), 10)) == 15
    await client.dispose()
    assert await backends_settle(pg_server, 0) == 0

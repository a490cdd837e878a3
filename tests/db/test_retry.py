"""Retry behaviour against a real PostgreSQL: all three driver flavours, both pool classes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from fault_tolerant_pool import ConnectRetriesExhausted, FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

from .client import ASYNC_FLAVOURS, FLAVOURS, POOLS, Client

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
async_flavours = pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
pools = pytest.mark.parametrize("poolclass", POOLS, ids=lambda p: p.__name__)


def start_later(server: PostgresServer, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Heartbeat:
    """A task that ticks every 10 ms; the largest gap shows whether the event loop was blocked."""

    def __init__(self) -> None:
        self.largest_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.largest_gap = max(self.largest_gap, now - last)
            self.ticks += 1
            last = now

    def __enter__(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()


@flavours
@pools
async def test_server_down_gives_up_near_the_deadline(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    pg_server.stop()
    client = Client(pg_server.url(flavour), flavour, poolclass=poolclass, retry_deadline=1.5)
    started = time.monotonic()
    with Heartbeat() as heartbeat, pytest.raises(sa.exc.OperationalError) as info:
        await client.scalar()
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 2.5
    assert isinstance(info.value.orig, ConnectRetriesExhausted)
    assert info.value.orig.transient is True
    stats = client.stats()
    assert stats.connects == 0 and stats.give_ups == 1
    assert stats.failed_attempts == stats.attempts == info.value.orig.attempts
    assert stats.attempts >= 4  # backoff from 50 ms capped at 500 ms: at least 4 tries in 1.5 s
    assert f"after {stats.attempts} attempts" in str(info.value)
    assert stats.last_error is not None
    # The loop kept running while the pool backed off (sync engines run in a worker thread).
    assert heartbeat.ticks > 50
    assert heartbeat.largest_gap < 0.25
    assert stats.checked_out == 0
    await client.dispose()


@flavours
@pools
async def test_server_started_inside_the_retry_window(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    pg_server.stop()
    client = Client(pg_server.url(flavour), flavour, poolclass=poolclass, retry_deadline=10)
    start_later(pg_server, 1.0)
    started = time.monotonic()
    assert await client.scalar() == 1
    assert 0.9 < time.monotonic() - started < 5
    stats = client.stats()
    assert stats.connects == 1 and stats.failed_attempts >= 3 and stats.give_ups == 0
    await client.dispose()


@flavours
@pytest.mark.parametrize("check", ["pre_ping", "liveness", "none"])
async def test_pooled_reconnects_go_through_the_retry_path(
    pg_server: PostgresServer, flavour: str, check: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_pre_ping=check == "pre_ping", liveness_check=check == "liveness", retry_deadline=10,
    )  # fmt: skip
    await asyncio.gather(*(client.scalar("SELECT pg_sleep(0.2)") for _ in range(3)))
    pooled = client.stats().connects
    assert pooled >= 2  # connections sit in the pool (threads may not all overlap)
    pg_server.stop()
    if check == "none":
        # The pooled connection is dead; its statement fails (statements are never replayed)
        # and SQLAlchemy invalidates the pool.
        with pytest.raises(sa.exc.DBAPIError) as info:
            await client.scalar()
        assert info.value.connection_invalidated
    start_later(pg_server, 1.0)
    assert await client.scalar("SELECT 2") == 2
    stats = client.stats()
    assert stats.connects == pooled + 1
    assert stats.failed_attempts >= 3  # the reconnect waited for the server through the retries
    assert stats.retired_liveness == (1 if check == "liveness" else 0)
    await client.dispose()


@flavours
@pools
@pytest.mark.parametrize("fault", ["bad_password", "unknown_database"])
async def test_permanent_failures_fail_on_the_first_attempt(
    pg_server: PostgresServer, flavour: str, poolclass: type, fault: str
) -> None:
    kw = {"password": "wrong"} if fault == "bad_password" else {"dbname": "nope"}
    client = Client(pg_server.url(flavour, **kw), flavour, poolclass=poolclass, retry_deadline=10)
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await client.scalar()
    assert time.monotonic() - started < 1.0
    orig = info.value.orig
    assert isinstance(orig, ConnectRetriesExhausted) and orig.transient is False
    assert orig.attempts == 1
    assert client.stats().attempts == 1
    expected = "28P01" if fault == "bad_password" else "3D000"
    last = client.stats().last_error
    assert last is not None and last.sqlstate == expected
    assert "wrong" not in str(info.value)
    await client.dispose()


async def _orphans_settle(server: PostgresServer, baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    count = server.backend_count()
    while count > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = server.backend_count()
    return count


@async_flavours
@pools
async def test_cancel_during_backoff_frees_the_slot(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    pg_server.stop()
    client = Client(pg_server.url(flavour), flavour, poolclass=poolclass, retry_deadline=30)
    task = asyncio.create_task(client.scalar())
    await asyncio.sleep(0.5)
    assert client.stats().failed_attempts >= 2  # it is backing off
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.1
    assert client.stats().checked_out == 0
    if poolclass is FaultTolerantQueuePool:
        assert client.pool.checkedout() == 0
    pg_server.start()
    baseline = pg_server.backend_count()
    assert await client.scalar() == 1  # the freed slot serves the next request
    await client.dispose()
    assert await _orphans_settle(pg_server, baseline) == baseline


@async_flavours
@pools
async def test_cancel_during_connect_leaves_no_orphan(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    """Cancel while the server is slow to accept: no slot held, no server backend left over."""
    from fault_tolerant_pool.testing import FaultProxy

    baseline = pg_server.backend_count()
    with FaultProxy(pg_server.host, pg_server.port) as proxy:
        proxy.latency(0.2)  # each round trip of the handshake takes 0.4 s
        url = pg_server.url(flavour).replace(f":{pg_server.port}/", f":{proxy.port}/")
        client = Client(url, flavour, poolclass=poolclass, retry_deadline=30)
        for wait in (0.05, 0.3, 0.5, 0.7):
            task = asyncio.create_task(client.scalar())
            await asyncio.sleep(wait)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client.stats().checked_out == 0
        proxy.healthy()
        assert await client.scalar() == 1
        await client.dispose()
        assert await _orphans_settle(pg_server, baseline, timeout=10) == baseline


@flavours
@pools
async def test_dispose_keeps_the_settings(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=poolclass,
        retry_deadline=1.25, retry_attempts=7, retry_initial_delay=0.01, retry_max_delay=0.2,
    )  # fmt: skip
    assert await client.scalar() == 1
    before = client.pool
    await client.dispose()
    assert client.pool is not before and type(client.pool) is type(before)
    policy = client.pool.retry_policy
    assert (policy.deadline, policy.attempts, policy.initial_delay, policy.max_delay) == (
        1.25, 7, 0.01, 0.2,
    )
    assert client.stats().connects == 1  # the counters carry over too
    pg_server.stop()
    with pytest.raises(sa.exc.OperationalError) as info:
        await client.scalar()
    assert info.value.orig.attempts == 7
    await client.dispose()

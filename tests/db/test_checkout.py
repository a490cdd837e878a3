"""What the queue pool does with its connections at checkout and checkin, on a real PostgreSQL.

Lifetime (jittered, never while checked out), idle shrinking after a burst, and the liveness
check after ``pg_terminate_backend`` and after a fast restart, without ``pool_pre_ping``.
All three flavours; NullPool has nothing to retire (every connection lives one checkout).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fault_tolerant_pool import FaultTolerantQueuePool, upkeep
from fault_tolerant_pool.testing import FaultProxy, PostgresServer

from .client import ASYNC_FLAVOURS, FLAVOURS, Client

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)


async def fill(client: Client, n: int, hold: float = 0.1) -> set[int]:
    """Open ``n`` connections at once (each held ``hold`` s); their backend pids."""
    pairs = await asyncio.gather(*(client.backend_pids(pause=hold) for _ in range(n)))
    return {first for first, _ in pairs}


async def backends_settle(server: PostgresServer, expected: int, timeout: float = 3.0) -> int:
    """The server's count of client backends once it is ``expected`` (a close takes a moment)."""
    deadline = time.monotonic() + timeout
    count = server.backend_count()
    while count != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        count = server.backend_count()
    return count


@flavours
async def test_lifetimes_spread_and_never_end_while_checked_out(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=10, max_overflow=0, max_lifetime=2, lifetime_jitter=0.5,
    )  # fmt: skip
    started = time.monotonic()
    originals = await fill(client, 10)
    assert len(originals) == 10
    last_seen: dict[int, float] = {}
    errors: list[BaseException] = []
    changed_while_out = 0

    async def worker() -> None:
        nonlocal changed_while_out
        while time.monotonic() - started < 3.0:
            try:
                first, second = await client.backend_pids(pause=0.03)
            except Exception as error:  # any statement error fails the test below
                errors.append(error)
                continue
            changed_while_out += first != second
            last_seen[first] = time.monotonic() - started

    await asyncio.gather(*(worker() for _ in range(10)))
    stats = client.stats()
    # each retirement closed a backend and each connect opened one (a slot retired last may
    # still be empty: the next checkout would fill it)
    expected = stats.connects - stats.retired_lifetime
    assert 5 <= expected <= 10
    assert await backends_settle(pg_server, expected) == expected
    await client.dispose()

    assert errors == [] and changed_while_out == 0
    assert stats.retired_lifetime >= 10 and stats.retired_liveness == 0
    ends = sorted(last_seen[pid] for pid in originals)
    # deadlines are uniform in [1, 2] s after creation: the retirements are spread over time
    assert ends[0] >= 0.7 and ends[-1] <= 2.6
    assert ends[-1] - ends[0] >= 0.3, ends


@flavours
async def test_idle_connections_are_closed_after_a_burst(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=10, max_overflow=0, max_idle=0.5,
    )  # fmt: skip
    assert len(await fill(client, 10)) == 10
    assert pg_server.backend_count() == 10
    deadline = time.monotonic() + 6.0
    while client.stats().retired_idle < 9 and time.monotonic() < deadline:
        assert await client.scalar() == 1  # light traffic: one request at a time
        await asyncio.sleep(0.02)
    stats = client.stats()
    assert stats.retired_idle == 9
    assert await backends_settle(pg_server, 1) == 1
    assert (stats.checked_in, stats.checked_out) == (1, 0)
    # a new burst opens connections again
    assert len(await fill(client, 4)) == 4
    await client.dispose()


@flavours
async def test_terminated_backends_are_replaced_before_checkout(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
        pool_size=5, liveness_ping_after=None,  # the check without a round trip alone
    )  # fmt: skip
    originals = await fill(client, 5)
    # Blocks this thread (and the event loop) until the backends have exited: asyncpg's loop
    # has not read the closes yet when the next checkouts run.
    rows = pg_server.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    assert int(rows[0][0]) == 5
    results = await asyncio.gather(*(client.checkout_then("SELECT 1") for _ in range(5)))
    assert results == [(True, True)] * 5  # no checkout failed, no statement saw an error
    stats = client.stats()
    assert stats.retired_liveness == 5 and stats.give_ups == 0
    assert not (await fill(client, 5)) & originals
    await client.dispose()


@flavours
async def test_fast_restart_while_idle_goes_unnoticed(
    pg_server: PostgresServer, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool, pool_size=5
    )
    await fill(client, 5)
    pg_server.restart("fast")
    results = await asyncio.gather(*(client.checkout_then("SELECT 1") for _ in range(10)))
    assert results == [(True, True)] * 10
    stats = client.stats()
    assert stats.retired_liveness == 5 and stats.give_ups == 0
    await client.dispose()


@pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
async def test_cancel_during_the_liveness_ping_frees_the_slot(
    pg_server: PostgresServer, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout cancelled while it pings leaves no checked-out slot and no orphan backend."""
    pings: list[str] = []
    real_ping = upkeep._answers_ping

    def watched_ping(dialect: Any, connection: Any) -> bool:
        pings.append("started")
        answer = real_ping(dialect, connection)
        pings.append("answered")
        return answer

    monkeypatch.setattr(upkeep, "_answers_ping", watched_ping)
    baseline = pg_server.backend_count()
    with FaultProxy(pg_server.host, pg_server.port) as proxy:
        client = Client(
            pg_server.url(flavour, port=proxy.port), flavour, poolclass=FaultTolerantQueuePool,
            pool_size=1, max_overflow=0, liveness_ping_after=0.05,
        )  # fmt: skip
        assert await client.scalar() == 1
        await asyncio.sleep(0.1)  # idle past the threshold: the next checkout pings
        proxy.latency(0.3)  # the ping's round trip takes 0.6 s
        task = asyncio.create_task(client.scalar())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pings == ["started"]  # the cancellation landed in the ping
        assert client.stats().checked_out == 0 and client.pool.checkedout() == 0
        proxy.healthy()
        assert await client.scalar() == 1  # the slot serves the next request
        await client.dispose()
    assert await backends_settle(pg_server, baseline, timeout=10) == baseline

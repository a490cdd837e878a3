"""Faults on the way to the server: a black hole, a latency spike, and a full server (53300)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from fault_tolerant_pool import (
    ConnectRetriesExhausted,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
)
from fault_tolerant_pool.testing import FaultProxy, PostgresServer
from tests.db.client import FLAVOURS, Client

from .harness import Attempts, Load, assert_no_leaks, label, request, settle

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)

DEADLINE = 3.0
#: The driver's own connect timeout a user might set, and, for a black hole with the deadline
#: above, the attempts made and when the pool gives up. asyncpg: 1 s, 1 s, then what is left.
#: psycopg async: its own 2 s (its minimum), then what is left (the pool's asyncio.wait_for).
#: psycopg sync: 2 s, then less than its 2-second minimum is left, so it stops at 2 s rather
#: than overrun the deadline.
USER_TIMEOUT: dict[str, tuple[dict[str, Any], int, float]] = {
    "asyncpg": ({"timeout": 1}, 3, DEADLINE),
    "psycopg_async": ({"connect_timeout": 2}, 2, DEADLINE),
    "psycopg": ({"connect_timeout": 2}, 1, 2.0),
}


def is_timeout(error: BaseException) -> bool:
    """asyncpg and the pool's wait_for raise TimeoutError, psycopg its ConnectionTimeout."""
    return isinstance(error, TimeoutError) or type(error).__name__ == "ConnectionTimeout"


@flavours
async def test_blackhole_attempts_end_at_the_connect_timeout_within_the_deadline(
    pg_server: PostgresServer, fault_proxy: FaultProxy, flavour: str
) -> None:
    """The proxy accepts and never answers. With the driver's own timeout set, attempts end at
    it; with none set, the pool's ``retry_attempt_timeout`` (5 s), clamped to the deadline left,
    ends the one attempt at the deadline. Either way nothing outlives ``retry_deadline``."""
    url = pg_server.url(flavour, port=fault_proxy.port)
    connect_args, expected_attempts, expected_elapsed = USER_TIMEOUT[flavour]
    users = Client(url, flavour, poolclass=FaultTolerantQueuePool, retry_deadline=DEADLINE,
                   connect_args=connect_args)  # fmt: skip
    defaults = Client(url, flavour, poolclass=FaultTolerantQueuePool, retry_deadline=DEADLINE)
    fault_proxy.blackhole()
    users_request, defaults_request = await asyncio.gather(request(users), request(defaults))
    for client, outcome, attempts, elapsed in (
        (users, users_request, expected_attempts, expected_elapsed),
        (defaults, defaults_request, 1, DEADLINE),
    ):
        assert outcome.stage == "checkout", outcome
        assert isinstance(outcome.error, sa.exc.OperationalError)
        error = outcome.error.orig
        assert isinstance(error, ConnectRetriesExhausted) and error.transient, error
        assert is_timeout(error.last_error), error.last_error
        assert error.attempts == attempts == client.stats().attempts, (flavour, error)
        # Generous on the late side only: the machine is shared; never early.
        assert elapsed - 0.05 <= outcome.duration <= elapsed + 0.75, (flavour, outcome.duration)
        assert outcome.duration <= DEADLINE + 0.75
    fault_proxy.healthy()
    # Both pools fail fast now (unreachable for a whole deadline) until their next probe, at
    # most 0.7 s away: the first request after it succeeds.
    for client in (defaults, users):
        started = time.monotonic()
        while (await request(client)).stage != "ok":
            assert time.monotonic() - started < 1.5, client.stats()
            await asyncio.sleep(0.05)
    await assert_no_leaks([users, defaults], pg_server)
    # The connections the timed-out attempts abandoned were closed by the drivers.
    assert await settle(lambda: fault_proxy.open_connections, 0) == 0


@flavours
async def test_latency_spike(
    pg_server: PostgresServer, fault_proxy: FaultProxy, flavour: str
) -> None:
    """0.1 s each way for a second: requests slow down, none fails, none is retried (a slow
    login is not cut: it stays far inside ``retry_attempt_timeout``), then they are fast again."""
    url = pg_server.url(flavour, port=fault_proxy.port)
    attempts = Attempts()
    pooled = Client(url, flavour, poolclass=FaultTolerantQueuePool, pool_size=3,
                    pool_pre_ping=True, retry_classifier=attempts)  # fmt: skip
    fresh = Client(url, flavour, poolclass=FaultTolerantNullPool, retry_classifier=attempts)
    async with Load(pooled, 3) as pooled_load, Load(fresh, 1) as fresh_load:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(fault_proxy.latency, 0.1)
        spike_at = time.monotonic()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fault_proxy.healthy)
        healed_at = time.monotonic()
        await asyncio.sleep(0.5)
    for load in (pooled_load, fresh_load):
        assert all(o.stage == "ok" for o in load.outcomes), load.summary()
    assert sum(attempts.seen.values()) == 0 and pooled.stats().failed_attempts == 0
    # The requests in flight during the spike met it: the slowest of them waited for at least one
    # slowed round trip (0.2 s; healthy: about 1 ms). Every request that overlapped the spike is
    # looked at: a request of several slowed round trips (pre-ping, BEGIN, SELECT, ROLLBACK) may
    # span the whole second, so on a loaded machine none need end inside it.
    during = [o for o in pooled_load.outcomes if o.started < healed_at and o.ended > spike_at + 0.1]
    assert during and max(o.duration for o in during) >= 0.15, pooled_load.summary()
    slow_logins = [o for o in fresh_load.outcomes if spike_at < o.ended and o.started < healed_at]
    assert max(o.duration for o in slow_logins) >= 0.4  # a login takes several round trips
    after = pooled_load.select(since=healed_at + 0.25)
    assert after and max(o.duration for o in after) < 0.2
    await assert_no_leaks([pooled, fresh], pg_server)


@pytest.fixture(params=["role", "max_connections"])
def full_server(request: pytest.FixtureRequest, pg_server: PostgresServer) -> Iterator[Any]:
    """A server where the role ``app`` gets 2 connections: by its ``CONNECTION LIMIT``, or by
    ``max_connections`` (3, one of them reserved for superusers). Yields (server, url maker)."""
    if request.param == "role":
        pg_server.create_role("app", "app-pw", connection_limit=2)
        yield pg_server
        return
    with PostgresServer(
        max_connections=3, settings={"superuser_reserved_connections": "1"}
    ) as server:
        server.create_role("app", "app-pw")
        yield server


@flavours
async def test_too_many_connections(full_server: PostgresServer, flavour: str) -> None:
    """53300 is transient: connects wait for a slot to free up within the deadline; when no slot
    frees up (a pool keeps its connections), the deadline ends the wait with 53300 named."""
    url = full_server.url(flavour, user="app", password="app-pw")
    statement = "SELECT pg_sleep(0.2)"
    attempts = Attempts()
    # NullPool: each request closes its connection, so the six take turns on two slots.
    null = Client(url, flavour, poolclass=FaultTolerantNullPool, retry_classifier=attempts)
    outcomes = await asyncio.gather(*(request(null, statement) for _ in range(6)))
    assert [o.stage for o in outcomes] == ["ok"] * 6, [o.label for o in outcomes]
    assert attempts.seen["53300"] > 0, attempts.seen
    assert max(o.duration for o in outcomes) < 5
    await null.dispose()
    # A queue pool of three keeps its two connections: the third checkout cannot get a slot.
    queue = Client(url, flavour, poolclass=FaultTolerantQueuePool, pool_size=3, max_overflow=0,
                   retry_deadline=1.0)  # fmt: skip
    outcomes = await asyncio.gather(*(request(queue, statement) for _ in range(3)))
    stages = sorted(o.stage for o in outcomes)
    assert stages == ["checkout", "ok", "ok"], [o.label for o in outcomes]
    failed = next(o for o in outcomes if o.stage == "checkout")
    assert isinstance(failed.error, sa.exc.OperationalError)
    assert isinstance(failed.error.orig, ConnectRetriesExhausted)
    assert failed.error.orig.transient and label(failed.error).endswith("[53300]"), failed.error
    assert 1.0 <= failed.duration < 2.5
    await assert_no_leaks([queue], full_server)

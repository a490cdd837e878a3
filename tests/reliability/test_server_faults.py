"""PostgreSQL restarted, shut down politely, crashed, or kicking every session out, under load.

Workers loop a short statement through a ``FaultTolerantQueuePool`` with pre-ping. Checkouts
must never fail (the outage is far shorter than the retry deadline); statements in flight when
the server goes may fail, with a disconnect error, and are never replayed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer
from tests.db.client import FLAVOURS, Client

from .harness import Attempts, Load, assert_no_leaks, is_disconnect

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)

WORKERS = 5
#: Long enough that each worker has a statement in flight when the server goes.
STATEMENT = "SELECT pg_sleep(0.03)"
#: What a statement in flight fails with when its server goes. The server says why when it
#: shuts down fast or terminates a backend (57P01; asyncpg reports it as 08003 "connection was
#: closed in the middle of operation: terminating connection due to administrator command");
#: after an immediate stop or a crash the socket just closes, and psycopg may read that close
#: before the server's message. asyncpg sometimes reports a connection lost between two
#: protocol states as "cannot switch to state".
LOST = (
    "terminating connection due to administrator command",
    "terminating connection due to immediate shutdown",
    "connection was closed in the middle of operation",
    "server closed the connection unexpectedly",
    "cannot switch to state",
)


def client_for(server: PostgresServer, flavour: str, attempts: Attempts, **kw: Any) -> Client:
    queue = kw.get("poolclass", FaultTolerantQueuePool) is FaultTolerantQueuePool
    settings: dict[str, Any] = {
        "poolclass": FaultTolerantQueuePool,
        **({"pool_size": WORKERS, "pool_pre_ping": True} if queue else {}),
        "retry_deadline": 10,
        "retry_classifier": attempts,
        **kw,
    }
    return Client(server.url(flavour), flavour, **settings)


def assert_rode_through(load: Load, fault_at: float, reasons: tuple[str, ...] = LOST) -> None:
    """No checkout failed; only statements in flight at the fault failed, each with a
    disconnect error whose text is one of ``reasons``; requests succeeded afterwards."""
    summary = load.summary()
    assert load.select("checkout") == [], summary
    failed = load.select("statement")
    assert len(failed) <= WORKERS, summary
    for outcome in failed:
        assert outcome.started < fault_at + 0.5, (outcome, summary)  # in flight, not later
        assert is_disconnect(outcome.error), outcome.error
        assert any(reason in str(outcome.error) for reason in reasons), outcome.error
    assert load.select("ok", since=fault_at), summary


@flavours
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart(pg_server: PostgresServer, flavour: str, mode: str) -> None:
    """Fast (SIGINT) or immediate (SIGQUIT) stop, down for half a second, start again."""
    attempts = Attempts()
    client = client_for(pg_server, flavour, attempts)
    async with Load(client, WORKERS, STATEMENT) as load:
        await asyncio.sleep(0.3)
        fault_at = time.monotonic()
        await asyncio.to_thread(pg_server.restart, mode, 0.5)
        ready_at = pg_server.ready_at
        await asyncio.sleep(0.6)
    assert ready_at is not None
    assert_rode_through(load, fault_at)
    # The reconnects waited for the server: refused while it was down.
    assert attempts.seen["08001"] + attempts.seen["ConnectionRefusedError"] > 0, attempts.seen
    stats = client.stats()
    assert stats.give_ups == 0 and stats.connects > WORKERS, stats
    await assert_no_leaks([client], pg_server)


@flavours
@pytest.mark.parametrize("crash", ["immediate", "kill"])
async def test_crash_then_recovery_answers_57P03(
    pg_server: PostgresServer, flavour: str, crash: str
) -> None:
    """A crash (SIGQUIT, or SIGKILL of every server process), restarted at once: crash recovery
    answers 57P03 "the database system is starting up" for a while; requests wait it out."""
    # WAL to replay, so that recovery lasts long enough to be seen: longer than the pool's probe
    # interval during an outage (0.12-0.16 s). 200,000 rows made 0.1-0.2 s of recovery, and one
    # fresh-clone run in about six saw no 57P03 at all (psycopg_async, kill); 600,000 rows.
    pg_server.execute("CREATE TABLE wal AS SELECT generate_series(1, 600000) AS i")
    attempts = Attempts()
    client = client_for(
        pg_server, flavour, attempts, retry_initial_delay=0.01, retry_max_delay=0.03
    )

    def crash_and_restart() -> None:
        if crash == "kill":
            pg_server.kill()
        else:
            pg_server.stop("immediate")
        pg_server.start()

    async with Load(client, WORKERS, STATEMENT) as load:
        await asyncio.sleep(0.3)
        fault_at = time.monotonic()
        await asyncio.to_thread(crash_and_restart)
        await asyncio.sleep(0.5)
    assert_rode_through(load, fault_at)
    assert attempts.seen["57P03"] > 0, attempts.seen  # recovery turned attempts away
    assert client.stats().give_ups == 0
    await assert_no_leaks([client], pg_server)


@flavours
async def test_every_backend_terminated(pg_server: PostgresServer, flavour: str) -> None:
    """``pg_terminate_backend`` on every session: statements in flight fail with 57P01, idle
    pooled connections are found dead by pre-ping and replaced at once (no failed attempt)."""
    attempts = Attempts()
    client = client_for(pg_server, flavour, attempts)
    async with Load(client, WORKERS, STATEMENT) as load:
        await asyncio.sleep(0.3)
        fault_at = time.monotonic()
        terminated = await asyncio.to_thread(pg_server.terminate_backends)
        await asyncio.sleep(0.4)
    assert terminated >= 1
    assert_rode_through(load, fault_at)
    stats = client.stats()
    assert stats.failed_attempts == 0 and sum(attempts.seen.values()) == 0  # server stayed up
    assert stats.connects >= WORKERS + 1  # the terminated ones were replaced
    await assert_no_leaks([client], pg_server)


@flavours
async def test_smart_shutdown(pg_server: PostgresServer, flavour: str) -> None:
    """Smart shutdown (SIGTERM): sessions carry on, new logins get 57P03 "shutting down"; the
    server stops once the pool lets go of its connections, and waiting requests connect to the
    restarted server."""
    pooled_attempts, fresh_attempts = Attempts(), Attempts()
    pooled = client_for(pg_server, flavour, pooled_attempts, pool_size=3)
    fresh = client_for(
        pg_server, flavour, fresh_attempts, poolclass=FaultTolerantNullPool, retry_max_delay=0.1
    )
    async with Load(fresh, 2, STATEMENT) as fresh_load:
        async with Load(pooled, 3, STATEMENT) as pooled_load:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(pg_server.stop, "smart", False)
            shutdown_at = time.monotonic()
            await asyncio.sleep(0.5)
        # Everything that started on a pooled session during the smart shutdown succeeded;
        # fresh logins were turned away with 57P03 and are still waiting.
        during = pooled_load.select(since=shutdown_at + 0.05)
        assert during and all(o.stage == "ok" for o in during), pooled_load.summary()
        assert fresh_attempts.seen["57P03"] > 0, fresh_attempts.seen
        assert not fresh_load.select("ok", since=shutdown_at + 0.05), fresh_load.summary()
        # The pooled sessions hold the server up; letting them go lets it finish.
        await pooled.dispose()
        await asyncio.to_thread(pg_server.stop, "smart")
        await asyncio.to_thread(pg_server.start)
        await asyncio.sleep(0.3)
    assert pg_server.ready_at is not None
    for load in (pooled_load, fresh_load):
        assert load.select("checkout") == [] and load.select("statement") == [], load.summary()
    # The waiting requests connected once the server was back.
    assert fresh_load.select("ok", since=shutdown_at + 0.05), fresh_load.summary()
    assert fresh.stats().give_ups == 0
    await assert_no_leaks([pooled, fresh], pg_server)

"""``FaultTolerantNullPool`` behind PgBouncer in transaction mode: PgBouncer restarted, paused and
resumed, and PostgreSQL restarted behind it. Requests ride through within the retry deadline.

Every checkout is a new login to PgBouncer. PgBouncer accepts logins while PostgreSQL is down
and answers the first statement with 08P01 "server login has been failing, try again later
(server_login_retry)". With the defaults (``retry_ping="auto"``) the pool pings new connections
while it has reason to doubt (a failed attempt, or a statement that met a disconnect or a
connection error, in the last 10 s), so it finds that out inside the retry loop, where it is
retried, instead of in the application's first statement.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from fault_tolerant_pool import FaultTolerantNullPool
from fault_tolerant_pool.testing import PgBouncer, PostgresServer
from tests.db.client import FLAVOURS, Client

from .harness import Attempts, Load, later, request, settle

pytestmark = [pytest.mark.anyio, pytest.mark.db]

WORKERS = 4
DEADLINE = 10.0


def prepared_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


#: The recipes of docs/pgbouncer.md: no server-side prepared statements that outlive a transaction.
RECIPES: dict[str, dict[str, Any]] = {
    "asyncpg": {
        "statement_cache_size": 0,  # asyncpg's own cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's
        "prepared_statement_name_func": prepared_statement_name,  # unique names per statement
    },
    "psycopg_async": {"prepare_threshold": None},
    "psycopg": {"prepare_threshold": None},
}


#: What a ping through PgBouncer meets while PostgreSQL restarts behind it: 08P01 "server login
#: has been failing" (asyncpg: 08003 "connection was closed in the middle of operation: server
#: login has been failing"; psycopg may read the close first, 08006), or the server's own
#: 57P01/57P03 passed on.
BEHIND = {"08P01", "08003", "08006", "57P01", "57P03"}


def assert_rode_through(load: Load, restarts: list[tuple[float, float]]) -> None:
    """No checkout failed; a statement failed only if it was in flight during a restart (at most
    one per worker and restart); every request was served well within the deadline."""
    summary = load.summary()
    assert load.outcomes and load.select("checkout") == [], summary
    for start, end in restarts:
        hit = [o for o in load.select("statement") if o.started <= end and o.ended >= start]
        assert len(hit) <= WORKERS, summary
    in_flight = [o for o in load.select("statement") if any(
        o.started <= end and o.ended >= start for start, end in restarts
    )]  # fmt: skip
    assert in_flight == load.select("statement"), summary
    assert max(o.duration for o in load.outcomes) < DEADLINE / 2, summary


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_pgbouncer_restart_pause_and_postgres_restart(
    pg_server: PostgresServer, pgbouncer: PgBouncer, flavour: str
) -> None:
    assert pgbouncer.pool_mode == "transaction" and pgbouncer.server_login_retry == 1
    attempts = Attempts()
    client = Client(
        pgbouncer.url(flavour), flavour, poolclass=FaultTolerantNullPool,
        retry_deadline=DEADLINE, retry_classifier=attempts, connect_args=RECIPES[flavour],
    )  # fmt: skip
    async with Load(client, WORKERS, "SELECT 1", pause=0.005) as load:
        await asyncio.sleep(0.3)
        # 1. PgBouncer restarted (SIGTERM, down 0.3 s): logins refused meanwhile, retried.
        restarted = time.monotonic()
        await asyncio.to_thread(pgbouncer.restart, "immediate", 0.3)
        restart_done = time.monotonic()
        await asyncio.sleep(0.8)  # room for requests to be served again, on a loaded machine too
        # 2. PAUSE for half a second, then RESUME: requests wait, none fails.
        paused = time.monotonic()
        await asyncio.to_thread(pgbouncer.admin, "PAUSE")  # returns once it is in force
        in_force = time.monotonic()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pgbouncer.admin, "RESUME")
        resumed = time.monotonic()
        await asyncio.sleep(0.8)
        # 3. PostgreSQL restarted behind PgBouncer (fast, down 0.5 s): new logins to PgBouncer
        # succeed but its server logins fail; server_login_retry (1 s here, 15 s by default)
        # then answers 08P01 at once; the ping finds it and the connect is retried.
        pg_restarted = time.monotonic()
        before = attempts.seen.copy()
        await asyncio.to_thread(pg_server.restart, "fast", 0.5)
        pg_restart_done = time.monotonic()
        await asyncio.sleep(1.5)
    summary = load.summary()
    assert_rode_through(load, [(restarted, restart_done), (pg_restarted, pg_restart_done)])
    for since, until in ((restart_done, paused), (resumed, pg_restarted), (pg_restart_done, 1e9)):
        served = [o for o in load.select("ok") if since < o.ended < until]
        assert served, (since, summary)  # requests were served again after each fault
    paused_through = [o for o in load.outcomes if o.started < in_force + 0.2 < o.ended]
    assert paused_through and all(o.stage == "ok" for o in paused_through), summary
    assert min(o.ended for o in paused_through) >= resumed - 0.05, summary  # held until RESUME
    # What the retries met: PgBouncer down (refused), then PostgreSQL down behind it.
    assert before["ConnectionRefusedError"] + before["08001"] > 0, before
    behind = attempts.seen - before
    assert set(behind) <= BEHIND, behind  # may be empty: logins that waited in PgBouncer
    assert client.stats().give_ups == 0 and client.stats().checked_out == 0
    # Nothing leaked: no client left on PgBouncer, and every server backend is one of its own.
    await client.dispose()

    def app_clients() -> int:
        return sum(c["database"] != "pgbouncer" for c in pgbouncer.show("CLIENTS"))

    assert await settle(app_clients, 0) == 0
    servers = len(pgbouncer.show("SERVERS"))
    assert await asyncio.to_thread(pg_server.backend_count) == servers <= 20


async def test_without_retry_ping_the_first_statement_meets_the_outage(
    pg_server: PostgresServer, pgbouncer: PgBouncer
) -> None:
    """PostgreSQL down behind a running PgBouncer: the login to PgBouncer succeeds, so without
    ``retry_ping`` the request's first statement gets 08P01 (and is not replayed); with it, the
    connect is retried until PostgreSQL is back. All three flavours at once, same outage."""
    clients = {
        (flavour, ping): Client(
            pgbouncer.url(flavour),
            flavour,
            poolclass=FaultTolerantNullPool,
            retry_ping=ping,
            retry_deadline=DEADLINE,
            connect_args=RECIPES[flavour],
        )
        for flavour in FLAVOURS
        for ping in (False, True)
    }
    assert {(await request(c)).stage for c in clients.values()} == {"ok"}  # PgBouncer knows PG
    await asyncio.to_thread(pg_server.stop)
    restart = asyncio.create_task(later(1.5, pg_server.start))
    # A first login makes PgBouncer try PostgreSQL and fail; for server_login_retry (1 s, again
    # at each failed retry) it then fails every statement that needs a server at once.
    first = asyncio.create_task(request(clients["asyncpg", False]))
    await asyncio.sleep(0.3)
    outcomes = dict(
        zip(clients, await asyncio.gather(*(request(c) for c in clients.values())), strict=True)
    )
    await restart
    await first
    for (flavour, ping), outcome in outcomes.items():
        if ping:
            assert outcome.stage == "ok" and 1.0 < outcome.duration < DEADLINE, (flavour, outcome)
        else:
            assert outcome.stage == "statement", (flavour, outcome)
            assert "server login has been failing" in str(outcome.error), outcome.error
    for client in clients.values():
        await client.dispose()

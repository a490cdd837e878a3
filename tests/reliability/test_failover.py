"""Failovers with the defaults: a writer demoted while reachable, a plain promotion, a
black-holed first host, pooled connections black-holed mid-session, an application's own
read-only transaction, and a ping that never gets its answer. Real primary and hot standby
(``pg_basebackup -R``), multi-host URLs with ``target_session_attrs=read-write``; every request
is counted, and only statements in flight at the fault may fail."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.testing import FaultProxy, PostgresServer, multi_host_url

from . import failover

pytestmark = [pytest.mark.anyio, pytest.mark.db]

DRIVERS = ("asyncpg", "psycopg_async")
WORKERS = 20


def _summary(run: failover.Run) -> dict[str, object]:
    return {
        "ok": run.count("ok"),
        "errors": dict(run.errors()),
        "marks": {k: round(v - run.started, 3) for k, v in run.marks.items()},
        "hung": run.hung,
    }


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
async def test_writer_turned_read_only_then_standby_promoted(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str, poolclass: type
) -> None:
    primary, standby = pg_primary_standby
    failover.prepare(primary)
    run = await failover.demote_then_promote(primary, standby, driver, poolclass, "ft")
    summary = _summary(run)
    assert run.count("checkout") == 0 and run.hung == 0, summary
    assert run.failed_statements_per_worker() <= 2, summary
    # every failed statement met the demoted writer, between the demotion and the promotion
    assert all(
        run.marks["demoting"] <= w.ended and w.started <= run.marks["promoted"]
        for w in run.writes
        if w.stage == "statement"
    ), summary
    first = run.first_on(standby.port, run.marks["promoted"])
    assert first is not None, summary
    assert first - run.marks["promoted"] < 1.5, summary  # bar 0.5 s; measured by bench/failover
    # nothing was written on the old primary after it turned read-only
    assert not [w for w in run.writes if w.port == primary.port and w.started > first], summary


@pytest.mark.parametrize("driver", DRIVERS)
async def test_plain_promotion_after_the_primary_stops(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str
) -> None:
    primary, standby = pg_primary_standby
    failover.prepare(primary)
    run = await failover.stop_then_promote(
        primary, standby, driver, FaultTolerantQueuePool, "ft"
    )
    summary = _summary(run)
    assert run.count("checkout") == 0 and run.hung == 0, summary
    assert run.failed_statements_per_worker() <= 1, summary  # in flight at the stop
    assert all(w.started <= run.marks["stopped"] for w in run.writes if w.stage != "ok"), summary
    assert all(w.ended >= run.marks["stopping"] for w in run.writes if w.stage != "ok"), summary
    assert run.first_on(standby.port, run.marks["promoted"]) is not None, summary


@pytest.mark.parametrize("driver", DRIVERS)
async def test_black_holed_first_host(
    pg_server: PostgresServer, fault_proxy: FaultProxy, driver: str
) -> None:
    failover.prepare(pg_server)
    run = await failover.blackholed_first_host(
        pg_server, fault_proxy, driver, FaultTolerantQueuePool, "ft", duration=4.0
    )
    summary = _summary(run)
    assert run.count("ok") > 0 and run.errors() == {} and run.hung == 0, summary
    first = run.first_on(pg_server.port)
    assert first is not None and first - run.started < 3.0, summary  # bar: 6 s (1 s better)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_pooled_connections_black_holed_mid_session(
    pg_server: PostgresServer, fault_proxy: FaultProxy, driver: str
) -> None:
    failover.prepare(pg_server)
    run = await failover.blackholed_pooled_connections(
        pg_server, fault_proxy, driver, FaultTolerantQueuePool, "ft", after=5.0
    )
    summary = _summary(run)
    blackholed = run.marks["blackholed"]
    early = [w for w in run.writes if w.stage != "ok" and w.ended < run.marks["blackholing"]]
    assert not early, (early, summary)
    assert run.count("checkout") == 0, summary
    # Workers think 1.2 s between requests, so each checkout pings (liveness_ping_after, 1 s),
    # the ping is cut at ping_timeout (2 s) and the checkout connects through the second host.
    # Only a statement in flight at the black hole fails (the application's own 3 s limit; then
    # psycopg spends about 10 s on its own cancellation): a few at most, one per worker.
    assert run.failed_statements_per_worker() <= 1 and run.hung <= 3, summary
    assert all(w.started <= blackholed for w in run.writes if w.stage != "ok"), summary
    assert run.longest_checkout() < 6.0, summary
    after = [w for w in run.writes if w.started > blackholed and w.stage == "ok"]
    assert len(after) >= WORKERS - 3, summary  # served again, through the second host


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_applications_own_read_only_transaction_invalidates_nothing(
    pg_server: PostgresServer, driver: str
) -> None:
    failover.prepare(pg_server)
    engine = create_async_engine(pg_server.url(driver), poolclass=FaultTolerantQueuePool)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
            await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            with pytest.raises(sa.exc.DBAPIError) as info:
                await conn.execute(sa.text(failover.WRITE))
            assert not info.value.connection_invalidated
        async with engine.begin() as conn:  # the same connection, still writable
            assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar() == pid
            await conn.execute(sa.text(failover.WRITE))
        assert engine.sync_engine.pool.stats().demotions == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_demotion_check_off_leaves_the_error_alone(
    pg_server: PostgresServer, driver: str
) -> None:
    failover.prepare(pg_server)
    engine = create_async_engine(
        pg_server.url(driver), poolclass=FaultTolerantQueuePool, demotion_check=False
    )
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(failover.WRITE))
        await asyncio.to_thread(pg_server.set_read_only, True)
        with pytest.raises(sa.exc.DBAPIError) as info:
            async with engine.begin() as conn:
                await conn.execute(sa.text(failover.WRITE))
        assert not info.value.connection_invalidated
        assert engine.sync_engine.pool.stats().demotions == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg_async", "psycopg"])
async def test_a_ping_that_gets_no_answer_is_cut_at_ping_timeout(
    pg_server: PostgresServer, fault_proxy: FaultProxy, flavour: str
) -> None:
    """A pooled connection idle past ``liveness_ping_after`` whose peer went silent: the ping is
    cut after ``ping_timeout`` and the checkout connects to the second host instead."""
    url = multi_host_url(flavour, [(fault_proxy.host, fault_proxy.port), pg_server])
    kw = dict(poolclass=FaultTolerantQueuePool, pool_size=1, max_overflow=0, ping_timeout=1.0)
    query = sa.text("SELECT inet_server_port()")
    if flavour == "psycopg":
        engine = sa.create_engine(url, **kw)

        def checkout() -> int:
            with engine.connect() as conn:
                return int(conn.execute(query).scalar_one())

        async def port() -> int:
            return await asyncio.to_thread(checkout)

        pool = engine.pool
    else:
        async_engine = create_async_engine(url, **kw)
        pool = async_engine.sync_engine.pool

        async def port() -> int:
            async with async_engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())

    try:
        assert await port() == pg_server.port  # through the proxy (the first host)
        assert fault_proxy.connections_accepted == 1
        await asyncio.sleep(1.2)  # idle past liveness_ping_after (1 s): the next checkout pings
        await asyncio.to_thread(fault_proxy.blackhole)
        started = time.monotonic()
        assert await port() == pg_server.port
        took = time.monotonic() - started
        assert 0.9 < took < 4.0, took  # the ping's 1 s, then the first look at each host
        assert pool.stats().ping_timeouts == 1 and pool.stats().retired_liveness == 1
    finally:
        if flavour == "psycopg":
            engine.dispose()
        else:
            await async_engine.dispose()

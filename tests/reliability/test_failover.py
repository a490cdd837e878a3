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
    run = await failover.demote_then_promote(
        primary, standby, driver, poolclass, "ft", warm=0.5, after=1.5
    )
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
        primary, standby, driver, FaultTolerantQueuePool, "ft", warm=0.5, after=1.5
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
        pg_server, fault_proxy, driver, FaultTolerantQueuePool, "ft", duration=3.0
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


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_demoted_idle_connection_is_not_lent(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str
) -> None:
    """Idle past ``liveness_ping_after``, the connection's ping shows its server read-only: it
    is replaced (and the pool with it) before the checkout, so not even one write fails."""
    primary, standby = pg_primary_standby
    failover.prepare(primary)
    engine = create_async_engine(
        multi_host_url(driver, [primary, standby]), poolclass=FaultTolerantQueuePool,
        pool_size=2, max_overflow=0,
    )  # fmt: skip
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text(failover.WRITE))).scalar_one() == primary.port
        await asyncio.to_thread(primary.set_read_only, True)
        await asyncio.to_thread(standby.promote)
        await asyncio.sleep(1.2)
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text(failover.WRITE))).scalar_one() == standby.port
        stats = engine.sync_engine.pool.stats()  # type: ignore[attr-defined]
        assert stats.demotions == 1 and stats.retired_liveness == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize("flavour", ["psycopg_async", "psycopg"])
async def test_libpq_url_form_with_a_black_holed_first_host(
    pg_server: PostgresServer, fault_proxy: FaultProxy, flavour: str
) -> None:
    """libpq's own multi-host form (``host=a,b&port=p,q``) is tried host by host too; libpq
    alone would give the silent first host its whole ``connect_timeout``."""
    await asyncio.to_thread(fault_proxy.blackhole)
    url = (
        f"postgresql+{flavour}://{pg_server.user}:{pg_server.password}@/{pg_server.dbname}"
        f"?host={fault_proxy.host},{pg_server.host}&port={fault_proxy.port},{pg_server.port}"
    )
    query = sa.text("SELECT inet_server_port()")
    started = time.monotonic()
    if flavour == "psycopg":
        engine = sa.create_engine(url, poolclass=FaultTolerantQueuePool)

        def scalar() -> int:
            with engine.connect() as conn:
                return int(conn.execute(query).scalar_one())

        try:
            assert await asyncio.to_thread(scalar) == pg_server.port
        finally:
            engine.dispose()
        limit = 4.5  # libpq waits at least 2 s per host (alone: the whole 5 s attempt limit)
    else:
        async_engine = create_async_engine(url, poolclass=FaultTolerantQueuePool)
        try:
            async with async_engine.connect() as conn:
                assert (await conn.execute(query)).scalar_one() == pg_server.port
        finally:
            await async_engine.dispose()
        limit = 2.5  # the first look at the silent host: 0.5 s (alone: 5 s)
    assert time.monotonic() - started < limit

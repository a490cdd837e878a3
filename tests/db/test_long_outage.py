"""The database stays down: one probe per pool, fail fast, recovery (issue 11's bar, shortened).

20 workers loop ``SELECT 1`` through a pool of 5 + 10 with the defaults except a shorter
``retry_deadline`` (2 s instead of 10 s, so fail-fast opens inside a 5 s outage and the test
stays short). Every connect goes through a :class:`FaultProxy`, which counts the connections that
reach the server side, refused ones included. The full bar (15 s outage, default deadline) is
measured by ``bench/fleet.py --bar``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fault_tolerant_pool import (
    DatabaseUnreachable,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
    TooManyWaiting,
)
from fault_tolerant_pool.testing import FaultProxy, PostgresServer
from tests.db.client import ASYNC_FLAVOURS, FLAVOURS, Client
from tests.reliability.harness import Load, Outcome, request, settle

pytestmark = [pytest.mark.anyio, pytest.mark.db]

WORKERS, DEADLINE, DOWN = 20, 2.0, 5.0


class LightLoad(Load):
    """A :class:`Load` that keeps no exception: ``error`` is True for a fail-fast refusal, else
    None. Thousands of kept tracebacks make the garbage collector pause the loop for seconds,
    which would be measured as the pool's slowness."""

    async def _work(self) -> None:
        while not self._stop.is_set():
            o = await request(self.client, self.sql)
            unreachable = isinstance(getattr(o.error, "orig", None), DatabaseUnreachable)
            self.outcomes.append(Outcome(o.started, o.ended, o.stage, unreachable or None))  # type: ignore[arg-type]
            del o
            await asyncio.sleep(self.pause)


@pytest.fixture
def proxy(pg_server: PostgresServer) -> Iterator[FaultProxy]:
    with FaultProxy(pg_server.host, pg_server.port) as proxy:
        yield proxy


def client_for(server: PostgresServer, proxy: FaultProxy, flavour: str, **kw: object) -> Client:
    return Client(
        server.url(flavour, port=proxy.port),
        flavour,
        poolclass=FaultTolerantQueuePool,
        pool_size=5,
        max_overflow=10,
        **{"retry_deadline": DEADLINE, **kw},
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_long_outage_one_probe_fail_fast_recovery(
    pg_server: PostgresServer, proxy: FaultProxy, flavour: str
) -> None:
    client = client_for(pg_server, proxy, flavour)
    async with LightLoad(client, WORKERS) as load:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(pg_server.stop, "fast")
        down_at, accepted_at_stop = time.monotonic(), proxy.connections_accepted
        await asyncio.sleep(DEADLINE + 0.5)
        deep_at, accepted_deep = time.monotonic(), proxy.connections_accepted
        await asyncio.sleep(DOWN - DEADLINE - 0.5)
        up_at, accepted_up = time.monotonic(), proxy.connections_accepted
        state_while_down = client.stats().connect_state
        await asyncio.to_thread(pg_server.start)
        assert pg_server.ready_at is not None
        ready_at = pg_server.ready_at
        await asyncio.sleep(2.0)
    stats = client.stats()
    rate = (accepted_up - accepted_at_stop) / (up_at - down_at)
    deep_rate = (accepted_up - accepted_deep) / (up_at - deep_at)
    durations = [o.duration for o in load.outcomes if o.ended > down_at]
    deep = load.select("checkout", since=deep_at, until=up_at - 0.2)
    firsts = [o.ended for o in load.outcomes if o.stage == "ok" and o.ended > ready_at]
    report = (
        f"{flavour}: {rate:.2f} connects/s reached the server while down "
        f"({accepted_up - accepted_at_stop} in {up_at - down_at:.1f}s), {deep_rate:.2f}/s "
        f"while failing fast; longest request "
        f"{max(durations):.2f}s; deep fail-fast median "
        f"{statistics.median(o.duration for o in deep) * 1000 if deep else float('nan'):.1f} ms "
        f"of {len(deep)}; first ok {(min(firsts) - ready_at) * 1000:.0f} ms after ready; "
        f"{load.outcomes.__len__()} requests, {stats}"
    )
    print("\n" + report)
    assert state_while_down == "failing_fast", report
    # One probe per pool, quick in the first seconds of a failure (a restart is noticed within
    # 0.2 s), then one attempt every 0.6 s: over a 15 s outage that averages about 2.6/s
    # (bench/fleet.py --bar); 20 callers retrying on their own made about 66/s.
    assert rate <= 6.0 and deep_rate <= 3.0, report
    assert max(durations) <= DEADLINE + 1.0, report
    assert deep and statistics.median(o.duration for o in deep) <= 0.1, report
    assert all(o.error is True for o in deep), report  # type: ignore[comparison-overlap]
    first_ok = min(firsts)
    assert first_ok - ready_at <= 1.0, report
    assert not [o for o in load.outcomes if o.started >= first_ok and o.stage != "ok"], report
    assert stats.connect_state == "healthy" and stats.outages >= 1, report
    assert stats.fast_failures > 0 and stats.checked_out == 0, report
    await client.dispose()


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg"])
async def test_fail_fast_off_waits_the_deadline_and_probes_once(
    pg_server: PostgresServer, proxy: FaultProxy, flavour: str
) -> None:
    """``fail_fast=False``: callers wait for the probe up to their deadline, then give up;
    the probe stays single."""
    client = client_for(pg_server, proxy, flavour, retry_deadline=1.0, fail_fast=False)
    await client.scalar()
    await asyncio.to_thread(pg_server.stop, "fast")
    before = proxy.connections_accepted
    started = time.monotonic()
    async with Load(client, WORKERS) as load:
        await asyncio.sleep(2.5)
    elapsed = time.monotonic() - started
    failed = load.select("checkout")
    print(f"\n{flavour}: {proxy.connections_accepted - before} connects in {elapsed:.1f}s, "
          f"{load.summary()}")  # fmt: skip
    assert client.stats().connect_state == "failing"
    assert (proxy.connections_accepted - before) / elapsed <= 12  # 20 callers, one probe
    assert failed and all(not isinstance(o.error.orig, DatabaseUnreachable) for o in failed)  # type: ignore[union-attr]
    # Nobody fails before its deadline; those holding a slot fail at it. The others waited for
    # a slot first (SQLAlchemy's queue, bounded by pool_timeout): the trade-off of fail_fast=False.
    durations = sorted(o.duration for o in failed)
    assert durations[0] >= 0.9 and durations[14] <= 1.5, durations
    await client.dispose()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll ``condition`` every 10 ms; the seconds it took (fails the test after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def gate_of(client: Client) -> Any:
    return client.pool._fault_tolerance.gate


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_crash_recovery_one_probe_through_the_starting_up_window(
    pg_server: PostgresServer, proxy: FaultProxy, flavour: str
) -> None:
    """Immediate stop (a crash: no checkpoint), started again at once: the server replays its
    WAL and answers 57P03 meanwhile. No checkout fails; the probe alone meets the window."""
    client = client_for(pg_server, proxy, flavour, retry_deadline=10)
    async with LightLoad(client, WORKERS) as load:
        await asyncio.sleep(1.0)
        crashed_at, before = time.monotonic(), proxy.connections_accepted
        await asyncio.to_thread(pg_server.stop, "immediate")
        await asyncio.to_thread(pg_server.start)
        assert pg_server.ready_at is not None
        ready_at, during = pg_server.ready_at, proxy.connections_accepted - before
        await asyncio.sleep(1.5)
    stats = client.stats()
    firsts = [o.ended for o in load.outcomes if o.stage == "ok" and o.ended > ready_at]
    report = (
        f"{flavour}: {during} connects reached the server in the {ready_at - crashed_at:.2f}s "
        f"from the crash to ready; first ok {(min(firsts) - ready_at) * 1000:.0f} ms after; "
        f"{load.summary()} {stats}"
    )
    print("\n" + report)
    assert load.select("checkout") == [], report
    assert len(load.select("statement")) <= WORKERS, report  # only those in flight
    # the healthy limit (4 at a time) meets the crash, then one probe every 0.14-0.2 s
    assert during <= 4 + 12 * (ready_at - crashed_at) + 2, report
    assert min(firsts) - ready_at <= 1.0, report
    assert stats.outages >= 1 and stats.checked_out == 0, report
    await client.dispose()


@pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
async def test_a_cancelled_probe_owner_hands_the_probe_on(
    pg_server: PostgresServer, proxy: FaultProxy, flavour: str
) -> None:
    """The probe's owner is cancelled in the middle of its attempt: the caller waiting for it
    becomes the probe at once and connects when the server answers; nothing leaks."""
    client = client_for(pg_server, proxy, flavour, retry_deadline=8, retry_attempt_timeout=0.5)
    await client.scalar()
    await client.dispose()  # nothing pooled: the next checkouts connect
    gate = gate_of(client)
    proxy.blackhole()  # every attempt hangs until its 0.5 s limit: the pool is failing
    owner = asyncio.create_task(client.scalar())
    await until(lambda: gate.state == "failing")
    await until(lambda: gate._in_flight == 1)  # the owner's probe is in the black hole
    waiter = asyncio.create_task(client.scalar())
    await until(lambda: client.stats().waiting == 1 and gate._in_flight == 1)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    handed_on = await until(lambda: client.stats().waiting == 0 and gate._in_flight == 1, 1.0)
    proxy.healthy()
    assert await asyncio.wait_for(waiter, 5.0) == 1
    print(f"\n{flavour}: the waiter took the probe {handed_on * 1000:.0f} ms after the cancel")
    assert handed_on < 0.2
    assert client.stats().checked_out == 0 and client.stats().connect_state == "healthy"
    await client.dispose()
    assert await settle(pg_server.backend_count, 0) == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_max_waiting_refuses_a_checkout_at_once(
    pg_server: PostgresServer, flavour: str
) -> None:
    """``max_waiting=2`` with one slot held: two callers wait for it, the third is refused at
    once with ``TooManyWaiting``; the two get the slot in turn."""
    client = Client(
        pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool, pool_size=1,
        max_overflow=0, max_waiting=2, pool_timeout=10,
    )  # fmt: skip
    if client.async_engine is not None:
        held: Any = await client.async_engine.connect()
    else:
        held = await asyncio.to_thread(client.engine.connect)
    waiting = [asyncio.create_task(client.scalar()) for _ in range(2)]
    await until(lambda: client.stats().waiting == 2)
    started = time.monotonic()
    with pytest.raises(TooManyWaiting, match="max_waiting=2"):
        await client.scalar()
    assert time.monotonic() - started < 0.5
    await (held.close() if client.async_engine is not None else asyncio.to_thread(held.close))
    assert await asyncio.wait_for(asyncio.gather(*waiting), 10) == [1, 1]
    stats = client.stats()
    assert (stats.waiting, stats.rejected_waiting, stats.checked_out) == (0, 1, 0)
    await client.dispose()


@pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
async def test_max_waiting_counts_the_callers_waiting_for_the_probe(
    pg_server: PostgresServer, proxy: FaultProxy, flavour: str
) -> None:
    client = Client(
        pg_server.url(flavour, port=proxy.port), flavour, poolclass=FaultTolerantNullPool,
        max_waiting=1, retry_deadline=8, retry_attempt_timeout=0.5,
    )  # fmt: skip
    await client.scalar()
    gate = gate_of(client)
    proxy.blackhole()
    owner = asyncio.create_task(client.scalar())
    await until(lambda: gate.state == "failing" and gate._in_flight == 1)
    waiter = asyncio.create_task(client.scalar())
    await until(lambda: client.stats().waiting == 1)
    with pytest.raises(TooManyWaiting, match="the connect probe"):
        await client.scalar()
    proxy.healthy()
    assert await asyncio.wait_for(asyncio.gather(owner, waiter), 10) == [1, 1]
    assert client.stats().rejected_waiting == 1
    await client.dispose()

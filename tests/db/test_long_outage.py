"""The database stays down: one probe per pool, fail fast, recovery (issue 11's bar, shortened).

20 workers loop ``SELECT 1`` through a pool of 5 + 10 with the defaults except a shorter
``retry_deadline`` (2.5 s instead of 10 s, so fail-fast opens inside a 6 s outage and the test
stays short). Every connect goes through a :class:`FaultProxy`, which counts the connections that
reach the server side, refused ones included. The full bar (15 s outage, default deadline) is
measured by ``bench/fleet.py --bar``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import pytest

from fault_tolerant_pool import DatabaseUnreachable, FaultTolerantQueuePool
from fault_tolerant_pool.testing import FaultProxy, PostgresServer
from tests.db.client import FLAVOURS, Client
from tests.reliability.harness import Load, Outcome, request

pytestmark = [pytest.mark.anyio, pytest.mark.db]

WORKERS, DEADLINE, DOWN = 20, 2.5, 6.0


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
    # The probe is quick in the first seconds of a failure (a restart is noticed within 0.2 s),
    # then slows to one attempt every 0.75 s: over a 15 s outage that averages about 2.5/s.
    assert rate <= 5.0 and deep_rate <= 2.0, report
    assert max(durations) <= DEADLINE + 1.0, report
    assert deep and statistics.median(o.duration for o in deep) <= 0.1, report
    assert all(o.error is True for o in deep), report  # type: ignore[comparison-overlap]
    first_ok = min(firsts)
    assert first_ok - ready_at <= 1.0, report
    assert not [o for o in load.outcomes if o.started >= first_ok and o.stage != "ok"], report
    assert stats.connect_state == "healthy" and stats.outages >= 1, report
    assert stats.fast_failures > 0 and stats.checked_out == 0, report
    await client.dispose()


@pytest.mark.parametrize("flavour", FLAVOURS)
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
        await asyncio.sleep(3.0)
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

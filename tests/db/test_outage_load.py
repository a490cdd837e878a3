"""The bar of the base issue: 20 workers looping SELECT 1 ride through a 2-second outage."""

from __future__ import annotations

import asyncio
import time

import pytest

from fault_tolerant_pool.testing import PostgresServer

from .client import FLAVOURS, POOLS, Client

pytestmark = [pytest.mark.anyio, pytest.mark.db]

WORKERS = 20
STOP_AT, DOWN_FOR, RUN_FOR = 1.0, 2.0, 4.5


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("poolclass", POOLS, ids=lambda p: p.__name__)
async def test_two_second_outage_under_load(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    client = Client(
        pg_server.url(flavour), flavour, poolclass=poolclass,  # defaults: liveness check on
        retry_deadline=10,
    )  # fmt: skip
    counts = {"ok": 0, "failed_checkouts": 0, "failed_statements": 0}
    started = time.monotonic()

    async def worker() -> None:
        while time.monotonic() - started < RUN_FOR:
            checked_out, executed = await client.checkout_then("SELECT 1")
            if not checked_out:
                counts["failed_checkouts"] += 1
            elif not executed:
                counts["failed_statements"] += 1
            else:
                counts["ok"] += 1

    async def outage() -> None:
        await asyncio.sleep(STOP_AT)
        await asyncio.to_thread(pg_server.stop, "fast")
        await asyncio.sleep(DOWN_FOR)
        await asyncio.to_thread(pg_server.start)

    await asyncio.gather(outage(), *(worker() for _ in range(WORKERS)))
    stats = client.stats()
    print(f"\n{flavour} {poolclass.__name__}: {counts} {stats}")
    assert counts["failed_checkouts"] == 0
    # Only statements in flight at the stop may fail: at most one per worker.
    assert counts["failed_statements"] <= WORKERS
    assert counts["ok"] > 100
    assert stats.failed_attempts > 0 and stats.give_ups == 0
    assert stats.checked_out == 0
    await client.dispose()

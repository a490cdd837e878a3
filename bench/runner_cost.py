"""What the transaction runner costs on the happy path, against stock SQLAlchemy, in one run.

A unit of work is one INSERT of one row in one transaction, the smallest write there is, so the
runner's own work shows at its largest. Setups, each an engine of its own kept for the whole run,
taking turns in short batches (``--batch`` units by 10 tasks, pool of 10) in a shuffled order:

- ``stock``: ``AsyncAdaptedQueuePool``, ``async with engine.begin()``;
- ``pool``: ``FaultTolerantQueuePool`` (its defaults), ``async with engine.begin()``;
- ``runner_no_resolve``: the pool, ``run_transaction_async(..., resolve_outcome=False)``;
- ``runner``: the pool, ``run_transaction_async`` with its defaults (the transaction's id noted
  before COMMIT: one more round trip, so that a COMMIT cut in flight can be settled).

For each setup the median wall time per unit and its throughput against stock's (stock's time
divided by the setup's, median over the rounds of the per-round ratio).

    .venv/bin/python bench/runner_cost.py [--rounds 60] [--batch 200] [--drivers asyncpg,psycopg]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool, run_transaction_async
from fault_tolerant_pool.testing import PostgresServer

TASKS = 10
INSERT = sa.text("INSERT INTO runner_cost (body) VALUES ('x')")

Unit = Callable[[AsyncEngine], Awaitable[None]]


async def write(connection: AsyncConnection) -> None:
    await connection.execute(INSERT)


async def with_begin(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await write(connection)


async def with_runner(engine: AsyncEngine) -> None:
    await run_transaction_async(engine, write)


async def with_runner_no_resolve(engine: AsyncEngine) -> None:
    await run_transaction_async(engine, write, resolve_outcome=False)


SETUPS: dict[str, tuple[type, Unit]] = {
    "stock": (AsyncAdaptedQueuePool, with_begin),
    "pool": (FaultTolerantQueuePool, with_begin),
    "runner_no_resolve": (FaultTolerantQueuePool, with_runner_no_resolve),
    "runner": (FaultTolerantQueuePool, with_runner),
}


async def timed_batch(engine: AsyncEngine, unit: Unit, units: int) -> float:
    """Seconds per unit, ``units`` run by :data:`TASKS` tasks."""
    share = units // TASKS

    async def task() -> None:
        for _ in range(share):
            await unit(engine)

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(TASKS)))
    return (time.perf_counter() - started) / (share * TASKS)


async def measure(url: str, rounds: int, units: int, rng: random.Random) -> dict[str, list[float]]:
    engines: dict[str, Any] = {
        name: create_async_engine(url, poolclass=pool, pool_size=TASKS, max_overflow=0)
        for name, (pool, _) in SETUPS.items()
    }
    async with engines["stock"].begin() as connection:
        await connection.execute(sa.text("DROP TABLE IF EXISTS runner_cost"))
        await connection.execute(sa.text("CREATE TABLE runner_cost (id serial, body text)"))
    for name, (_, unit) in SETUPS.items():  # warm: every connection made, statements prepared
        await timed_batch(engines[name], unit, units)
    seconds: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(rounds):
        order = list(SETUPS.items())
        rng.shuffle(order)
        for name, (_, unit) in order:
            seconds[name].append(await timed_batch(engines[name], unit, units))
    for engine in engines.values():
        await engine.dispose()
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    args = parser.parse_args()
    rng = random.Random(7)
    with PostgresServer(max_connections=100) as server:
        for driver in args.drivers.split(","):
            flavour = "asyncpg" if driver == "asyncpg" else "psycopg_async"
            seconds = await measure(server.url(flavour), args.rounds, args.batch, rng)
            print(f"\n{driver}: {TASKS} tasks, {args.rounds} rounds of {args.batch} units")
            print(f"{'setup':20} {'µs/unit':>9} {'throughput vs stock':>20}")
            for name in SETUPS:
                ratios = [s / m for s, m in zip(seconds["stock"], seconds[name], strict=True)]
                print(
                    f"{name:20} {statistics.median(seconds[name]) * 1e6:9.1f} "
                    f"{statistics.median(ratios):20.3f}"
                )


if __name__ == "__main__":
    asyncio.run(main())

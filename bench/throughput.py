"""Happy-path cost of the fault-tolerant pool, side by side with stock SQLAlchemy in one run.

Measures, for asyncpg and psycopg (async):
- throughput: 50 tasks looping ``SELECT 1`` for a fixed time, ops/s;
- a bare checkout + checkin cycle (no statement), µs per cycle.
Stock and fault-tolerant runs alternate, several rounds each, and the medians are compared.

    .venv/bin/python bench/throughput.py [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import greenlet_spawn

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

TASKS = 50
CYCLES = 5000


async def throughput(engine: AsyncEngine, seconds: float, tasks: int = TASKS) -> float:
    stop = time.perf_counter() + seconds
    done = 0
    select = sa.text("SELECT 1")

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with engine.connect() as conn:
                await conn.execute(select)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done / (time.perf_counter() - started)


async def cycle_us(engine: AsyncEngine) -> float:
    """The pool's own cost: checkout + checkin of an existing connection, no statement."""
    pool: Any = engine.sync_engine.pool
    async with engine.connect():
        pass

    def run() -> float:
        started = time.perf_counter()
        for _ in range(CYCLES):
            pool.connect().close()
        return (time.perf_counter() - started) / CYCLES * 1e6

    return float(await greenlet_spawn(run))


async def engine_cycle_us(engine: AsyncEngine) -> float:
    """The same through the engine, as an application does it (``async with engine.connect()``)."""
    started = time.perf_counter()
    for _ in range(CYCLES // 5):
        async with engine.connect():
            pass
    return (time.perf_counter() - started) / (CYCLES // 5) * 1e6


def make(url: str, poolclass: type, **kw: Any) -> AsyncEngine:
    # A fixed pool (no overflow): with overflow, 50 tasks keep closing and reopening connections
    # and the figure measures connects, not the pool.
    return create_async_engine(url, poolclass=poolclass, pool_size=10, max_overflow=0, **kw)


async def measure(
    label: str, url: str, rounds: int, seconds: float, extra: dict[str, Any]
) -> list[tuple[str, float, float, float]]:
    setups: dict[str, Callable[[], AsyncEngine]] = {
        "stock": lambda: make(url, AsyncAdaptedQueuePool, **extra),
        "fault_tolerant": lambda: make(url, FaultTolerantQueuePool, **extra),
    }
    results: dict[str, dict[str, list[float]]] = {
        k: {"ops": [], "cycle": [], "engine_cycle": []} for k in setups
    }
    for round_ in range(rounds):
        order = list(setups.items())
        if round_ % 2:  # alternate who goes first: drift of the machine cancels out
            order.reverse()
        for name, factory in order:
            engine = factory()
            await throughput(engine, 0.3)  # warm up: open the connections
            results[name]["ops"].append(await throughput(engine, seconds))
            results[name]["cycle"].append(await cycle_us(engine))
            results[name]["engine_cycle"].append(await engine_cycle_us(engine))
            await engine.dispose()
    names = {
        "ops": "throughput (ops/s)",
        "cycle": "pool checkout+checkin (µs)",
        "engine_cycle": "engine.connect() cycle (µs)",
    }
    rows = []
    for key, title in names.items():
        stock = statistics.median(results["stock"][key])
        ft = statistics.median(results["fault_tolerant"][key])
        rows.append((f"{label} {title}", stock, ft, ft / stock))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float]] = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            rows += await measure(driver, server.url(driver), args.rounds, args.seconds, {})
    print(f"{'measure':40} {'stock':>10} {'fault_tol':>10} {'ratio':>7}")
    for name, stock, ft, ratio in rows:
        print(f"{name:40} {stock:10.1f} {ft:10.1f} {ratio:7.3f}")


if __name__ == "__main__":
    asyncio.run(main())

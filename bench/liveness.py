"""Cost of checking connections at checkout, side by side in one run, against stock SQLAlchemy.

Three setups on the same server, rounds alternating, medians compared:
- ``stock_pre_ping``: ``AsyncAdaptedQueuePool`` with ``pool_pre_ping=True`` (a round trip per
  checkout);
- ``stock_none``: ``AsyncAdaptedQueuePool`` with no check at all;
- ``liveness``: ``FaultTolerantQueuePool`` with its defaults (liveness check without a round
  trip, a ping only after 1 s of idleness; no ``pool_pre_ping``).

Measured for asyncpg and psycopg (async): throughput of ``--tasks`` tasks looping ``SELECT 1``
through a pool of 10 without overflow (``--pool-size``, ``--max-overflow``: overflow
connections are closed and reopened all the time under 50 tasks, which would measure connects,
not checkouts) in ops/s, and a bare checkout + checkin cycle (µs). The bar:
``liveness`` at least 1.3x ``stock_pre_ping`` and at least 0.95x ``stock_none`` in throughput.

    .venv/bin/python bench/liveness.py [--rounds 5] [--seconds 2] [--tasks 50] [--pool-size 10]
        [--max-overflow 0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import cycle_us, throughput

SETUPS = ("stock_pre_ping", "stock_none", "liveness")


def factories(url: str, pool_size: int, max_overflow: int) -> dict[str, Callable[[], AsyncEngine]]:
    common: dict[str, Any] = {"pool_size": pool_size, "max_overflow": max_overflow}
    return {
        "stock_pre_ping": lambda: create_async_engine(
            url, poolclass=AsyncAdaptedQueuePool, pool_pre_ping=True, **common
        ),
        "stock_none": lambda: create_async_engine(url, poolclass=AsyncAdaptedQueuePool, **common),
        "liveness": lambda: create_async_engine(url, poolclass=FaultTolerantQueuePool, **common),
    }


async def measure(
    label: str, url: str, args: argparse.Namespace
) -> list[tuple[str, dict[str, float]]]:
    results: dict[str, dict[str, list[float]]] = {k: {"ops": [], "cycle": []} for k in SETUPS}
    for round_ in range(args.rounds):
        order = list(factories(url, args.pool_size, args.max_overflow).items())
        if round_ % 2:  # alternate who goes first: drift of the machine cancels out
            order.reverse()
        for name, factory in order:
            engine = factory()
            await throughput(engine, 0.3, args.tasks)  # warm up: open the connections
            results[name]["ops"].append(await throughput(engine, args.seconds, args.tasks))
            results[name]["cycle"].append(await cycle_us(engine))
            await engine.dispose()
    ops = {name: statistics.median(values["ops"]) for name, values in results.items()}
    cycle = {name: statistics.median(values["cycle"]) for name, values in results.items()}
    return [(f"{label} throughput (ops/s)", ops), (f"{label} checkout+checkin (µs)", cycle)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--max-overflow", type=int, default=0)
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            rows += await measure(driver, server.url(driver), args)
    print(
        f"{'measure':30} {'stock_pre_ping':>15} {'stock_none':>11} {'liveness':>9} "
        f"{'vs pre_ping':>12} {'vs none':>8}"
    )
    for name, values in rows:
        ours, pre, none = values["liveness"], values["stock_pre_ping"], values["stock_none"]
        print(
            f"{name:30} {pre:15.1f} {none:11.1f} {ours:9.1f} {ours / pre:12.3f} {ours / none:8.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())

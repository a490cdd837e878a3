"""Where the fault-tolerant pool's happy-path cost is, setting by setting, in one process.

One engine per setup, kept for the whole run; the setups take turns in short batches (100
operations of ``async with engine.connect()`` + ``SELECT 1`` by 10 tasks, pool of 10) in a shuffled
order, many rounds. For each batch, the process's CPU time per operation (the event loop is
saturated: throughput follows it); the figure is stock's CPU per operation divided by the
setup's, median over the rounds, with a 95 % bootstrap interval of the median. ``stock_again``
(a second stock engine) shows what the method reads for no difference: each engine has a lasting
speed of its own of about ±2 % (its server sessions, where its objects sit in memory), so a
difference smaller than that needs ``bench/leak.py`` (fresh engines every round) to be believed.

    .venv/bin/python bench/checkout_cost.py [--rounds 250] [--tasks 10] [--driver asyncpg]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from leak import batch
from throughput import make

BATCH = 100
SETUPS: dict[str, tuple[type, dict[str, Any]]] = {
    "stock": (AsyncAdaptedQueuePool, {}),
    "stock_again": (AsyncAdaptedQueuePool, {}),
    "fault_tolerant": (FaultTolerantQueuePool, {}),
    "no_liveness_check": (FaultTolerantQueuePool, {"liveness_check": False}),
    "leak_30": (FaultTolerantQueuePool, {"leak_threshold": 30}),
}


async def cpu_per_operation(engine: AsyncEngine, tasks: int, operations: int) -> float:
    _, cpu = await batch(engine, operations, tasks)
    return cpu / operations * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=250)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--driver", default="asyncpg", choices=("asyncpg", "psycopg"))
    args = parser.parse_args()
    rng = random.Random(7)
    with PostgresServer(max_connections=200) as server:
        url = server.url(args.driver)
        engines = {name: make(url, pool, **kw) for name, (pool, kw) in SETUPS.items()}
        for engine in engines.values():
            await cpu_per_operation(engine, args.tasks, 3 * BATCH)
        cpu: dict[str, list[float]] = {name: [] for name in SETUPS}
        for _ in range(args.rounds):
            order = list(engines.items())
            rng.shuffle(order)
            for name, engine in order:
                cpu[name].append(await cpu_per_operation(engine, args.tasks, BATCH))
        for engine in engines.values():
            await engine.dispose()
    print(f"{args.driver}, {args.tasks} tasks, {args.rounds} rounds of {BATCH} operations")
    print(f"{'setup':20} {'CPU µs/op':>10} {'stock / setup':>14} {'95 % interval':>16}")
    for name in SETUPS:
        ratios = [stock / mine for stock, mine in zip(cpu["stock"], cpu[name], strict=True)]
        medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        print(
            f"{name:20} {statistics.median(cpu[name]):10.1f} {statistics.median(ratios):14.3f}"
            f"   [{medians[50]:.3f}, {medians[1949]:.3f}]"
        )


if __name__ == "__main__":
    asyncio.run(main())

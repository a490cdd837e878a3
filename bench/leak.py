"""The cost of leak detection, side by side with stock SQLAlchemy in one run.

Four setups, for asyncpg and psycopg (async):
- ``stock``: SQLAlchemy's ``AsyncAdaptedQueuePool``;
- ``stock_again``: the same, a second engine: what the method reads for no difference at all;
- ``fault_tolerant``: ``FaultTolerantQueuePool`` with its defaults (leak detection off);
- ``leak_30``: ``FaultTolerantQueuePool`` with ``leak_threshold=30`` (every checkout notes its
  time, holder and stack; a watcher per pool).

The workload is the pool's worst case: 50 tasks looping ``async with engine.connect()`` +
``SELECT 1`` through a pool of 10, so the pool's own work is as large a share of each operation
as it can be. This machine's noise is larger than the differences measured, so the method is
built to cancel it:

- every round makes a fresh engine per setup (each engine has its own server sessions, and its
  own lasting speed: two stock engines differ by up to 2 %), and the rounds are many;
- within a round the setups take turns in short batches (200 operations, a tenth of a second),
  in a shuffled order, so a slow moment of the machine falls on all of them;
- a round's figure for a setup is its operations per second over all its batches (and its CPU
  time per operation: the event loop is saturated, so throughput follows it), divided by
  stock's in the same round; the summary is the median over the rounds, with a 95 % bootstrap
  interval of that median and the lowest and highest round.

    .venv/bin/python bench/leak.py [--rounds 12] [--batches 6] [--verbose]

The bar (issue 12): ``leak_30`` at least 0.95 of stock in throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import TASKS, make

SETUPS = ("stock", "stock_again", "fault_tolerant", "leak_30")
BATCH = 200  # operations per batch

Summary = tuple[float, float, float, float, float]  # median, interval low, high, lowest, highest


async def batch(engine: AsyncEngine, operations: int, tasks: int = TASKS) -> tuple[float, float]:
    """Wall and CPU seconds of ``operations`` checkouts + ``SELECT 1`` by ``tasks`` tasks."""
    select = sa.text("SELECT 1")
    left = operations

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with engine.connect() as conn:
                await conn.execute(select)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(ratios: list[float], rng: random.Random) -> Summary:
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return (
        statistics.median(ratios), medians[50], medians[1949], min(ratios), max(ratios),
    )  # fmt: skip


async def measure(
    url: str, rounds: int, batches: int, rng: random.Random, verbose: bool
) -> dict[str, dict[str, list[float]]]:
    """Per setup: its throughput and CPU-per-operation ratios to stock, one per round."""
    factories: dict[str, Callable[[], AsyncEngine]] = {
        "stock": lambda: make(url, AsyncAdaptedQueuePool),
        "stock_again": lambda: make(url, AsyncAdaptedQueuePool),
        "fault_tolerant": lambda: make(url, FaultTolerantQueuePool),
        "leak_30": lambda: make(url, FaultTolerantQueuePool, leak_threshold=30),
    }
    ratios: dict[str, dict[str, list[float]]] = {
        name: {"throughput": [], "cpu": []} for name in SETUPS
    }
    for round_ in range(rounds):
        engines = {name: factory() for name, factory in factories.items()}
        for engine in engines.values():  # open the connections, warm the caches
            await batch(engine, BATCH)
        wall = dict.fromkeys(SETUPS, 0.0)
        cpu = dict.fromkeys(SETUPS, 0.0)
        for _ in range(batches):
            order = list(SETUPS)
            rng.shuffle(order)
            for name in order:
                spent, used = await batch(engines[name], BATCH)
                wall[name] += spent
                cpu[name] += used
        for engine in engines.values():
            await engine.dispose()
        for name in SETUPS:
            ratios[name]["throughput"].append(wall["stock"] / wall[name])
            ratios[name]["cpu"].append(cpu[name] / cpu["stock"])
        if verbose:
            ops = {name: round(batches * BATCH / wall[name]) for name in SETUPS}
            print(f"  round {round_ + 1}: ops/s {ops}", flush=True)
    return ratios


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, default=6, help="batches per setup per round")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    rng = random.Random(12)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    started = time.perf_counter()
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            results[driver] = await measure(
                server.url(driver), args.rounds, args.batches, rng, args.verbose
            )
    print(
        f"\n{args.rounds} rounds x {args.batches} batches of {BATCH} operations per setup, "
        f"{TASKS} tasks, pool of 10 ({time.perf_counter() - started:.0f} s)"
    )
    print("median over the rounds [95 % interval of the median] (lowest, highest round)\n")
    print(f"{'vs stock':28} " + " ".join(f"{name:>26}" for name in SETUPS[1:]))
    for driver, ratios in results.items():
        for measure_, title in (("throughput", "throughput"), ("cpu", "CPU per operation")):
            cells = []
            for name in SETUPS[1:]:
                med, low, high, lowest, highest = summary(ratios[name][measure_], rng)
                cells.append(f"{med:.3f} [{low:.3f},{high:.3f}] ({lowest:.2f},{highest:.2f})")
            print(f"{driver + ' ' + title:28} " + " ".join(f"{cell:>26}" for cell in cells))
    print()
    for driver, ratios in results.items():
        leak = statistics.median(ratios["leak_30"]["throughput"])
        verdict = "meets" if leak >= 0.95 else "misses"
        print(f"{driver}: throughput leak_30 / stock = {leak:.3f} ({verdict} the 0.95 bar)")


if __name__ == "__main__":
    asyncio.run(main())

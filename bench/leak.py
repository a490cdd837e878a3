"""The cost of leak detection, side by side with stock SQLAlchemy in one run.

Three setups, for asyncpg and psycopg (async), every round running each once, in an order that
rotates from round to round:
- ``stock``: SQLAlchemy's ``AsyncAdaptedQueuePool``;
- ``fault_tolerant``: ``FaultTolerantQueuePool`` with its defaults (leak detection off);
- ``leak_30``: ``FaultTolerantQueuePool`` with ``leak_threshold=30`` (every checkout notes its
  time, holder and stack; a watcher per pool).

Measures throughput (50 tasks looping ``SELECT 1`` through a pool of 10, ops/s), the CPU time of
this process per operation during that run (µs: the event loop is saturated, so this is what the
throughput ratio reflects, without the time the machine gave to other processes) and the cost of
one ``async with engine.connect()`` with no statement (µs, best of the rounds). Ratios are taken
round by round against the ``stock`` run of the same round (paired: the machine's drift between
rounds cancels out) and summarised by their median, with the lowest and highest. The bar:
``leak_30`` at least 0.95 of stock in throughput.

    .venv/bin/python bench/leak.py [--rounds 10] [--seconds 1.5] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import engine_cycle_us, make, throughput

SETUPS = ("stock", "fault_tolerant", "leak_30")

Row = tuple[str, dict[str, float], dict[str, tuple[float, float, float]]]


def _cpu_seconds() -> float:
    """CPU time of this process (every thread): what the saturated event loop spends."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(label: str, url: str, rounds: int, seconds: float, verbose: bool) -> list[Row]:
    factories: dict[str, Callable[[], AsyncEngine]] = {
        "stock": lambda: make(url, AsyncAdaptedQueuePool),
        "fault_tolerant": lambda: make(url, FaultTolerantQueuePool),
        "leak_30": lambda: make(url, FaultTolerantQueuePool, leak_threshold=30),
    }
    ops: dict[str, list[float]] = {name: [] for name in SETUPS}
    cycle: dict[str, list[float]] = {name: [] for name in SETUPS}
    cpu_per_op: dict[str, list[float]] = {name: [] for name in SETUPS}
    for round_ in range(rounds):
        shift = round_ % len(SETUPS)  # rotate who goes first: drift of the machine cancels out
        for name in SETUPS[shift:] + SETUPS[:shift]:
            engine = factories[name]()
            await throughput(engine, 0.3)  # warm up: open the connections
            cpu_before = _cpu_seconds()
            ops_per_s = await throughput(engine, seconds)
            cpu_per_op[name].append((_cpu_seconds() - cpu_before) / (ops_per_s * seconds) * 1e6)
            ops[name].append(ops_per_s)
            cycle[name].append(await engine_cycle_us(engine))
            await engine.dispose()

    def paired(values: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
        summary = {}
        for name, base in (("fault_tolerant", "stock"), ("leak_30", "stock"),
                           ("leak_vs_ft", "fault_tolerant")):  # fmt: skip
            ours = values["leak_30" if name == "leak_vs_ft" else name]
            ratios = [mine / theirs for mine, theirs in zip(ours, values[base], strict=True)]
            summary[name] = (statistics.median(ratios), min(ratios), max(ratios))
        return summary

    if verbose:
        for name, values in ops.items():
            print(f"{label} {name} ops/s by round: {[round(value) for value in values]}")
    best_cycle = {name: min(values) for name, values in cycle.items()}
    return [
        (
            f"{label} throughput (ops/s)",
            {name: statistics.median(values) for name, values in ops.items()},
            paired(ops),
        ),
        (
            f"{label} CPU per op (µs)",
            {name: statistics.median(values) for name, values in cpu_per_op.items()},
            paired(cpu_per_op),
        ),
        (
            f"{label} engine.connect+close (µs)",
            best_cycle,
            {
                "fault_tolerant": (best_cycle["fault_tolerant"] / best_cycle["stock"],) * 3,
                "leak_30": (best_cycle["leak_30"] / best_cycle["stock"],) * 3,
                "leak_vs_ft": (best_cycle["leak_30"] / best_cycle["fault_tolerant"],) * 3,
            },
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            rows += await measure(
                driver, server.url(driver), args.rounds, args.seconds, args.verbose
            )
    print(f"\n{'measure':36} " + " ".join(f"{name:>16}" for name in SETUPS))
    for title, values, _ in rows:
        print(f"{title:36} " + " ".join(f"{values[name]:16.1f}" for name in SETUPS))
    print("\nvs stock, paired by round: median [lowest, highest]")
    for title, _, ratios in rows:
        cells = ["1".rjust(16)] + [
            f"{ratios[name][0]:.3f} [{ratios[name][1]:.2f},{ratios[name][2]:.2f}]".rjust(16)
            for name in SETUPS[1:]
        ]
        print(f"{title:36} " + " ".join(cells))
    print("\nleak_30 vs fault_tolerant (what the leak detection itself costs), paired medians:")
    for title, _, ratios in rows:
        low, high = ratios["leak_vs_ft"][1:]
        print(f"{title:36} {ratios['leak_vs_ft'][0]:16.3f} [{low:.2f},{high:.2f}]")
    print()
    for title, _, ratios in rows:
        if "throughput" in title:
            verdict = "meets" if ratios["leak_30"][0] >= 0.95 else "misses"
            print(f"{title}: leak_30 / stock = {ratios['leak_30'][0]:.3f} ({verdict} the 0.95 bar)")


if __name__ == "__main__":
    asyncio.run(main())

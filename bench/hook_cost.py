"""What each of the pool's hooks costs inside a busy event loop, in microseconds per checkout.

``bench/checkout_cost.py`` and ``bench/leak.py`` say how much slower a setting makes the whole
operation; this script says where that time goes. One engine (``FaultTolerantQueuePool`` with
its defaults and ``leak_threshold=30``), 10 tasks looping ``async with engine.connect()`` +
``SELECT 1`` through a pool of 10, and a ``perf_counter`` pair around each hook of the pool's:

- ``leak checked_out`` / ``leak checked_in``: the leak tracker's note of the checkout (the task,
  the walk of the checkout site) and its removal;
- ``upkeep checkout`` / ``upkeep checkin``: lifetime, idleness and the liveness check (with the
  probe's look at the socket, timed on its own too: ``socket poll``, ``driver closed flag``).

A hook's figure includes the timing itself: ``timed empty call`` is a function that does
nothing, timed the same way at the same place (just before the leak tracker's note), what to
take off each figure; ``upkeep checkout`` includes the probe's two looks with their own timers.
Each repeat is 5,000 operations; printed: the lowest and the median over the repeats, and the
operation's CPU time for scale (the timers make it slower than without them). Inside the loop
everything costs several times what ``python -m timeit`` shows (the rest of an operation
evicts the pool's code and data from the caches), so these are the figures that add up to the
ratios.

    .venv/bin/python bench/hook_cost.py [--repeats 8] [--driver asyncpg]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fault_tolerant_pool import FaultTolerantQueuePool, leaks, upkeep
from fault_tolerant_pool.testing import PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from leak import batch
from throughput import make

OPERATIONS = 5000
TASKS = 10
spent: dict[str, float] = {}


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    clock = time.perf_counter

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + clock() - started

    return wrapper


def time_the_hooks() -> None:
    """Wrap the hooks (in this process only), the probe's two looks too."""
    tracker = leaks.LeakTracker
    original_checked_out = tracker.checked_out
    empty_call = timed("timed empty call", lambda: None)

    def checked_out(self: Any, record: Any, fairy_ref: Any, depth: int = 1) -> None:
        empty_call()
        original_checked_out(self, record, fairy_ref, depth + 2)  # the site is the same

    tracker.checked_out = timed("leak checked_out", checked_out)  # type: ignore[method-assign]
    tracker.checked_in = timed("leak checked_in", tracker.checked_in)  # type: ignore[method-assign]
    keeper = upkeep.Upkeep
    keeper.checkout = timed("upkeep checkout", keeper.checkout)  # type: ignore[method-assign]
    keeper.checkin = timed("upkeep checkin", keeper.checkin)  # type: ignore[method-assign]
    original_connected = keeper.connected

    def connected(self: Any, record: Any, driver_connection: Any) -> None:
        original_connected(self, record, driver_connection)
        probe = record.notes.probe
        if probe is not None:
            probe.closed = timed("driver closed flag", probe.closed)
            probe.readable = timed("socket poll", probe.readable)

    keeper.connected = connected  # type: ignore[method-assign]


async def measure(url: str, repeats: int) -> dict[str, list[float]]:
    engine = make(url, FaultTolerantQueuePool, leak_threshold=30)
    figures: dict[str, list[float]] = {}
    try:
        await batch(engine, 500, TASKS)  # warm up: open the connections
        for _ in range(repeats):
            spent.clear()
            _, cpu = await batch(engine, OPERATIONS, TASKS)
            spent["operation (CPU)"] = cpu
            for name, seconds in spent.items():
                figures.setdefault(name, []).append(seconds / OPERATIONS * 1e6)
    finally:
        await engine.dispose()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--driver", default="asyncpg", choices=("asyncpg", "psycopg"))
    args = parser.parse_args()
    time_the_hooks()
    with PostgresServer(max_connections=200) as server:
        figures = await measure(server.url(args.driver), args.repeats)
    print(f"{args.driver}, {TASKS} tasks, pool of 10, {args.repeats} x {OPERATIONS} operations")
    print(f"{'µs per checkout':22} {'lowest':>8} {'median':>8} {'share':>7}")
    operation = statistics.median(figures["operation (CPU)"])
    for name, values in figures.items():
        median = statistics.median(values)
        share = "" if name == "operation (CPU)" else f"{median / operation:7.1%}"
        print(f"{name:22} {min(values):8.2f} {median:8.2f} {share:>7}")


if __name__ == "__main__":
    asyncio.run(main())

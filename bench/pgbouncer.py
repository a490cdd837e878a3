"""Happy path behind PgBouncer: ``FaultTolerantNullPool`` against stock ``NullPool``, one run.

Behind ``NullPool`` every checkout is a login to PgBouncer, so the connect path is the hot path.
For asyncpg and psycopg (async), ``--tasks`` tasks loop one ``SELECT 1`` per checkout through a
PgBouncer (transaction mode) in front of a throwaway PostgreSQL, for ``--seconds`` per round.
The setups run in an order that rotates round by round; each round's ratio is taken against
that round's stock run, and the median of the rounds is printed with the lowest and highest.

Setups: ``stock`` (``NullPool``), ``defaults`` (``FaultTolerantNullPool``, nothing passed: new
connections are pinged only while the pool has reason to doubt), ``retry_ping`` (every new
connection pinged), ``stock_again`` (a second stock engine: how far apart two identical setups
land in this run, the noise to read the others against). PgBouncer's ``auth_type`` is
``trust`` unless ``--auth`` says otherwise: a cheap login makes the pool's own cost per checkout
as visible as it can be.

    .venv/bin/python bench/pgbouncer.py [--rounds 8] [--seconds 1.5] [--tasks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from fault_tolerant_pool import FaultTolerantNullPool
from fault_tolerant_pool.testing import PgBouncer, PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from throughput import throughput


def _name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


RECIPES: dict[str, dict[str, Any]] = {
    "asyncpg": {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": _name,
    },
    "psycopg_async": {"prepare_threshold": None},
}

SETUPS: dict[str, tuple[type, dict[str, Any]]] = {
    "stock": (NullPool, {}),
    "defaults": (FaultTolerantNullPool, {}),
    "retry_ping": (FaultTolerantNullPool, {"retry_ping": True}),
    "stock_again": (NullPool, {}),  # stock against itself: the noise of the run
}


def factory(url: str, driver: str, setup: str) -> Callable[[], AsyncEngine]:
    poolclass, kw = SETUPS[setup]
    return lambda: create_async_engine(
        url, poolclass=poolclass, connect_args=RECIPES[driver], **kw
    )


async def measure(bouncer: PgBouncer, driver: str, rounds: int, seconds: float, tasks: int) -> None:
    names = list(SETUPS)
    engines = {name: factory(bouncer.url(driver), driver, name)() for name in names}
    ops: dict[str, list[float]] = {name: [] for name in names}
    try:
        for engine in engines.values():  # warm up: imports, PgBouncer's server connections
            await throughput(engine, 0.3, tasks)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                ops[name].append(await throughput(engines[name], seconds, tasks))
    finally:
        for engine in engines.values():
            await engine.dispose()
    stock = ops["stock"]
    print(f"\n{driver}: {tasks} tasks, {rounds} rounds of {seconds}s, one login per checkout")
    print(f"  {'setup':<12}{'ops/s (median)':>16}{'vs stock: median [low, high]':>34}")
    for name in names:
        ratios = [a / b for a, b in zip(ops[name], stock, strict=True)]
        print(
            f"  {name:<12}{statistics.median(ops[name]):>16,.0f}"
            f"{statistics.median(ratios):>18.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--drivers", default="asyncpg,psycopg_async")
    parser.add_argument(
        "--auth", default="trust", choices=["trust", "plain", "md5", "scram-sha-256"],
        help="PgBouncer's auth_type: trust (the default) makes a login cheap, so what the "
        "pool itself spends per checkout shows; scram-sha-256 is what production pays",
    )  # fmt: skip
    args = parser.parse_args()
    with (
        PostgresServer(max_connections=200) as server,
        PgBouncer(server, auth_type=args.auth) as bouncer,
    ):
        for driver in args.drivers.split(","):
            await measure(bouncer, driver, args.rounds, args.seconds, args.tasks)


if __name__ == "__main__":
    asyncio.run(main())

"""Login churn under steady load: server logins per second and throughput, stock side by side.

20 async workers each make a request (check out, ``SELECT pg_backend_pid()``, check in) and then
think for 10 ms, at SQLAlchemy's default pool size (``pool_size=5, max_overflow=10``), for
asyncpg and psycopg (async). Setups:

- ``stock``: SQLAlchemy's ``AsyncAdaptedQueuePool``;
- ``ft``: ``FaultTolerantQueuePool`` with its defaults (``overflow_idle=30``);
- ``ft_idle1``: ``overflow_idle=1``: the rule's windows end several times in a run (with the
  default, a run shorter than 30 s never sees one end);
- ``ft_idle0``: ``FaultTolerantQueuePool(overflow_idle=0)``, SQLAlchemy's closing rule: the
  churn goes through this project's connect path (retry loop, telemetry, liveness set-up).

Logins are counted on the server: every backend pid a request saw during the measured window
that no request saw before it (a new server connection is a new backend process), and, as a
cross-check, the growth of ``pg_stat_database.sessions``. Each run warms up for ``--warmup``
seconds (the pool opens what it needs) before the measured ``--seconds``. Every round runs each
setup once, in an order that rotates from round to round; ratios are taken round by round against
the ``stock`` run of the same round and summarised by their median [lowest, highest].

Then the connect path's own cost per login: sequential ``engine.connect()`` through a NullPool
(every checkout is a login), stock ``NullPool`` against ``FaultTolerantNullPool``: with the real
server (wall-clock µs per login and this process's CPU µs per login, the best of the rounds: a
SCRAM login's wall time on a loaded machine varies by milliseconds, the client's CPU much less),
and with a DBAPI stand-in that connects instantly (the pure Python cost of the pool's connect
path, CPU µs per login).

    .venv/bin/python bench/churn.py [--rounds 5] [--seconds 3] [--warmup 1.5]
    .venv/bin/python bench/churn.py --setups ft --rounds 1 --seconds 65 --skip-connect-path
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
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

WORKERS = 20
THINK = 0.010
SETUPS = ("stock", "ft", "ft_idle1", "ft_idle0")
STAND_IN_RUNS = 40
PID = sa.text("SELECT pg_backend_pid()")


def factories(url: str) -> dict[str, Callable[[], AsyncEngine]]:
    return {
        "stock": lambda: create_async_engine(url, poolclass=AsyncAdaptedQueuePool),
        "ft": lambda: create_async_engine(url, poolclass=FaultTolerantQueuePool),
        "ft_idle1": lambda: create_async_engine(
            url, poolclass=FaultTolerantQueuePool, overflow_idle=1
        ),
        "ft_idle0": lambda: create_async_engine(
            url, poolclass=FaultTolerantQueuePool, overflow_idle=0
        ),
    }


def sessions(server: PostgresServer) -> int:
    rows = server.execute(
        f"SELECT sessions FROM pg_stat_database WHERE datname = '{server.dbname}'"
    )
    return int(rows[0][0])


async def load(engine: AsyncEngine, warmup: float, seconds: float) -> tuple[float, int, int]:
    """(requests a second, new backends seen in the window, most backends seen at once)."""
    started = time.perf_counter()
    measuring = started + warmup
    stop = measuring + seconds
    before: set[int] = set()
    during: set[int] = set()
    done = 0
    in_use = 0
    peak = 0

    async def worker() -> None:
        nonlocal done, in_use, peak
        while True:
            now = time.perf_counter()
            if now >= stop:
                return
            async with engine.connect() as conn:
                in_use += 1
                peak = max(peak, in_use)
                pid = (await conn.execute(PID)).scalar_one()
                in_use -= 1
            if now >= measuring:
                done += 1
                if pid not in before:
                    during.add(pid)
            else:
                before.add(pid)
            await asyncio.sleep(THINK)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return done / seconds, len(during), peak


async def churn(
    server: PostgresServer,
    driver: str,
    rounds: int,
    warmup: float,
    seconds: float,
    setups: tuple[str, ...] = SETUPS,
) -> list[str]:
    make = factories(server.url(driver))
    ops: dict[str, list[float]] = {name: [] for name in setups}
    logins: dict[str, list[float]] = {name: [] for name in setups}
    counted: dict[str, list[float]] = {name: [] for name in setups}
    peaks: dict[str, list[int]] = {name: [] for name in setups}
    for round_ in range(rounds):
        shift = round_ % len(setups)
        for name in setups[shift:] + setups[:shift]:
            engine = make[name]()
            first = sessions(server)
            throughput, new, peak = await load(engine, warmup, seconds)
            await engine.dispose()
            await asyncio.sleep(1.1)  # the server flushes session counts at most once a second
            ops[name].append(throughput)
            logins[name].append(new / seconds)
            # every session of the run, less the ones of the warm-up (at most the pool's 15)
            counted[name].append(sessions(server) - first)
            peaks[name].append(peak)
    lines = []
    for name in setups:
        ratio = ""
        if "stock" in ops:
            ratios = [ours / stock for ours, stock in zip(ops[name], ops["stock"], strict=True)]
            ratio = f"x{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
        lines.append(
            f"{driver:8} {name:9} {statistics.median(ops[name]):9.0f} req/s {ratio}   "
            f"logins/s {statistics.median(logins[name]):7.1f} "
            f"[{min(logins[name]):.1f}, {max(logins[name]):.1f}]   "
            f"sessions/run {statistics.median(counted[name]):6.0f}   "
            f"most in use {max(peaks[name])}"
        )
    return lines


async def login_us(url: str, poolclass: type, logins: int) -> tuple[float, float]:
    """µs per login: (wall clock, CPU of this process: the client side, driver and pool)."""
    engine = create_async_engine(url, poolclass=poolclass)
    async with engine.connect():
        pass  # the dialect's first-connect initialisation, once
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(logins):
        async with engine.connect():
            pass
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await engine.dispose()
    return elapsed / logins * 1e6, cpu / logins * 1e6


class _Connection:
    def close(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def stand_in_us(poolclass: type, logins: int) -> float:
    """Checkout + checkin through a NullPool whose DBAPI connects instantly (no database):
    CPU µs of this process per login (a loaded machine's preemption is not counted)."""
    pool: Any = poolclass(_Connection)
    started = time.process_time()
    for _ in range(logins):
        pool.connect().close()
    return (time.process_time() - started) / logins * 1e6


async def connect_path(server: PostgresServer, rounds: int) -> list[str]:
    pools = {"stock": NullPool, "ft": FaultTolerantNullPool}
    lines = []
    for driver in ("asyncpg", "psycopg"):
        url = server.url(driver)
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for round_ in range(rounds):
            order = list(pools.items())
            if round_ % 2:
                order.reverse()
            for name, poolclass in order:
                us, cpu_us = await login_us(url, poolclass, 200)
                wall[name] = min(wall.get(name, us), us)
                cpu[name] = min(cpu.get(name, cpu_us), cpu_us)
        lines.append(
            f"{driver:8} login through a NullPool (best of {rounds}): wall µs stock "
            f"{wall['stock']:.0f}, ft {wall['ft']:.0f}; client CPU µs stock {cpu['stock']:.0f}, "
            f"ft {cpu['ft']:.0f}, added {cpu['ft'] - cpu['stock']:+.0f}"
        )
    best: dict[str, float] = {}
    for _ in range(STAND_IN_RUNS):  # many short runs, the best of each: a lower bound
        for name, poolclass in pools.items():
            us = stand_in_us(poolclass, 2000)
            best[name] = min(best.get(name, us), us)
    lines.append(
        f"stand-in  checkout+checkin, instant connect (CPU µs, best of {STAND_IN_RUNS}): stock "
        f"{best['stock']:.1f}, ft {best['ft']:.1f}, added {best['ft'] - best['stock']:+.1f}"
    )
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--skip-connect-path", action="store_true")
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}"
    )
    args = parser.parse_args()
    setups = tuple(args.setups.split(","))
    lines = []
    with PostgresServer(max_connections=200) as server:
        for driver in ("asyncpg", "psycopg"):
            lines += await churn(server, driver, args.rounds, args.warmup, args.seconds, setups)
        if not args.skip_connect_path:
            lines += await connect_path(server, args.rounds)
    print(
        f"{WORKERS} workers, {THINK * 1000:.0f} ms think time, pool_size=5 max_overflow=10, "
        f"{args.rounds} rounds of {args.seconds:g} s after {args.warmup:g} s warm-up; "
        "throughput ratio to stock: median [lowest, highest] of the rounds"
    )
    for line in lines:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())

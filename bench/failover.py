"""Failovers: stock SQLAlchemy and the fault-tolerant pool side by side, on the same scenarios.

For each driver (asyncpg, psycopg async) and each setup (stock ``AsyncAdaptedQueuePool`` /
``NullPool``, then ``FaultTolerantQueuePool`` / ``FaultTolerantNullPool``, nothing else passed),
fresh servers are started for every run and ``--workers`` tasks loop one-row writes:

- ``demote``: a primary + hot standby; multi-host URL with ``target_session_attrs=read-write``;
  pool ``workers`` + 0. The primary turns read-only at 1 s (while reachable), the standby is
  promoted 1 s later. Measured: failed checkouts, failed statements (most per worker), the time
  from the promotion to the first write on the new primary.
- ``promote``: the primary stops (fast) at 1 s and the standby is promoted at once.
- ``blackhole``: the first host of the URL drops every packet from the start (the project's
  fault proxy); the second is the primary. Measured: the time to the first write.
- ``pgbouncer``: ``NullPool`` behind PgBouncer (transaction mode, 10 workers, ``SELECT 1``):
  PgBouncer restarted (down 0.3 s), then PostgreSQL restarted behind it (down 2 s). Measured:
  failed requests.

Prints a table, and with ``--png`` writes the demote timeline (writes per 100 ms, by server).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/failover.py --png docs/failover.png
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.testing import FaultProxy, PgBouncer, PostgresServer
from tests.reliability import failover

QUEUE_POOLS: dict[str, type] = {
    "stock": AsyncAdaptedQueuePool,
    "fault_tolerant": FaultTolerantQueuePool,
}
NULL_POOLS: dict[str, type] = {"stock": NullPool, "fault_tolerant": FaultTolerantNullPool}
BUCKET = 0.1


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}s"


async def with_standby(
    scenario: Callable[..., Awaitable[failover.Run]], driver: str, setup: str, workers: int
) -> failover.Run:
    """A scenario on a fresh primary and its hot standby (the standby is the target)."""
    with PostgresServer() as primary:
        failover.prepare(primary)
        standby = primary.standby()
        try:
            run = await scenario(
                primary, standby, driver, QUEUE_POOLS[setup], setup, workers=workers
            )
            run.marks["standby_port"] = standby.port
            return run
        finally:
            standby.destroy()


async def demote(driver: str, setup: str, workers: int) -> failover.Run:
    return await with_standby(failover.demote_then_promote, driver, setup, workers)


async def promote(driver: str, setup: str, workers: int) -> failover.Run:
    return await with_standby(failover.stop_then_promote, driver, setup, workers)


async def blackhole(driver: str, setup: str, workers: int) -> failover.Run:
    with PostgresServer() as primary, FaultProxy(primary.host, primary.port) as proxy:
        failover.prepare(primary)
        run = await failover.blackholed_first_host(
            primary, proxy, driver, QUEUE_POOLS[setup], setup, workers=workers, duration=8.0
        )
        run.marks["standby_port"] = primary.port
        return run


def _recipe(driver: str) -> dict[str, Any]:
    if driver == "asyncpg":
        return {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    return {"prepare_threshold": None}


async def pgbouncer(driver: str, setup: str, workers: int = 10) -> dict[str, int]:
    """PgBouncer restarted, then PostgreSQL restarted behind it; failed requests of each."""
    with PostgresServer() as server, PgBouncer(server) as bouncer:
        engine = create_async_engine(
            bouncer.url(driver), poolclass=NULL_POOLS[setup], connect_args=_recipe(driver)
        )
        failed: list[float] = []
        served: list[float] = []
        stop = asyncio.Event()

        async def work() -> None:
            while not stop.is_set():
                try:
                    async with engine.connect() as conn:
                        await conn.execute(sa.text("SELECT 1"))
                    served.append(time.monotonic())
                except Exception:
                    failed.append(time.monotonic())
                await asyncio.sleep(0.002)

        tasks = [asyncio.create_task(work()) for _ in range(workers)]
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await asyncio.to_thread(bouncer.restart, "immediate", 0.3)
        await asyncio.sleep(1.5)
        t1 = time.monotonic()
        await asyncio.to_thread(server.restart, "fast", 2.0)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        await engine.dispose()
    return {
        "bouncer_restart": sum(t0 <= t < t1 for t in failed),
        "postgres_restart": sum(t >= t1 for t in failed),
        "served": len(served),
    }


def chart(runs: list[failover.Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), sharex=True)
    for ax, run in zip(axes, runs, strict=True):
        total = max(w.ended for w in run.writes) - run.started if run.writes else 1.0
        n = int(total / BUCKET) + 1
        old, new, bad = [0] * n, [0] * n, [0] * n
        target = int(run.marks["standby_port"])
        for w in run.writes:
            i = int((w.ended - run.started) / BUCKET)
            if w.stage != "ok":
                bad[i] += 1
            elif w.port == target:
                new[i] += 1
            else:
                old[i] += 1
        xs = [i * BUCKET for i in range(n)]
        ax.bar(xs, old, width=BUCKET, color="#4878a8", label="written on the old primary")
        ax.bar(xs, new, width=BUCKET, bottom=old, color="#59a14f", label="on the new primary")
        ax.bar(xs, bad, width=BUCKET, bottom=[a + b for a, b in zip(old, new, strict=True)],
               color="#e15759", label="failed")  # fmt: skip
        for name, color in (("demoted", "#999999"), ("promoted", "#333333")):
            if name in run.marks:
                ax.axvline(run.marks[name] - run.started, color=color, linestyle="--")
        ax.set_title(f"{run.driver}, {run.setup}", fontsize=9, loc="left")
        ax.set_ylabel("writes / 100 ms", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds (dashed: primary turned read-only, standby promoted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--drivers", default="asyncpg,psycopg_async")
    parser.add_argument("--scenarios", default="demote,promote,blackhole,pgbouncer")
    parser.add_argument("--png", help="write the demote timeline here")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    timelines: list[failover.Run] = []
    print(f"{'scenario':<10}{'driver':<15}{'setup':<16}{'ok':>7}{'failed checkouts':>18}"
          f"{'failed stmts':>14}{'most/worker':>13}{'hung':>6}{'first on target':>17}")  # fmt: skip
    for scenario in scenarios:
        for driver in args.drivers.split(","):
            for setup in QUEUE_POOLS:
                if scenario == "pgbouncer":
                    counts = await pgbouncer(driver, setup)
                    print(f"{scenario:<10}{driver:<15}{setup:<16}{counts['served']:>7}  failed "
                          f"requests: PgBouncer restart {counts['bouncer_restart']}, PostgreSQL "
                          f"restart behind it {counts['postgres_restart']}")  # fmt: skip
                    continue
                make = {"demote": demote, "promote": promote, "blackhole": blackhole}[scenario]
                run = await make(driver, setup, args.workers)
                since = run.marks.get("promoted", run.started)
                first = run.first_on(int(run.marks["standby_port"]), since)
                print(f"{scenario:<10}{driver:<15}{setup:<16}{run.count('ok'):>7}"
                      f"{run.count('checkout'):>18}"
                      f"{run.count('statement') + run.count('timeout'):>14}"
                      f"{run.failed_statements_per_worker():>13}{run.hung:>6}"
                      f"{_fmt(None if first is None else first - since):>17}")  # fmt: skip
                if scenario == "demote":
                    timelines.append(run)
    if args.png and timelines:
        chart(timelines, args.png)


if __name__ == "__main__":
    asyncio.run(main())

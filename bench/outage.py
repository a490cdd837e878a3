"""A database outage under load: stock SQLAlchemy and the fault-tolerant pool, side by side.

For each driver (asyncpg, psycopg async) and each pool (stock ``AsyncAdaptedQueuePool``, then
``FaultTolerantQueuePool``, both with ``pool_pre_ping=True`` and the same size), a fresh
PostgreSQL is started with ``log_connections=on``; ``--workers`` tasks loop ``SELECT 1``; the
server is stopped (fast shutdown) at ``--stop-at`` seconds and started again ``--down`` seconds
later. Measured:

- successes and failures per half second;
- the time from the server logging "ready to accept connections" to the first success;
- how many connections the server received (including those it turned away with 57P03 while
  starting up) and how many logged in, from its restart to the end of the run (the herd).

The pool has no overflow by default: SQLAlchemy's ``QueuePool`` closes an overflow connection
that comes back to a full queue and opens another at the next checkout, so under bursty load it
logs in all the time, outage or not, which would hide what the recovery itself does.

It prints a table with ratios and writes a PNG chart. A worker whose request failed yields to
the event loop once before the next (psycopg's async connect to a refused port fails without
yielding; a loop retrying it at once would starve every other task, the outage's included).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/outage.py --png docs/outage.png
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing import PostgresServer

BUCKET = 0.5
SETUPS: dict[str, type] = {"stock": AsyncAdaptedQueuePool, "fault_tolerant": FaultTolerantQueuePool}
_STARTING = "starting PostgreSQL"


@dataclass
class Run:
    driver: str
    setup: str
    total: float
    ends: list[tuple[float, bool]] = field(default_factory=list)  # (seconds since start, ok)
    stopped_at: float = 0.0
    ready_at: float = 0.0
    received: int = 0
    logins: int = 0

    def buckets(self) -> tuple[list[int], list[int]]:
        n = int(self.total / BUCKET + 0.5)
        ok, failed = [0] * n, [0] * n
        for at, success in self.ends:
            i = min(int(at / BUCKET), n - 1)
            (ok if success else failed)[i] += 1
        return ok, failed

    @property
    def failures(self) -> int:
        return sum(1 for _, success in self.ends if not success)

    @property
    def successes(self) -> int:
        return sum(1 for _, success in self.ends if success)

    @property
    def first_success_ms(self) -> float:
        """Milliseconds from the server being ready to the first request succeeding."""
        after = [at for at, success in self.ends if success and at > self.ready_at]
        return (min(after) - self.ready_at) * 1000 if after else float("nan")


def make_engine(url: str, poolclass: type, args: argparse.Namespace) -> AsyncEngine:
    return create_async_engine(
        url,
        poolclass=poolclass,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        pool_pre_ping=True,
    )


def count_recovery(log: str) -> tuple[int, int]:
    """Connections received (including those turned away while starting up, 57P03) and logins
    since the server was started again."""
    after = log.rsplit(_STARTING, 1)[-1]
    return (
        len(re.findall(r"connection received:", after)),
        len(re.findall(r"connection authorized:", after)),
    )


async def run_one(driver: str, setup: str, args: argparse.Namespace) -> Run:
    total = args.stop_at + args.down + args.after
    run = Run(driver, setup, total)
    with PostgresServer(max_connections=200, settings={"log_connections": "on"}) as server:
        engine = make_engine(server.url(driver), SETUPS[setup], args)
        select = sa.text("SELECT 1")
        async with engine.connect() as conn:  # warm: the dialect is initialised
            await conn.execute(select)
        started = time.monotonic()
        stop = started + total

        async def worker() -> None:
            while time.monotonic() < stop:
                try:
                    async with engine.connect() as conn:
                        await conn.execute(select)
                    ok = True
                except Exception:  # stock asyncpg lets raw OSErrors through
                    ok = False
                    await asyncio.sleep(0)  # psycopg fails without yielding: let others run
                run.ends.append((time.monotonic() - started, ok))

        async def outage() -> None:
            await asyncio.sleep(args.stop_at)
            run.stopped_at = time.monotonic() - started
            await asyncio.to_thread(server.stop, "fast")
            await asyncio.sleep(args.down)
            await asyncio.to_thread(server.start)
            assert server.ready_at is not None
            run.ready_at = server.ready_at - started

        await asyncio.gather(outage(), *(worker() for _ in range(args.workers)))
        await engine.dispose()
        run.received, run.logins = count_recovery(server.read_log())
    return run


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    slots = args.pool_size + args.max_overflow
    print(
        f"\n{args.workers} workers looping SELECT 1, pool_size={args.pool_size} "
        f"max_overflow={args.max_overflow} pre-ping; server stopped (fast) at "
        f"{args.stop_at:g} s, started {args.down:g} s later\n"
    )
    head = (
        f"{'driver':14} {'pool':15} {'ok':>7} {'failed':>7} {'1st ok after ready':>19} "
        f"{'received':>9} {'logins':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        print(
            f"{r.driver:14} {r.setup:15} {r.successes:7d} {r.failures:7d} "
            f"{r.first_success_ms:16.0f} ms {r.received:9d} {r.logins:7d}"
        )
    print(f"\n(received/logins: connections the server got after its restart; slots = {slots})")
    for driver in dict.fromkeys(r.driver for r in runs):
        stock = next(r for r in runs if r.driver == driver and r.setup == "stock")
        ft = next(r for r in runs if r.driver == driver and r.setup == "fault_tolerant")
        ratio = stock.failures / ft.failures if ft.failures else float("inf")
        print(
            f"{driver}: failed requests stock/fault_tolerant = {stock.failures}/{ft.failures}"
            f" ({'x' + format(ratio, '.0f') if ft.failures else 'none with the pool'}); "
            f"ok ratio fault_tolerant/stock = {ft.successes / max(stock.successes, 1):.2f}"
        )
    print("\nper half second (ok/failed):")
    for r in runs:
        ok, failed = r.buckets()
        cells = " ".join(f"{o:>4}/{f:<4}" for o, f in zip(ok, failed, strict=True))
        print(f"{r.driver:14} {r.setup:15} {cells}".rstrip())


def chart(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drivers = list(dict.fromkeys(r.driver for r in runs))
    fig, axes = plt.subplots(
        len(drivers), 2, figsize=(11, 3.2 * len(drivers)), sharex=True, squeeze=False
    )
    top = max(max(max(r.buckets()[0]), max(r.buckets()[1])) for r in runs) * 1.15
    for row, driver in enumerate(drivers):
        for col, setup in enumerate(SETUPS):
            ax = axes[row][col]
            r = next(x for x in runs if x.driver == driver and x.setup == setup)
            ok, failed = r.buckets()
            xs = [i * BUCKET for i in range(len(ok))]
            ax.bar(xs, ok, width=BUCKET * 0.9, align="edge", color="#3a923a", label="succeeded")
            ax.bar(xs, failed, width=BUCKET * 0.9, align="edge", bottom=ok, color="#d04040",
                   label="failed")  # fmt: skip
            ax.axvspan(r.stopped_at, r.ready_at, color="grey", alpha=0.15, label="server down")
            ax.set_ylim(0, top)
            ax.set_title(
                f"{driver}, {setup}: {r.failures} failed, first ok "
                f"{r.first_success_ms:.0f} ms after ready, {r.logins} logins",
                fontsize=9,
            )
            if col == 0:
                ax.set_ylabel("requests per 0.5 s")
            if row == len(drivers) - 1:
                ax.set_xlabel("seconds")
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nchart written to {path}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--max-overflow", type=int, default=0)
    parser.add_argument("--stop-at", type=float, default=1.0)
    parser.add_argument("--down", type=float, default=2.0)
    parser.add_argument("--after", type=float, default=2.0)
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    parser.add_argument("--png", default=None, help="write the chart here (needs matplotlib)")
    args = parser.parse_args()
    runs: list[Run] = []
    for driver in args.drivers.split(","):
        for setup in SETUPS:
            runs.append(await run_one(driver, setup, args))
    print_table(runs, args)
    if args.png:
        chart(runs, args.png)


if __name__ == "__main__":
    asyncio.run(main())

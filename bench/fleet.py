"""A fleet against one PostgreSQL: restarts, a long outage, a crash; stock SQLAlchemy side by side.

``--processes`` processes (default 8), each with its own async engine and pool (the replicas of a
service), run ``--workers`` tasks looping ``SELECT 1`` against one PostgreSQL whose
``max_connections`` is a little above the fleet's slots. Every connection goes through the
project's :class:`FaultProxy`, which counts the connect attempts that reach the server side, the
refused ones included (when the server is down, nothing else can see them). Scenarios:

- ``restart``: fast stop, down ``--restart-down`` seconds (2), start;
- ``outage``: fast stop, down ``--outage-down`` seconds (30), start;
- ``crash``: immediate stop (no checkpoint), start at once: the server replays its WAL and answers
  ``57P03`` ("the database system is starting up") meanwhile.

For each scenario and setup (``stock``: ``AsyncAdaptedQueuePool``; ``fault_tolerant``:
``FaultTolerantQueuePool``, both with their defaults and the same size) it prints the connect
attempts reaching the server per second while it is down (mean and the worst second), the
connections the server received and the logins from its start to the end of the run (its log),
failed requests, the longest request, requests that failed fast, the time from "ready" to the
first success and to the last failure. With ``--png``,
a chart of the attempts per second and the failed requests.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/fleet.py --png docs/fleet.png            # about 4 minutes
    .venv/bin/python bench/fleet.py --bar                           # issue 11's bar, one process

``--bar`` is the single-pool bar: 1 process, 20 workers, pool 5 + 10, a 15 s outage and a 2 s
restart, both drivers, with each bar's verdict printed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

BUCKET = 1.0
SETUPS = ("stock", "fault_tolerant")
AFTER = 5.0  # seconds of load after the server is ready
BEFORE = 1.5  # seconds of load before the fault
_STARTING = "starting PostgreSQL"


# -- one replica: a child process with its own engine ---------------------------------------------


def replica(conn: Connection, config: dict[str, Any]) -> None:
    """Run one replica until the parent's stop time; send back (start, end, ok, fast) tuples."""
    asyncio.run(_replica(conn, config))


async def _replica(conn: Connection, config: dict[str, Any]) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    from fault_tolerant_pool import DatabaseUnreachable, FaultTolerantQueuePool

    poolclass = (
        FaultTolerantQueuePool if config["setup"] == "fault_tolerant" else AsyncAdaptedQueuePool
    )
    engine = create_async_engine(
        config["url"],
        poolclass=poolclass,
        pool_size=config["pool_size"],
        max_overflow=config["max_overflow"],
        **(
            {"retry_deadline": config["deadline"]}
            if config["deadline"] and poolclass is not AsyncAdaptedQueuePool
            else {}
        ),
    )
    select = sa.text("SELECT 1")
    async with engine.connect() as c:
        await c.execute(select)
    conn.send("ready")
    started, stop = conn.recv()
    while time.monotonic() < started:
        await asyncio.sleep(0.005)
    # (start, end, ok, failed fast) of every request; no exception is kept (thousands of kept
    # tracebacks make the garbage collector pause the loop for seconds).
    ends: list[tuple[float, float, bool, bool, bool]] = []

    async def worker() -> None:
        while time.monotonic() < stop:
            began = time.monotonic()
            ok = fast = checkout_failed = False
            try:
                c = await engine.connect()
            except Exception as error:  # stock asyncpg lets raw OSErrors through
                checkout_failed = True
                fast = isinstance(getattr(error, "orig", None), DatabaseUnreachable)
                del error
            else:
                try:
                    await c.execute(select)
                    ok = True
                except Exception:
                    pass
                finally:
                    try:
                        await c.close()
                    except Exception:
                        ok = False
            # Yield between requests, as a server awaiting its next request does (psycopg fails
            # without yielding, and SQLAlchemy's queue hands a returned connection to whoever
            # asks first: a task that never yields would starve those waiting for a slot).
            await asyncio.sleep(0)
            ends.append((began, time.monotonic(), ok, fast, checkout_failed))

    await asyncio.gather(*(worker() for _ in range(config["workers"])))
    await engine.dispose()
    conn.send(ends)
    conn.close()


# -- the parent: server, proxy, faults, counting ---------------------------------------------


@dataclass
class Run:
    scenario: str
    driver: str
    setup: str
    started: float = 0.0
    down_at: float = 0.0
    up_at: float = 0.0
    ready_at: float = 0.0
    stop_at: float = 0.0
    requests: list[tuple[float, float, bool, bool, bool]] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, accepted so far)
    logins: int = 0
    received: int = 0

    def rel(self, t: float) -> float:
        return t - self.started

    def attempts_per_second(self) -> list[tuple[float, float]]:
        """(bucket start, connects reaching the server side in that bucket) relative to start."""
        out: list[tuple[float, float]] = []
        i = 0
        while i < len(self.samples):
            t0, n0 = self.samples[i]
            j = i
            while j + 1 < len(self.samples) and self.samples[j + 1][0] - t0 < BUCKET:
                j += 1
            if j + 1 < len(self.samples):
                t1, n1 = self.samples[j + 1]
                out.append((self.rel(t0), (n1 - n0) / (t1 - t0)))
            i = j + 1
        return out

    def accepted_between(self, a: float, b: float) -> int:
        def at(t: float) -> int:
            best = self.samples[0][1]
            for when, n in self.samples:
                if when <= t:
                    best = n
            return best

        return at(b) - at(a)

    @property
    def down_rate(self) -> float:
        """Connects reaching the server side per second from the stop to "ready" (the crash's
        starting-up window included)."""
        span = self.ready_at - self.down_at
        return self.accepted_between(self.down_at, self.ready_at) / span if span > 0 else 0.0

    @property
    def worst_second(self) -> float:
        rates = [
            r
            for t, r in self.attempts_per_second()
            if self.rel(self.down_at) <= t < self.rel(self.ready_at) - BUCKET / 2
        ]
        return max(rates, default=self.down_rate)

    @property
    def failures(self) -> int:
        return sum(1 for r in self.requests if not r[2])

    @property
    def successes(self) -> int:
        return sum(1 for r in self.requests if r[2])

    @property
    def longest(self) -> float:
        return max((e - s for s, e, *_ in self.requests), default=0.0)

    @property
    def first_ok_ms(self) -> float:
        after = [e for s, e, ok, *_ in self.requests if ok and e > self.ready_at]
        return (min(after) - self.ready_at) * 1000 if after else float("nan")

    @property
    def last_failure_ms(self) -> float:
        """From ready to the end of the last failed request (negative: none failed after ready)."""
        failed = [e for s, e, ok, *_ in self.requests if not ok]
        return (max(failed) - self.ready_at) * 1000 if failed else float("nan")

    def deep_fail_fast_median_ms(self, deadline: float) -> float:
        deep = [
            e - s
            for s, e, ok, *_ in self.requests
            if not ok and self.down_at + deadline + 1 <= s < self.up_at - 0.5
        ]
        return statistics.median(deep) * 1000 if deep else float("nan")

    @property
    def failed_after_first_ok(self) -> int:
        after = [e for s, e, ok, *_ in self.requests if ok and e > self.ready_at]
        if not after:
            return 0
        first = min(after)
        return sum(1 for s, _, ok, *_ in self.requests if not ok and s >= first)


def count_logins(log: str) -> tuple[int, int]:
    """Connections received and logins after the server's last start."""
    after = log.rsplit(_STARTING, 1)[-1]
    return (
        len(re.findall(r"connection received:", after)),
        len(re.findall(r"connection authorized:", after)),
    )


def run_one(scenario: str, driver: str, setup: str, args: argparse.Namespace) -> Run:
    from fault_tolerant_pool.testing import FaultProxy, PostgresServer

    slots = args.processes * (args.pool_size + args.max_overflow)
    run = Run(scenario, driver, setup)
    settings = {"log_connections": "on"}
    with (
        PostgresServer(max_connections=slots + 10, settings=settings) as server,
        FaultProxy(server.host, server.port) as proxy,
    ):
        url = server.url(driver, port=proxy.port)
        config = {
            "url": url, "setup": setup, "workers": args.workers, "pool_size": args.pool_size,
            "max_overflow": args.max_overflow, "deadline": args.deadline,
        }  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        pipes, procs = [], []
        for _ in range(args.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=replica, args=(child, config), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        for p in pipes:
            assert p.recv() == "ready"
        down = {"restart": args.restart_down, "outage": args.outage_down, "crash": 0.0}[scenario]
        run.started = time.monotonic() + 0.5
        stop = run.started + BEFORE + down + AFTER + (1.0 if scenario == "crash" else 0.0)
        run.stop_at = stop
        for p in pipes:
            p.send((run.started, stop))
        sampling = True

        def sample() -> None:
            while sampling:
                run.samples.append((time.monotonic(), proxy.connections_accepted))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(max(run.started + BEFORE - time.monotonic(), 0))
        run.down_at = time.monotonic()
        server.stop("immediate" if scenario == "crash" else "fast")
        time.sleep(down)
        run.up_at = time.monotonic()
        server.start()
        assert server.ready_at is not None
        run.ready_at = server.ready_at
        for p in pipes:
            run.requests.extend(p.recv())
        for proc in procs:
            proc.join(10)
        sampling = False
        sampler.join()
        run.received, run.logins = count_logins(server.read_log())
    return run


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    slots = args.pool_size + args.max_overflow
    print(
        f"\n{args.processes} process(es) x {args.workers} workers looping SELECT 1, pool "
        f"{args.pool_size} + {args.max_overflow} each ({args.processes * slots} slots), "
        f"defaults{'' if not args.deadline else f' (retry_deadline={args.deadline:g})'}; "
        "attempts = connects reaching the server side (the proxy)\n"
    )
    head = (
        f"{'scenario':8} {'driver':14} {'pool':15} {'attempts/s down':>15} {'worst s':>8} "
        f"{'received':>8} {'logins':>6} {'ok':>7} {'failed':>7} {'fast':>6} {'longest':>8} "
        f"{'1st ok':>8} {'last fail':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        fast = sum(1 for x in r.requests if x[3])
        print(
            f"{r.scenario:8} {r.driver:14} {r.setup:15} {r.down_rate:15.1f} {r.worst_second:8.0f} "
            f"{r.received:8d} {r.logins:6d} {r.successes:7d} {r.failures:7d} {fast:6d} "
            f"{r.longest:7.2f}s "
            f"{r.first_ok_ms:6.0f}ms {r.last_failure_ms:7.0f}ms"
        )
    print(
        "\n(attempts/s down: connects reaching the server side (the proxy) per second from the "
        "stop to 'ready', mean; worst s: the busiest whole second; received / logins: what the "
        "server logged from its start to the end of the run (received includes the 57P03 "
        "answers while starting up; the pools' own churn of overflow connections is in both); "
        "1st ok / last fail: from the server's 'ready' log line)"
    )
    for scenario in dict.fromkeys(r.scenario for r in runs):
        for driver in dict.fromkeys(r.driver for r in runs):
            pair = {r.setup: r for r in runs if r.scenario == scenario and r.driver == driver}
            if len(pair) == 2:
                s, f = pair["stock"], pair["fault_tolerant"]
                ratio = s.down_rate / f.down_rate if f.down_rate else float("inf")
                each, stock_each = f.down_rate / args.processes, s.down_rate / args.processes
                print(
                    f"{scenario} {driver}: attempts/s while down stock/fault_tolerant = "
                    f"{s.down_rate:.1f}/{f.down_rate:.1f} (x{ratio:.0f}); per replica "
                    f"{each:.2f}/s -> 100 replicas {each * 100:.0f}/s, 1,000 replicas "
                    f"{each * 1000:.0f}/s (stock {stock_each * 100:.0f}/s and "
                    f"{stock_each * 1000:.0f}/s); failed requests {s.failures}/{f.failures}; "
                    f"received/logins after the start {s.received}/{s.logins} and "
                    f"{f.received}/{f.logins}"
                )


def print_bar(runs: list[Run], deadline: float) -> None:
    print("\nissue 11's bar (fault_tolerant):")
    for r in runs:
        if r.setup != "fault_tolerant":
            continue
        if r.scenario == "outage":
            deep = r.deep_fail_fast_median_ms(deadline)
            late = r.failed_after_first_ok
            checks = {
                "<= 3 attempts/s while down": r.down_rate <= 3.0,
                f"no request > deadline + 1 s ({r.longest:.2f}s)": r.longest <= deadline + 1.0,
                f"deep fail-fast median <= 0.1 s ({deep:.2f} ms)": deep <= 100,
                f"first ok <= 1 s after ready ({r.first_ok_ms:.0f} ms)": r.first_ok_ms <= 1000,
                f"nothing fails after the first ok ({late})": late == 0,
            }
        elif r.scenario == "restart":
            checkout_failures = sum(1 for x in r.requests if x[4])
            checks = {
                f"0 failed checkouts ({checkout_failures}; {r.failures} failed requests)": (
                    checkout_failures == 0
                ),
                f"first ok <= 250 ms after ready ({r.first_ok_ms:.0f} ms)": r.first_ok_ms <= 250,
            }
        else:
            continue
        for what, ok in checks.items():
            print(f"  {r.scenario:8} {r.driver:14} {'met ' if ok else 'MISS'} {what}")


def chart(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in runs))
    drivers = list(dict.fromkeys(r.driver for r in runs))
    fig, axes = plt.subplots(
        len(scenarios), len(drivers), figsize=(6 * len(drivers), 3.2 * len(scenarios)),
        squeeze=False,
    )  # fmt: skip
    colours = {"stock": "#d04040", "fault_tolerant": "#2a6fbb"}
    for row, scenario in enumerate(scenarios):
        for col, driver in enumerate(drivers):
            ax = axes[row][col]
            for r in runs:
                if r.scenario != scenario or r.driver != driver:
                    continue
                points = [p for p in r.attempts_per_second() if p[0] < r.rel(r.stop_at)]
                label = f"{r.setup}: {r.down_rate:.1f}/s down, {r.failures} failed"
                ax.plot([t for t, _ in points], [max(v, 0.1) for _, v in points],
                        drawstyle="steps-post", color=colours[r.setup], label=label)  # fmt: skip
                ax.axvspan(r.rel(r.down_at), r.rel(r.ready_at), color="grey", alpha=0.12)
            ax.set_yscale("log")
            ax.set_title(f"{scenario}, {driver}", fontsize=9)
            ax.set_ylabel("connects reaching the server /s")
            ax.set_xlabel("seconds (grey: server down)")
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nchart written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=10, help="tasks per process")
    parser.add_argument("--pool-size", type=int, default=3)
    parser.add_argument("--max-overflow", type=int, default=2)
    parser.add_argument("--restart-down", type=float, default=2.0)
    parser.add_argument("--outage-down", type=float, default=30.0)
    parser.add_argument(
        "--deadline", type=float, default=None, help="retry_deadline (default: the pool's)"
    )
    parser.add_argument("--scenarios", default="restart,outage,crash")
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument(
        "--bar",
        action="store_true",
        help="issue 11's bar: 1 process, 20 workers, pool 5 + 10, 15 s outage, 2 s restart",
    )
    parser.add_argument("--png", default=None, help="write the chart here (needs matplotlib)")
    args = parser.parse_args()
    if args.bar:
        args.processes, args.workers, args.pool_size, args.max_overflow = 1, 20, 5, 10
        args.outage_down = 15.0
        if args.scenarios == parser.get_default("scenarios"):
            args.scenarios = "outage,restart"
    runs: list[Run] = []
    for scenario in args.scenarios.split(","):
        for driver in args.drivers.split(","):
            for setup in args.setups.split(","):
                run = run_one(scenario, driver, setup, args)
                print(
                    f"  {scenario} {driver} {setup}: {run.down_rate:.1f} attempts/s down, "
                    f"{run.failures} failed",
                    flush=True,
                )
                runs.append(run)
    print_table(runs, args)
    if args.processes == 1:  # the bar is one pool's
        print_bar(runs, args.deadline or 10.0)
    if args.png:
        chart(runs, args.png)


if __name__ == "__main__":
    main()

"""Read replicas: how reads spread, what a stopped or lagging standby costs, and routing's price.

A primary and two hot standbys (``pg_basebackup``), all on this machine; every engine on
``FaultTolerantQueuePool``. Scenarios, for asyncpg and psycopg (async):

- ``spread``: 20 readers (``run_transaction_async(router.reads, ...)``) and 5 writers for
  ``--seconds``; the share of reads each server took (issue 23's bar: at least 90 % on standbys);
- ``stop``: the same load; standby 1 stopped (fast) 3 s in, started again 5 s later: failed
  reads (bar: 0), reads per server per second, and how soon standby 1 takes reads again;
- ``lag``: the same load with ``max_replica_lag=1``; standby 2's replay delayed 5 s
  (``recovery_min_apply_delay``) 3 s in: the last read it took after the delay began (bar: none
  after 2 s), and how soon after the delay is lifted it takes reads again;
- ``cost``: 20 tasks looping a one-row read, through ``router.connect(read_only=True)`` with the
  standby as its only reader, and straight through that standby's engine, in alternating
  batches of about ``--cost-seconds`` each; the event loop is saturated, so throughput follows
  the process's CPU time per read: the figure is the direct CPU time per read over the routed
  one, the median over the rounds (bar: routing costs at most 3 % of throughput).

    .venv/bin/python bench/replicas.py                      # everything, about 3 minutes
    .venv/bin/python bench/replicas.py --scenarios cost --rounds 30 --cost-seconds 0.5
    .venv/bin/python bench/replicas.py --json replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fault_tolerant_pool import FaultTolerantQueuePool, ReplicaRouter, run_transaction_async
from fault_tolerant_pool.testing import PostgresServer

READERS = 20
WRITERS = 5
DRIVERS = {"asyncpg": "asyncpg", "psycopg": "psycopg_async"}
WHERE = sa.text("SELECT inet_server_port()")


def engine(server: PostgresServer, driver: str) -> AsyncEngine:
    return create_async_engine(
        server.url(DRIVERS[driver]),
        poolclass=FaultTolerantQueuePool,
        pool_size=10,
        max_overflow=10,
    )


@dataclass
class Run:
    scenario: str
    driver: str
    started: float = 0.0
    reads: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the start, the server's port) of every read that succeeded."""
    failed: Counter[str] = field(default_factory=Counter)
    writes: int = 0
    marks: dict[str, float] = field(default_factory=dict)
    ports: dict[int, str] = field(default_factory=dict)
    stats: Any = None

    def share(self, name: str, after: float = 0.0, before: float = 1e9) -> float:
        reads = [port for at, port in self.reads if after <= at < before]
        if not reads:
            return 0.0
        return sum(1 for port in reads if self.ports.get(port) == name) / len(reads)

    def last_read(self, name: str, after: float, before: float = 1e9) -> float | None:
        times = [
            at for at, port in self.reads if self.ports.get(port) == name and after <= at < before
        ]
        return max(times) if times else None

    def first_read(self, name: str, after: float) -> float | None:
        times = [at for at, port in self.reads if self.ports.get(port) == name and at >= after]
        return min(times) if times else None

    def timeline(self) -> list[dict[str, Any]]:
        per_second: dict[int, Counter[str]] = defaultdict(Counter)
        for at, port in self.reads:
            per_second[int(at)][self.ports.get(port, str(port))] += 1
        return [{"t": t, **per_second[t]} for t in sorted(per_second)]


async def load(
    run: Run,
    router: ReplicaRouter,
    seconds: float,
    script: Any = None,
) -> None:
    """READERS readers and WRITERS writers for ``seconds``, ``script`` beside them."""
    stop = time.monotonic() + seconds

    async def read(conn: AsyncConnection) -> int:
        port: int = (await conn.execute(WHERE)).scalar_one()
        return port

    async def reader() -> None:
        while time.monotonic() < stop:
            try:
                port = await run_transaction_async(router.reads, read)
            except Exception as error:  # a failed read is the figure we count
                run.failed[type(error).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            run.reads.append((time.monotonic() - run.started, port))

    async def writer() -> None:
        insert = sa.text("INSERT INTO bench_replicas (at) VALUES (now())")
        while time.monotonic() < stop:
            try:
                async with router.connect() as conn:
                    await conn.execute(insert)
                    await conn.commit()
                run.writes += 1
            except Exception:
                run.failed["write"] += 1
            await asyncio.sleep(0.02)

    run.started = time.monotonic()
    tasks = [reader() for _ in range(READERS)] + [writer() for _ in range(WRITERS)]
    if script is not None:
        tasks.append(script())
    await asyncio.gather(*tasks)


async def create_table(writer: AsyncEngine) -> None:
    async with writer.begin() as conn:
        await conn.execute(TABLE)


TABLE = sa.text(
    "CREATE TABLE IF NOT EXISTS bench_replicas (id bigserial PRIMARY KEY, at timestamptz)"
)


async def scenario(name: str, driver: str, servers: list[PostgresServer], args: Any) -> Run:
    primary, first, second = servers
    run = Run(name, driver)
    run.ports = {primary.port: "primary", first.port: "standby 1", second.port: "standby 2"}
    lag = 1.0 if name == "lag" else 5.0
    writer = engine(primary, driver)
    readers = [engine(first, driver), engine(second, driver)]
    router = ReplicaRouter(writer, readers, max_replica_lag=lag)
    # In a task of its own: a commit in this context would keep the readers' reads (tasks made
    # from it) on the writer for read_your_writes seconds.
    await asyncio.create_task(create_table(writer))
    await router.wait_ready(5.0)

    async def stop_standby() -> None:
        await asyncio.sleep(3.0)
        run.marks["stopped"] = time.monotonic() - run.started
        await asyncio.to_thread(first.stop, "fast")
        await asyncio.sleep(5.0)
        await asyncio.to_thread(first.start)
        run.marks["started"] = time.monotonic() - run.started

    async def delay_standby() -> None:
        await asyncio.sleep(3.0)
        await asyncio.to_thread(second.delay_replay, 5.0)
        run.marks["delayed"] = time.monotonic() - run.started
        await asyncio.sleep(8.0)
        await asyncio.to_thread(second.delay_replay, 0)
        run.marks["undelayed"] = time.monotonic() - run.started

    script = {"stop": stop_standby, "lag": delay_standby}.get(name)
    seconds = args.seconds if name == "spread" else max(args.seconds, 16.0)
    try:
        await load(run, router, seconds, script)
        run.stats = router.stats()
    finally:
        await router.aclose()
        for made in (writer, *readers):
            await made.dispose()
    return run


async def cost(driver: str, servers: list[PostgresServer], args: Any) -> dict[str, Any]:
    """Reads per second through the router (one reader) and straight through that engine."""
    primary, first, _ = servers
    writer = engine(primary, driver)
    reader = engine(first, driver)
    router = ReplicaRouter(writer, [reader])
    await router.wait_ready(5.0)
    select = sa.text("SELECT 1")

    share = 100  # reads per task in a batch; set from the first batch to last --cost-seconds

    async def through(connect: Any) -> float:
        """Reads per CPU second of this process: a batch of ``share`` reads by each task."""

        async def worker() -> None:
            for _ in range(share):
                async with connect() as conn:
                    await conn.execute(select)

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(READERS)))
        return share * READERS / (time.process_time() - started)

    direct: list[float] = []
    routed: list[float] = []
    try:
        rate = await through(reader.connect)  # warm both
        await through(lambda: router.connect(read_only=True))
        share = max(10, int(rate * args.cost_seconds / READERS))
        for i in range(args.rounds):
            pair = [("direct", reader.connect), ("routed", lambda: router.connect(read_only=True))]
            if i % 2:
                pair.reverse()
            for label, connect in pair:
                figure = await through(connect)
                (direct if label == "direct" else routed).append(figure)
        stats = router.stats()
    finally:
        await router.aclose()
        await writer.dispose()
        await reader.dispose()
    ratios = [r / d for r, d in zip(routed, direct, strict=True)]
    return {
        "driver": driver,
        "direct_median": statistics.median(direct),
        "routed_median": statistics.median(routed),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "routed_to_reader": stats.readers[0].reads,
        "writer_reads": stats.writer_reads,
    }


def report(run: Run) -> dict[str, Any]:
    reads = len(run.reads)
    standbys = run.share("standby 1") + run.share("standby 2")
    row: dict[str, Any] = {
        "scenario": run.scenario,
        "driver": run.driver,
        "reads": reads,
        "failed_reads": sum(n for k, n in run.failed.items() if k != "write"),
        "failed_writes": run.failed.get("write", 0),
        "failures": dict(run.failed),
        "writes": run.writes,
        "on_standbys": round(standbys, 4),
        "by_server": {
            name: round(run.share(name), 4) for name in ("primary", "standby 1", "standby 2")
        },
        "marks": {k: round(v, 2) for k, v in run.marks.items()},
        "timeline": run.timeline(),
        "router": None
        if run.stats is None
        else {
            "readers": [
                {
                    "name": r.name,
                    "reads": r.reads,
                    "skipped_for_lag": r.skipped_for_lag,
                    "skipped_down": r.skipped_down,
                }
                for r in run.stats.readers
            ],
            "fallbacks": run.stats.fallbacks,
            "read_your_writes": run.stats.read_your_writes,
        },
    }
    if "stopped" in run.marks:
        started = run.marks.get("started")
        row["standby1_back_after"] = (
            None
            if started is None or run.first_read("standby 1", started) is None
            else round(run.first_read("standby 1", started) - started, 2)  # type: ignore[operator]
        )
    if "delayed" in run.marks:
        delayed = run.marks["delayed"]
        last = run.last_read("standby 2", delayed, run.marks.get("undelayed", 1e9))
        row["last_read_on_delayed_after"] = None if last is None else round(last - delayed, 2)
        undelayed = run.marks.get("undelayed")
        back = None if undelayed is None else run.first_read("standby 2", undelayed)
        row["delayed_back_after"] = (
            None if back is None or undelayed is None else round(back - undelayed, 2)
        )
    return row


def print_runs(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':<8} {'driver':<8} {'reads':>7} {'failed':>6} {'standbys':>9} "
          f"{'primary':>8} {'sb 1':>6} {'sb 2':>6}  notes")  # fmt: skip
    for row in rows:
        by = row["by_server"]
        notes = []
        if "standby1_back_after" in row:
            notes.append(f"standby 1 stopped at {row['marks'].get('stopped')}s, "
                         f"reads again {row['standby1_back_after']}s after its start")  # fmt: skip
        if "last_read_on_delayed_after" in row:
            last, back = row["last_read_on_delayed_after"], row["delayed_back_after"]
            notes.append(f"last read on the delayed standby {last}s after the delay began; "
                         f"back {back}s after it ended")  # fmt: skip
        print(f"{row['scenario']:<8} {row['driver']:<8} {row['reads']:>7} {row['failed_reads']:>6} "
              f"{row['on_standbys']:>9.1%} {by['primary']:>8.1%} {by['standby 1']:>6.1%} "
              f"{by['standby 2']:>6.1%}  {'; '.join(notes)}")  # fmt: skip
        if row["failures"]:
            print(f"         failures: {row['failures']}")
        if row["router"]:
            print(f"         router: {row['router']}")


def print_timeline(row: dict[str, Any]) -> None:
    print(f"\n{row['scenario']} / {row['driver']}: reads per second ({row['marks']})")
    print(f"{'s':>4} {'primary':>8} {'standby 1':>10} {'standby 2':>10}")
    for second in row["timeline"]:
        print(f"{second['t']:>4} {second.get('primary', 0):>8} {second.get('standby 1', 0):>10} "
              f"{second.get('standby 2', 0):>10}")  # fmt: skip


def bars(rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> None:
    print("\nissue 23's bar:")

    def verdict(driver: str, what: str, ok: bool) -> None:
        print(f"  {driver:<8} {what}: {'met' if ok else 'MISSED'}")

    for row in rows:
        driver = row["driver"]
        if row["scenario"] == "spread":
            share = row["on_standbys"]
            verdict(driver, f"reads on standbys {share:.1%} (>= 90 %)", share >= 0.90)
        if row["scenario"] == "stop":
            failed = row["failed_reads"]
            verdict(driver, f"a standby stopped: {failed} failed reads (0)", failed == 0)
        if row["scenario"] == "lag":
            last = row["last_read_on_delayed_after"]
            what = f"the delayed standby's last read {last}s after the delay (<= 2 s)"
            verdict(driver, what, last is None or last <= 2.0)
    for figure in costs:
        ratio = figure["ratio_median"]
        verdict(figure["driver"], f"routed/direct throughput {ratio:.3f} (>= 0.97)", ratio >= 0.97)


async def main_async(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    scenarios = args.scenarios.split(",")
    rows: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    primary = PostgresServer(max_connections=200)
    primary.start()
    servers = [primary]
    try:
        servers += [primary.standby(), primary.standby()]
        for driver in args.drivers.split(","):
            for name in scenarios:
                if name == "cost":
                    costs.append(await cost(driver, servers, args))
                    continue
                row = report(await scenario(name, driver, servers, args))
                rows.append(row)
                print(f"  done: {name} / {driver}", flush=True)
    finally:
        for server in reversed(servers):
            server.destroy()
    print_runs(rows)
    for row in rows:
        if row["scenario"] in ("stop", "lag") and args.timeline:
            print_timeline(row)
    if costs:
        print(f"\n{'driver':<8} {'direct/CPU s':>13} {'routed/CPU s':>13} {'ratio':>6}  rounds")
        for figure in costs:
            rounds = " ".join(f"{r:.3f}" for r in figure["ratios"])
            direct, routed = figure["direct_median"], figure["routed_median"]
            print(f"{figure['driver']:<8} {direct:>13.0f} {routed:>13.0f} "
                  f"{figure['ratio_median']:>6.3f}  {rounds}")  # fmt: skip
    bars(rows, costs)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"runs": rows, "cost": costs}, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="spread,stop,lag,cost")
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="load per scenario (at least 16 for stop and lag)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="cost: alternating rounds")
    parser.add_argument("--cost-seconds", type=float, default=2.0)
    parser.add_argument("--timeline", action="store_true", default=True)
    parser.add_argument("--json", default=None)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

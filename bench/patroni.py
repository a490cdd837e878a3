"""Patroni failovers: stock SQLAlchemy and the fault-tolerant pool side by side, on a real cluster.

One cluster (etcd, two Patroni nodes, HAProxy; ``ttl`` 10, ``loop_wait`` 1, HAProxy checks every
second) serves every run. For each fault, route (HAProxy's read-write port, or a multi-host URL
with ``target_session_attrs=read-write``), driver and setup (stock ``QueuePool`` /
``AsyncAdaptedQueuePool`` with ``pool_pre_ping=True``, then ``FaultTolerantQueuePool`` with its
defaults and ``pool_pre_ping=True``), ``--workers`` writers loop one-row writes; 1 s in, the
fault strikes the leader; the run ends 2 s after the new leader is writable and routed. Between
runs the cluster is restored (every node back, a leader, a streaming replica, HAProxy routing).

Measured per run: failed checkouts, failed statements (most per worker), when Patroni reported
the new leader writable and when HAProxy routed to it ("ready", seconds after the fault), the
first write on the new leader, and the lag between them (the pool's share of the outage).

    .venv/bin/python bench/patroni.py                       # everything (about 6 minutes)
    .venv/bin/python bench/patroni.py --faults switchover --routes haproxy --repeat 3
    .venv/bin/python bench/patroni.py --png docs/patroni.png --json /tmp/patroni.json
    .venv/bin/python bench/patroni.py --from-json /tmp/patroni.json --png docs/patroni.png
    .venv/bin/python bench/patroni.py --faults crash,fence,partition   # the ttl-long outages
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_tolerant_pool import FaultTolerantQueuePool
from fault_tolerant_pool.testing.patroni import PatroniCluster
from tests.reliability import patroni

BUCKET = 0.1


def _pools(driver: str) -> dict[str, type]:
    stock = QueuePool if driver == "psycopg" else AsyncAdaptedQueuePool
    return {"stock": stock, "fault_tolerant": FaultTolerantQueuePool}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with PatroniCluster() as cluster:
        patroni.prepare(cluster)
        for fault in args.faults.split(","):
            for route in args.routes.split(","):
                for driver in args.drivers.split(","):
                    for _ in range(args.repeat):
                        for setup, poolclass in _pools(driver).items():
                            await asyncio.to_thread(cluster.restore)
                            result = await patroni.scenario(
                                cluster, fault, route, driver, poolclass,  # type: ignore[arg-type]
                                setup=setup, workers=args.workers, pool_pre_ping=True,
                            )  # fmt: skip
                            row = result.summary()
                            row.update(driver=driver, setup=setup)
                            row["timeline"] = _buckets(result)
                            rows.append(row)
                            print(
                                f"{fault:16} {route:9} {driver:14} {setup:14} "
                                f"ok={row['ok']:6} checkouts={row['failed_checkouts']:5} "
                                f"statements={row['failed_statements']:4} "
                                f"(per worker {row['per_worker']}) ready={_fmt(row['ready'])} "
                                f"first={_fmt(row['first_write'])} lag={_fmt(row['lag'])}",
                                flush=True,
                            )
                            if args.verbose:
                                print("   ", row["errors"], row["events"])
    return rows


def _buckets(result: patroni.PatroniRun) -> dict[str, Any]:
    """Writes per :data:`BUCKET` seconds from 1 s before the fault, by node, and failures."""
    start = result.fault_at - 1.0
    ports = {node.pg_port: node.name for node in (result.old, result.new)}
    series: dict[str, dict[int, int]] = {}
    for write in result.run.writes:
        if write.ended < start:
            continue
        key = ports.get(write.port or -1, "failed") if write.stage == "ok" else "failed"
        bucket = int((write.ended - start) / BUCKET)
        series.setdefault(key, {})
        series[key][bucket] = series[key].get(bucket, 0) + 1
    return {"start": -1.0, "bucket": BUCKET, "series": series, "ready": result.summary()["ready"]}


def report(rows: list[dict[str, Any]]) -> None:
    print()
    print("medians per fault, route, driver and setup (seconds after the fault)")
    print(
        f"{'fault':16} {'route':9} {'driver':14} {'setup':14} {'failed co':>9} "
        f"{'stmts/wkr':>9} {'ready':>6} {'first':>6} {'lag':>6}"
    )
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["fault"], row["route"], row["driver"], row["setup"])
        groups.setdefault(key, []).append(row)
    for key, group in groups.items():

        def med(name: str, group: list[dict[str, Any]] = group) -> float | None:
            values = [r[name] for r in group if r[name] is not None]
            return statistics.median(values) if values else None

        print(
            f"{key[0]:16} {key[1]:9} {key[2]:14} {key[3]:14} "
            f"{max(r['failed_checkouts'] for r in group):9} "
            f"{max(r['per_worker'] for r in group):9} {_fmt(med('ready')):>6} "
            f"{_fmt(med('first_write')):>6} {_fmt(med('lag')):>6}"
        )


def chart(rows: list[dict[str, Any]], path: str) -> None:
    """Writes per 100 ms through a switchover via HAProxy, stock above, this pool below."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print(f"matplotlib is not installed: no chart ({path}); pip install -e '.[bench]'")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [
        r for r in rows if r["fault"] == "switchover" and r["route"] == "haproxy"
    ]
    wanted = [s for s in ("stock", "fault_tolerant") if any(r["setup"] == s for r in picks)]
    if not wanted:
        print("no switchover through HAProxy in this run: no chart")
        return
    figure, axes = plt.subplots(len(wanted), 1, figsize=(9, 2.6 * len(wanted)), sharex=True)
    if len(wanted) == 1:
        axes = [axes]
    for axis, setup in zip(axes, wanted, strict=True):
        row = next(r for r in picks if r["setup"] == setup)
        timeline = row["timeline"]
        for name, by_bucket in sorted(timeline["series"].items()):
            counts = {int(x): n for x, n in by_bucket.items()}  # str keys when read from JSON
            xs = sorted(counts)
            axis.bar(
                [timeline["start"] + x * timeline["bucket"] for x in xs],
                [counts[x] for x in xs],
                width=timeline["bucket"],
                align="edge",
                label=name,
                color="tab:red" if name == "failed" else None,
                alpha=0.8,
            )
        if timeline["ready"] is not None:
            axis.axvline(timeline["ready"], color="black", linestyle="--", label="route ready")
        axis.axvline(0.0, color="grey", linestyle=":", label="switchover")
        axis.set_title(f"{setup} ({row['driver']}): writes per 100 ms by node")
        axis.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds after the switchover began")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--drivers", default="asyncpg,psycopg_async,psycopg")
    parser.add_argument("--routes", default="haproxy,multihost")
    parser.add_argument("--faults", default="switchover,stop_patroni,kill_postmaster")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--png", help="write the switchover timeline chart here")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--from-json", help="no run: report (and chart) a run written by --json")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        report(rows)
        if args.png:
            chart(rows, args.png)
        return
    rows = asyncio.run(run_all(args))
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
        chart(rows, args.png)


if __name__ == "__main__":
    main()

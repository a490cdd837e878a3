"""Patroni scenarios shared by the reliability tests and ``bench/patroni.py``.

``workers`` loops write one row each (``INSERT ... inet_server_port()``, its own transaction)
through one engine (HAProxy's read-write port, or a multi-host URL over the nodes), while the
cluster is broken one way (:data:`FAULTS`). Every request is recorded (see ``failover.py``), and
beside it the cluster's own timeline: when Patroni reported the new leader writable and when
HAProxy routed to it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from fault_tolerant_pool.testing.patroni import ClusterTimeline, PatroniCluster, PatroniNode

from . import failover
from .failover import TABLE, WRITE, Run, Write

Route = Literal["haproxy", "multihost"]
Fault = Literal["switchover", "kill_postmaster", "stop_patroni", "crash", "fence", "partition"]

#: fault -> (what it does to the leader, whether the leader node changes)
FAULTS: dict[str, tuple[Callable[[PatroniCluster], PatroniNode], bool]] = {
    "switchover": (PatroniCluster.switchover, True),
    "kill_postmaster": (PatroniCluster.kill_leader_postmaster, False),
    "stop_patroni": (PatroniCluster.stop_leader, True),
    "crash": (PatroniCluster.crash_leader, True),
    "fence": (PatroniCluster.fence_leader, True),
    "partition": (PatroniCluster.partition_leader, True),
}


@dataclass
class PatroniRun:
    run: Run
    timeline: ClusterTimeline
    fault: str
    route: Route
    old: PatroniNode
    new: PatroniNode
    fault_at: float

    @property
    def ready_at(self) -> float | None:
        """When writes could reach the new leader by this route: Patroni reported it writable
        (and, through HAProxy, HAProxy routed to it, or already did)."""
        writable = self.timeline.writable.get(self.new.name)
        if writable is None:
            return None
        if self.route == "multihost":
            return writable
        routed = self.timeline.routed.get(self.new.name, self.fault_at)
        return max(writable, routed)

    @property
    def first_write(self) -> float | None:
        """When the first write on the new leader after the fault ended (for a leader restarted
        in place: after Patroni reported it down, as backends outlive a killed postmaster)."""
        since = self.fault_at
        if self.new is self.old:
            since = self.timeline.down.get(self.new.name, self.fault_at)
        ends = [
            w.ended
            for w in self.run.writes
            if w.port == self.new.pg_port and w.started >= self.fault_at and w.ended >= since
        ]
        return min(ends) if ends else None

    def lag(self) -> float | None:
        """Seconds from the route being ready to the first write landing on the new leader."""
        ready, first = self.ready_at, self.first_write
        return None if ready is None or first is None else first - ready

    def summary(self) -> dict[str, Any]:
        run = self.run
        rel = self.fault_at

        def at(value: float | None) -> float | None:
            return None if value is None else round(value - rel, 3)

        return {
            "fault": self.fault,
            "route": self.route,
            "ok": run.count("ok"),
            "failed_checkouts": run.count("checkout"),
            "failed_statements": run.count("statement") + run.count("timeout"),
            "per_worker": run.failed_statements_per_worker(),
            "errors": dict(run.errors()),
            "ready": at(self.ready_at),
            "first_write": at(self.first_write),
            "lag": None if self.lag() is None else round(self.lag() or 0.0, 3),
            "longest_checkout": round(run.longest_checkout(), 3),
            "events": [(round(t - rel, 3), e) for t, e in self.timeline.events],
            "hung": run.hung,
        }


def prepare(cluster: PatroniCluster, timeout: float = 30.0) -> None:
    """The table every write goes to, on the leader, and seen on every replica (so the leader a
    fault makes has it)."""
    leader = cluster.wait_healthy()
    leader.psql(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, port int, "
        "at timestamptz DEFAULT clock_timestamp())"
    )
    deadline = time.monotonic() + timeout
    for node in cluster.nodes:
        while node is not leader:
            rows = node.psql(f"SELECT to_regclass('{TABLE}') IS NOT NULL")
            if rows and rows[0][0] == "t":
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{TABLE} not replicated to {node.name}: {cluster.describe()}")
            time.sleep(0.1)


def url_for(cluster: PatroniCluster, route: Route, driver: str) -> str:
    if route == "haproxy":
        return cluster.haproxy_url(driver)
    return cluster.multi_host_url(driver)


def _sync_engine_kw(poolclass: type, workers: int, kw: dict[str, Any]) -> dict[str, Any]:
    if not issubclass(poolclass, NullPool):
        kw = {"pool_size": workers, "max_overflow": 0, **kw}
    return kw


def _sync_write(engine: sa.engine.Engine) -> Write:
    started = time.monotonic()
    try:
        conn = engine.connect()
    except Exception as error:
        now = time.monotonic()
        return Write(started, now, "checkout", error=type(error).__name__, checkout=now - started)
    checked_out = time.monotonic()
    try:
        with conn:
            port = conn.execute(sa.text(WRITE)).scalar_one()
            conn.commit()
    except sa.exc.DBAPIError as error:
        inner = error.orig if isinstance(error.orig, BaseException) else error
        return Write(
            started, time.monotonic(), "statement", error=type(inner).__name__,
            checkout=checked_out - started,
        )  # fmt: skip
    return Write(started, time.monotonic(), "ok", int(port), checkout=checked_out - started)


async def _sync_load(
    run: Run, engine: sa.engine.Engine, workers: int, timeline: Callable[[Run], Any]
) -> Run:
    """``workers`` threads writing through a sync engine while ``timeline`` runs."""
    stop = threading.Event()
    run.per_worker = [Counter() for _ in range(workers)]
    lock = threading.Lock()

    def work(index: int) -> None:
        counter = run.per_worker[index]
        while not stop.is_set():
            outcome = _sync_write(engine)
            with lock:
                run.writes.append(outcome)
            counter[outcome.stage] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        await timeline(run)
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 15.0)
        run.hung = sum(thread.is_alive() for thread in threads)
    return run


async def scenario(
    cluster: PatroniCluster,
    fault: str,
    route: Route,
    driver: str,
    poolclass: type,
    *,
    setup: str = "ft",
    workers: int = 20,
    warm: float = 1.0,
    after: float = 2.0,
    leader_timeout: float = 40.0,
    **engine_kw: Any,
) -> PatroniRun:
    """One run: ``workers`` writers on ``route``; ``warm`` s in, ``fault`` strikes the leader;
    the run ends ``after`` s once the new leader is writable (and routed, through HAProxy)."""
    action, moves = FAULTS[fault]
    url = url_for(cluster, route, driver)
    sync = driver == "psycopg"
    marks: dict[str, Any] = {}

    async def timeline(run: Run) -> None:
        await asyncio.sleep(warm)
        with cluster.watch() as watched:
            marks["timeline"] = watched
            marks["fault_at"] = run.marks["fault"] = time.monotonic()
            old = await asyncio.to_thread(action, cluster)
            marks["old"] = old
            new = await asyncio.to_thread(
                cluster.wait_leader, leader_timeout, old if moves else None
            )
            marks["new"] = new
            deadline = time.monotonic() + leader_timeout
            while time.monotonic() < deadline:
                ready = PatroniRun(
                    run, watched, fault, route, old, new, marks["fault_at"]
                ).ready_at
                if ready is not None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(after)

    run = Run(f"patroni_{fault}", setup, driver, time.monotonic())
    if sync:
        engine = sa.create_engine(
            url, poolclass=poolclass, **_sync_engine_kw(poolclass, workers, engine_kw)
        )
        try:
            await _sync_load(run, engine, workers, timeline)
        finally:
            await asyncio.to_thread(engine.dispose)
    else:
        engine_async = failover.engine_for(url, poolclass, pool_size=workers, **engine_kw)
        try:
            await failover.run_load(run, engine_async, workers, timeline)
        finally:
            await asyncio.wait_for(engine_async.dispose(), 30)
    return PatroniRun(
        run, marks["timeline"], fault, route, marks["old"], marks["new"], marks["fault_at"]
    )

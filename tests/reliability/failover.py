"""Failover scenarios shared by the reliability tests and ``bench/failover.py``.

Each scenario runs ``workers`` tasks that loop a one-row write (``INSERT ... inet_server_port()``
in its own transaction) through one engine, breaks the cluster on a timeline, and records the
fate of every request: when it started and ended, whether the checkout or the statement failed,
and which server took the write.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from fault_tolerant_pool.testing import FaultProxy, PostgresServer, multi_host_url

Stage = Literal["ok", "checkout", "statement", "timeout"]

TABLE = "failover_writes"
WRITE = f"INSERT INTO {TABLE} (port) VALUES (inet_server_port()) RETURNING port"


@dataclass(frozen=True)
class Write:
    started: float
    ended: float
    stage: Stage
    port: int | None = None
    error: str = ""
    checkout: float = 0.0
    """Seconds the checkout took (until it failed, for a failed one)."""


@dataclass
class Run:
    """The outcome of one scenario run."""

    scenario: str
    setup: str
    driver: str
    started: float
    writes: list[Write] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    """Timeline events (monotonic seconds): ``demoted``, ``promoted``, ``blackholed`` ..."""
    per_worker: list[Counter[str]] = field(default_factory=list)
    hung: int = 0
    """Workers still inside a request when the run ended (waited for 2 s more, then cancelled)."""

    def count(self, stage: Stage) -> int:
        return sum(w.stage == stage for w in self.writes)

    def first_on(self, port: int, after: float = 0.0) -> float | None:
        """When the first write that landed on ``port`` ended (monotonic), or None."""
        ends = [w.ended for w in self.writes if w.port == port and w.ended >= after]
        return min(ends) if ends else None

    def failed_statements_per_worker(self) -> int:
        return max((c["statement"] + c["timeout"] for c in self.per_worker), default=0)

    def longest_checkout(self) -> float:
        return max((w.checkout for w in self.writes), default=0.0)

    def errors(self) -> Counter[str]:
        return Counter(f"{w.stage}:{w.error}" for w in self.writes if w.stage != "ok")


def _label(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    inner = orig if isinstance(orig, BaseException) else error
    last = getattr(inner, "last_error", None)
    if isinstance(last, BaseException):
        inner = last
    return type(inner).__name__


async def write(engine: AsyncEngine, timeout: float | None) -> Write:
    """One write in its own transaction; never raises (lets cancellation through)."""
    started = time.monotonic()
    try:
        conn = await engine.connect()
    except Exception as error:
        now = time.monotonic()
        return Write(started, now, "checkout", error=_label(error), checkout=now - started)
    checked_out = time.monotonic()
    try:
        try:
            if timeout is None:
                port = await _insert(conn)
            else:
                port = await asyncio.wait_for(_insert(conn), timeout)
        finally:
            await conn.close()
    except asyncio.TimeoutError:
        return Write(started, time.monotonic(), "timeout", checkout=checked_out - started)
    except sa.exc.DBAPIError as error:
        return Write(
            started, time.monotonic(), "statement", error=_label(error),
            checkout=checked_out - started,
        )  # fmt: skip
    return Write(started, time.monotonic(), "ok", port, checkout=checked_out - started)


async def _insert(conn: Any) -> int:
    port = (await conn.execute(sa.text(WRITE))).scalar_one()
    await conn.commit()
    return int(port)


async def run_load(
    run: Run,
    engine: AsyncEngine,
    workers: int,
    timeline: Callable[[Run], Awaitable[None]],
    *,
    pause: float = 0.002,
    timeout: float | None = None,
) -> Run:
    """``workers`` write loops while ``timeline`` runs; stops when it returns."""
    stop = asyncio.Event()
    run.per_worker = [Counter() for _ in range(workers)]

    async def work(index: int) -> None:
        counter = run.per_worker[index]
        while not stop.is_set():
            outcome = await write(engine, timeout)
            run.writes.append(outcome)
            counter[outcome.stage] += 1
            await asyncio.sleep(pause)

    tasks = [asyncio.create_task(work(i)) for i in range(workers)]
    try:
        await timeline(run)
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=2.0)
        run.hung = len(pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10.0)
    return run


def prepare(primary: PostgresServer) -> None:
    """The table every write goes to (replicated to the standby)."""
    primary.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, port int, "
        "at timestamptz DEFAULT clock_timestamp())"
    )


def engine_for(
    url: str, poolclass: type, *, pool_size: int, max_overflow: int = 0, **kw: Any
) -> AsyncEngine:
    if not issubclass(poolclass, NullPool):
        kw.update(pool_size=pool_size, max_overflow=max_overflow)
    return create_async_engine(url, poolclass=poolclass, **kw)


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def _marked(run: Run, name: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run a blocking fault in a thread; mark ``<name>ing`` before it, ``<name>ed`` after."""
    run.marks[f"{name}ing"] = time.monotonic()
    await _thread(fn, *args)
    run.marks[f"{name}ed"] = time.monotonic()


async def _scenario(
    scenario: str,
    url: str,
    driver: str,
    poolclass: type,
    setup: str,
    workers: int,
    timeline: Callable[[Run], Awaitable[None]],
    engine_kw: dict[str, Any],
    **load_kw: Any,
) -> Run:
    """One engine on ``url`` (pool ``workers`` + 0), the write load while ``timeline`` runs."""
    engine = engine_for(url, poolclass, pool_size=workers, **engine_kw)
    run = Run(scenario, setup, driver, time.monotonic())
    try:
        return await run_load(run, engine, workers, timeline, **load_kw)
    finally:
        await asyncio.wait_for(engine.dispose(), 30)


# -- the scenarios ------------------------------------------------------------------------------


async def demote_then_promote(
    primary: PostgresServer,
    standby: PostgresServer,
    driver: str,
    poolclass: type,
    setup: str,
    *,
    workers: int = 20,
    warm: float = 1.0,
    gap: float = 1.0,
    after: float = 3.0,
    **engine_kw: Any,
) -> Run:
    """The writer turns read-only while reachable; ``gap`` seconds later the standby is
    promoted. Multi-host URL, ``target_session_attrs=read-write``, pool ``workers`` + 0."""

    async def timeline(run: Run) -> None:
        await asyncio.sleep(warm)
        await _marked(run, "demot", primary.set_read_only, True)
        await asyncio.sleep(gap)
        await _marked(run, "promot", standby.promote)
        await asyncio.sleep(after)

    url = multi_host_url(driver, [primary, standby])
    return await _scenario(
        "demote_then_promote", url, driver, poolclass, setup, workers, timeline, engine_kw
    )


async def stop_then_promote(
    primary: PostgresServer,
    standby: PostgresServer,
    driver: str,
    poolclass: type,
    setup: str,
    *,
    workers: int = 20,
    warm: float = 1.0,
    after: float = 3.0,
    **engine_kw: Any,
) -> Run:
    """A plain promotion: the primary stops (fast), the standby is promoted at once."""

    async def timeline(run: Run) -> None:
        await asyncio.sleep(warm)
        await _marked(run, "stopp", primary.stop, "fast")
        await _marked(run, "promot", standby.promote)
        await asyncio.sleep(after)

    url = multi_host_url(driver, [primary, standby])
    return await _scenario(
        "stop_then_promote", url, driver, poolclass, setup, workers, timeline, engine_kw
    )


async def blackholed_first_host(
    primary: PostgresServer,
    proxy: FaultProxy,
    driver: str,
    poolclass: type,
    setup: str,
    *,
    workers: int = 20,
    duration: float = 8.0,
    **engine_kw: Any,
) -> Run:
    """The first host of the URL drops everything from the start; the second is the primary."""
    await _thread(proxy.blackhole)

    async def timeline(run: Run) -> None:
        await asyncio.sleep(duration)

    url = multi_host_url(driver, [(proxy.host, proxy.port), primary])
    return await _scenario(
        "blackholed_first_host", url, driver, poolclass, setup, workers, timeline, engine_kw,
        timeout=duration,
    )  # fmt: skip


async def blackholed_pooled_connections(
    primary: PostgresServer,
    proxy: FaultProxy,
    driver: str,
    poolclass: type,
    setup: str,
    *,
    workers: int = 20,
    warm: float = 1.0,
    after: float = 5.0,
    pause: float = 1.2,
    request_timeout: float = 3.0,
    **engine_kw: Any,
) -> Run:
    """Every pooled connection goes through the first host (a proxy), which then black-holes
    them all (new connections too); the second host reaches the same server directly. Workers
    think ``pause`` seconds between requests (longer than ``liveness_ping_after``, so a
    checkout pings), and each request has the application's own time limit
    (``request_timeout``) for a statement caught in flight."""

    async def timeline(run: Run) -> None:
        await asyncio.sleep(warm)
        await _marked(run, "blackhol", proxy.blackhole)
        await asyncio.sleep(after)

    url = multi_host_url(driver, [(proxy.host, proxy.port), primary])
    return await _scenario(
        "blackholed_pooled_connections", url, driver, poolclass, setup, workers, timeline,
        engine_kw, pause=pause, timeout=request_timeout,
    )  # fmt: skip

"""A chaos mix of PostgreSQL faults under a write load: stock SQLAlchemy, the pool, and the pool
with the transaction runner, side by side in one run against the same server (issue 22).

One PostgreSQL (``max_connections`` 64) and one :class:`FaultProxy` per setup in front of it, so
a black hole or a refusal hits the three setups at once. Each setup has ``--workers`` (20) async
writers; a request is one unit of work inserting one row keyed by a fresh uuid (the table has
no unique constraint on the key, so a unit of work committed twice shows as two rows), then
returning. The setups, all with ``pool_pre_ping=True`` and the pools' default size (5 + 10):

- ``stock``: ``AsyncAdaptedQueuePool``, ``async with engine.begin()``;
- ``pool``: ``FaultTolerantQueuePool`` with its defaults, ``async with engine.begin()``;
- ``pool+runner``: the same pool, the write through ``run_transaction_async`` (its defaults;
  the benchmark passes a ``classifier`` that only records each failed run and answers None,
  "the built-in rules").

The fault schedule is fixed: after a 3 s warm-up, ``--seconds`` minus 7 s are cut into equal
slots (one cycle of six faults per 80 s, at least one cycle), and each slot begins with the next
fault of the cycle, the rest of the slot being recovery:

- ``restart``: fast stop, down 2 s, start;
- ``crash``: immediate stop, start at once (the server replays its WAL and answers 57P03);
- ``terminate``: ``pg_terminate_backend`` of every client session;
- ``blackhole``: the three proxies stop forwarding for 4 s (open and new connections hang);
- ``refuse``: the three proxies refuse new connections for 4 s;
- ``exhaust``: another client (the same role, directly to the server) takes every free
  connection slot for 4 s, re-taking any slot freed meanwhile: logins get 53300.

No statement or TCP timeout is given to any setup: a statement in flight on a black-holed
connection waits for the hole to end (the pools' ``ping_timeout``, 2 s, cuts their pings).

Afterwards the table is read back and, per setup, the benchmark prints: requests, failed
requests (by SQLSTATE or error class), unknown outcomes (``TransactionOutcomeUnknown``), rows
lost (the request returned success, no row), rows written twice (a key with two rows or more),
rows of failed requests that were in fact committed, the longest request and the throughput;
then the failures by fault and phase, the runner's re-runs, every unknown outcome, and the bar
of issue 22: with the runner, failed requests are only unknown outcomes, at most 3 a run; 0
rows lost; 0 written twice. Each driver is a separate run of the whole schedule.

    .venv/bin/python bench/chaos.py --seconds 40 --drivers asyncpg          # a quick check
    .venv/bin/python bench/chaos.py --json /tmp/chaos.json --log /tmp/chaos.log  # ~6 minutes
    .venv/bin/python bench/chaos.py --trace-server --json /tmp/chaos-traced.json
    .venv/bin/pip install -e ".[bench]"                                     # for --png
    .venv/bin/python bench/chaos.py --png /tmp/chaos.png

``--log`` writes the pools' and the runner's warnings and one line per failed request (or
failed run of the runner) with its time, fault, phase and message. ``--trace-server`` has the
server log every statement with its backend's pid and tells, for every request that failed in
COMMIT, whether its COMMIT ever reached its session (``COMMIT received``), or the session ended
first (``ended before COMMIT``: its FATAL is logged before; ``no COMMIT``: nothing more logged,
as after an immediate stop). It costs the server some throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_tolerant_pool import (
    FaultTolerantQueuePool,
    TransactionOutcomeUnknown,
    run_transaction_async,
)
from fault_tolerant_pool.classify import innermost_class, sqlstate_of
from fault_tolerant_pool.testing import FaultProxy, PostgresServer

SETUPS = ("stock", "pool", "pool+runner")
FAULTS = ("restart", "crash", "terminate", "blackhole", "refuse", "exhaust")
WARM_UP = 3.0  # seconds of load before the first fault
TAIL = 4.0  # seconds of load after the last slot
CYCLE = 80.0  # seconds per cycle of the six faults (the slots stretch to fill --seconds)
MIN_SLOT = 5.0  # the longest fault (4 s) and one second of recovery
RESTART_DOWN = 2.0
HOLE = 4.0  # black hole, refusal and exhaustion
MAX_CONNECTIONS = 64
ROLE, ROLE_PASSWORD = "chaos", "chaos-bench-pw"
BAR_UNKNOWN = 3
BUCKET = 1.0

INSERT = sa.text("INSERT INTO chaos_writes (request_key, setup) VALUES (:key, :setup)")

logger = logging.getLogger("bench.chaos")

#: Names of the SQLSTATEs met here, for the printed labels.
SQLSTATE_NAMES = {
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "53300": "too_many_connections",
    "08006": "connection_failure",
    "08003": "connection_does_not_exist",
    "08001": "unable_to_connect",
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
}


def label_of(error: BaseException) -> str:
    """The SQLSTATE (with its name) or, without one, the driver's error class."""
    code = sqlstate_of(error)
    if code is None:
        return innermost_class(error)
    name = SQLSTATE_NAMES.get(code)
    return f"{code} {name}" if name else code


def message_of(error: BaseException) -> str:
    """The innermost error's message on one line (shortened)."""
    inner: BaseException = error
    for _ in range(8):
        orig = getattr(inner, "orig", None)
        nxt = orig if isinstance(orig, BaseException) else inner.__cause__
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = " ".join(str(inner).split()) or type(inner).__name__
    return f"{type(inner).__name__}: {text}"[:220]


# -- the records -----------------------------------------------------------------------------------


@dataclass
class Failure:
    """One failed request (or, for the runner, one failed run that was run again)."""

    at: float  # seconds since the load started
    fault: str
    phase: str  # checkout, work, commit
    label: str
    message: str
    key: str
    unknown: bool = False
    rerun: bool = False  # a run the runner ran again (not a failed request)

    @property
    def kind(self) -> str:
        """The fault without its cycle number."""
        return self.fault.split(" ")[0]


@dataclass
class Setup:
    name: str
    engine: AsyncEngine
    proxy: FaultProxy
    requests: int = 0
    ok_keys: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    reruns: list[Failure] = field(default_factory=list)
    runs_per_request: Counter[int] = field(default_factory=Counter)
    longest: float = 0.0
    longest_at: float = 0.0
    longest_by_kind: dict[str, float] = field(default_factory=dict)  # by the fault at its end
    ok_per_bucket: Counter[int] = field(default_factory=Counter)
    failed_per_bucket: Counter[int] = field(default_factory=Counter)
    pool_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fault:
    name: str
    at: float  # when it began, seconds since the load started
    until: float = 0.0  # when its action ended (server ready, proxies healthy, slots freed)
    note: str = ""


@dataclass
class Trace:
    """One request's progress: its phase and, for the runner, its failed runs so far."""

    phase: str = "checkout"
    failed: list[tuple[str, str, str, float]] = field(default_factory=list)
    last_error: BaseException | None = None


_TRACE: contextvars.ContextVar[Trace] = contextvars.ContextVar("chaos_trace")


def observe(error: BaseException) -> bool | None:
    """The runner's classifier: record the failed run (phase, label, message), change nothing."""
    trace = _TRACE.get(None)
    if trace is not None:
        trace.failed.append((trace.phase, label_of(error), message_of(error), time.monotonic()))
        trace.last_error = error
        trace.phase = "checkout"  # a re-run begins with a checkout
    return None


class Clock:
    """Seconds since the load started, and which fault a moment belongs to."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.faults: list[Fault] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def fault_at(self, at: float) -> str:
        name = "warm-up"
        counts: Counter[str] = Counter()
        for fault in self.faults:
            if fault.at > at:
                break
            counts[fault.name] += 1
            name = f"{fault.name} {counts[fault.name]}"
        return name


# -- the load --------------------------------------------------------------------------------------


async def plain_write(engine: AsyncEngine, key: uuid.UUID, setup: str, trace: Trace) -> None:
    async with engine.begin() as conn:
        trace.phase = "work"
        await conn.execute(INSERT, {"key": key, "setup": setup})
        trace.phase = "commit"  # COMMIT is sent when the block exits


async def runner_write(engine: AsyncEngine, key: uuid.UUID, setup: str, trace: Trace) -> None:
    async def unit(conn: AsyncConnection) -> None:
        trace.phase = "work"
        await conn.execute(INSERT, {"key": key, "setup": setup})
        trace.phase = "commit"  # the runner sends COMMIT once this returns

    await run_transaction_async(engine, unit, classifier=observe)


async def writer(setup: Setup, clock: Clock, stop: float, log: Callable[[str], None]) -> None:
    runner = setup.name == "pool+runner"
    write = runner_write if runner else plain_write
    while time.monotonic() < stop:
        key = uuid.uuid4()
        trace = Trace()
        token = _TRACE.set(trace)
        began = time.monotonic()
        failure: Failure | None = None
        reruns = trace.failed
        try:
            await write(setup.engine, key, setup.name, trace)
        except Exception as error:
            at = time.monotonic() - clock.started
            unknown = isinstance(error, TransactionOutcomeUnknown)
            phase = trace.phase
            cause = error.__cause__ if unknown else error
            if trace.failed and cause is trace.last_error:  # the runner's last run: recorded
                phase = trace.failed[-1][0]
                reruns = trace.failed[:-1]
            failure = Failure(
                at, clock.fault_at(at), phase, label_of(error), message_of(error), str(key),
                unknown=unknown,
            )  # fmt: skip
            del error, cause  # keep no traceback (thousands make the collector pause the loop)
        finally:
            _TRACE.reset(token)
            trace.last_error = None
        ended = time.monotonic()
        setup.requests += 1
        took = ended - began
        if took > setup.longest:
            setup.longest, setup.longest_at = took, began - clock.started
        kind = clock.fault_at(ended - clock.started).split(" ")[0]
        setup.longest_by_kind[kind] = max(took, setup.longest_by_kind.get(kind, 0.0))
        bucket = int((ended - clock.started) / BUCKET)
        for phase, label, message, t in reruns:
            at = t - clock.started
            rerun = Failure(at, clock.fault_at(at), phase, label, message, str(key), rerun=True)
            setup.reruns.append(rerun)
            log(f"{at:8.3f} {setup.name:12} re-run  {rerun.fault:12} {phase:8} {label}: {message}")
        setup.runs_per_request[len(reruns) + 1] += 1
        if failure is None:
            setup.ok_keys.append(str(key))
            setup.ok_per_bucket[bucket] += 1
        else:
            setup.failures.append(failure)
            setup.failed_per_bucket[bucket] += 1
            what = "unknown" if failure.unknown else "failed"
            log(
                f"{failure.at:8.3f} {setup.name:12} {what:7} {failure.fault:12} "
                f"{failure.phase:8} {failure.label}: {failure.message} (took {ended - began:.3f}s)"
            )
        # Yield between requests (psycopg fails without yielding; a task that never yields
        # would starve the others, the fault schedule's included).
        await asyncio.sleep(0)


# -- the faults ------------------------------------------------------------------------------------


def is_too_many(error: BaseException) -> bool:
    """A login refused for want of a connection slot (53300)."""
    if sqlstate_of(error) == "53300":
        return True
    text = str(error).lower()
    return "too many clients" in text or "remaining connection slots are reserved" in text


class Hog:
    """Another client of the same role, connecting straight to the server, that takes slots."""

    def __init__(self, driver: str, server: PostgresServer) -> None:
        self.driver = driver
        self.server = server
        self.held: list[Any] = []
        self.refused = 0

    async def _connect(self) -> Any:
        host, port = self.server.host, self.server.port
        if self.driver == "asyncpg":
            import asyncpg  # type: ignore[import-untyped,unused-ignore]

            return await asyncpg.connect(
                host=host, port=port, user=ROLE, password=ROLE_PASSWORD,
                database=self.server.dbname, timeout=5,
            )  # fmt: skip
        import psycopg

        return await psycopg.AsyncConnection.connect(
            host=host, port=port, user=ROLE, password=ROLE_PASSWORD,
            dbname=self.server.dbname, connect_timeout=5,
        )  # fmt: skip

    async def take_one(self) -> bool:
        """Take a slot if one is free; False once the server refuses with 53300."""
        try:
            self.held.append(await self._connect())
        except Exception as error:
            if not is_too_many(error):
                raise
            self.refused += 1
            return False
        return True

    async def hold(self, seconds: float) -> int:
        """Take every free slot, keep them (re-taking freed ones) for ``seconds``; how many."""
        try:
            while len(self.held) < MAX_CONNECTIONS and await self.take_one():
                pass
            taken = len(self.held)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(0.05)
                await self.take_one()
            return taken
        finally:
            for conn in self.held:
                with contextlib.suppress(Exception):
                    await conn.close()
            self.held.clear()


async def inject(
    name: str, server: PostgresServer, proxies: list[FaultProxy], hog: Hog, clock: Clock
) -> Fault:
    fault = Fault(name, clock.now())
    clock.faults.append(fault)
    if name == "restart":
        await asyncio.to_thread(server.stop, "fast")
        await asyncio.sleep(RESTART_DOWN)
        await asyncio.to_thread(server.start)
    elif name == "crash":
        await asyncio.to_thread(server.stop, "immediate")
        await asyncio.to_thread(server.start)
    elif name == "terminate":
        count = await asyncio.to_thread(server.terminate_backends)
        fault.note = f"{count} sessions terminated"
    elif name in ("blackhole", "refuse"):
        for proxy in proxies:
            await asyncio.to_thread(proxy.blackhole if name == "blackhole" else proxy.refuse)
        await asyncio.sleep(HOLE)
        for proxy in proxies:
            await asyncio.to_thread(proxy.healthy)
    elif name == "exhaust":
        taken = await hog.hold(HOLE)
        fault.note = f"{taken} slots taken, {hog.refused} of its logins refused"
        hog.refused = 0
    else:
        raise ValueError(name)
    fault.until = clock.now()
    return fault


def schedule(seconds: float) -> list[tuple[float, str]]:
    """(seconds since the load started, fault) of the whole run: fixed for a given --seconds."""
    span = seconds - WARM_UP - TAIL
    cycles = max(1, round(span / CYCLE))
    slots = cycles * len(FAULTS)
    slot = span / slots
    if slot < MIN_SLOT:
        raise SystemExit(
            f"--seconds {seconds:g} is too short: six faults need at least "
            f"{WARM_UP + TAIL + MIN_SLOT * len(FAULTS):g} s"
        )
    return [(WARM_UP + i * slot, FAULTS[i % len(FAULTS)]) for i in range(slots)]


# -- one run: one driver, the three setups, the whole schedule -------------------------------------


@dataclass
class Run:
    driver: str
    seconds: float
    workers: int
    date: str
    faults: list[Fault]
    setups: list[dict[str, Any]]


def make_engine(url: str, setup: str) -> AsyncEngine:
    poolclass = AsyncAdaptedQueuePool if setup == "stock" else FaultTolerantQueuePool
    return create_async_engine(url, poolclass=poolclass, pool_pre_ping=True)


def prepare(server: PostgresServer) -> None:
    server.create_role(ROLE, ROLE_PASSWORD)
    server.execute(
        "CREATE TABLE chaos_writes (request_key uuid NOT NULL, setup text NOT NULL, "
        "written_at timestamptz NOT NULL DEFAULT clock_timestamp()); "
        f"ALTER TABLE chaos_writes OWNER TO {ROLE}"
    )


async def read_back(server: PostgresServer, driver: str) -> dict[str, Counter[str]]:
    """Rows per request key, per setup."""
    engine = create_async_engine(server.url(driver), poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.text("SELECT setup, request_key::text, count(*) FROM chaos_writes GROUP BY 1, 2")
            )
            rows: dict[str, Counter[str]] = {name: Counter() for name in SETUPS}
            for setup, key, count in result:
                rows.setdefault(setup, Counter())[key] = count
            return rows
    finally:
        await engine.dispose()


#: The server's log with ``--trace-server``: every statement, with the backend's pid.
TRACE_SETTINGS = {"log_statement": "all", "log_line_prefix": "%m [%p] "}
_LOG_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] ([A-Z]+):  (.*)$")
_KEY_PARAMETER = re.compile(r"\$1 = '([0-9a-f-]{36})'")


def what_the_server_saw(log_text: str, keys: set[str]) -> dict[str, str]:
    """For each key, what the backend that ran its INSERT did next: ``COMMIT received`` (it read
    the COMMIT: the outcome is truly unknown to the client), ``ended before COMMIT: ...`` (it
    logged its end first) or ``no COMMIT`` (it logged nothing more: killed, or never sent one).
    A key whose INSERT never ran is absent. The last INSERT of a key wins (a re-run's)."""
    seen: dict[str, str] = {}
    pending: dict[str, str] = {}  # pid -> key whose INSERT it ran last
    for line in log_text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        pid, level, text = match.groups()
        if level == "DETAIL" and text.startswith("parameters:"):
            key = _KEY_PARAMETER.search(text)
            if key is not None and key.group(1) in keys:
                pending[pid] = key.group(1)
                seen[key.group(1)] = "no COMMIT"
            continue
        key_of_pid = pending.pop(pid, None)
        if key_of_pid is None:
            continue
        if level == "LOG" and text.startswith("statement: COMMIT"):
            seen[key_of_pid] = "COMMIT received"
        elif level == "LOG" and text.startswith(("statement: ", "execute ")):
            seen[key_of_pid] = f"next statement: {text[:60]}"
        else:
            seen[key_of_pid] = f"ended before COMMIT: {level} {text[:70]}"
    return seen


def stats_of(engine: AsyncEngine) -> dict[str, Any]:
    stats = getattr(engine.sync_engine.pool, "stats", None)
    if stats is None:
        return {}
    snapshot = stats()
    names = (
        "connects", "failed_attempts", "give_ups", "ping_timeouts", "fast_failures",
        "transaction_retries", "outcomes_unknown", "outcomes_resolved",
    )  # fmt: skip
    return {name: getattr(snapshot, name) for name in names}


async def run_one(driver: str, args: argparse.Namespace, log: Callable[[str], None]) -> Run:
    plan = schedule(args.seconds)
    date = time.strftime("%Y-%m-%d %H:%M")
    settings = TRACE_SETTINGS if args.trace_server else {}
    with PostgresServer(max_connections=MAX_CONNECTIONS, settings=settings) as server:
        await asyncio.to_thread(prepare, server)
        proxies = [FaultProxy(server.host, server.port).start() for _ in SETUPS]
        setups: list[Setup] = []
        try:
            for name, proxy in zip(SETUPS, proxies, strict=True):
                url = server.url(driver, user=ROLE, password=ROLE_PASSWORD, port=proxy.port)
                setups.append(Setup(name, make_engine(url, name), proxy))
            for s in setups:  # warm: the dialect is initialised, one connection made
                async with s.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            hog = Hog(driver, server)
            clock = Clock()
            stop = clock.started + args.seconds
            log(f"--- {driver}: load started")

            async def faults() -> None:
                for at, name in plan:
                    await asyncio.sleep(max(0.0, clock.started + at - time.monotonic()))
                    log(f"{clock.now():8.3f} fault   {name} begins")
                    fault = await inject(name, server, proxies, hog, clock)
                    log(f"{clock.now():8.3f} fault   {name} done {fault.note}")
                    print(
                        f"  {driver} {clock.fault_at(fault.at):12} at {fault.at:6.1f} s, "
                        f"until {fault.until:6.1f} s {fault.note}",
                        flush=True,
                    )

            writers = [writer(s, clock, stop, log) for s in setups for _ in range(args.workers)]
            await asyncio.gather(faults(), *writers)
            for s in setups:
                s.pool_stats = stats_of(s.engine)
                await s.engine.dispose()
        finally:
            for proxy in proxies:
                proxy.stop()
        rows = await read_back(server, driver)
        saw: dict[str, str] = {}
        if args.trace_server:
            keys = {f.key for s in setups for f in s.failures if f.phase == "commit"}
            saw = await asyncio.to_thread(what_the_server_saw, server.read_log(), keys)
    figures = [summarise(s, rows.get(s.name, Counter()), clock, saw) for s in setups]
    return Run(driver, args.seconds, args.workers, date, clock.faults, figures)


def summarise(
    setup: Setup, rows: Counter[str], clock: Clock, saw: dict[str, str]
) -> dict[str, Any]:
    """A setup's figures, its keys checked against the rows read back."""
    ok = set(setup.ok_keys)
    lost = [key for key in setup.ok_keys if rows[key] == 0]
    twice = {key: n for key, n in rows.items() if n > 1}
    failed_committed = [f for f in setup.failures if rows[f.key] > 0]
    known = ok | {f.key for f in setup.failures}
    stray = sum(n for key, n in rows.items() if key not in known)
    unknowns = [f for f in setup.failures if f.unknown]
    duration = max(clock.now(), 1e-9)

    def breakdown(failures: list[Failure], *fields: str) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for f in failures:
            counts[" | ".join(str(getattr(f, name)) for name in fields)] += 1
        return dict(counts.most_common())

    return {
        "setup": setup.name,
        "requests": setup.requests,
        "ok": len(setup.ok_keys),
        "failed": len(setup.failures),
        "unknown": len(unknowns),
        "rows_lost": len(lost),
        "written_twice": len(twice),
        "failed_but_committed": len(failed_committed),
        "unknown_committed": sum(1 for f in unknowns if rows[f.key] > 0),
        "rows_without_request": stray,
        "longest_s": round(setup.longest, 3),
        "longest_began_at": round(setup.longest_at, 3),
        "throughput": round(len(setup.ok_keys) / duration, 1),
        "failed_by_label": breakdown(setup.failures, "label"),
        "failed_by_kind": dict(Counter(f.kind for f in setup.failures)),
        "unknown_by_kind": dict(Counter(f.kind for f in unknowns)),
        "longest_by_kind": {k: round(v, 3) for k, v in setup.longest_by_kind.items()},
        "commit_failures_server_saw": dict(
            Counter(
                saw.get(f.key, "(not traced)").split(":")[0]
                for f in setup.failures
                if f.phase == "commit"
            )
        ),
        "failed_by_fault_phase": breakdown(setup.failures, "fault", "phase", "label"),
        "failed_by_kind_phase": breakdown(setup.failures, "kind", "phase", "label"),
        "reruns": len(setup.reruns),
        "reruns_by_phase_label": breakdown(setup.reruns, "phase", "label"),
        "reruns_by_fault": breakdown(setup.reruns, "kind", "phase"),
        "runs_per_request": {str(k): v for k, v in sorted(setup.runs_per_request.items())},
        "unknown_outcomes": [
            {
                "at": round(f.at, 3),
                "fault": f.fault,
                "label": f.label,
                "committed": rows[f.key] > 0,
                "server": saw.get(f.key, "(not traced)"),
                "message": f.message,
            }
            for f in unknowns
        ],
        "failures_not_unknown": [
            {
                "at": round(f.at, 3),
                "fault": f.fault,
                "phase": f.phase,
                "label": f.label,
                "committed": rows[f.key] > 0,
                "message": f.message,
            }
            for f in setup.failures
            if not f.unknown
        ][:50],
        "twice_keys": list(twice)[:20],
        "lost_keys": lost[:20],
        "ok_per_second": [setup.ok_per_bucket[i] for i in range(int(duration / BUCKET) + 1)],
        "failed_per_second": [
            setup.failed_per_bucket[i] for i in range(int(duration / BUCKET) + 1)
        ],
        "pool_stats": setup.pool_stats,
    }


# -- the report ------------------------------------------------------------------------------------


def verdict(runner: dict[str, Any]) -> tuple[bool, list[str]]:
    """Issue 22's bar for the runner column of one run."""
    reasons = []
    others = runner["failed"] - runner["unknown"]
    if others:
        reasons.append(f"{others} failed requests that are not unknown outcomes")
    if runner["unknown"] > BAR_UNKNOWN:
        reasons.append(f"{runner['unknown']} unknown outcomes (at most {BAR_UNKNOWN})")
    if runner["rows_lost"]:
        reasons.append(f"{runner['rows_lost']} rows lost")
    if runner["written_twice"]:
        reasons.append(f"{runner['written_twice']} keys written twice")
    return not reasons, reasons


def print_run(run: Run) -> None:
    print(
        f"\n{run.driver}: {run.workers} writers per setup, {run.seconds:g} s, pool 5 + 10, "
        f"pool_pre_ping; {len(run.faults)} faults ({run.date})\n"
    )
    head = (
        f"{'setup':12} {'requests':>8} {'failed':>7} {'unknown':>7} {'lost':>5} {'twice':>5} "
        f"{'failed+committed':>16} {'longest':>8} {'ok/s':>7}"
    )
    print(head)
    print("-" * len(head))
    for s in run.setups:
        print(
            f"{s['setup']:12} {s['requests']:8d} {s['failed']:7d} {s['unknown']:7d} "
            f"{s['rows_lost']:5d} {s['written_twice']:5d} {s['failed_but_committed']:16d} "
            f"{s['longest_s']:7.2f}s {s['throughput']:7.1f}"
        )
    by_name = {s["setup"]: s for s in run.setups}
    stock, runner = by_name["stock"], by_name["pool+runner"]
    print(
        f"\nfailed requests stock/pool/pool+runner = {stock['failed']}/{by_name['pool']['failed']}"
        f"/{runner['failed']}"
        + (f" (stock x{stock['failed'] / runner['failed']:.0f})" if runner["failed"] else "")
        + f"; ok/s pool+runner/stock = {runner['throughput'] / max(stock['throughput'], 1e-9):.2f}"
    )
    for s in run.setups:
        if s["rows_without_request"]:
            print(f"{s['setup']}: {s['rows_without_request']} rows with no request (a bug here)")
    kinds = ("warm-up", *FAULTS)
    print("\nfailed requests (unknown outcomes) and the longest request, by the fault they met:")
    print(f"{'':12} " + " ".join(f"{k:>13}" for k in kinds))
    for s in run.setups:
        cells = [
            f"{s['failed_by_kind'].get(k, 0)} ({s['unknown_by_kind'].get(k, 0)})" for k in kinds
        ]
        print(f"{s['setup']:12} " + " ".join(f"{c:>13}" for c in cells))
        longest = [f"{s['longest_by_kind'].get(k, 0.0):.2f}s" for k in kinds]
        print(f"{'  longest':12} " + " ".join(f"{c:>13}" for c in longest))
    print("\nfailed requests by fault | phase | error:")
    for s in run.setups:
        print(f"  {s['setup']}:" + ("" if s["failed_by_kind_phase"] else " none"))
        for what, n in s["failed_by_kind_phase"].items():
            print(f"    {n:6d}  {what}")
    print(
        f"\nthe runner's re-runs: {runner['reruns']} "
        f"(runs per request: {runner['runs_per_request']})"
    )
    for what, n in (runner["reruns_by_fault"] | runner["reruns_by_phase_label"]).items():
        print(f"    {n:6d}  {what}")
    if runner["unknown_outcomes"]:
        groups: Counter[str] = Counter()
        for u in runner["unknown_outcomes"]:
            server = "" if u["server"] == "(not traced)" else f" | server: {u['server']}"
            groups[
                f"{u['fault'].split(' ')[0]} | committed={u['committed']}{server} | {u['message']}"
            ] += 1
        print("\nthe runner's unknown outcomes (committed: the row is there):")
        for what, n in groups.most_common():
            print(f"    {n:6d}  {what}")
    if any(set(s["commit_failures_server_saw"]) - {"(not traced)"} for s in run.setups):
        print("\nfailures in COMMIT, what the server's log shows of their session:")
        for s in run.setups:
            print(f"  {s['setup']}: {s['commit_failures_server_saw']}")
    if runner["failures_not_unknown"]:
        print("\nthe runner's other failed requests:")
        for f in runner["failures_not_unknown"]:
            print(
                f"    {f['at']:7.2f} s  {f['fault']:12} {f['phase']:8} "
                f"committed={f['committed']!s:5}  {f['message']}"
            )
    for s in run.setups:
        if s["pool_stats"]:
            print(f"{s['setup']} pool stats: {s['pool_stats']}")
    passed, reasons = verdict(runner)
    print(
        f"\nbar (issue 22) {run.driver}: "
        + ("PASS" if passed else "FAIL: " + "; ".join(reasons))
        + f" [runner: {runner['failed']} failed, {runner['unknown']} unknown, "
        f"{runner['rows_lost']} lost, {runner['written_twice']} twice]"
    )


def chart(runs: list[Run], path: str) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print(f"\nmatplotlib is not installed: no chart ({path}); pip install -e '.[bench]'")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    fig, axes = plt.subplots(
        len(SETUPS), len(runs), figsize=(7 * len(runs), 2.4 * len(SETUPS)), sharex=True,
        squeeze=False,
    )  # fmt: skip
    for col, run in enumerate(runs):
        for row, s in enumerate(run.setups):
            ax = axes[row][col]
            ok, failed = s["ok_per_second"], s["failed_per_second"]
            xs = [i * BUCKET for i in range(len(ok))]
            ax.bar(xs, ok, width=BUCKET, align="edge", color="#3a923a", label="ok")
            ax.bar(xs, failed, width=BUCKET, align="edge", bottom=ok, color="#d04040",
                   label="failed")  # fmt: skip
            for fault in run.faults:
                ax.axvspan(fault.at, max(fault.until, fault.at + 0.3), color="grey", alpha=0.2)
                if row == 0:
                    ax.text(fault.at, ax.get_ylim()[1] * 0.02, fault.name, fontsize=6,
                            rotation=90, va="bottom")  # fmt: skip
            ax.set_title(
                f"{run.driver}, {s['setup']}: {s['failed']} failed ({s['unknown']} unknown)",
                fontsize=9,
            )
            ax.set_ylabel("requests /s")
            if row == len(SETUPS) - 1:
                ax.set_xlabel("seconds (grey: a fault in force)")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nchart written to {path}")


def setup_logging(path: str | None) -> Callable[[str], None]:
    """Route every library warning to ``path`` (or nowhere); return the per-failure logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if path is None:
        root.addHandler(logging.NullHandler())
        return lambda line: None
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(relativeCreated)10.0f %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    return lambda line: logger.info("%s", line)


async def main_async(args: argparse.Namespace) -> list[Run]:
    log = setup_logging(args.log)
    runs = []
    for driver in args.drivers.split(","):
        print(f"{driver}: schedule of {args.seconds:g} s", flush=True)
        run = await run_one(driver, args, log)
        print_run(run)
        runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=170.0, help="length of each run")
    parser.add_argument("--workers", type=int, default=20, help="writers per setup")
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    parser.add_argument("--json", default=None, help="write every run's figures here")
    parser.add_argument("--png", default=None, help="write the chart here (needs matplotlib)")
    parser.add_argument("--log", default=None, help="write warnings and every failure here")
    parser.add_argument(
        "--trace-server",
        action="store_true",
        help="log every statement on the server; tell, for each failure in COMMIT, whether "
        "the COMMIT reached the session",
    )
    args = parser.parse_args()
    schedule(args.seconds)  # refuse a too short run before starting anything
    runs = asyncio.run(main_async(args))
    if len(runs) > 1:
        print("\nbar (issue 22), every run:")
        for run in runs:
            runner = next(s for s in run.setups if s["setup"] == "pool+runner")
            passed, reasons = verdict(runner)
            print(f"  {run.driver:8} " + ("PASS" if passed else "FAIL: " + "; ".join(reasons)))
    if args.json:
        document = [
            {
                "driver": run.driver, "seconds": run.seconds, "workers": run.workers,
                "date": run.date,
                "faults": [
                    {"name": f.name, "at": round(f.at, 3), "until": round(f.until, 3),
                     "note": f.note}
                    for f in run.faults
                ],
                "setups": run.setups,
                "bar_passed": verdict(
                    next(s for s in run.setups if s["setup"] == "pool+runner")
                )[0],
            }
            for run in runs
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps(document, indent=1))
        print(f"\nfigures written to {args.json}")
    if args.png:
        chart(runs, args.png)


if __name__ == "__main__":
    main()

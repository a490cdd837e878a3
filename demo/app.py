"""The FastAPI application: a few database endpoints, the pool's health, metrics and a live page."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, Field
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from fault_tolerant_pool import (
    ConnectRetriesExhausted,
    DatabaseUnreachable,
    PoolClosed,
    PoolStats,
    TransactionOutcomeUnknown,
    shutdown,
)

from . import db
from .embedded import CHAOS_STEPS, EmbeddedDatabase
from .patroni import LEADER_INTERVAL, PatroniDemo
from .reads import Reads, open_reads
from .settings import Settings
from .telemetry import (
    PoolCollector,
    ReadsCollector,
    RequestCounters,
    RequestObserver,
    db_span,
    render_metrics,
)

log = logging.getLogger("demo")

#: One sample a second, kept for ten minutes (the page shows the last five).
SAMPLE_INTERVAL = 1.0
HISTORY_LENGTH = 600
#: A connect failure this recent makes /health say "degraded".
DEGRADED_FOR = 10.0
#: The chaos steps /health lists (the latest; every step of the last few mixes).
CHAOS_STEPS_SHOWN = 24
#: Header the restart endpoint requires: a cross-site form cannot send it without a CORS
#: preflight, which this app never grants.
ADMIN_HEADER = "x-demo-action"

#: "cannot execute ... in a read-only transaction": the writer was demoted under the statement.
READ_ONLY_SQLSTATE = "25006"
#: The reason of a write whose COMMIT was cut in flight (``TransactionOutcomeUnknown``).
OUTCOME_UNKNOWN = "outcome_unknown"

_PAGE = Path(__file__).with_name("static") / "index.html"


class NoteIn(BaseModel):
    text: str = Field(min_length=1, max_length=500)


class DemoState:
    """Everything one app instance holds: the engine, counters, the history the page draws."""

    def __init__(
        self,
        settings: Settings,
        database: EmbeddedDatabase | None,
        patroni: PatroniDemo | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.patroni = patroni
        #: With ``patroni``: the writes each node took (by name, from ``inet_server_port()``),
        #: and the last one's node, port and time.
        self.writes_by_node: dict[str, int] = {}
        self.last_write: dict[str, Any] | None = None
        self.engine: AsyncEngine | None = None
        #: Where ``GET /notes/`` reads: through a ReplicaRouter on the standby, or on the writer.
        self.reads: Reads | None = None
        self.requests = RequestCounters()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(self.stats, self.requests, settings.service_name))
        self.registry.register(ReadsCollector(self.reads_health, settings.service_name))
        self.started_at = time.time()
        #: The restart, failover or standby rebuild under way (one at a time).
        self.database_task: asyncio.Task[None] | None = None
        url = settings.url
        self.driver = url.get_driver_name()
        host, port = first_host(url)
        self.server_attributes = {
            "server.address": host or "",
            "server.port": port or 5432,
            "db.namespace": url.database or "",
        }

    def stats(self) -> PoolStats | None:
        return db.pool_stats(self.engine) if self.engine is not None else None

    def reads_health(self) -> dict[str, Any]:
        return self.reads.health() if self.reads is not None else {"routed": False}

    @property
    def db_state(self) -> str:
        if self.patroni is not None:
            return self.patroni.state
        return self.database.state if self.database is not None else "external"

    def count_write(self, note: dict[str, Any]) -> None:
        """On the Patroni cluster: which node took a write (its server port names it)."""
        assert self.patroni is not None
        port = note.get("server_port")
        name = self.patroni.node_name(port) or f"port {port}"
        note["server_node"] = name
        self.writes_by_node[name] = self.writes_by_node.get(name, 0) + 1
        self.last_write = {"node": name, "port": port, "at": round(time.time(), 3)}

    async def poll_patroni_forever(self) -> None:
        """Ask Patroni which node leads, about once a second, in a thread (HTTP calls)."""
        assert self.patroni is not None
        while True:
            try:
                await asyncio.to_thread(self.patroni.refresh)
            except Exception:  # the page shows the last answer; the next poll tries again
                log.debug("polling Patroni failed", exc_info=True)
            await asyncio.sleep(LEADER_INTERVAL)

    def patroni_health(self) -> dict[str, Any]:
        assert self.patroni is not None
        cluster = self.patroni
        return {
            "route": cluster.route,
            "leader": cluster.leader,
            "leader_checked_at": None if cluster.leader_checked_at is None
            else round(cluster.leader_checked_at, 3),
            "busy": cluster.busy,
            "activity": cluster.activity,
            "nodes": cluster.nodes(self.writes_by_node),
            "writes": dict(self.writes_by_node),
            "last_write": self.last_write,
            "actions": [action.as_dict() for action in cluster.actions],
        }  # fmt: skip

    def sample(self) -> dict[str, Any]:
        stats = self.stats()
        requests = self.requests
        return {
            "t": round(time.time(), 3),
            "idle": stats.checked_in if stats else 0,
            "used": stats.checked_out if stats else 0,
            "attempts": stats.attempts if stats else 0,
            "failures": stats.failed_attempts if stats else 0,
            "give_ups": stats.give_ups if stats else 0,
            "fast_failures": stats.fast_failures if stats else 0,
            "connect_state": stats.connect_state if stats else "healthy",
            "ok": requests.ok,
            "unavailable": requests.unavailable,
            "errors": requests.errors,
            "in_flight": requests.in_flight,
            "slowest_ms": round(requests.take_slowest() * 1000, 1),
            "oldest_checkout_s": _rounded(stats.oldest_checkout_age if stats else None),
            "leaks": stats.leaks if stats else 0,
            "retries": stats.transaction_retries if stats else 0,
            "unknown": stats.outcomes_unknown if stats else 0,
            "db": self.db_state,
        }

    async def sample_forever(self) -> None:
        while True:
            self.history.append(self.sample())
            await asyncio.sleep(SAMPLE_INTERVAL)

    def health(self) -> dict[str, Any]:
        """The pool's state as JSON: no URL, host, user or password, ever."""
        now = time.time()
        stats = self.stats()
        pool: dict[str, Any] = {"kind": self.settings.pool}
        if self.engine is not None and stats is not None:
            last = stats.last_error
            pool.update(
                {
                    "class": type(self.engine.pool).__name__,
                    "size": stats.size,
                    "max_overflow": self.settings.max_overflow if self.settings.pool == "queue"
                    else None,
                    "idle": stats.checked_in,
                    "used": stats.checked_out,
                    "checked_out": stats.checked_out,
                    "overflow": stats.overflow,
                    "connects": stats.connects,
                    "connect_attempts": stats.attempts,
                    "connect_failures": stats.failed_attempts,
                    "give_ups": stats.give_ups,
                    "oldest_checkout_age": _rounded(stats.oldest_checkout_age),
                    "leak_threshold": self.settings.leak_threshold,
                    "leaks": stats.leaks,
                    "leaks_reclaimed": stats.leaks_reclaimed,
                    "leaks_at_shutdown": stats.leaks_at_shutdown,
                    # the probe (issue 11): one attempt at a time while connects fail, fail-fast
                    # once they have failed for a whole retry deadline
                    "connect_state": stats.connect_state,
                    "unreachable_since": None if stats.unreachable_since is None
                    else round(stats.unreachable_since, 3),
                    "outage_attempts": stats.outage_attempts,
                    "outages": stats.outages,
                    "last_outage_seconds": None if stats.last_outage is None
                    else round(stats.last_outage, 2),
                    "fast_failures": stats.fast_failures,
                    "waiting": stats.waiting,
                    "rejected_waiting": stats.rejected_waiting,
                    # the transaction runner (issue 22): writes run again after a failure that
                    # left nothing behind, and those whose COMMIT was cut in flight
                    "transaction_retries": stats.transaction_retries,
                    "outcomes_unknown": stats.outcomes_unknown,
                    # ... and those settled by asking the server how the COMMIT ended
                    "outcomes_resolved": stats.outcomes_resolved,
                    "last_error": None if last is None else {
                        "class": last.error_class,
                        "sqlstate": last.sqlstate,
                        "at": round(last.at, 3),
                        "seconds_ago": round(max(0.0, now - last.at), 1),
                    },
                    "retry_deadline": self.settings.retry_deadline,
                }
            )  # fmt: skip
        recent_failure = (
            stats is not None
            and stats.last_error is not None
            and (now - stats.last_error.at < DEGRADED_FOR)
        )
        status = "ok"
        if self.engine is None or self.db_state not in ("running", "external") or recent_failure:
            status = "degraded"
        database: dict[str, Any] = {
            "driver": self.driver,
            "embedded": self.database is not None or self.patroni is not None,
            "state": self.db_state,
            "can_restart": self.database is not None,
        }
        if self.patroni is not None:
            database["patroni"] = self.patroni_health()
        if self.database is not None:
            embedded = self.database
            database["restarts"] = [
                {"number": r.number, "stopped_at": r.stopped_at, "started_at": r.started_at}
                for r in embedded.restarts
            ]
            # The embedded servers run on this machine for the demo alone: their ports are
            # what the page shows to tell them apart.
            database["can_fail_over"] = embedded.can_fail_over
            database["busy"] = embedded.restarting
            database["chaos"] = {
                "runs": embedded.chaos_runs,
                "running": embedded.chaos_running,
                "steps": [asdict(step) for step in embedded.chaos_steps[-CHAOS_STEPS_SHOWN:]],
            }
            database["servers"] = embedded.servers()
            database["failovers"] = [
                {"number": f.number, "from_port": f.from_port, "to_port": f.to_port,
                 "demoted_at": f.demoted_at, "promoted_at": f.promoted_at}
                for f in embedded.failovers
            ]  # fmt: skip
        return {
            "status": status,
            "service": self.settings.service_name,
            "time": round(now, 3),
            "uptime_seconds": round(now - self.started_at, 1),
            "pool": pool,
            "database": database,
            "requests": self.requests.as_dict(),
            # GET /notes/: on which server (by name and port), and why the writer took some
            "reads": self.reads_health(),
            # POST /notes/ runs in the transaction runner; idempotent: a COMMIT cut in flight is
            # run again too (the write carries a key of its own)
            "writes": {"idempotent": self.settings.idempotent_writes},
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def first_host(url: URL) -> tuple[str | None, int | None]:
    """The host and port of a URL; of its first host for a multi-host URL (``?host=h1:p1&...``)."""
    hosts = url.query.get("host")
    if url.host is not None or not hosts:
        return url.host, url.port
    first = hosts if isinstance(hosts, str) else hosts[0]
    if first.startswith("[") and "]" in first:
        host, _, rest = first[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = first.partition(":")
    return host or None, int(port) if port.isdigit() else None


def database_error_body(exc: BaseException) -> dict[str, Any]:
    """A 503 body that says what happened in terms of classes and SQLSTATEs, never messages.

    Driver messages can carry host names, user names or (before scrubbing) connection strings;
    the reason is built from structured fields only.
    """
    if isinstance(exc, TransactionOutcomeUnknown):
        # Not "unavailable": the write may have been committed. No Retry-After either, as
        # sending it again may write it twice.
        return {
            "error": "outcome unknown",
            "reason": OUTCOME_UNKNOWN,
            "detail": (
                f"the connection broke while COMMIT was in flight (run {exc.attempts}): the write "
                "may or may not have been committed, and it was not run again"
            ),
            "error_class": type(exc.orig).__name__,
            "sqlstate": _sqlstate(exc.orig),
        }
    if isinstance(exc, PoolClosed):
        return {
            "error": "database unavailable",
            "reason": "shutting_down",
            "detail": "the service is shutting down",
            "error_class": type(exc).__name__,
            "sqlstate": None,
        }
    orig = getattr(exc, "orig", None)
    if isinstance(orig, DatabaseUnreachable):
        return {
            "error": "database unavailable",
            "reason": "database_unreachable",
            "detail": (
                f"failing fast: unreachable for {max(time.time() - orig.unreachable_since, 0):.0f}s"
                f" ({orig.outage_attempts} failed attempts); a probe retries"
            ),
            "error_class": type(orig.last_error).__name__,
            "sqlstate": _sqlstate(orig) or _sqlstate(orig.last_error),
        }
    if isinstance(orig, ConnectRetriesExhausted):
        last = orig.last_error
        return {
            "error": "database unavailable",
            "reason": "connect_retries_exhausted" if orig.transient else "connect_failed",
            "detail": (
                f"could not connect after {orig.attempts} attempt"
                f"{'s' if orig.attempts != 1 else ''} in {orig.elapsed:.1f}s"
                + ("" if orig.transient else " (permanent error, not retried)")
            ),
            "error_class": type(last).__name__,
            "sqlstate": _sqlstate(orig) or _sqlstate(last),
        }
    if isinstance(exc, sa.exc.TimeoutError):
        return {
            "error": "database unavailable",
            "reason": "pool_timeout",
            "detail": "no pooled connection became free within pool_timeout",
            "error_class": type(exc).__name__,
            "sqlstate": None,
        }
    sqlstate = _sqlstate(orig) or _sqlstate(exc)
    cause = orig if orig is not None else exc
    if sqlstate is not None and (sqlstate.startswith("28") or sqlstate == "3D000"):
        # Only a login fails this way (authentication, unknown database). Reached only if a
        # driver's own exception escapes SQLAlchemy's wrapper and the pool's.
        return {
            "error": "database unavailable",
            "reason": "connect_failed",
            "detail": "the database refused the login (permanent error, not retried)",
            "error_class": type(cause).__name__,
            "sqlstate": sqlstate,
        }
    if sqlstate == READ_ONLY_SQLSTATE:
        return {
            "error": "database unavailable",
            "reason": "server_read_only",
            "detail": "the server turned read-only (a failover); the statement was not replayed",
            "error_class": type(cause).__name__,
            "sqlstate": sqlstate,
        }
    lost = (
        (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)
        or isinstance(cause, OSError)
        or (sqlstate is not None and (sqlstate.startswith("08") or sqlstate.startswith("57P")))
    )
    if lost:
        return {
            "error": "database unavailable",
            "reason": "connection_lost",
            "detail": "the connection broke while the statement ran; it was not replayed",
            "error_class": type(cause).__name__,
            "sqlstate": sqlstate,
        }
    return {
        "error": "database error",
        "reason": "database_error",
        "detail": "the database refused the statement",
        "error_class": type(cause).__name__,
        "sqlstate": sqlstate,
    }


def _raw_driver_errors() -> tuple[type[Exception], ...]:
    """Driver exceptions that could reach the app without SQLAlchemy's wrapper: a safety net.

    SQLAlchemy 2.0's asyncpg adapter does not wrap connect-time errors; the pool wraps those that
    carry a SQLSTATE, and this keeps the answer a clean 503 should any other one get through.
    """
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        return ()
    return (asyncpg.PostgresError, asyncpg.InterfaceError)


def _sqlstate(error: object) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(error, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):  # Starlette's TestClient says "testclient"
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    settings: Settings,
    *,
    database: EmbeddedDatabase | None = None,
    patroni: PatroniDemo | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The demo app on ``settings.database_url``.

    ``database``: the embedded server behind that URL, if the demo started it; only then is the
    restart endpoint there. ``patroni``: the Patroni cluster behind that URL (``--patroni``);
    only then are the switchover and kill-leader endpoints there. ``on_ready`` runs once the
    schema exists (the CLI prints its URLs).
    """
    if database is not None and patroni is not None:
        raise ValueError("the demo runs on an embedded database or a Patroni cluster, not both")
    state = DemoState(settings, database, patroni)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine = db.make_engine(settings)
        sampler = asyncio.create_task(state.sample_forever())
        leader_poll = (
            asyncio.create_task(state.poll_patroni_forever()) if patroni is not None else None
        )
        try:
            await db.create_schema(state.engine, settings.startup_timeout)
            # After the schema: its COMMIT is nobody's write to read back (read-your-writes).
            state.reads = open_reads(settings, state.engine, database)
            await state.reads.start()
            if on_ready is not None:
                on_ready()
            yield
        finally:
            for task in (sampler, leader_poll):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if patroni is not None:
                patroni.stop_actions()  # a restore under way gives up within seconds
            if database is not None:
                database.stop_actions()  # a chaos mix under way ends after its current step
            if state.database_task is not None:
                with contextlib.suppress(Exception):
                    await state.database_task
            if state.reads is not None:
                try:
                    await state.reads.aclose()  # the router's checks, then the readers' engines
                except Exception:  # the writer's own shutdown below must still run
                    log.exception("closing the reads' router and engines failed")
            # The lifespan recipe of docs/leaks.md: uvicorn has let the in-flight requests
            # finish; what still holds a connection gets shutdown_timeout seconds, then it is
            # closed and reported as a leak (with its task and checkout site).
            report = await shutdown(state.engine, settings.shutdown_timeout)
            if not report.clean:
                log.warning("shut down with %d connection(s) still out", report.stragglers)
            await state.engine.dispose()

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's own OpenTelemetry (recent versions) would duplicate RequestObserver's spans
        # and durations; one behaviour across FastAPI versions is easier to explain.
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="fault_tolerant_pool demo",
        description="A service on FaultTolerantQueuePool / FaultTolerantNullPool.",
        lifespan=lifespan,
        **options,
    )
    app.state.demo = state
    app.add_middleware(RequestObserver, counters=state.requests)

    def engine() -> AsyncEngine:
        if state.engine is None:
            raise RuntimeError("the app is not started (lifespan not run)")
        return state.engine

    def reads() -> Reads:
        if state.reads is None:
            raise RuntimeError("the app is not started (lifespan not run)")
        return state.reads

    # -- errors ------------------------------------------------------------------------------------

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        body = database_error_body(exc)
        log.warning(
            "%s %s -> %s (%s, %s)",
            request.method, request.url.path, body["reason"], body["error_class"],
            body["sqlstate"],
        )  # fmt: skip
        unknown = body["reason"] == OUTCOME_UNKNOWN
        return JSONResponse(body, status_code=503, headers={} if unknown else {"Retry-After": "1"})

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal error", "error_class": type(exc).__name__}, status_code=500
        )

    for error in (
        sa.exc.DBAPIError, sa.exc.TimeoutError, OSError, PoolClosed, *_raw_driver_errors()
    ):  # fmt: skip
        app.add_exception_handler(error, database_unavailable)
    app.add_exception_handler(Exception, internal_error)

    # -- database endpoints ------------------------------------------------------------------------

    server = state.server_attributes

    @app.get("/pg_version/")
    async def pg_version() -> dict[str, str]:
        """The database server's version string."""
        with db_span("SELECT", None, server):
            return {"version": await db.server_version(engine())}

    @app.post("/notes/", status_code=201)
    async def add_note(note: NoteIn) -> dict[str, Any]:
        """Write a row as one unit of work in the transaction runner (run again on a fresh
        connection when a fault cut it); its id and the server that took it come back."""
        with db_span("INSERT", "demo_notes", server):
            written = await db.add_note(engine(), note.text, idempotent=settings.idempotent_writes)
        if state.patroni is not None:
            state.count_write(written)
        return written

    @app.get("/notes/")
    async def list_notes(limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        """The newest rows and how many there are: on a standby when the demo has one (a
        ReplicaRouter's reads, in the transaction runner), else on the writer."""
        with db_span("SELECT", "demo_notes", server):
            count, notes = await reads().run(lambda conn: db.latest_notes(conn, limit))
        return {"count": count, "notes": notes}

    @app.get("/notes/{note_id}")
    async def get_note(note_id: int) -> dict[str, Any]:
        """One row, read where ``GET /notes/`` reads (a standby may not have replayed a write
        of the last few milliseconds yet)."""
        with db_span("SELECT", "demo_notes", server):
            note = await reads().run(lambda conn: db.get_note(conn, note_id))
        if note is None:
            raise HTTPException(404, f"no note {note_id}")
        return note

    # -- the pool, metrics, the page ---------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The pool's state (no database round trip)."""
        return state.health()

    @app.get("/health/history")
    async def history(after: float = 0.0) -> dict[str, Any]:
        """One sample a second for the last ten minutes; only those newer than ``after``."""
        return {
            "interval": SAMPLE_INTERVAL,
            "samples": [s for s in state.history if s["t"] > after],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: OpenTelemetry metrics of the process and the pool's own counters."""
        return Response(render_metrics(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    @app.post("/_demo/hold")
    async def hold(
        request: Request, seconds: float = Query(15.0, gt=0.0, le=60.0)
    ) -> dict[str, Any]:
        """Keep a connection checked out for ``seconds``: a slow request, or (past the pool's
        leak_threshold) a leak report in the log and on the page."""
        if request.headers.get(ADMIN_HEADER) != "hold":
            raise HTTPException(403, f"send the header {ADMIN_HEADER}: hold")
        if not _is_loopback(request.client.host if request.client else None):
            raise HTTPException(403, "only from this machine")
        with db_span("SELECT", None, server):
            return {"held": await db.hold_connection(engine(), seconds)}

    def admit(request: Request, action: str) -> None:
        """Refuse an action without its header (no cross-site form can send one) or from
        another machine."""
        if request.headers.get(ADMIN_HEADER) != action:
            raise HTTPException(403, f"send the header {ADMIN_HEADER}: {action}")
        if not _is_loopback(request.client.host if request.client else None):
            raise HTTPException(403, "only from this machine")

    if patroni is not None:

        def begin(request: Request, action: str) -> dict[str, Any]:
            admit(request, action)
            refused = patroni.begin()
            if refused is not None:
                raise HTTPException(409, refused)
            return {"action": len(patroni.actions) + 1, "kind": action, "leader": patroni.leader}

        @app.post("/_demo/switchover", status_code=202)
        async def switchover(request: Request) -> dict[str, Any]:
            """Patroni's planned switchover: the leader hands over to the replica, then the old
            leader rejoins as a replica (the restore step)."""
            answer = begin(request, "switchover")
            state.database_task = asyncio.create_task(asyncio.to_thread(patroni.switchover))
            return answer

        @app.post("/_demo/kill-leader", status_code=202)
        async def kill_leader(request: Request) -> dict[str, Any]:
            """SIGKILL the leader's postmaster; Patroni starts it again in place."""
            answer = begin(request, "kill-leader")
            state.database_task = asyncio.create_task(asyncio.to_thread(patroni.kill_leader))
            return answer

    if database is not None:

        @app.post("/_demo/restart-db", status_code=202)
        async def restart_db(
            request: Request, down_for: float = Query(2.0, ge=0.0, le=30.0)
        ) -> dict[str, Any]:
            """Restart the embedded PostgreSQL (fast shutdown, down for ``down_for`` seconds)."""
            admit(request, "restart-db")
            if not database.begin_restart():
                raise HTTPException(409, "a restart is already under way")
            number = len(database.restarts) + 1
            state.database_task = asyncio.create_task(asyncio.to_thread(database.restart, down_for))
            return {"restart": number, "down_for": down_for, "state": "stopping"}

        @app.post("/_demo/failover", status_code=202)
        async def failover(
            request: Request, gap: float = Query(1.0, ge=0.0, le=10.0)
        ) -> dict[str, Any]:
            """Turn the writer read-only, then ``gap`` seconds later promote the standby."""
            admit(request, "failover")
            refused = database.begin_failover()
            if refused is not None:
                raise HTTPException(409, refused)
            assert database.standby is not None
            answer = {
                "failover": len(database.failovers) + 1,
                "from_port": database.primary.port,
                "to_port": database.standby.port,
                "gap": gap,
                "state": "failing over",
            }
            state.database_task = asyncio.create_task(asyncio.to_thread(database.failover, gap))
            return answer

        @app.post("/_demo/chaos", status_code=202)
        async def chaos(
            request: Request, pause: float = Query(5.0, ge=0.5, le=30.0)
        ) -> dict[str, Any]:
            """The chaos mix on the writer, steps ``pause`` seconds apart: terminate every
            client session, a fast restart (down 2 s), a crash (immediate stop, started again at
            once), terminate every session again."""
            admit(request, "chaos")
            refused = database.begin_chaos()
            if refused is not None:
                raise HTTPException(409, refused)
            answer = {
                "chaos": database.chaos_runs,
                "pause": pause,
                "steps": [kind for kind, _ in CHAOS_STEPS],
                "port": database.primary.port,
            }
            state.database_task = asyncio.create_task(asyncio.to_thread(database.chaos, pause))
            return answer

        @app.post("/_demo/rebuild-standby", status_code=202)
        async def rebuild_standby(request: Request) -> dict[str, Any]:
            """Replace the demoted server by a fresh standby of the writer, on its port."""
            admit(request, "rebuild-standby")
            refused = database.begin_rebuild()
            if refused is not None:
                raise HTTPException(409, refused)
            assert database.demoted is not None
            answer = {"port": database.demoted.port, "upstream_port": database.primary.port}
            state.database_task = asyncio.create_task(asyncio.to_thread(database.rebuild_standby))
            return answer

        @app.get("/_demo/servers")
        async def servers() -> dict[str, Any]:
            """Each embedded server as it describes itself: ``pg_is_in_recovery()`` and
            ``default_transaction_read_only`` (asked with psql, not through the pool)."""
            return {"servers": await asyncio.to_thread(database.inspect)}

    return app
